"""Router CPU per request of token keys: chat template, tokenizer, prefix cache.

Run::

    python benchmarks/tokenize_cost.py [--vocab 16000 --prompts 16 --conversations 64
                                        --turns 8 --passes 3 --corpus-chars 4000000]

Tokenizer
    No model files can be downloaded here, so a byte-level BPE (as GPT-2, Llama 3 and
    Qwen are) of ``--vocab`` ids is trained on the Python standard library's source, with
    ChatML's special tokens and Qwen2's chat template. Real vocabularies are larger (128k-
    150k ids), which changes the ids, not the work per character much.

Workload
    ``--prompts`` system prompts of 2,000 characters (standard library text);
    ``--conversations`` conversations, each on one of them, grow by one user turn and one
    assistant answer (80-300 characters each) up to ``--turns`` turns; the requests are
    interleaved round robin across conversations, as many clients do at once. Every
    request is a whole chat (system prompt and all turns so far), as the OpenAI API sends.

Rows (microseconds per request; best of ``--passes`` passes over the same requests, each
pass with a fresh cache)
    * ``characters``: today's key, the messages' text (``chat_key``).
    * ``render``: the chat template alone (Jinja2, sandboxed).
    * ``tokens, no cache``: render and tokenize the whole prompt.
    * ``tokens, prefix cache``: render, then tokenize only what follows the longest cached
      prefix (``hit rate``: requests that found one).
    * ``code points``: the simulated engine's tokenizer, for the benchmarks against it.
"""

from __future__ import annotations

import argparse
import random
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cache_router.core.routing_key import chat_key
from cache_router.core.token_keys import token_routes
from cache_router.ops.tokenizers import HFTokenizer, PrefixCache
from cache_router.testing.tokenizer import CodePointTokenizer

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def stdlib_text(limit: int) -> str:
    """About ``limit`` characters of the standard library's source."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(parts)


def trained(vocab: int, text: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        show_progress=False,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = text.splitlines()
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def requests(text: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(1)

    def piece(low: int, high: int) -> str:
        size = rng.randrange(low, high)
        start = rng.randrange(0, len(text) - size)
        return text[start : start + size]

    systems = [piece(2000, 2001) for _ in range(args.prompts)]
    chats: list[list[dict[str, str]]] = [
        [{"role": "system", "content": systems[index % args.prompts]}]
        for index in range(args.conversations)
    ]
    bodies: list[dict[str, Any]] = []
    for _ in range(args.turns):
        for chat in chats:
            chat.append({"role": "user", "content": piece(80, 300)})
            bodies.append({"model": "m", "messages": list(chat)})
            chat.append({"role": "assistant", "content": piece(80, 300)})
    return bodies


def per_request(run: Callable[[dict[str, Any]], object], bodies: Sequence[dict[str, Any]]) -> float:
    start = time.perf_counter()
    for body in bodies:
        run(body)
    return (time.perf_counter() - start) / len(bodies) * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--corpus-chars", type=int, default=4_000_000)
    args = parser.parse_args(argv)

    text = stdlib_text(args.corpus_chars)
    tokenizer = trained(args.vocab, text)
    bodies = requests(text, args)
    whole = HFTokenizer(tokenizer, CHATML, cache=None)
    chars = sum(len(whole.render_chat(body["messages"])) for body in bodies) / len(bodies)

    rows: list[tuple[str, float, str]] = []

    def best(run_for_pass: Callable[[], Callable[[dict[str, Any]], object]]) -> float:
        return min(per_request(run_for_pass(), bodies) for _ in range(args.passes))

    rows.append(("characters", best(lambda: chat_key), ""))
    rows.append(("render", best(lambda: lambda body: whole.render_chat(body["messages"])), ""))
    rows.append(("tokens, no cache", best(lambda: token_routes({"m": whole})[_CHAT]), ""))
    caches: list[PrefixCache] = []

    def cached_pass() -> Callable[[dict[str, Any]], object]:
        cache = PrefixCache()
        caches.append(cache)
        return token_routes({"m": HFTokenizer(tokenizer, CHATML, cache=cache)})[_CHAT]

    rows.append(("tokens, prefix cache", best(cached_pass), _hits(caches[-1])))
    rows.append(("code points", best(lambda: token_routes({"m": CodePointTokenizer()})[_CHAT]), ""))

    check = token_routes({"m": HFTokenizer(tokenizer, CHATML)})[_CHAT]
    plain = token_routes({"m": whole})[_CHAT]
    assert all(check(body) == plain(body) for body in bodies), "the cache changed a key"

    print(
        f"{len(bodies)} chat requests, {chars:,.0f} characters rendered on average, "
        f"BPE of {tokenizer.get_vocab_size():,} ids"
    )
    print("| key | µs/request | notes |")
    print("| --- | ---: | --- |")
    for name, micros, notes in rows:
        print(f"| {name} | {micros:,.1f} | {notes} |")
    return 0


_CHAT = "/v1/chat/completions"


def _hits(cache: PrefixCache) -> str:
    total = cache.hits + cache.misses
    return f"hit rate {cache.hits / total:.0%}, {len(cache)} prefixes, {cache.chars:,} chars"


if __name__ == "__main__":
    sys.exit(main())
