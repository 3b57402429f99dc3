"""The benchmark workloads: what is sent, in what order, and to engines that cost what.

Parameter names follow SGLang's ``bench_serving --dataset-name generated-shared-prefix``
(``num_groups``, ``prompts_per_group``, ``system_prompt_len``, ``question_len``,
``output_len``) and the multi-round QA benchmarks (``num_users``, ``num_rounds``) where they
match. Lengths are in characters: the simulated engine's tokenizer maps one character to one
token, and the routers' prefix trees count characters too.

* ``shared_prefix`` -- ``num_groups`` system prompts, each shared by ``prompts_per_group``
  questions; requests of all groups are interleaved (in a seeded random order) at a fixed
  concurrency. Affinity pays: a group's system prompt is prefilled once per engine it
  reaches.
* ``multi_turn`` -- ``num_users`` conversations of ``num_rounds`` rounds over one shared
  system prompt; each round resends the whole history plus a new question, and the answer
  is appended to the history. Users run concurrently, rounds of one user one after another.
* ``burst`` -- ``num_requests`` requests sharing one system prompt, all sent at once, far
  more than ``--balance-abs-threshold`` (64): affinity alone would pile them onto one engine,
  which is the failure the load accounting exists to prevent.
* ``overhead`` -- unique short prompts to engines with zero prefill and decode time, at a
  fixed concurrency (closed loop): what the router itself costs, in CPU and in throughput.
  ``overhead_chat`` is the same with streamed chat, ``overhead_generate`` with
  non-streamed SGLang ``/generate``, and ``embeddings`` with ``/v1/embeddings`` of 1-8 KiB
  inputs (the simulated engine answers 4-16 KiB).
* ``overhead_paced`` -- the same prompts sent open loop at a fixed rate below saturation:
  the latency the router adds to a request when nobody queues.

:class:`PDRequests` is the prefill/decode benchmark's workload (``benchmarks/pd.py``):
``overhead``'s shape for one request kind -- SGLang's ``/generate`` or chat, streamed or
not.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import aiohttp

from benchmarks.loadgen import (
    Outcome,
    json_request,
    run_closed_loop,
    run_paced,
    stream_request,
)

__all__ = [
    "REQUEST_KINDS",
    "SIZES",
    "WORKLOAD_NAMES",
    "Burst",
    "MultiTurn",
    "Overhead",
    "PDRequests",
    "SharedPrefix",
    "Workload",
    "make_workloads",
    "request_body",
]

MODEL = "sim-model"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"

#: Engines that behave like a small GPU: 20 µs of prefill per uncached character, 2 ms per
#: generated token, 8 requests decoded at once, a prefix cache of 24,000 characters (small
#: enough that scattering prefixes over the fleet evicts them).
SIMULATED_ENGINE: dict[str, Any] = {
    "prefill_seconds_per_char": 20e-6,
    "decode_seconds_per_token": 2e-3,
    "max_running": 8,
    "capacity": 24_000,
}

#: Engines that answer at once: the router's own cost is all that is left to measure.
INSTANT_ENGINE: dict[str, Any] = {
    "prefill_seconds_per_char": 0.0,
    "decode_seconds_per_token": 0.0,
    "max_running": 1024,
    "capacity": 24_000,
}


def _simulated_engine(capacity: int | None, block_size: int | None) -> dict[str, Any]:
    """:data:`SIMULATED_ENGINE` with another cache size and/or block-based caching."""
    knobs = dict(SIMULATED_ENGINE)
    if capacity is not None:
        knobs["capacity"] = capacity
    if block_size is not None:
        knobs["block_size"] = block_size
    return knobs


_VOCABULARY = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega cache prefix router engine token batch queue prompt "
    "system user assistant answer question memory tensor kernel stream latency tree radix "
    "node edge worker load balance fleet shard model layer head block page"
)
_WORDS = tuple(_VOCABULARY.split())


def random_text(rng: random.Random, length: int) -> str:
    """``length`` characters of random words: distinct texts diverge within a word or two."""
    words: list[str] = []
    size = 0
    while size <= length:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:length]


def _completion_body(prompt: str, output_len: int) -> bytes:
    return request_body("completions_stream", prompt, output_len)


def _chat_body(system: str, question: str, output_len: int) -> bytes:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    payload = {"model": MODEL, "messages": messages, "max_tokens": output_len, "stream": True}
    return json.dumps(payload).encode()


async def _stream_all(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], concurrency: int
) -> list[Outcome]:
    jobs = (partial(stream_request, session, url, body) for body in bodies)
    return await run_closed_loop(concurrency, jobs)


@dataclass(frozen=True)
class Workload:
    """Base class: a name, the engines' knobs, and ``run`` against one base URL."""

    name: str = field(init=False, default="")
    concurrency: int = 64

    @property
    def engine_knobs(self) -> dict[str, Any]:
        return dict(SIMULATED_ENGINE)

    @property
    def in_flight(self) -> int:
        """The most requests this workload has in flight at once."""
        return self.concurrency

    @property
    def connections(self) -> int:
        """Client sockets needed: one per request in flight."""
        return self.in_flight

    def params(self) -> dict[str, Any]:
        return {**asdict(self), "concurrency": self.in_flight}

    async def run(
        self, session: aiohttp.ClientSession, base_url: str, rng: random.Random
    ) -> list[Outcome]:
        raise NotImplementedError


@dataclass(frozen=True)
class SharedPrefix(Workload):
    name: str = field(init=False, default="shared_prefix")
    num_groups: int = 16
    prompts_per_group: int = 32
    system_prompt_len: int = 2000
    question_len: int = 200
    output_len: int = 16
    concurrency: int = 64
    #: Streaming chat (a system and a user message) instead of completions.
    chat: bool = False
    #: The engines' prefix-cache size in characters (None: the default engine's).
    capacity: int | None = None
    #: Engines cache (and publish KV events) in blocks of this many tokens (None: not).
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.chat:
            object.__setattr__(self, "name", "shared_prefix_chat")

    @property
    def engine_knobs(self) -> dict[str, Any]:
        return _simulated_engine(self.capacity, self.block_size)

    async def run(
        self, session: aiohttp.ClientSession, base_url: str, rng: random.Random
    ) -> list[Outcome]:
        systems = [random_text(rng, self.system_prompt_len) for _ in range(self.num_groups)]
        pairs = [
            (systems[i % self.num_groups], random_text(rng, self.question_len))
            for i in range(self.num_groups * self.prompts_per_group)
        ]
        # Interleaved in a seeded random order: a fixed stride (group i % G) would line up
        # with round robin's own stride whenever G and the engine count share a factor.
        rng.shuffle(pairs)
        if self.chat:
            bodies = [_chat_body(system, question, self.output_len) for system, question in pairs]
            return await _stream_all(session, base_url + CHAT, bodies, self.concurrency)
        bodies = [
            _completion_body(system + "\n" + question, self.output_len)
            for system, question in pairs
        ]
        return await _stream_all(session, base_url + COMPLETIONS, bodies, self.concurrency)


@dataclass(frozen=True)
class MultiTurn(Workload):
    name: str = field(init=False, default="multi_turn")
    num_users: int = 32
    num_rounds: int = 6
    system_prompt_len: int = 1000
    question_len: int = 200
    output_len: int = 32
    #: Engines cache (and publish KV events) in blocks of this many tokens (None: not).
    block_size: int | None = None

    @property
    def in_flight(self) -> int:
        return self.num_users

    @property
    def engine_knobs(self) -> dict[str, Any]:
        return _simulated_engine(None, self.block_size)

    async def run(
        self, session: aiohttp.ClientSession, base_url: str, rng: random.Random
    ) -> list[Outcome]:
        system = random_text(rng, self.system_prompt_len)
        questions = [
            [random_text(rng, self.question_len) for _ in range(self.num_rounds)]
            for _ in range(self.num_users)
        ]
        url = base_url + CHAT
        outcomes: list[Outcome] = []

        async def user(asks: list[str]) -> None:
            messages: list[dict[str, str]] = [{"role": "system", "content": system}]
            for question in asks:
                messages.append({"role": "user", "content": question})
                body = {
                    "model": MODEL,
                    "messages": messages,
                    "max_tokens": self.output_len,
                    "stream": True,
                }
                outcome = await stream_request(
                    session, url, json.dumps(body).encode(), collect_text=True
                )
                outcomes.append(outcome)
                if not outcome.ok:
                    return  # the conversation cannot go on without its answer
                messages.append({"role": "assistant", "content": outcome.text})

        await run_closed_loop(self.num_users, (partial(user, asks) for asks in questions))
        return outcomes


@dataclass(frozen=True)
class Burst(Workload):
    name: str = field(init=False, default="burst")
    num_requests: int = 480
    system_prompt_len: int = 2000
    question_len: int = 200
    output_len: int = 16
    #: Engines cache (and publish KV events) in blocks of this many tokens (None: not).
    block_size: int | None = None

    @property
    def in_flight(self) -> int:
        return self.num_requests

    @property
    def engine_knobs(self) -> dict[str, Any]:
        return _simulated_engine(None, self.block_size)

    async def run(
        self, session: aiohttp.ClientSession, base_url: str, rng: random.Random
    ) -> list[Outcome]:
        system = random_text(rng, self.system_prompt_len)
        bodies = [
            _completion_body(system + "\n" + random_text(rng, self.question_len), self.output_len)
            for _ in range(self.num_requests)
        ]
        return await _stream_all(session, base_url + COMPLETIONS, bodies, self.num_requests)


#: Every request kind: path and whether the answer is streamed. The PD benchmark's four
#: (:data:`PD_KINDS`), and for the overhead rows also streamed completions and embeddings.
PD_KINDS: dict[str, tuple[str, bool]] = {
    "generate_stream": ("/generate", True),
    "generate": ("/generate", False),
    "chat_stream": (CHAT, True),
    "chat": (CHAT, False),
}
REQUEST_KINDS: dict[str, tuple[str, bool]] = {
    "completions_stream": (COMPLETIONS, True),
    **PD_KINDS,
    "embeddings": (EMBEDDINGS, False),
}
#: Characters of an embeddings input: bodies of 1-8 KiB.
EMBEDDING_INPUT = (1000, 8100)


def request_body(kind: str, prompt: str, output_len: int) -> bytes:
    """One request of ``kind`` (:data:`REQUEST_KINDS`) for ``prompt``."""
    path, stream = REQUEST_KINDS[kind]
    payload: dict[str, Any]
    if path == "/generate":
        payload = {"text": prompt, "sampling_params": {"max_new_tokens": output_len}}
    elif path == CHAT:
        messages = [{"role": "user", "content": prompt}]
        payload = {"model": MODEL, "messages": messages, "max_tokens": output_len}
    elif path == COMPLETIONS:
        payload = {"model": MODEL, "prompt": prompt, "max_tokens": output_len}
    else:
        return json.dumps({"model": MODEL, "input": prompt}).encode()
    payload["stream"] = stream
    return json.dumps(payload).encode()


def send_all(
    session: aiohttp.ClientSession, kind: str, base_url: str, bodies: list[bytes]
) -> list[partial[Any]]:
    """One job per body: POST it to ``kind``'s path and read the (streamed or JSON) answer."""
    path, stream = REQUEST_KINDS[kind]
    send = stream_request if stream else json_request
    return [partial(send, session, base_url + path, body) for body in bodies]


#: The names of :class:`Overhead`'s closed-loop rows, by request kind.
_OVERHEAD_NAMES = {
    "completions_stream": "overhead",
    "chat_stream": "overhead_chat",
    "generate": "overhead_generate",
    "embeddings": "embeddings",
}


@dataclass(frozen=True)
class Overhead(Workload):
    """Unique prompts to engines that answer at once: the router's own cost. ``kind`` is
    the request (:data:`REQUEST_KINDS`): streamed completions (``overhead``), streamed
    chat (``overhead_chat``), non-streamed ``/generate`` (``overhead_generate``), or
    embeddings of 1-8 KiB inputs (``embeddings``)."""

    name: str = field(init=False, default="overhead")
    num_requests: int = 3000
    prompt_len: int = 200
    output_len: int = 1
    concurrency: int = 64
    #: Requests per second for an open-loop run; None for a closed loop at ``concurrency``.
    rate: float | None = None
    kind: str = "completions_stream"

    def __post_init__(self) -> None:
        if self.kind not in REQUEST_KINDS:
            raise ValueError(f"unknown request kind {self.kind!r}")
        name = "overhead_paced" if self.rate is not None else _OVERHEAD_NAMES.get(self.kind)
        object.__setattr__(self, "name", name or f"overhead_{self.kind}")

    @property
    def engine_knobs(self) -> dict[str, Any]:
        return dict(INSTANT_ENGINE)

    def _prompt(self, rng: random.Random) -> str:
        if self.kind == "embeddings":
            return random_text(rng, rng.randint(*EMBEDDING_INPUT))
        return random_text(rng, self.prompt_len)

    async def run(
        self, session: aiohttp.ClientSession, base_url: str, rng: random.Random
    ) -> list[Outcome]:
        bodies = [
            request_body(self.kind, self._prompt(rng), self.output_len)
            for _ in range(self.num_requests)
        ]
        jobs = send_all(session, self.kind, base_url, bodies)
        if self.rate is None:
            return await run_closed_loop(self.concurrency, jobs)
        return await run_paced(self.rate, self.concurrency, jobs)


@dataclass(frozen=True)
class PDRequests(Overhead):
    """:class:`Overhead` of one PD kind (:data:`PD_KINDS`) through a prefill/decode pair:
    what the router costs per PD request. The row is named after the kind."""

    num_requests: int = 2000
    kind: str = "generate_stream"

    def __post_init__(self) -> None:
        if self.kind not in PD_KINDS:
            raise ValueError(f"unknown PD request kind {self.kind!r}")
        object.__setattr__(self, "name", self.kind)


WORKLOAD_NAMES = (
    "shared_prefix",
    "multi_turn",
    "burst",
    "overhead",
    "overhead_chat",
    "overhead_generate",
    "embeddings",
    "overhead_paced",
)

#: Workload sizes. ``full`` is the published run; ``quick`` keeps the shapes at about a
#: quarter of the requests; ``smoke`` only proves the plumbing works (tests).
SIZES: dict[str, dict[str, Workload]] = {
    "full": {
        "shared_prefix": SharedPrefix(),
        "multi_turn": MultiTurn(),
        "burst": Burst(),
        "overhead": Overhead(),
        "overhead_chat": Overhead(kind="chat_stream"),
        "overhead_generate": Overhead(kind="generate"),
        "embeddings": Overhead(kind="embeddings"),
        "overhead_paced": Overhead(num_requests=1500, rate=250.0),
    },
    "quick": {
        "shared_prefix": SharedPrefix(num_groups=16, prompts_per_group=12, concurrency=32),
        "multi_turn": MultiTurn(num_users=16, num_rounds=4),
        "burst": Burst(),
        "overhead": Overhead(num_requests=1000),
        "overhead_chat": Overhead(num_requests=1000, kind="chat_stream"),
        "overhead_generate": Overhead(num_requests=1000, kind="generate"),
        "embeddings": Overhead(num_requests=1000, kind="embeddings"),
        "overhead_paced": Overhead(num_requests=500, rate=250.0),
    },
    "smoke": {
        "shared_prefix": SharedPrefix(
            num_groups=2,
            prompts_per_group=4,
            system_prompt_len=300,
            question_len=30,
            output_len=2,
            concurrency=4,
        ),
        "multi_turn": MultiTurn(
            num_users=2, num_rounds=2, system_prompt_len=200, question_len=30, output_len=2
        ),
        # Enough to queue on one engine: with fewer than its slots the spill gate (rightly)
        # spreads the burst and no engine sees a hit.
        "burst": Burst(num_requests=40, system_prompt_len=300, question_len=30, output_len=2),
        "overhead": Overhead(num_requests=20, concurrency=4),
        "overhead_chat": Overhead(num_requests=20, concurrency=4, kind="chat_stream"),
        "overhead_generate": Overhead(num_requests=20, concurrency=4, kind="generate"),
        "embeddings": Overhead(num_requests=20, concurrency=4, kind="embeddings"),
        "overhead_paced": Overhead(num_requests=10, concurrency=4, rate=100.0),
    },
}


def make_workloads(names: list[str], size: str) -> list[Workload]:
    """The named workloads at ``size`` (``full``, ``quick`` or ``smoke``), in order."""
    table = SIZES[size]
    return [table[name] for name in names]
