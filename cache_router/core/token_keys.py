"""Routing keys made of the token ids the engine will compute, for the precise policy.

An engine's KV events name blocks of *tokens*; a key of characters cannot be matched
against them. These extractors turn a request's prompt into the ids the engine itself will
tokenize it to, with the model's own tokenizer and chat template (a
:class:`PromptTokenizer`), and encode them with :func:`cache_router.core.tree.encode_tokens`
(``RoutingRequest.tokens`` is then true and :func:`cache_router.core.tree.decode_tokens`
gives the ids back). Token ids a request already carries are keyed as they are.

What each path tokenizes is what vLLM and SGLang tokenize: a chat's rendered template
without special tokens added on top (the template writes them; vLLM's
``add_special_tokens`` defaults to false for chat), a completion's or ``/generate``'s text
with them (a BOS, where the tokenizer adds one). A request whose model has no tokenizer,
or whose prompt the tokenizer refuses (a template's ``raise_exception``), keeps its
character key: the engine answers a bad request, the router only routes it.

The work is bounded: at most ``max_tokens`` ids per key, and no more text than
``max_chars`` is rendered or tokenized, however large the prompt. It is not done on the
event loop for a body over ``offload_above`` bytes: each extractor carries that number,
and :class:`~cache_router.proxy.middleware.RoutingMiddleware` keys such a body in a worker
thread, so other requests go on meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from cache_router.core.routing_key import (
    DEFAULT_TYPED_ROUTES,
    MAX_KEY_ITEMS,
    KeyExtractor,
    RoutingKey,
    chat_key,
    completions_key,
    generate_key,
)
from cache_router.core.tree import encode_tokens

__all__ = [
    "CHARS_PER_TOKEN",
    "OFFLOAD_ABOVE",
    "TOKEN_PATHS",
    "KeyTokenizer",
    "PromptTokenizer",
    "TokenizeError",
    "token_routes",
]

#: Characters of text read per token of key: tokens of real vocabularies average about 4
#: characters of English, so a key of ``max_tokens`` rarely needs more text than this.
CHARS_PER_TOKEN = 4
#: The paths whose extractors :func:`token_routes` replaces.
TOKEN_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
#: Bodies over this many bytes are tokenized off the event loop: from there on the
#: tokenization costs far more than the hop to a thread (docs/precise-routing.md).
OFFLOAD_ABOVE = 16 * 1024


class TokenizeError(ValueError):
    """The tokenizer cannot tokenize this prompt (e.g. its chat template refuses it)."""


@runtime_checkable
class PromptTokenizer(Protocol):
    """A model's tokenizer as the engine applies it to a prompt.

    Both methods are pure CPU work (anything read from files is read once, when the
    tokenizer is made) and may raise :class:`TokenizeError`.
    """

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``text``'s ids, as for a completion (``add_special_tokens``: a BOS and the like)."""
        ...

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: Sequence[Any] | None = None,
    ) -> list[int]:
        """The ids of ``messages`` rendered by the chat template, as for a chat completion."""
        ...


@runtime_checkable
class KeyTokenizer(PromptTokenizer, Protocol):
    """Optional: a tokenizer that gives the key (:func:`encode_tokens` of the ids) itself,
    e.g. from keys it cached, so no list of ids is built per request only to be encoded."""

    def text_key(self, text: str, *, add_special_tokens: bool = True) -> str:
        """``encode_tokens(self.encode_text(text, ...))``."""
        ...

    def chat_key(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: Sequence[Any] | None = None,
    ) -> str:
        """``encode_tokens(self.encode_chat(messages, ...))``."""
        ...


class _Keys:
    """A tokenizer's keys: its own :class:`KeyTokenizer` methods, else its ids encoded."""

    __slots__ = ("chat_key", "text_key")

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.text_key: Callable[..., str]
        self.chat_key: Callable[..., str]
        if isinstance(tokenizer, KeyTokenizer):  # once, not per request
            self.text_key, self.chat_key = tokenizer.text_key, tokenizer.chat_key
        else:
            encode_text, encode_chat = tokenizer.encode_text, tokenizer.encode_chat
            self.text_key = lambda *args, **options: encode_tokens(encode_text(*args, **options))
            self.chat_key = lambda *args, **options: encode_tokens(encode_chat(*args, **options))


class _TokenKeys:
    """The token extractors of one tokenizer table (see :func:`token_routes`)."""

    __slots__ = ("default", "max_chars", "max_tokens", "tokenizers")

    def __init__(
        self,
        tokenizers: Mapping[str | None, PromptTokenizer],
        default: PromptTokenizer | None,
        max_tokens: int,
    ) -> None:
        self.tokenizers = {model: _Keys(tokenizer) for model, tokenizer in tokenizers.items()}
        self.default = None if default is None else _Keys(default)
        self.max_tokens = max_tokens
        self.max_chars = max_tokens * CHARS_PER_TOKEN

    def tokenizer(self, body: Mapping[str, Any]) -> _Keys | None:
        model = body.get("model")
        found = self.tokenizers.get(model) if model is None or isinstance(model, str) else None
        return self.default if found is None else found

    def key(self, key: str) -> RoutingKey:
        return (key[: self.max_tokens] if len(key) > self.max_tokens else key), True

    def text(self, body: Mapping[str, Any], value: object, fallback: KeyExtractor) -> RoutingKey:
        """A text prompt (or a batch's first) tokenized; ids and anything else as before."""
        tokenizer = self.tokenizer(body)
        if isinstance(value, list) and value and isinstance(value[0], str):
            value = value[0]
        if tokenizer is None or not isinstance(value, str) or not value:
            return fallback(body)
        special = body.get("add_special_tokens")
        try:
            key = tokenizer.text_key(
                value[: self.max_chars],
                add_special_tokens=special if isinstance(special, bool) else True,
            )
        except TokenizeError:
            return fallback(body)
        return self.key(key)

    def generate(self, body: Mapping[str, Any]) -> RoutingKey:
        """SGLang ``/generate``: ``text`` tokenized, else ``input_ids`` as given."""
        return self.text(body, body.get("text"), generate_key)

    def completions(self, body: Mapping[str, Any]) -> RoutingKey:
        """``/v1/completions``: a text ``prompt`` tokenized, token ids as given."""
        return self.text(body, body.get("prompt"), completions_key)

    def chat(self, body: Mapping[str, Any]) -> RoutingKey:
        """``/v1/chat/completions``: ``messages`` through the chat template, tokenized."""
        tokenizer = self.tokenizer(body)
        messages = body.get("messages")
        if tokenizer is None or not isinstance(messages, list) or not messages:
            return chat_key(body)
        bounded = _bounded_messages(messages, self.max_chars)
        if bounded is None:
            return chat_key(body)
        generation = body.get("add_generation_prompt")
        if body.get("continue_final_message") is True:
            generation = False  # the template leaves the last message open instead
        special = body.get("add_special_tokens")
        tools = body.get("tools")
        try:
            key = tokenizer.chat_key(
                bounded,
                add_generation_prompt=generation if isinstance(generation, bool) else True,
                add_special_tokens=special if isinstance(special, bool) else False,
                tools=tools if isinstance(tools, list) else None,
            )
        except TokenizeError:
            return chat_key(body)
        return self.key(key)


class _OffLoopExtractor:
    """A key extractor that tells the middleware (``offload_above``) from which body size
    on it is to be called in a worker thread."""

    __slots__ = ("extract", "offload_above")

    def __init__(self, extract: KeyExtractor, offload_above: int) -> None:
        self.extract = extract
        self.offload_above = offload_above

    def __call__(self, body: Mapping[str, Any]) -> RoutingKey:
        return self.extract(body)


def _bounded_messages(messages: list[Any], max_chars: int) -> list[Mapping[str, Any]] | None:
    """The first messages, up to :data:`MAX_KEY_ITEMS` and ``max_chars`` characters of
    text content (the text that crosses the budget cut); None unless every one kept is an
    object. Later text cannot change the key's first ``max_tokens`` tokens, only the cost
    of rendering it."""
    kept: list[Mapping[str, Any]] = []
    budget = max_chars
    for message in messages[:MAX_KEY_ITEMS]:
        if not isinstance(message, dict):
            return None
        content, budget = _bounded_content(message.get("content"), budget)
        kept.append(message if content is None else {**message, "content": content})
        if budget <= 0:
            break
    return kept


def _bounded_content(content: object, budget: int) -> tuple[object, int]:
    """``(content cut to budget or None when whole, budget left)``: a string, or the text
    of a list of parts."""
    if isinstance(content, str):
        return (content[:budget] if len(content) > budget else None), budget - len(content)
    if not isinstance(content, list):
        return None, budget
    parts: list[Any] = []
    for part in content[:MAX_KEY_ITEMS]:
        text = part.get("text") if isinstance(part, dict) else None
        if isinstance(text, str):
            if len(text) > budget:
                parts.append({**part, "text": text[:budget]})
                return parts, 0
            budget -= len(text)
        parts.append(part)
    return (parts if len(content) > MAX_KEY_ITEMS else None), budget


def token_routes(
    tokenizers: Mapping[str | None, PromptTokenizer],
    default: PromptTokenizer | None = None,
    *,
    max_tokens: int = 32768,
    routes: Mapping[str, KeyExtractor] = DEFAULT_TYPED_ROUTES,
    offload_above: int = OFFLOAD_ABOVE,
) -> dict[str, KeyExtractor]:
    """``routes`` with token extractors on :data:`TOKEN_PATHS`, for
    ``RoutingMiddleware(typed_routes=...)``.

    ``tokenizers`` maps a request's ``model`` to its tokenizer (the key ``None``: requests
    that name no model); ``default`` serves any other model. A request with neither keeps
    its character key. ``max_tokens`` bounds each key (give the middleware's
    ``max_routing_key_length``); at most ``4 * max_tokens`` characters are tokenized.
    Bodies over ``offload_above`` bytes are tokenized in a worker thread.
    """
    if max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    keys = _TokenKeys(tokenizers, default, max_tokens)
    extractors: dict[str, KeyExtractor] = {
        "/generate": _OffLoopExtractor(keys.generate, offload_above),
        "/v1/completions": _OffLoopExtractor(keys.completions, offload_above),
        "/v1/chat/completions": _OffLoopExtractor(keys.chat, offload_above),
    }
    return {**routes, **extractors}
