"""The routing decisions replicas share: their form on the Redis stream, and teaching them.

:class:`~cache_router.ops.fleet.RedisFleetState` buffers this replica's decisions as
:data:`Decision` tuples, publishes them in stream entries whose ``d`` field
:func:`encode_batch` writes, and reads the other replicas' entries back with
:func:`stream_entries` and :func:`decode_batch`; :func:`teacher` is how the decisions
read reach the policy. Nothing here talks to Redis or keeps state: the fleet does both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cache_router.core.request import RoutingRequest

__all__ = ["Decision", "Teacher", "decode_batch", "encode_batch", "stream_entries", "teacher"]

# The fleet's logger: a skipped entry is the fleet's news, wherever it is decoded.
logger = logging.getLogger("cache_router.ops.fleet")

#: One decision as buffered on the request path: (worker url, model, tokens flag, key).
Decision = tuple[str, "str | None", bool, str]

# Teaches a policy decisions of one model and key kind: (model, tokens, [(key, url)...]).
Teacher = Callable[[str | None, bool, list[tuple[str, str]]], None]


def teacher(policy: object) -> Teacher | None:
    """How to teach ``policy`` other replicas' decisions: its ``learn_many`` when it has
    one, else ``learn`` once per decision, else None (it only shares load)."""
    learn_many: Teacher | None = getattr(policy, "learn_many", None)
    if learn_many is not None:
        return learn_many
    learn: Callable[[RoutingRequest, str], None] | None = getattr(policy, "learn", None)
    if learn is None:
        return None

    def learn_each(model: str | None, tokens: bool, decisions: list[tuple[str, str]]) -> None:
        for key, url in decisions:
            learn(RoutingRequest(key, model, tokens=tokens), url)

    return learn_each


def encode_batch(decisions: Sequence[Decision], max_key_chars: int) -> bytes:
    """``[[url, model, tokens, key bytes]...]`` as JSON, a newline, then the keys' bytes.

    The keys travel as raw UTF-8 after the (ASCII, newline-free) JSON header rather than
    inside it: JSON-escaping kilobytes of prompt per decision cost more than everything
    else a flush does. ``surrogatepass`` keeps lone surrogates, which JSON bodies allow.
    """
    header: list[list[object]] = []
    keys: list[bytes] = []
    for url, model, tokens, key in decisions:
        data = key[:max_key_chars].encode("utf-8", "surrogatepass")
        header.append([url, model, 1 if tokens else 0, len(data)])
        keys.append(data)
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + b"".join(keys)


def decode_batch(blob: bytes | None) -> Iterator[tuple[str, str | None, bool, str]]:
    """The decisions of one stream entry's ``d`` field; a malformed entry yields nothing
    more from the point where it stops making sense."""
    if not blob:
        return
    head, _, keys = blob.partition(b"\n")
    try:
        header = json.loads(head)
    except ValueError:
        logger.debug("skipped an unreadable fleet decision entry")
        return
    if not isinstance(header, list):
        return
    offset = 0
    for item in header:
        if not (isinstance(item, list) and len(item) == 4):
            return
        url, model, tokens, size = item
        if not isinstance(size, int) or size < 0 or offset + size > len(keys):
            return
        try:
            key = keys[offset : offset + size].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return
        offset += size
        if isinstance(url, str) and key:
            yield url, model if isinstance(model, str) else None, bool(tokens), key


def stream_entries(batch: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREAD answer for one stream (RESP2 list or RESP3 dict form)."""
    if not batch:
        return []
    if isinstance(batch, dict):
        for entries in batch.values():
            return list(entries[0] if entries and isinstance(entries[0], list) else entries)
        return []
    _, entries = batch[0]
    return list(entries)
