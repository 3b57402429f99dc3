"""What the simulated engine generates: fixed outputs, so tests can assert on them.

A generated token's text depends only on its index (:func:`token_text`), and an
embedding only on the input (:func:`embedding_json`), whose length also sets its size
(:func:`embedding_dimensions`): nothing is random, and an answer is only joined from
text built once.
"""

from __future__ import annotations

import zlib

__all__ = [
    "EMBEDDING_VALUES",
    "embedding_dimensions",
    "embedding_json",
    "output_text",
    "token_text",
]


def token_text(index: int) -> str:
    """Text of the ``index``-th generated token: fixed, so tests can assert on outputs."""
    return f" tok{index}"


def output_text(tokens: int) -> str:
    """The text of an answer ``tokens`` long: the first ``tokens`` tokens' texts."""
    return "".join(map(token_text, range(tokens)))


#: Embedding components as JSON text, twice over so that any window of up to
#: ``EMBEDDING_VALUES`` of them is one slice; built once, since an answer is only a join.
EMBEDDING_VALUES = 4096
_EMBEDDING_TEXT = (
    tuple(f"{((i * 7919 + 13) % 20001 - 10000) / 10000:.6f}" for i in range(EMBEDDING_VALUES)) * 2
)


def embedding_dimensions(tokens: int) -> int:
    """Components of the embedding of a ``tokens``-long input: 256 plus one per 6 tokens,
    so that 1-8 KiB of input text come back as about 4-16 KiB of JSON."""
    return min(EMBEDDING_VALUES, 256 + tokens // 6)


def embedding_json(prompt: str, dimensions: int) -> str:
    """The embedding of ``prompt`` as a JSON array: fixed per prompt, so tests can compare."""
    start = zlib.crc32(prompt.encode("utf-8", "surrogatepass")) % EMBEDDING_VALUES
    return "[" + ",".join(_EMBEDDING_TEXT[start : start + dimensions]) + "]"
