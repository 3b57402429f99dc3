"""A model's own tokenizer and chat template, loaded from local files (the ``precise`` extra).

:class:`HFTokenizer` reads a Hugging Face ``tokenizer.json`` (with the ``tokenizers``
package, the Rust tokenizer the engines' fast tokenizers are) and the chat template from
``tokenizer_config.json`` or ``chat_template.jinja``, once, when it is made; tokenizing is
CPU work only. It lives outside the routing core because it reads files and needs two
optional packages; the core sees it as a :class:`~cache_router.core.token_keys.PromptTokenizer`.

The template is rendered as ``transformers.apply_chat_template`` renders it, in Jinja2's
``ImmutableSandboxedEnvironment`` (a template from a downloaded model cannot reach Python
objects: ``{{ ''.__class__ }}`` fails), with ``trim_blocks``/``lstrip_blocks``, the loop
controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, and
the special tokens (``bos_token``, ``eos_token``, ...) as variables. A message whose content
is a list of parts is flattened to its text parts joined by newlines unless the template
iterates over the parts itself, as vLLM decides between its "string" and "openai" formats.

**Prefix cache.** A chat's rendered prompt repeats earlier requests' prompts: the same
system prompt, the same conversation one turn shorter. The tokenizers library splits its
input at special tokens before anything else, so the ids of a prompt are exactly the ids
of its part up to the end of a special token followed by the ids of the rest (tokenized
behind that same special token, so nothing else about its position changes). The cache
keeps the ids of such prefixes (least recently used dropped, bounded in entries and
characters); a prompt that starts with one tokenizes only its rest.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Encoding, Tokenizer

from cache_router.core.token_keys import TokenizeError
from cache_router.core.tree import decode_tokens, encode_tokens

__all__ = ["HFTokenizer", "PrefixCache", "compile_chat_template", "load_tokenizer"]

logger = logging.getLogger("cache_router")

#: The special tokens transformers passes to every chat template.
_SPECIAL_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
#: A template that loops over a message's content parts renders them itself ("openai").
_ITERATES_CONTENT = re.compile(r"\bfor\s+\w+\s+in\s+\w+(?:\[\s*['\"]content['\"]\s*\]|\.content\b)")
#: Prefixes tried per lookup, from the end of the prompt back.
_LOOKUPS = 8


def _raise_exception(message: str) -> str:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """``source`` compiled in the sandbox, with transformers' environment."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(source)


class PrefixCache:
    """The token ids of prompt prefixes that end right after a special token, as routing
    keys (:func:`~cache_router.core.tree.encode_tokens`: compact, and joined to the rest
    without a list in between); least recently used dropped beyond ``max_entries``, or
    beyond ``max_chars`` characters of prefixes and keys."""

    def __init__(self, max_entries: int = 1024, max_chars: int = 4 * 1024 * 1024) -> None:
        if max_entries <= 0 or max_chars <= 0:
            raise ValueError("max_entries and max_chars must be positive")
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.chars = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, str] = OrderedDict()
        # Extractors run on the event loop, large bodies' in worker threads too.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prefix: str) -> str | None:
        """The key of ``prefix``'s tokens, or None."""
        with self._lock:
            key = self._entries.get(prefix)
            if key is not None:
                self._entries.move_to_end(prefix)
            return key

    def put(self, prefix: str, key: str) -> None:
        size = len(prefix) + len(key)
        if size > self.max_chars:
            return
        with self._lock:
            if prefix in self._entries:
                self._entries.move_to_end(prefix)
                return
            self._entries[prefix] = key
            self.chars += size
            while len(self._entries) > self.max_entries or self.chars > self.max_chars:
                old, old_key = self._entries.popitem(last=False)
                self.chars -= len(old) + len(old_key)


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class HFTokenizer:
    """A Hugging Face fast tokenizer and chat template (see the module docstring).

    ``tokenizer``: a loaded ``tokenizers.Tokenizer``; ``chat_template``: the Jinja source
    (None: chats keep character keys); ``special_tokens``: the template's variables
    (``bos_token``, ...); ``cache``: the prefix cache, None to tokenize every prompt whole.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        *,
        cache: PrefixCache | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.cache = cache
        self._template = None if chat_template is None else compile_chat_template(chat_template)
        self._parts = chat_template is not None and bool(_ITERATES_CONTENT.search(chat_template))
        self._boundaries = self._boundary_pattern()
        self._head, self._tail = self._added_around()

    @classmethod
    def from_path(cls, path: str | Path, *, cache: PrefixCache | bool = True) -> HFTokenizer:
        """Load from a model directory (``tokenizer.json``, ``tokenizer_config.json``,
        ``chat_template.jinja``) or a ``tokenizer.json`` file (its directory's config and
        template are read too). ``cache``: True for a default :class:`PrefixCache`, False for
        none."""
        location = Path(path).expanduser()
        if location.is_dir():
            folder, file = location, location / "tokenizer.json"
        elif location.is_file():
            folder, file = location.parent, location
        else:
            raise ValueError(
                f"tokenizer path {str(path)!r} is neither a local directory nor a "
                "tokenizer.json file (download the model's files first)"
            )
        if not file.is_file():
            raise ValueError(f"{folder} has no tokenizer.json (a fast tokenizer is required)")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise ValueError(f"cannot load {file}: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        template = _chat_template(folder, config)
        special = {
            name: content
            for name in _SPECIAL_NAMES
            if (content := _token_content(config.get(name))) is not None
        }
        made = PrefixCache() if cache is True else (None if cache is False else cache)
        return cls(tokenizer, template, special, cache=made)

    def _encode(self, text: str, add_special_tokens: bool) -> Encoding:
        # encode_batch lets go of the GIL while it runs (encode holds it), so a body keyed
        # in a worker thread leaves the event loop free; same ids, same CPU.
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    # -- the protocol -----------------------------------------------------------------

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._encode(text, add_special_tokens).ids)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: Sequence[Any] | None = None,
    ) -> list[int]:
        return decode_tokens(
            self.chat_key(
                messages,
                add_generation_prompt=add_generation_prompt,
                add_special_tokens=add_special_tokens,
                tools=tools,
            )
        )

    def text_key(self, text: str, *, add_special_tokens: bool = True) -> str:
        return encode_tokens(self._encode(text, add_special_tokens).ids)

    def chat_key(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: Sequence[Any] | None = None,
    ) -> str:
        return self.prompt_key(
            self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools),
            add_special_tokens=add_special_tokens,
            first=_first_content(messages),
        )

    # -- the parts ----------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
    ) -> str:
        """The prompt text the engine builds from ``messages``."""
        if self._template is None:
            raise TokenizeError("the tokenizer has no chat template")
        if not self._parts:
            messages = [_flattened(message) for message in messages]
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as exc:  # the sandbox's refusals included
            raise TokenizeError(f"chat template: {exc}") from None

    def prompt_key(
        self, text: str, *, add_special_tokens: bool = False, first: str | None = None
    ) -> str:
        """The key of ``text``'s tokens, through the prefix cache; ``first``: text whose
        end marks a prefix worth keeping (the first message: a system prompt others share)."""
        if self.cache is None or self._boundaries is None or self._head is None:
            return self.text_key(text, add_special_tokens=add_special_tokens)
        key = self._cached_key(text, first)
        return f"{self._head}{key}{self._tail}" if add_special_tokens else key

    def _cached_key(self, text: str, first: str | None) -> str:
        """Look the prompt's prefixes up from the longest (the last :data:`_LOOKUPS`
        special tokens' ends, and the end of the first message); tokenize the rest behind
        the special token the prefix ends with, whose id the prefix's key already ends with."""
        cache = self.cache
        assert cache is not None and self._boundaries is not None
        marks = [(match.start(), match.end()) for match in self._boundaries.finditer(text)]
        if not marks:
            return self.text_key(text, add_special_tokens=False)
        ends = [end for _, end in marks]
        shared = _end_after(text, ends, first)
        tried = marks[-_LOOKUPS:]
        if shared is not None and all(end != shared for _, end in tried):
            tried.insert(0, marks[ends.index(shared)])
        for start, end in reversed(tried):
            cached = cache.get(text[:end])
            if cached is None:
                continue
            encoding = self._encode(text[start:], False)
            ids = encoding.ids
            if not ids or not cached or ids[0] != ord(cached[-1]):
                break  # not split where expected: tokenize it whole
            cache.hits += 1
            key = cached[:-1] + encode_tokens(ids)
            self._remember(text, (ends[-1], shared), key, encoding, start, len(cached) - 1)
            return key
        cache.misses += 1
        encoding = self._encode(text, False)
        key = encode_tokens(encoding.ids)
        self._remember(text, (ends[-1], shared), key, encoding, 0, 0)
        return key

    def _remember(
        self,
        text: str,
        ends: tuple[int | None, ...],
        key: str,
        encoding: Encoding,
        shift: int,
        base: int,
    ) -> None:
        """Cache the prefixes of ``text`` ending at ``ends``; ``encoding`` tokenized
        ``text[shift:]`` and its first token is ``key[base]``."""
        assert self.cache is not None
        starts = [offset[0] + shift for offset in encoding.offsets]
        for end in set(ends):
            if end is None or end <= shift:
                continue
            count = base + bisect_left(starts, end)
            if count:
                self.cache.put(text[:end], key[:count])

    def _boundary_pattern(self) -> re.Pattern[str] | None:
        """The special tokens a prompt may be split after: added special tokens matched on
        the raw text anywhere (not ``single_word``, not normalized), and only the ones the
        template writes (a prompt has few others, and a short pattern is a fast one)."""
        if self.chat_template is None:
            return None
        names = [
            token.content
            for token in self.tokenizer.get_added_tokens_decoder().values()
            if token.special
            and not token.single_word
            and not token.normalized
            and token.content
            and token.content in self.chat_template
        ]
        names += [
            value
            for value in self.special_tokens.values()
            if value and value in self.chat_template and value not in names
        ]
        special = set(self.tokenizer.get_added_tokens_decoder().values())
        contents = {token.content for token in special}
        names = [name for name in names if name in contents]
        if not names:
            return None
        names.sort(key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names)))

    def _added_around(self) -> tuple[str | None, str | None]:
        """The keys of the ids ``add_special_tokens`` puts before and after a prompt's own
        (e.g. a BOS), or ``(None, None)`` when the post-processor does something else."""
        probe = "a b"
        plain = list(self.tokenizer.encode(probe, add_special_tokens=False).ids)
        full = list(self.tokenizer.encode(probe, add_special_tokens=True).ids)
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return encode_tokens(full[:start]), encode_tokens(full[start + len(plain) :])
        return None, None


def _end_after(text: str, ends: list[int], first: str | None) -> int | None:
    """The first boundary at or after the end of ``first`` in ``text``."""
    if not first or not ends:
        return None
    found = text.find(first)
    if found < 0:
        return None
    index = bisect_left(ends, found + len(first))
    return ends[index] if index < len(ends) else None


def _first_content(messages: Sequence[Mapping[str, Any]]) -> str | None:
    content = messages[0].get("content") if messages else None
    return content if isinstance(content, str) else None


def _flattened(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """A message whose content is a list of parts, with the text parts joined (vLLM's
    "string" content format); any other message as it is."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = [
        part["text"]
        for part in content
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    ]
    return {**message, "content": "\n".join(texts)}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return value if isinstance(value, dict) else {}


def _chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` when present (newer models), else the config's
    ``chat_template``: a string, or named templates of which ``default`` (else the first)."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {
            item.get("name"): item.get("template")
            for item in template
            if isinstance(item, dict) and isinstance(item.get("template"), str)
        }
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """:meth:`HFTokenizer.from_path` with the default prefix cache, logging what was found."""
    tokenizer = HFTokenizer.from_path(path)
    if tokenizer.chat_template is None:
        logger.warning("tokenizer %s has no chat template: chats keep character keys", path)
    return tokenizer
