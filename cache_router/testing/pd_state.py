"""Prefill and decode roles for :class:`~cache_router.testing.SimulatedEngine`: one engine's side.

A router that pairs a prefill worker with a decode worker can only be tested against engines
that check the pairing: a decode engine that happily generates for any request would let a
router that sends the wrong room, the wrong params or no prefill at all pass every test.
So the simulated engines exchange a (simulated) KV cache the way real ones do, over real
loopback HTTP, and refuse what no prefill produced:

* **SGLang** (``pd_protocol="sglang"``, bootstrap rooms). The router adds ``bootstrap_host``,
  ``bootstrap_port`` and ``bootstrap_room`` (one room per item of a batch) and sends the
  same body to both engines at once. A prefill engine serves a bootstrap server on its own
  port (:attr:`PDState.app`, as SGLang's ``--disaggregation-bootstrap-port``); once it has
  prefilled a request it registers the request's rooms there (``POST /register_dp_rank``
  in SGLang's vocabulary). A decode engine asks ``bootstrap_host:bootstrap_port`` for its
  rooms (``POST /query_dp_ranks``) until all are there, and gives up after
  ``transfer_timeout`` seconds with the 500 a real SGLang decode sends when its KV transfer
  fails. A PD engine given no room answers 400, as SGLang does.
* **vLLM** (``pd_protocol="vllm"``, NixlConnector-style ``kv_transfer_params``). A prefill
  engine given ``kv_transfer_params.do_remote_decode = true`` records a transfer and returns
  ``kv_transfer_params`` (``do_remote_prefill: true``, ``remote_engine_id``,
  ``remote_block_ids``, ``remote_request_id``, ``remote_host``/``remote_port`` = its side
  channel) in its answer. A decode engine given those params claims the transfer from the
  side channel (``POST /transfers/claim``), waiting up to ``transfer_timeout`` seconds,
  then fails with 500 (vLLM's ``kv_load_failure_policy="fail"``). Without
  ``kv_transfer_params`` both serve the request normally, as vLLM does, and count it as
  unpaired so a test can tell that pairing did not happen.

A paired decode does no prefill of its own (the KV cache arrived), so its latency is decode
only and its decode speed (``decode_seconds_per_token``) is what decode-side balancing sees.
Stored rooms and transfers are bounded: they expire after ``pd_store_ttl`` seconds and the
oldest go first beyond ``pd_store_size``.

:class:`PDState` is one engine's part of this exchange; :mod:`cache_router.testing.pd`
starts a whole fleet (:func:`~cache_router.testing.pd.serve_pd_fleet`: HTTP servers and
side servers) for tests, demos and benchmarks.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp

from cache_router.core.errors import error_body

__all__ = [
    "NO_ROOM_MESSAGE",
    "PDProtocol",
    "PDRole",
    "PDState",
    "PDTicket",
    "sglang_logprobs",
]

PDRole = Literal["prefill", "decode"]
PDProtocol = Literal["sglang", "vllm"]

#: SGLang's 400 message for a PD engine reached without a bootstrap room.
NO_ROOM_MESSAGE = "Disaggregated request received without bootstrap room id"

#: Tokens per simulated KV block (vLLM's default block size).
_BLOCK_TOKENS = 16
_MAX_ROOM = 2**63 - 1
_FIRST_POLL = 0.002
_MAX_POLL = 0.05


class _BoundedStore:
    """Values by key that expire after ``ttl`` seconds; beyond ``capacity`` the oldest go.

    The TTL is the same for every entry, so insertion order is expiry order and both
    bounds are enforced from the head of one ordered dict in amortized O(1).
    """

    def __init__(self, capacity: int, ttl: float) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Any, value: Any) -> None:
        now = time.monotonic()
        self._expire(now)
        self._entries[key] = (now + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.evicted += 1

    def get(self, key: Any) -> Any | None:
        self._expire(time.monotonic())
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def pop(self, key: Any) -> Any | None:
        self._expire(time.monotonic())
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[1]

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            deadline = next(iter(entries.values()))[0]
            if deadline > now:
                return
            entries.popitem(last=False)
            self.expired += 1


def sglang_logprobs(prompt: str, generated: int, *, remote_kv: bool) -> dict[str, Any]:
    """SGLang's ``meta_info`` logprob fields for ``return_logprob`` (fixed, fake values).

    Entries are ``[logprob, token_id, None]`` (SGLang without ``return_text_in_logprobs``);
    the first input token has no logprob. A paired decode engine did not compute the
    prompt, so its ``input_token_logprobs`` is empty: SGLang's router puts the prefill's
    list in front of it, and a test sees whether that merge happened.
    """
    inputs: list[list[Any]] = []
    if not remote_kv:
        inputs = [[None if i == 0 else -1.0, ord(ch), None] for i, ch in enumerate(prompt)]
    outputs = [[-1.0, index, None] for index in range(generated)]
    return {"input_token_logprobs": inputs, "output_token_logprobs": outputs}


@dataclass(slots=True)
class PDTicket:
    """What one request carries for the PD exchange, parsed once when it arrives.

    ``rooms`` holds ``(bootstrap_host, bootstrap_port, room)`` per item (SGLang); ``params``
    the request's ``kv_transfer_params`` (vLLM). ``remote_kv`` is true on a decode engine:
    the prompt's KV cache comes from the prefill, so the decode does not prefill it.
    """

    state: PDState
    rooms: list[tuple[str, int | None, int]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    tokens: int = 0
    blocks: list[int] = field(default_factory=list)

    @property
    def remote_kv(self) -> bool:
        return self.state.role == "decode"

    async def claim(self) -> str | None:
        """Decode side: wait for the prefill's KV; ``None`` once it is there, else the error."""
        return await self.state.claim(self)

    def cap_tokens(self, max_tokens: int) -> int:
        """An SGLang prefill generates one token whatever the request asks for."""
        sglang_prefill = self.state.protocol == "sglang" and self.state.role == "prefill"
        return min(max_tokens, 1) if sglang_prefill else max_tokens

    def prefilled(self) -> None:
        """Prefill side: the prompt is computed, publish it to the decode."""
        self.state.publish(self)

    def decorate(self, answer: Any) -> None:
        """Prefill side (vLLM): add the ``kv_transfer_params`` the decode will need."""
        if (
            self.state.protocol == "vllm"
            and self.state.role == "prefill"
            and isinstance(answer, dict)
        ):
            answer["kv_transfer_params"] = self.state.transfer_params(self)


class PDState:
    """One engine's side of the PD exchange: parsing, the side server, the store, counters.

    Counters: ``paired`` (requests that took part in an exchange: published by a prefill,
    claimed by a decode), ``unpaired`` (vLLM requests without usable ``kv_transfer_params``,
    served as on a plain engine), ``registered`` (rooms or transfers a prefill stored),
    ``claimed`` (rooms or transfers a decode obtained), ``refused`` (decode requests failed
    after waiting), ``abandoned`` (decode requests whose client left while they waited),
    ``lookups``/``hits`` (side-server queries answered / found).
    """

    def __init__(
        self,
        *,
        role: PDRole,
        protocol: PDProtocol,
        name: str,
        transfer_timeout: float = 5.0,
        store_size: int = 10_000,
        store_ttl: float = 300.0,
        default_bootstrap_port: int | None = None,
    ) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError("role must be 'prefill' or 'decode'")
        if protocol not in ("sglang", "vllm"):
            raise ValueError("pd_protocol must be 'sglang' or 'vllm'")
        if transfer_timeout < 0 or store_size < 1 or store_ttl <= 0:
            raise ValueError("transfer_timeout >= 0, pd_store_size >= 1 and pd_store_ttl > 0")
        self.role: PDRole = role
        self.protocol: PDProtocol = protocol
        self.name = name
        self.transfer_timeout = transfer_timeout
        self.default_bootstrap_port = default_bootstrap_port
        self.engine_id = str(uuid.uuid4())
        self._store = _BoundedStore(store_size, store_ttl)
        self._blocks = itertools.count()
        self._side_host: str | None = None
        self._side_port: int | None = None
        self.paired = self.unpaired = self.registered = self.claimed = self.refused = 0
        self.abandoned = 0
        self.lookups = self.hits = 0
        self.app: ASGIApp | None = self._side_app() if role == "prefill" else None

    # -- configuration ------------------------------------------------------------------------

    def advertise(self, url: str) -> None:
        """Record where the side server listens (``http://host:port``).

        vLLM's prefill names it in the ``kv_transfer_params`` it returns.
        """
        parsed = httpx.URL(url)
        self._side_host, self._side_port = parsed.host, parsed.port

    def stats(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "protocol": self.protocol,
            "paired": self.paired,
            "unpaired": self.unpaired,
            "registered": self.registered,
            "claimed": self.claimed,
            "refused": self.refused,
            "abandoned": self.abandoned,
            "lookups": self.lookups,
            "hits": self.hits,
            "stored": len(self._store),
            "expired": self._store.expired,
            "evicted": self._store.evicted,
        }

    # -- request parsing ----------------------------------------------------------------------

    def ticket(
        self, body: Mapping[str, Any], prompts: Sequence[str], request_id: str
    ) -> PDTicket | None:
        """The request's PD fields, or ``None`` for a request served as on a plain engine.

        Raises :class:`ValueError` (a 400) for missing or malformed fields.
        """
        tokens = sum(map(len, prompts))
        if self.protocol == "sglang":
            rooms = _sglang_rooms(body, _batch_size(body, len(prompts)))
            return PDTicket(self, rooms=rooms, request_id=request_id, tokens=tokens)
        params = body.get("kv_transfer_params")
        if params is None:
            self.unpaired += 1
            return None
        if not isinstance(params, dict):
            raise ValueError("kv_transfer_params must be an object")
        wanted = "do_remote_decode" if self.role == "prefill" else "do_remote_prefill"
        if params.get(wanted) is not True:
            self.unpaired += 1
            return None
        if self.role == "decode":
            _check_remote(params)
        return PDTicket(self, params=params, request_id=request_id, tokens=tokens)

    # -- prefill side -------------------------------------------------------------------------

    def publish(self, ticket: PDTicket) -> None:
        if self.role != "prefill":
            return
        self.paired += 1
        if self.protocol == "sglang":
            for _, _, room in ticket.rooms:
                self._store.put(room, 0)
            self.registered += len(ticket.rooms)
            return
        count = max(1, -(-ticket.tokens // _BLOCK_TOKENS))
        ticket.blocks = [next(self._blocks) for _ in range(count)]
        self._store.put(ticket.request_id, ticket.blocks)
        self.registered += 1

    def transfer_params(self, ticket: PDTicket) -> dict[str, Any]:
        """NixlConnector's ``request_finished`` answer, pointing at this engine's side channel."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": ticket.blocks,
            "remote_engine_id": self.engine_id,
            "remote_request_id": ticket.request_id,
            "remote_host": self._side_host,
            "remote_port": self._side_port,
            "tp_size": 1,
        }

    def _side_app(self) -> ASGIApp:
        routes = [Route("/health", _health, methods=["GET"])]
        if self.protocol == "sglang":
            routes += [
                Route("/register_dp_rank", self._register_dp_rank, methods=["POST"]),
                Route("/query_dp_ranks", self._query_dp_ranks, methods=["POST"]),
            ]
        else:
            routes.append(Route("/transfers/claim", self._claim_transfer, methods=["POST"]))
        return Router(routes=routes, redirect_slashes=False)

    async def _register_dp_rank(self, request: Request) -> Response:
        data = await _json_object(request)
        room, rank = data.get("bootstrap_room"), data.get("dp_rank", 0)
        if not _is_room(room) or not isinstance(rank, int):
            return _side_error(400, "bootstrap_room and dp_rank must be integers")
        self._store.put(room, rank)
        self.registered += 1
        return PlainTextResponse("OK")

    async def _query_dp_ranks(self, request: Request) -> Response:
        rooms = (await _json_object(request)).get("bootstrap_rooms")
        if not isinstance(rooms, list) or not all(map(_is_room, rooms)):
            return _side_error(400, "bootstrap_rooms must be a list of integers")
        self.lookups += 1
        found = {}
        for room in rooms:
            rank = self._store.get(room)
            if rank is not None:
                found[str(room)] = rank
        self.hits += len(found)
        return JSONResponse(found)

    async def _claim_transfer(self, request: Request) -> Response:
        data = await _json_object(request)
        self.lookups += 1
        blocks = None
        if data.get("remote_engine_id") == self.engine_id:
            blocks = self._store.pop(data.get("remote_request_id"))
        if blocks is None:
            return _side_error(404, "no such transfer")
        self.hits += 1
        return JSONResponse({"remote_block_ids": blocks})

    # -- decode side --------------------------------------------------------------------------

    async def claim(self, ticket: PDTicket) -> str | None:
        if self.role != "decode":
            return None
        deadline = anyio.current_time() + self.transfer_timeout
        # Plain HTTP to loopback: verify=False skips building an SSL context (~20 ms).
        async with httpx.AsyncClient(trust_env=False, verify=False) as client:
            if self.protocol == "sglang":
                failure = await self._await_rooms(client, ticket, deadline)
            else:
                failure = await self._await_transfer(client, ticket, deadline)
        if failure is None:
            self.paired += 1
        else:
            self.refused += 1
        return failure

    async def _await_rooms(
        self, client: httpx.AsyncClient, ticket: PDTicket, deadline: float
    ) -> str | None:
        servers: dict[tuple[str, int | None], list[int]] = {}
        for host, port, room in ticket.rooms:
            servers.setdefault((host, port or self.default_bootstrap_port), []).append(room)
        for (host, port), rooms in servers.items():
            missing = set(rooms)
            if port is not None:
                url = f"http://{_url_host(host)}:{port}/query_dp_ranks"

                async def found(url: str = url, missing: set[int] = missing) -> bool:
                    response = await client.post(url, json={"bootstrap_rooms": sorted(missing)})
                    if response.status_code == 200:
                        missing.difference_update(int(room) for room in response.json())
                    return not missing

                await _poll(found, deadline)
            if missing:
                room = min(missing)
                return (
                    f"Decode transfer failed for request rid={ticket.request_id} "
                    f"bootstrap_room={room} with exception KVTransferError(bootstrap_room="
                    f"{room}): Failed to get kvcache from prefill instance, it might be dead"
                )
            self.claimed += len(rooms)
        return None

    async def _await_transfer(
        self, client: httpx.AsyncClient, ticket: PDTicket, deadline: float
    ) -> str | None:
        params = ticket.params
        url = f"http://{_url_host(params['remote_host'])}:{params['remote_port']}/transfers/claim"
        claim = {
            "remote_engine_id": params["remote_engine_id"],
            "remote_request_id": params["remote_request_id"],
        }

        async def found() -> bool:
            response = await client.post(url, json=claim)
            return response.status_code == 200

        if await _poll(found, deadline):
            self.claimed += 1
            return None
        return (
            f"KV transfer for request {ticket.request_id} failed: no transfer "
            f"{params['remote_request_id']} from engine {params['remote_engine_id']} at "
            f"{params['remote_host']}:{params['remote_port']} (kv_load_failure_policy=fail)"
        )


async def _poll(attempt: Any, deadline: float) -> bool:
    """Call ``attempt()`` until it returns true or ``deadline`` passes (connection errors retry)."""
    delay = _FIRST_POLL
    while True:
        remaining = deadline - anyio.current_time()
        try:
            with anyio.fail_after(max(remaining, 0.001)):
                if await attempt():
                    return True
        except (httpx.HTTPError, TimeoutError, ValueError):
            pass
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            return False
        await anyio.sleep(min(delay, remaining))
        delay = min(delay * 2, _MAX_POLL)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _health(request: Request) -> Response:
    return PlainTextResponse("OK")


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _side_error(status: int, message: str) -> Response:
    kind = "invalid_request_error" if status == 400 else "not_found_error"
    return Response(error_body(message, kind, status), status, media_type="application/json")


def _is_room(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ROOM


def _batch_size(body: Mapping[str, Any], prompts: int) -> int:
    """Items the router gave rooms for: ``n`` of a chat request, else one per prompt."""
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1 and "messages" in body:
        return n
    return prompts


def _per_item(value: object, size: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != size:
            raise ValueError(f"{name} has {len(value)} items for a batch of {size}")
        return value
    return [value] * size


def _sglang_rooms(body: Mapping[str, Any], size: int) -> list[tuple[str, int | None, int]]:
    room = body.get("bootstrap_room")
    if room is None or room == []:
        raise ValueError(NO_ROOM_MESSAGE)
    if size > 1 and not isinstance(room, list):
        raise ValueError(f"bootstrap_room must be a list of {size} rooms for a batch")
    rooms = _per_item(room, size, "bootstrap_room")
    hosts = _per_item(body.get("bootstrap_host"), size, "bootstrap_host")
    ports = _per_item(body.get("bootstrap_port"), size, "bootstrap_port")
    items = []
    for host, port, item in zip(hosts, ports, rooms, strict=True):
        if not _is_room(item):
            raise ValueError("bootstrap_room must be an integer in 0..2**63-1")
        if not isinstance(host, str) or not host:
            raise ValueError("bootstrap_host must be a host name")
        if port is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536
        ):
            raise ValueError("bootstrap_port must be a port number or null")
        items.append((host, port, item))
    return items


def _check_remote(params: Mapping[str, Any]) -> None:
    for key, kind in (
        ("remote_engine_id", str),
        ("remote_request_id", str),
        ("remote_host", str),
        ("remote_port", int),
    ):
        if not isinstance(params.get(key), kind):
            raise ValueError(f"kv_transfer_params.{key} is missing or not a {kind.__name__}")
