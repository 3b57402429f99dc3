"""The simulated engine's tokenizer, for routing to :class:`SimulatedEngine` by tokens.

The simulated engine maps every character of its prompt to one token, the character's code
point, and renders a chat with :func:`~cache_router.testing.engine_requests.render_chat`; its KV
events carry those ids. :class:`CodePointTokenizer` gives the router exactly the same ids,
so tests, the demo and the benchmarks exercise precise routing with exact tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cache_router.core.token_keys import TokenizeError
from cache_router.core.tree import decode_tokens
from cache_router.testing.engine_requests import BadRequest, render_chat

__all__ = ["CodePointTokenizer"]


class CodePointTokenizer:
    """One token per character, its code point (a
    :class:`~cache_router.core.token_keys.KeyTokenizer`); no special tokens. A text's key
    is the text itself, so keying costs what rendering the chat costs."""

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return decode_tokens(text)

    def text_key(self, text: str, *, add_special_tokens: bool = True) -> str:
        return text

    def chat_key(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: Sequence[Any] | None = None,
    ) -> str:
        try:
            return render_chat(list(messages))
        except BadRequest as exc:  # the engine answers 400 to what it cannot render
            raise TokenizeError(str(exc)) from None

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: Sequence[Any] | None = None,
    ) -> list[int]:
        return decode_tokens(self.chat_key(messages))
