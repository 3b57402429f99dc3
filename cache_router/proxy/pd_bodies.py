"""What the two halves of a prefill/decode request carry, and what is merged back.

Pure functions of the client's body and the engines' answers, kept apart from the
dispatch in :mod:`cache_router.proxy.pd` so they can be read (and tested) without it:
SGLang's bootstrap fields spliced into the body, vLLM's one-token prefill request and the
``kv_transfer_params`` it answers, and the prompt logprobs a prefill computed, prepended to
the decode's answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, cast

from cache_router.core.registry import Worker
from cache_router.proxy.responses import bad_request

__all__ = [
    "LogprobMerge",
    "batch_size",
    "input_logprobs",
    "transfer_params",
    "vllm_prefill_body",
    "wants_logprobs",
    "with_bootstrap",
    "with_fields",
]

#: Bootstrap rooms are random 63-bit integers (SGLang's range: a signed 64-bit id).
_ROOM_BITS = 63
#: What the vLLM prefill request asks: compute the prompt, keep its KV for a remote decode.
_REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
#: Fields a one-token prefill request must not carry (a minimum above one token is an error).
_DECODE_ONLY = frozenset({"stream_options", "min_tokens", "min_completion_tokens"})
_dumps = json.dumps


class LogprobMerge:
    """Prepends the prompt's ``meta_info.input_token_logprobs`` to a decode answer's: to
    the whole JSON answer, or to each server-sent event that carries them."""

    def __init__(self, prompt: list[Any], *, stream: bool) -> None:
        self._prompt = prompt
        self._stream = stream
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        self._pending += chunk
        if not self._stream:
            return b""
        complete, separator, rest = self._pending.rpartition(b"\n\n")
        if not separator:
            return b""
        self._pending = rest
        return b"".join(self._event(event) for event in complete.split(b"\n\n"))

    def end(self) -> bytes:
        rest, self._pending = self._pending, b""
        if self._stream:
            return rest
        merged = self._merged(rest)
        return rest if merged is None else merged

    def _event(self, event: bytes) -> bytes:
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            merged = self._merged(event[6:])
            if merged is not None:
                return b"data: " + merged + b"\n\n"
        return event + b"\n\n"

    def _merged(self, payload: bytes) -> bytes | None:
        try:
            answer = json.loads(payload)
        except ValueError:
            return None
        meta = answer.get("meta_info") if isinstance(answer, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("input_token_logprobs"), list):
            return None
        meta["input_token_logprobs"] = [*self._prompt, *meta["input_token_logprobs"]]
        return _dumps(answer, separators=(",", ":")).encode()


def wants_logprobs(path: str, parsed: Mapping[str, Any]) -> bool:
    """Whether the request asks for its prompt's logprobs (each API spells it its way)."""
    if path == "/generate":
        return bool(parsed.get("return_logprob"))
    if path == "/v1/completions":
        return parsed.get("logprobs") is not None
    return bool(parsed.get("logprobs"))


def input_logprobs(answer: bytes) -> list[Any] | None:
    """The prefill's ``meta_info.input_token_logprobs``: from its JSON answer, or from the
    last event of a streamed one that has them."""
    payloads = [answer]
    if not answer.lstrip().startswith(b"{"):
        payloads = [
            event[6:]
            for event in reversed(answer.split(b"\n\n"))
            if event.startswith(b"data: ") and event != b"data: [DONE]"
        ]
    for payload in payloads:
        try:
            parsed = json.loads(payload)
        except ValueError:
            continue
        meta = parsed.get("meta_info") if isinstance(parsed, dict) else None
        found = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
        if isinstance(found, list):
            return found
    return None


def batch_size(parsed: Mapping[str, Any]) -> int | None:
    """How many generations a request asks for at once, each needing its own bootstrap
    room (as SGLang's router counts them): ``n`` above 1, or a list of prompts in
    ``text``, ``prompt`` or ``input_ids``; None for a single one."""
    n = parsed.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        return n
    for name in ("text", "prompt", "input_ids"):
        items = parsed.get(name)
        if isinstance(items, list):
            if not items:
                raise bad_request(f"{name} is an empty list", "empty_batch")
            # A list of token ids is one prompt; a list of strings or of id lists, many.
            if name == "text" or isinstance(items[0], (str, list)):
                return len(items)
            return None
    return None


def with_bootstrap(
    body: bytes,
    parsed: Mapping[str, Any],
    prefill: Worker,
    batch: int | None,
    room: Callable[[int], int],
) -> bytes:
    """``body`` with the prefill worker's bootstrap address and a fresh room (one per item
    of a batch), as SGLang's prefill and decode servers both expect them."""
    host, port = prefill.bootstrap_host, prefill.bootstrap_port
    fields: dict[str, Any]
    if batch is None:
        fields = {
            "bootstrap_host": host,
            "bootstrap_port": port,
            "bootstrap_room": room(_ROOM_BITS),
        }
    else:
        fields = {
            "bootstrap_host": [host] * batch,
            "bootstrap_port": [port] * batch,
            "bootstrap_room": [room(_ROOM_BITS) for _ in range(batch)],
        }
    return with_fields(body, parsed, fields)


def with_fields(body: bytes, parsed: Mapping[str, Any], fields: Mapping[str, Any]) -> bytes:
    """``body`` (the JSON object ``parsed`` came from) with ``fields`` set.

    The fields are spliced in before the closing brace, so the client's bytes are not
    serialized again; a body that already names one of them is rebuilt, so the router's
    value is the only one (JSON parsers disagree on which of two equal keys wins).
    """
    if any(name in parsed for name in fields):
        return _dumps({**parsed, **fields}, separators=(",", ":")).encode()
    addition = _dumps(fields, separators=(",", ":")).encode()
    if not parsed:
        return addition
    return body.rstrip()[:-1] + b"," + addition[1:]


def vllm_prefill_body(parsed: Mapping[str, Any]) -> bytes:
    """The request for a vLLM prefill worker: compute the prompt, answer one token
    without streaming, keep the KV cache for the decode worker to pull."""
    request = {name: value for name, value in parsed.items() if name not in _DECODE_ONLY}
    request["kv_transfer_params"] = _REMOTE_DECODE
    request["stream"] = False
    request["max_tokens"] = 1
    if "max_completion_tokens" in request:
        request["max_completion_tokens"] = 1
    return _dumps(request, separators=(",", ":")).encode()


def transfer_params(content: bytes) -> dict[str, Any] | None:
    """The ``kv_transfer_params`` object of a vLLM prefill answer, or None."""
    try:
        answer = json.loads(content)
    except ValueError:
        return None
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    return cast(dict[str, Any], params) if isinstance(params, dict) else None
