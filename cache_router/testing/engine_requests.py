"""What the simulated engine reads from a request: its prompts, as cache keys.

SGLang's ``/generate`` and OpenAI's completions, chat and embeddings send a prompt in
several shapes (text, a batch of texts, token ids, a batch of id lists, chat messages);
each becomes one cache key per sequence (:func:`generate_prompts`,
:func:`completion_prompts`, :func:`render_chat`), token ids encoded the way the router's
tree keys them. What the engine cannot read is a :class:`BadRequest`, answered with 400.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from cache_router.core.tree import encode_tokens

__all__ = [
    "BadRequest",
    "completion_prompts",
    "generate_prompts",
    "include_usage",
    "render_chat",
]


class BadRequest(Exception):
    """A request the engine refuses with 400; the message goes into the OpenAI error body."""


def include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _token_key(ids: Sequence[object]) -> str:
    try:
        return encode_tokens(ids)  # type: ignore[arg-type]  # validated by encode_tokens
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    )


def generate_prompts(body: Mapping[str, Any]) -> tuple[list[str], bool]:
    """SGLang: ``text`` (str or list of str) or ``input_ids`` (ids or list of id lists)."""
    text = body.get("text")
    ids = body.get("input_ids")
    if text is not None and ids is not None:
        raise BadRequest("give either text or input_ids, not both")
    if isinstance(text, str):
        return [text], False
    if isinstance(text, list) and text and all(isinstance(item, str) for item in text):
        return list(text), True
    if isinstance(ids, list) and ids:
        if _is_token_list(ids):
            return [_token_key(ids)], False
        if all(_is_token_list(item) for item in ids):
            return [_token_key(item) for item in ids], True
    raise BadRequest("text must be a string or list of strings, or input_ids a list of ints")


def completion_prompts(prompt: object) -> list[str]:
    """OpenAI: a string, a list of strings, a list of token ids or a list of id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if _is_token_list(prompt):
            return [_token_key(prompt)]
        if all(isinstance(item, str) for item in prompt):
            return list(prompt)
        if all(_is_token_list(item) for item in prompt):
            return [_token_key(item) for item in prompt]
    raise BadRequest("prompt must be a string, a list of strings or a list of token ids")


def render_chat(messages: object) -> str:
    """The prompt a chat template would build: ``<|role|>\\ncontent\\n`` per message.

    Any template works for the simulation as long as a conversation extended by more
    messages renders to an extension of the same string, so multi-turn chats share their
    prefix. Non-text parts become short placeholders (an image is keyed by a hash of its
    URL, so the same image hits the cache and a data URL does not bloat the key).
    """
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message must be an object with a string role")
        parts.append(f"<|{message['role']}|>\n{_render_content(message.get('content'))}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _render_content(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of parts")
    rendered: list[str] = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRequest("each content part must be an object with a string type")
        kind = part["type"]
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest("a text part needs a string text")
            rendered.append(text)
        else:
            payload = json.dumps(part.get(kind), sort_keys=True, default=str)
            digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
            rendered.append(f"<{kind}:{digest}>")
    return "".join(rendered)
