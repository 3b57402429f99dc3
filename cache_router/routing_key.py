"""Routing keys: the part of a request body that predicts what the engine will cache.

Each typed endpoint names the fields its prompt lives in; transparent routes try the same
fields in a fixed order. Two rules matter more than the rest:

* The key must start with the prompt. Routing on a serialized whole body (as one peer
  router does) makes every request "share a prefix" of field names.
* Token ids are keyed as tokens (:func:`cache_router.tree.encode_tokens`), never as their
  length or a lossy decimal join.

Parsing uses ``orjson`` when it is installed (several times faster on long prompts) and the
standard library otherwise; both accept exactly JSON.
"""

from __future__ import annotations

import json as _json
from collections.abc import Callable, Mapping
from typing import Any

from cache_router.tree import encode_tokens

try:  # pragma: no cover - depends on the environment
    from orjson import JSONDecodeError as _JSONError
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import JSONDecodeError as _JSONError  # type: ignore[assignment]
    from json import loads as _loads  # type: ignore[assignment]

__all__ = [
    "DEFAULT_TYPED_ROUTES",
    "BodyError",
    "KeyExtractor",
    "RoutingKey",
    "chat_key",
    "generic_key",
    "parse_json_object",
]

#: ``(key, is_tokens)``
RoutingKey = tuple[str, bool]
KeyExtractor = Callable[[Mapping[str, Any]], RoutingKey]

_EMPTY: RoutingKey = ("", False)
_SEPARATOR = "\n"


class BodyError(ValueError):
    """The body is not what the endpoint requires (the HTTP layer answers 400)."""


def _not_json(constant: str) -> Any:
    """Refuse the standard library's extensions (``NaN``, ``Infinity``): they are not JSON."""
    raise ValueError(f"{constant} is not valid JSON")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse ``body`` as a JSON object or raise :class:`BodyError` saying why not."""
    if not body:
        raise BodyError("request body is empty; expected a JSON object")
    try:
        value = _loads(body)
    except (_JSONError, UnicodeDecodeError, RecursionError) as exc:
        # orjson refuses some valid JSON that engines (standard json) accept: a lone
        # surrogate escape such as a truncated emoji ("\ud83d"), a number beyond a double.
        # Only bodies orjson refused pay for this second opinion.
        try:
            value = _json.loads(body, parse_constant=_not_json)
        except (ValueError, RecursionError):
            raise BodyError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BodyError(f"request body must be a JSON object, not {type(value).__name__}")
    return value


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and type(value[0]) is int


def _tokens(value: list[Any]) -> RoutingKey:
    try:
        return encode_tokens(value), True
    except ValueError:
        raise BodyError("token ids must be a list of non-negative integers") from None


def _prompt_key(value: object) -> RoutingKey:
    """A prompt that may be a string, a list of strings, token ids, or a batch of those.

    A batch routes on its first element: one engine serves the whole request, and the
    first prompt is as good a predictor of its cache as any.
    """
    if isinstance(value, str):
        return value, False
    if isinstance(value, list) and value:
        first = value[0]
        if type(first) is int:
            return _tokens(value)
        if isinstance(first, str):
            return first, False
        if _is_token_list(first):
            return _tokens(first)
    return _EMPTY


def _content_text(content: object) -> str:
    """Text of a message's ``content``: a string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return _SEPARATOR.join(parts)
    return ""


def _messages_text(messages: object) -> str:
    """Message texts in order: a later turn of the same conversation extends the key."""
    if not isinstance(messages, list):
        return ""
    texts: list[str] = []
    for message in messages:
        if isinstance(message, dict):
            text = _content_text(message.get("content"))
            if text:
                texts.append(text)
        elif isinstance(message, str):
            texts.append(message)
    return _SEPARATOR.join(texts)


def chat_key(body: Mapping[str, Any]) -> RoutingKey:
    """``/v1/chat/completions``: the text of every message, in order."""
    return _messages_text(body.get("messages")), False


def generate_key(body: Mapping[str, Any]) -> RoutingKey:
    """SGLang ``/generate``: ``text``, else ``input_ids``."""
    text = body.get("text")
    if text is not None:
        return _prompt_key(text)
    return _prompt_key(body.get("input_ids"))


def completions_key(body: Mapping[str, Any]) -> RoutingKey:
    """``/v1/completions``: ``prompt`` (string, strings, or token ids)."""
    return _prompt_key(body.get("prompt"))


def embeddings_key(body: Mapping[str, Any]) -> RoutingKey:
    """``/v1/embeddings``: ``input``."""
    return _prompt_key(body.get("input"))


def rerank_key(body: Mapping[str, Any]) -> RoutingKey:
    """``/rerank`` and ``/v1/rerank``: ``query`` (the documents differ per request)."""
    return _prompt_key(body.get("query"))


def responses_key(body: Mapping[str, Any]) -> RoutingKey:
    """``/v1/responses``: ``input``, a string or a list of message-like items."""
    value = body.get("input")
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _messages_text(value), False
    return _prompt_key(value)


_GENERIC_FIELDS: tuple[tuple[str, Callable[[object], RoutingKey]], ...] = (
    ("token_ids", _prompt_key),
    ("input_ids", _prompt_key),
    ("text", _prompt_key),
    ("prompt", _prompt_key),
    ("messages", lambda value: (_messages_text(value), False)),
    ("input", lambda value: responses_key({"input": value})),
)


def generic_key(body: Mapping[str, Any]) -> RoutingKey:
    """Transparent routes: the first present of token_ids, input_ids, text, prompt,
    messages, input. A body with none of them has no key (it routes on load alone)."""
    for name, extract in _GENERIC_FIELDS:
        value = body.get(name)
        if value is not None:
            key = extract(value)
            if key[0]:
                return key
    return _EMPTY


#: Typed routes and how each finds its key; pass your own mapping to the middleware to
#: add or drop endpoints.
DEFAULT_TYPED_ROUTES: Mapping[str, KeyExtractor] = {
    "/generate": generate_key,
    "/v1/completions": completions_key,
    "/v1/chat/completions": chat_key,
    "/v1/embeddings": embeddings_key,
    "/v1/rerank": rerank_key,
    "/rerank": rerank_key,
    "/v1/responses": responses_key,
}
