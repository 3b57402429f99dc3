"""Routing keys: the part of a request body that predicts what the engine will cache.

Each typed endpoint names the fields its prompt lives in; transparent routes try the same
fields in a fixed order. Two rules matter more than the rest:

* The key must start with the prompt. A serialized whole body would make every request
  "share a prefix" of field names.
* Token ids are keyed as tokens (:func:`cache_router.core.tree.encode_tokens`), never as their
  length or a lossy decimal join.

Parsing uses ``orjson`` when it is installed and the standard library otherwise; both
accept exactly JSON. A large body is never turned into Python objects whole:
:func:`parse_routing_fields` (with ``msgspec`` installed) checks its syntax without building
objects, in pieces that hold the GIL briefly, and decodes only a bounded head of the fields
a key is made of, so its memory does not grow with a prompt the key would cut anyway.
"""

from __future__ import annotations

import hashlib
import json as _json
import re
from collections.abc import Callable, Mapping
from typing import Any

from cache_router.core.tree import encode_tokens

try:  # pragma: no cover - depends on the environment
    from orjson import JSONDecodeError as _JSONError
    from orjson import loads as _loads

    _SECOND_OPINION = True
except ImportError:  # pragma: no cover
    from json import JSONDecodeError as _JSONError  # type: ignore[assignment]

    _SECOND_OPINION = False

    def _loads(body: bytes | memoryview) -> Any:  # type: ignore[misc]
        return _json.loads(bytes(body), parse_constant=_not_json)


try:  # pragma: no cover - depends on the environment
    import msgspec
except ImportError:  # pragma: no cover
    msgspec = None  # type: ignore[assignment]

__all__ = [
    "BOUNDED_EXTRACTORS",
    "DEFAULT_TYPED_ROUTES",
    "MAX_KEY_ITEMS",
    "ROUTING_FIELDS",
    "SCOPE_FIELDS",
    "BodyError",
    "KeyExtractor",
    "RoutingKey",
    "cache_scope",
    "chat_key",
    "generic_key",
    "parse_json_object",
    "parse_routing_fields",
]

#: ``(key, is_tokens)``
RoutingKey = tuple[str, bool]
KeyExtractor = Callable[[Mapping[str, Any]], RoutingKey]

_EMPTY: RoutingKey = ("", False)
_SEPARATOR = "\n"
#: Messages (and parts of one message's content) a key is made of; later ones never count,
#: so that a large body, decoded only in part, gives the same key as a small one.
MAX_KEY_ITEMS = 256


class BodyError(ValueError):
    """The body is not what the endpoint requires (the HTTP layer answers 400)."""


def _not_json(constant: str) -> Any:
    """Refuse the standard library's extensions (``NaN``, ``Infinity``): they are not JSON."""
    raise ValueError(f"{constant} is not valid JSON")


_BOM = b"\xef\xbb\xbf"


def _stdlib_might_accept(error: Exception, body: bytes | memoryview) -> bool:
    """Whether the standard library could accept what orjson refused: a lone surrogate
    escape (a truncated emoji, as JavaScript writes it), a number beyond a double, a BOM.
    Anything else orjson refuses is not JSON, and the body is not parsed a second time."""
    message = str(error)
    return "surrogate" in message or "infinity" in message or bytes(body[:3]) == _BOM


def _parse(body: bytes | memoryview) -> Any:
    """One JSON value; a body orjson refuses gets the standard library's opinion only when
    it might differ (see :func:`_stdlib_might_accept`)."""
    try:
        return _loads(body)
    except (_JSONError, UnicodeDecodeError, RecursionError) as exc:
        return _second_opinion(exc, body)


def _second_opinion(error: Exception, body: bytes | memoryview) -> Any:
    if _SECOND_OPINION and _stdlib_might_accept(error, body):
        try:
            return _json.loads(bytes(body), parse_constant=_not_json)
        except (ValueError, RecursionError):
            pass
    raise BodyError(f"request body is not valid JSON: {error}") from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse ``body`` as a JSON object or raise :class:`BodyError` saying why not."""
    if not body:
        raise BodyError("request body is empty; expected a JSON object")
    try:
        value = _loads(body)
    except (_JSONError, UnicodeDecodeError, RecursionError) as exc:
        value = _second_opinion(exc, body)
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
        if len(content) > MAX_KEY_ITEMS:
            content = content[:MAX_KEY_ITEMS]
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
    if len(messages) > MAX_KEY_ITEMS:
        messages = messages[:MAX_KEY_ITEMS]
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


#: Request fields that split an engine's prefix cache: requests that differ in one never
#: reuse each other's cached blocks (vLLM's and SGLang's ``cache_salt``, SGLang's
#: ``extra_key`` and its LoRA adapter ``lora_path``; vLLM names an adapter as the model).
SCOPE_FIELDS = ("cache_salt", "extra_key", "lora_path")
#: Characters of a scope's marker (32 bits of its hash): short, so that the marker adds
#: little to the matched share of a short prompt of the same scope.
SCOPE_MARKER_CHARS = 2
_SCOPE_NAMES = frozenset(SCOPE_FIELDS)


def cache_scope(body: Mapping[str, Any]) -> str:
    """A short marker for the body's :data:`SCOPE_FIELDS`, or '' when none is set.

    The middleware puts it in front of the routing key, so a prompt under one salt or
    adapter never matches the same prompt cached under another, or under none, while
    requests of one scope still share their prefixes. A batch's first item decides, as for
    the key. The marker is a hash, so a client's long salt costs the tree two characters.
    """
    if _SCOPE_NAMES.isdisjoint(body):  # nearly every body: one C pass over its keys
        return ""
    parts: list[str] = []
    for name in SCOPE_FIELDS:
        value = body.get(name)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str) and value:
            parts.append(f"{name}\0{value}")
    if not parts:
        return ""
    text = "\0".join(parts).encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(text, digest_size=2 * SCOPE_MARKER_CHARS).digest()
    return "".join(chr(digest[i] << 8 | digest[i + 1]) for i in range(0, len(digest), 2))


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


# -- large bodies -------------------------------------------------------------------------

#: The extractors that read nothing but :data:`ROUTING_FIELDS`, so they give the same key
#: on the fields :func:`parse_routing_fields` returns as on the whole body.
BOUNDED_EXTRACTORS: frozenset[KeyExtractor] = frozenset(
    {*DEFAULT_TYPED_ROUTES.values(), generic_key}
)
#: Every field a built-in extractor (or the model check) reads.
ROUTING_FIELDS = (
    "model",
    "token_ids",
    "input_ids",
    "text",
    "prompt",
    "messages",
    "input",
    "query",
    *SCOPE_FIELDS,
)
#: The most JSON bytes one character can take: a surrogate pair written as two escapes.
_CHAR_BYTES = 12
_MODEL_BYTES = 4096
_DIGIT_START = frozenset(b"-0123456789")
_WHITESPACE = b" \t\r\n"
#: A string's closing quote: the first quote not escaped.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: A list's first element, when it is an integer.
_FIRST_INTEGER = re.compile(rb"\[\s*-?[0-9]+\s*[,\]]")
#: Long runs of these bytes (a list of numbers) are checked apart from the rest, piece by
#: piece, so that no single call into the parser holds the GIL for long.
_NUMBER_BYTES = b"0123456789-+.eE \t\r\n,"
_BLOCK = 1 << 20
_PIECE = 1 << 20
#: Stands in for a cut-out run: a number in a list, but a raw newline, which no JSON string
#: may hold, if the run was inside a string after all.
_STAND_IN = b"0\n"


def _intact(limit: int) -> int:
    """Bytes at the start of a run of numbers that stay in place: more than any key of
    ``limit`` reads (:func:`_tokens_head` reads no further)."""
    return max(2 * _BLOCK, 2 * (limit + 2) * _CHAR_BYTES)


def _skim(body: bytes, intact: int) -> Any:
    """``_SKIM.decode(body)``, with each long run of numbers checked on its own in pieces.

    A run (whole 1 MiB blocks of digits, signs, commas, whitespace) is cut out after its
    first ``intact`` bytes and replaced by :data:`_STAND_IN`; the rest of the body is
    skimmed, then the run is checked as numbers, a piece at a time. A run that was inside a
    string makes the skim fail on the stand-in, and the whole body is skimmed in one pass.
    """
    cuts = _number_runs(body, intact)
    if not cuts:
        return _SKIM.decode(body)
    parts: list[bytes | memoryview] = []
    view = memoryview(body)
    position = 0
    for start, end in cuts:
        parts += (view[position:start], _STAND_IN)
        position = end
    parts.append(view[position:])
    try:
        fields = _SKIM.decode(b"".join(parts))
    except msgspec.DecodeError:
        return _SKIM.decode(body)  # a run inside a string, or a broken body: one pass decides
    for start, end in cuts:
        _check_numbers(body, start, end)
    return fields


def _number_runs(body: bytes, intact: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each long run of numbers to check apart: from just after a comma
    to a comma, leaving the run's first ``intact`` bytes where they are."""
    cuts: list[tuple[int, int]] = []
    run = -1
    for block in range(0, len(body) + _BLOCK, _BLOCK):
        if block < len(body) and not body[block : block + _BLOCK].translate(None, _NUMBER_BYTES):
            run = block if run < 0 else run
            continue
        if run >= 0:
            end = min(block, len(body))
            start = body.find(b",", run + intact, end)
            stop = body.rfind(b",", start + 1, end) if start >= 0 else -1
            if stop - start > _BLOCK:
                cuts.append((start + 1, stop))
            run = -1
    return cuts


def _check_numbers(body: bytes, start: int, end: int) -> None:
    """Raise ``msgspec.DecodeError`` unless ``body[start:end]`` is numbers between commas."""
    view = memoryview(body)
    position = start
    while position < end:
        stop = end
        if end - position > _PIECE:
            found = body.rfind(b",", position, position + _PIECE)
            if found <= position:  # one long number: to the comma after it
                found = body.find(b",", position + _PIECE, end)
            stop = found if found > position else end
        if stop == position:
            raise msgspec.DecodeError("JSON is malformed: a list with an empty element")
        _NUMBERS.decode(b"".join((b"[", view[position:stop], b"]")))
        position = stop + 1


def parse_routing_fields(body: bytes, limit: int) -> dict[str, Any]:
    """The fields of ``body`` a routing key is made of, each decoded only as far as a key of
    ``limit`` characters (or tokens) and :data:`MAX_KEY_ITEMS` messages can use.

    For bodies too large to turn into Python objects whole: with ``msgspec`` installed the
    whole body is checked to be a JSON object in C, without building objects (long runs of
    numbers apart, see :func:`_skim`), and every other field is skipped; the key fields
    are decoded from bounded slices of the body. The built-in extractors
    (:data:`BOUNDED_EXTRACTORS`) give the same key, once cut to ``limit``, as on the whole
    body. Without ``msgspec`` this is
    :func:`parse_json_object`. In a skimmed body, token ids past the key are not checked
    (the engine checks them), nor is UTF-8 in skipped strings; a lone surrogate escape
    anywhere is refused, as ``msgspec`` does.
    """
    if msgspec is None:  # pragma: no cover - depends on the environment
        return parse_json_object(body)
    if body[:3] == _BOM:
        body = body[3:]  # a copy, for the rare body that starts with a byte-order mark
    try:
        fields = _skim(body, _intact(limit))
    except msgspec.ValidationError:
        raise BodyError("request body must be a JSON object") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BodyError(f"request body is not valid JSON: {exc}") from None
    parsed: dict[str, Any] = {}
    window = (limit + 2) * _CHAR_BYTES
    for name in ROUTING_FIELDS:
        raw = memoryview(getattr(fields, name))
        if not raw:
            continue
        if name == "model":
            if len(raw) > _MODEL_BYTES:
                raise BodyError("model must be a short string")
            parsed[name] = _parse(raw)
        elif name == "messages":
            parsed[name] = _items_head(raw, limit, window, strings=True)
        elif name == "input":
            parsed[name] = _items_head(raw, limit, window, strings=False)
        else:
            parsed[name] = _prompt_head(raw, limit, window)
    return parsed


def _prompt_head(raw: memoryview, limit: int, window: int) -> Any:
    """A prompt value cut so that :func:`_prompt_key` sees the same first ``limit``
    characters or tokens: a string's head, a token list's head, a batch's first prompt."""
    if len(raw) <= window:
        return _parse(raw)
    first = raw[0]
    if first == 0x22:  # '"'
        return _string_head(raw, window)
    if first != 0x5B:  # '[': a huge object or number is no prompt, but not absent either
        return {}
    inner = _skip_whitespace(raw, 1)
    if raw[inner] in _DIGIT_START:
        return _tokens_head(raw, limit)
    if raw[inner] == 0x22:
        return [_string_head(raw[inner:], window)]
    if raw[inner] == 0x5B and raw[_skip_whitespace(raw, inner + 1)] in _DIGIT_START:
        return [_tokens_head(raw[inner:], limit)]
    return [{}]


def _items_head(raw: memoryview, limit: int, window: int, *, strings: bool) -> Any:
    """``messages``, ``input`` or a message's ``content``: a list of items (objects, or
    strings when ``strings``) keeps its first :data:`MAX_KEY_ITEMS`, each cut; anything
    else is cut as a prompt."""
    if len(raw) <= window:
        return _parse(raw)
    if raw[0] == 0x5B:
        first = raw[_skip_whitespace(raw, 1)]
        if first == 0x7B or (strings and first == 0x22):  # '{' or '"'
            head = _HEAD_DECODER.decode(raw)
            items = msgspec.structs.astuple(head)
            return [_item_head(memoryview(item), limit, window) for item in items if item]
    return _prompt_head(raw, limit, window)


def _item_head(raw: memoryview, limit: int, window: int) -> Any:
    """One message (or content part): its ``content`` and ``text``, each cut."""
    if len(raw) <= window or raw[0] != 0x7B:  # '{'
        return _prompt_head(raw, limit, window)
    fields = _MESSAGE.decode(raw)
    item: dict[str, Any] = {}
    if fields.text:
        item["text"] = _prompt_head(memoryview(fields.text), limit, window)
    if fields.content:
        item["content"] = _items_head(memoryview(fields.content), limit, window, strings=True)
    return item


def _skip_whitespace(raw: memoryview, index: int) -> int:
    while raw[index] in _WHITESPACE:
        index += 1
    return index


def _string_head(raw: memoryview, window: int) -> str:
    """The string ``raw`` starts with: whole when it ends within ``window`` bytes, else at
    least its first ``window // 12 - 1`` characters, each as the whole string has it (only
    the last one may be half a surrogate pair)."""
    piece = bytes(raw[:window])
    match = _STRING.match(piece)
    if match is not None:
        return str(_parse(piece[: match.end()]))
    start = len(piece) - 1
    while 0x80 <= piece[start] < 0xC0:  # drop the last character, whole: never split UTF-8
        start -= 1
    piece = piece[:start]
    escape = piece.rfind(b"\\", len(piece) - 6)
    if escape >= 0:
        run = escape + 1 - len(piece[: escape + 1].rstrip(b"\\"))
        length = 6 if piece[escape + 1 : escape + 2] == b"u" else 2
        if run % 2 and escape + length > len(piece):  # never split an escape
            piece = piece[:escape]
    return str(_parse(piece + b'"'))


def _tokens_head(raw: memoryview, limit: int) -> list[Any]:
    """The first ``limit`` elements of the list ``raw`` starts with (fewer when it has
    fewer), decoded from a slice that ends at the list's first ``]`` or else at a comma;
    whitespace may double the slice, up to :func:`_intact` bytes (a list padded beyond
    that keys on fewer elements).

    The slice parses when the elements are numbers; when it does not, a list that starts
    with an integer holds something else, which no token list may (:class:`BodyError`),
    and a list that starts with anything else is no token list (``[]``).
    """
    size, most = limit * 8 + 64, _intact(limit)
    while True:
        piece = bytes(raw[:size])
        close = piece.find(b"]")
        cut = close + 1 if close >= 0 else piece.rfind(b",")
        if cut > 0:
            try:
                values = _loads(piece[:cut] if close >= 0 else piece[:cut] + b"]")
            except (_JSONError, UnicodeDecodeError, RecursionError):
                if _FIRST_INTEGER.match(piece):
                    raise BodyError("token ids must be a list of non-negative integers") from None
                return []
            if close >= 0 or len(values) >= limit or size >= most:
                return list(values[:limit])
        elif size >= most:
            return []
        size = min(size * 2, most)


if msgspec is not None:  # pragma: no branch

    class _RoutingFields(msgspec.Struct):
        """The top-level fields :data:`ROUTING_FIELDS`, kept as undecoded slices."""

        model: msgspec.Raw = msgspec.Raw()
        token_ids: msgspec.Raw = msgspec.Raw()
        input_ids: msgspec.Raw = msgspec.Raw()
        text: msgspec.Raw = msgspec.Raw()
        prompt: msgspec.Raw = msgspec.Raw()
        messages: msgspec.Raw = msgspec.Raw()
        input: msgspec.Raw = msgspec.Raw()
        query: msgspec.Raw = msgspec.Raw()
        cache_salt: msgspec.Raw = msgspec.Raw()
        extra_key: msgspec.Raw = msgspec.Raw()
        lora_path: msgspec.Raw = msgspec.Raw()

    class _MessageFields(msgspec.Struct):
        content: msgspec.Raw = msgspec.Raw()
        text: msgspec.Raw = msgspec.Raw()

    _SKIM = msgspec.json.Decoder(_RoutingFields)
    _NUMBERS = msgspec.json.Decoder(msgspec.Raw)
    _MESSAGE = msgspec.json.Decoder(_MessageFields)
    # A list's first MAX_KEY_ITEMS elements: an array-like struct ignores the rest.
    _Head = msgspec.defstruct(
        "_Head",
        [(f"item{index}", msgspec.Raw, msgspec.Raw()) for index in range(MAX_KEY_ITEMS)],
        array_like=True,
    )
    _HEAD_DECODER = msgspec.json.Decoder(_Head)
