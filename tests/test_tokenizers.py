"""Tokens for every request: the model's tokenizer and chat template, the prefix cache, the
token key extractors, and their wiring into the router (docs/precise-routing.md)."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from cache_router import RouterConfig, RoutingMiddleware, RoutingRequest, WorkerRegistry, builder
from cache_router.builder import build_router
from cache_router.core.policies import RoundRobinPolicy
from cache_router.core.registry import Worker
from cache_router.core.routing_key import DEFAULT_TYPED_ROUTES, chat_key
from cache_router.core.token_keys import OFFLOAD_ABOVE, TokenizeError, token_routes
from cache_router.core.tree import decode_tokens, encode_tokens
from cache_router.ops.probes import probe_app
from cache_router.ops.tokenizers import HFTokenizer, PrefixCache, compile_chat_template
from cache_router.testing import SimulatedEngine, serve_app
from cache_router.testing.engine import render_chat
from cache_router.testing.tokenizer import CodePointTokenizer

SPECIALS = [
    "<|begin_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
#: Qwen2's template, as its tokenizer_config.json holds it.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: Llama 3's shape: the BOS written by the template, roles checked, contents trimmed.
LLAMA3 = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
CORPUS = [
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello there, how are you today? I am fine, thanks for asking.",
    "Routers send requests to the engine that holds the prefix in its cache.",
]
SYSTEM = ("You are a helpful assistant. Answer briefly and precisely. " * 35)[:2000]


def _write_model(
    folder: Path, template: str | list[dict[str, str]] | None, *, metaspace: bool = False
) -> Path:
    """A real BPE tokenizer trained on a few sentences (byte-level as GPT-2, Llama 3 and
    Qwen; or SentencePiece-style, a "▁" before the first word only, as Llama 2 and
    Mistral), with a BOS post-processor, and a tokenizer_config.json carrying ``template``."""
    tokenizer = Tokenizer(models.BPE(unk_token=None if not metaspace else "<|im_end|>"))
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = sorted({*"".join(CORPUS), "▁", "é", "\t", "\n"})
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        show_progress=False,
        special_tokens=SPECIALS,
        initial_alphabet=alphabet,
    )
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
    }
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_model(tmp_path_factory.mktemp("chatml"), CHATML)


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_model(tmp_path_factory.mktemp("metaspace"), CHATML, metaspace=True)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_model(tmp_path_factory.mktemp("llama3"), LLAMA3)


def _raw(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def _conversation(turns: int, system: str = SYSTEM) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"How are you today, fox {turn}?"})
        messages.append({"role": "assistant", "content": f"The lazy dog is fine {turn}."})
    messages.append({"role": "user", "content": "Hello there, one more question?"})
    return messages


# -- the chat template, as the engines render it ----------------------------------------


def test_chat_is_the_rendered_template_tokenized_without_added_special_tokens(
    chatml: Path,
) -> None:
    tokenizer = HFTokenizer.from_path(chatml, cache=False)
    messages = [{"role": "user", "content": "Hello there"}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    )
    raw = _raw(chatml)
    assert tokenizer.render_chat(messages) == expected
    assert tokenizer.encode_chat(messages) == raw.encode(expected, add_special_tokens=False).ids
    # vLLM's chat default adds none on top of the template; a request may ask for them.
    with_bos = tokenizer.encode_chat(messages, add_special_tokens=True)
    assert with_bos == raw.encode(expected).ids and with_bos[0] == SPECIALS.index(SPECIALS[0])
    assert tokenizer.render_chat(messages, add_generation_prompt=False) == expected[:-22]


def test_llama3_template_gets_the_bos_variable_trims_and_raises(llama3: Path) -> None:
    tokenizer = HFTokenizer.from_path(llama3 / "tokenizer.json", cache=False)
    messages = [
        {"role": "system", "content": "  You are a helpful assistant.\n"},
        {"role": "user", "content": "Hello there"},
    ]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tokenizer.render_chat(messages) == expected
    plain = _raw(llama3).encode(expected, add_special_tokens=False).ids
    assert tokenizer.encode_chat(messages) == plain
    with pytest.raises(TokenizeError, match="Unknown role: robot"):
        tokenizer.encode_chat([{"role": "robot", "content": "beep"}])


def test_environment_is_transformers(tmp_path: Path) -> None:
    """trim_blocks, lstrip_blocks, loop controls, a tojson that keeps HTML characters,
    strftime_now."""
    assert compile_chat_template("{% if true %}\nA\n{% endif %}").render() == "A\n"
    assert compile_chat_template("  {% if true %}x{% endif %}").render() == "x"
    loop = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m }}{% endfor %}"
    assert compile_chat_template(loop).render(messages=["a", "b", "c"]) == "ab"
    assert compile_chat_template("{{ x | tojson }}").render(x={"a": "<b>"}) == '{"a": "<b>"}'
    assert len(compile_chat_template("{{ strftime_now('%Y') }}").render()) == 4


def test_named_templates_and_a_template_file(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "X"}]
    folder = _write_model(tmp_path / "named", named)
    assert HFTokenizer.from_path(folder).chat_template == "X"
    (folder / "chat_template.jinja").write_text("FILE{{ messages[0]['content'] }}")
    assert HFTokenizer.from_path(folder).render_chat([{"role": "user", "content": "!"}]) == "FILE!"
    bare = _write_model(tmp_path / "bare", None)
    with pytest.raises(TokenizeError, match="no chat template"):
        HFTokenizer.from_path(bare).encode_chat([{"role": "user", "content": "hi"}])


def test_content_parts_are_joined_unless_the_template_iterates_them(chatml: Path) -> None:
    tokenizer = HFTokenizer.from_path(chatml)
    parts = [
        {"type": "text", "text": "Hello"},
        {"type": "image_url"},
        {"type": "text", "text": "x"},
    ]
    rendered = tokenizer.render_chat([{"role": "user", "content": parts}])
    assert "<|im_start|>user\nHello\nx<|im_end|>" in rendered
    iterating = HFTokenizer(
        _raw(chatml),
        "{% for m in messages %}{% for p in m['content'] %}[{{ p.type }}]{% endfor %}{% endfor %}",
    )
    assert iterating.render_chat([{"role": "user", "content": parts}]) == (
        "[text][image_url][text]"
    )


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ messages.append(1) }}",  # immutable: the caller's objects cannot be changed
        "{{ raise_exception.__globals__['os'] }}",
    ],
)
def test_the_sandbox_refuses_attribute_attacks(chatml: Path, template: str) -> None:
    tokenizer = HFTokenizer(_raw(chatml), template)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizeError):
        tokenizer.encode_chat(messages)
    assert messages == [{"role": "user", "content": "hi"}]
    # The request keeps its character key: the engine answers it, the router routes it.
    routes = token_routes({None: tokenizer})
    assert routes["/v1/chat/completions"]({"messages": messages}) == ("hi", False)


def test_an_unsafe_attribute_renders_nothing(chatml: Path) -> None:
    tokenizer = HFTokenizer(_raw(chatml), "{{ ''.__class__ }}|{{ messages[0].content }}")
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "|hi"


def test_from_path_refuses_what_is_not_local(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a local directory"):
        HFTokenizer.from_path("meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(ValueError, match=r"has no tokenizer\.json"):
        HFTokenizer.from_path(tmp_path)


# -- the prefix cache ---------------------------------------------------------------------


def test_prefix_cache_gives_the_same_ids_and_hits(chatml: Path) -> None:
    cached = HFTokenizer.from_path(chatml)
    whole = HFTokenizer.from_path(chatml, cache=False)
    assert cached.cache is not None and whole.cache is None
    for turns in range(6):  # one conversation growing: each turn starts with the last
        messages = _conversation(turns)
        assert cached.encode_chat(messages) == whole.encode_chat(messages)
    assert (cached.cache.misses, cached.cache.hits) == (1, 5)
    # Another conversation with the same system prompt starts from its cached prefix.
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "dog?"}]
    assert cached.encode_chat(other) == whole.encode_chat(other)
    assert cached.cache.hits == 6
    assert cached.encode_chat(other, add_special_tokens=True) == whole.encode_chat(
        other, add_special_tokens=True
    )


def test_prefix_cache_is_exact_on_random_conversations(
    chatml: Path, llama3: Path, metaspace: Path
) -> None:
    """Contents that hold special tokens, whitespace runs and unseen characters split the
    same with the cache as without."""
    rng = random.Random(7)
    pieces = [*CORPUS, *SPECIALS, "  ", "\n\n", " é", "🦊", "<|im", "_end|>", "\t"]
    for folder in (chatml, llama3, metaspace):
        cached = HFTokenizer.from_path(folder, cache=PrefixCache(max_entries=8))
        whole = HFTokenizer.from_path(folder, cache=False)
        systems = ["".join(rng.choices(pieces, k=12)) for _ in range(3)]
        for _ in range(60):
            messages: list[dict[str, str]] = [{"role": "system", "content": rng.choice(systems)}]
            for index in range(rng.randrange(1, 6)):
                role = "user" if index % 2 == 0 else "assistant"
                messages.append({"role": role, "content": "".join(rng.choices(pieces, k=4))})
            assert cached.encode_chat(messages) == whole.encode_chat(messages), messages
        assert cached.cache is not None and cached.cache.hits > 0


def test_prefix_cache_is_bounded_in_entries_and_characters() -> None:
    cache = PrefixCache(max_entries=3, max_chars=100)
    for index in range(10):
        cache.put(f"prefix {index}", [index])
    assert len(cache) == 3 and cache.get("prefix 9") is not None and cache.get("prefix 0") is None
    cache.get("prefix 7")  # recently used: kept
    cache.put("x" * 60, [1])
    assert cache.chars <= 100 and cache.get("prefix 7") is not None
    assert cache.get("prefix 8") is None
    cache.put("y" * 101, [1])  # larger than the whole budget: not kept
    assert cache.get("y" * 101) is None and cache.chars <= 100
    with pytest.raises(ValueError):
        PrefixCache(max_entries=0)


# -- the key extractors -------------------------------------------------------------------


def test_decode_tokens_inverts_encode_tokens() -> None:
    ids = [0, 1, 65, 0xD800, 0xDFFF, 150_000, 0x10FFFF]
    assert decode_tokens(encode_tokens(ids)) == ids
    assert decode_tokens("") == []


def test_token_routes_key_every_path_by_tokens(chatml: Path) -> None:
    tokenizer = HFTokenizer.from_path(chatml)
    raw = _raw(chatml)
    routes = token_routes({"qwen": tokenizer})
    assert routes["/v1/embeddings"] is DEFAULT_TYPED_ROUTES["/v1/embeddings"]
    messages = [{"role": "user", "content": "Hello there"}]
    key, tokens = routes["/v1/chat/completions"]({"model": "qwen", "messages": messages})
    assert tokens and decode_tokens(key) == tokenizer.encode_chat(messages)
    text = "The quick brown fox"
    for path, body in [
        ("/v1/completions", {"model": "qwen", "prompt": text}),
        ("/v1/completions", {"model": "qwen", "prompt": [text, "other"]}),
        ("/generate", {"model": "qwen", "text": text}),
    ]:
        key, tokens = routes[path](body)
        assert tokens and decode_tokens(key) == raw.encode(text).ids  # with the BOS
    assert (
        decode_tokens(
            routes["/v1/completions"](
                {"model": "qwen", "prompt": text, "add_special_tokens": False}
            )[0]
        )
        == raw.encode(text, add_special_tokens=False).ids
    )
    # Token ids are keyed as given, with or without a tokenizer.
    assert routes["/generate"]({"model": "qwen", "input_ids": [5, 6, 7]}) == (
        encode_tokens([5, 6, 7]),
        True,
    )
    # A model without a tokenizer keeps the character key.
    body = {"model": "other", "messages": messages}
    assert routes["/v1/chat/completions"](body) == chat_key(body)
    assert routes["/v1/completions"]({"model": "other", "prompt": text}) == (text, False)


def test_default_and_model_less_requests(chatml: Path) -> None:
    codepoints = CodePointTokenizer()
    hf = HFTokenizer.from_path(chatml)
    routes = token_routes({None: codepoints}, default=hf)
    assert routes["/generate"]({"text": "abc"}) == ("abc", True)  # no model: the None entry
    key, tokens = routes["/generate"]({"model": "any", "text": "abc"})
    assert tokens and decode_tokens(key) == hf.encode_text("abc")
    assert routes["/generate"]({"model": 7, "text": "abc"}) == (
        encode_tokens(hf.encode_text("abc")),
        True,
    )


def test_generation_prompt_and_tools_reach_the_template(chatml: Path) -> None:
    template = (
        "{% if tools %}TOOLS{{ tools | tojson }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    tokenizer = HFTokenizer(_raw(chatml), template)
    extract = token_routes({None: tokenizer})["/v1/chat/completions"]
    messages = [{"role": "user", "content": "hi"}]

    def rendered(body: dict[str, Any]) -> str:
        return str(_raw(chatml).decode(decode_tokens(extract(body)[0]), skip_special_tokens=False))

    assert rendered({"messages": messages}) == "<|im_start|>hi<|im_end|><|im_start|>"
    assert rendered({"messages": messages, "add_generation_prompt": False}).endswith("<|im_end|>")
    assert rendered({"messages": messages, "continue_final_message": True}).endswith("<|im_end|>")
    assert rendered({"messages": messages, "tools": [{"name": "f"}]}).startswith('TOOLS[{"name"')


class _Counting:
    """A tokenizer that records how much text it was given."""

    def __init__(self) -> None:
        self.seen = 0

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self.seen = len(text)
        return decode_tokens(text)

    def encode_chat(
        self,
        messages: Sequence[Any],
        *,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: Sequence[Any] | None = None,
    ) -> list[int]:
        text = "".join(str(message.get("content")) for message in messages)
        self.seen = len(text)
        return decode_tokens(text)


def test_keys_and_the_work_behind_them_are_bounded() -> None:
    counting = _Counting()
    routes = token_routes({None: counting}, max_tokens=100)
    key, _ = routes["/v1/completions"]({"prompt": "x" * 10_000})
    assert len(key) == 100 and counting.seen == 400
    messages = [{"role": "user", "content": "y" * 300}] * 5
    key, _ = routes["/v1/chat/completions"]({"messages": messages})
    assert len(key) == 100 and counting.seen == 400  # the second message cut, none after
    parts = [{"role": "user", "content": [{"type": "text", "text": "z" * 1000}]}]
    routes["/v1/chat/completions"]({"messages": parts})
    assert counting.seen <= 1000
    with pytest.raises(ValueError):
        token_routes({}, max_tokens=0)


def test_codepoint_tokenizer_matches_the_simulated_engine() -> None:
    messages = [{"role": "system", "content": "sé🦊"}, {"role": "user", "content": "hi"}]
    tokenizer = CodePointTokenizer()
    assert tokenizer.encode_chat(messages) == [ord(char) for char in render_chat(messages)]
    assert tokenizer.encode_text("a🦊") == [97, 0x1F98A]
    with pytest.raises(TokenizeError):
        tokenizer.encode_chat([{"content": "no role"}])


# -- through a real router ----------------------------------------------------------------


class _Recording:
    """Round robin that remembers what it was asked to route."""

    def __init__(self) -> None:
        self.inner = RoundRobinPolicy()
        self.requests: list[RoutingRequest] = []

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        self.requests.append(RoutingRequest(request.key, request.model, tokens=request.tokens))
        return self.inner.select(request, candidates)


def test_a_request_through_a_real_router_gets_a_token_key(chatml: Path) -> None:
    engine = SimulatedEngine(model="sim", decode_seconds_per_token=0.0)
    policy = _Recording()
    hf = HFTokenizer.from_path(chatml)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    with serve_app(engine) as engine_url:
        registry = WorkerRegistry([engine_url])
        routes = token_routes({"sim": CodePointTokenizer()}, default=hf)
        app = RoutingMiddleware(
            probe_app(registry), registry, policy, typed_routes=routes, transport="httpx"
        )
        with serve_app(app) as url, httpx.Client(base_url=url, trust_env=False) as client:
            body = {"model": "sim", "messages": messages, "max_tokens": 1}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert client.post("/generate", json={"model": "sim", "text": "abc"}).is_success
    chat, generate = policy.requests
    assert chat.tokens and decode_tokens(chat.key) == [ord(c) for c in render_chat(messages)]
    assert (generate.key, generate.tokens) == ("abc", True)


class _Gated(CodePointTokenizer):
    """Tokenizes a long text only once the test lets it: a stand-in for seconds of work."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.proceed = threading.Event()
        self.released: bool | None = None

    def text_key(self, text: str, *, add_special_tokens: bool = True) -> str:
        if len(text) > 10_000:
            self.started.set()
            self.released = self.proceed.wait(10)
        return text


def test_a_large_body_is_tokenized_off_the_event_loop() -> None:
    """While a body over ``offload_above`` is being tokenized, a small request is served:
    on the event loop, the small one would wait for it (and the gate would time out)."""
    engine = SimulatedEngine(model="sim", decode_seconds_per_token=0.0)
    tokenizer = _Gated()
    with serve_app(engine) as engine_url:
        registry = WorkerRegistry([engine_url])
        routes = token_routes({"sim": tokenizer})
        app = RoutingMiddleware(
            probe_app(registry), registry, _Recording(), typed_routes=routes, transport="httpx"
        )
        with serve_app(app) as url, httpx.Client(base_url=url, trust_env=False) as client:
            large = {"model": "sim", "text": "x" * 20_000, "sampling_params": {"max_new_tokens": 1}}
            assert len(json.dumps(large)) > OFFLOAD_ABOVE
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(client.post, "/generate", json=large, timeout=30)
                assert tokenizer.started.wait(10)
                small = client.post("/generate", json={"model": "sim", "text": "hi"}, timeout=5)
                assert small.status_code == 200 and tokenizer.released is None
                tokenizer.proceed.set()
                assert pending.result(30).status_code == 200
    assert tokenizer.released is True


# -- configuration ------------------------------------------------------------------------


def test_build_router_keys_by_tokens_for_token_policies(
    chatml: Path,
) -> None:
    """``tokenizer_path`` (``MODEL=PATH`` and ``PATH``) reaches the served router; each
    path is loaded once."""
    engine = SimulatedEngine(model="sim", decode_seconds_per_token=0.0)
    policy = _Recording()
    messages = [{"role": "user", "content": "Hello there"}]
    with serve_app(engine) as engine_url:
        config = RouterConfig(
            worker_urls=[engine_url],
            tokenizer_path=(f"sim={builder.CODEPOINTS}", f"qwen={chatml}"),
            model_path=str(chatml),
            disable_health_check=True,
            policy="precise_cache_aware",
        )
        router = build_router(config, policy=policy)
        assert router.typed_routes is not None
        with serve_app(router.app()) as url, httpx.Client(base_url=url, trust_env=False) as client:
            for model in ("sim", "qwen", "other"):
                body = {"model": model, "messages": messages, "max_tokens": 1}
                assert client.post("/v1/chat/completions", json=body).status_code == 200
    hf = HFTokenizer.from_path(chatml)
    sim, qwen, other = (decode_tokens(request.key) for request in policy.requests)
    assert all(request.tokens for request in policy.requests)
    assert sim == [ord(char) for char in render_chat(messages)]
    assert qwen == other == hf.encode_chat(messages)


def test_tokenizers_are_for_token_policies_only(
    chatml: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = RouterConfig(worker_urls=["http://127.0.0.1:9"], model_path=str(chatml))
    with caplog.at_level("WARNING", logger="cache_router"):
        assert build_router(config).typed_routes is None
    assert "requests keep character keys" in caplog.text


@pytest.mark.parametrize(
    ("paths", "model_path", "problem"),
    [
        (("meta-llama/Llama-3.1-8B",), None, "neither a local directory"),
        ((), "meta-llama/Llama-3.1-8B", "neither a local directory"),
        (("a=/x", "a=/y"), None, "model 'a' twice"),
        (("/x", "/y"), None, "two paths for any model"),
    ],
)
def test_bad_tokenizer_settings_are_refused_at_start(
    paths: tuple[str, ...], model_path: str | None, problem: str
) -> None:
    config = RouterConfig(
        worker_urls=["http://127.0.0.1:9"],
        tokenizer_path=paths,
        model_path=model_path,
        policy="precise_cache_aware",
    )
    with pytest.raises(ValueError, match=problem):
        build_router(config)


def test_a_path_with_an_equals_sign_is_a_path(tmp_path: Path, chatml: Path) -> None:
    odd = tmp_path / "a=b"
    odd.mkdir()
    (odd / "tokenizer.json").write_bytes((chatml / "tokenizer.json").read_bytes())
    assert builder._tokenizer_specs([str(odd), "m=/p"], "/model") == ({"m": "/p"}, str(odd))
    assert builder._tokenizer_specs(["m=/p"], "/model") == ({"m": "/p"}, "/model")


def test_the_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """A smoke-sized run, so benchmarks/tokenize_cost.py never rots (no timing checked)."""
    from benchmarks import tokenize_cost

    argv = ["--vocab", "600", "--prompts", "2", "--conversations", "3", "--turns", "2"]
    assert tokenize_cost.main([*argv, "--passes", "1", "--corpus-chars", "200000"]) == 0
    assert "| tokens, prefix cache |" in capsys.readouterr().out


def test_the_offload_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """A smoke-sized run of benchmarks/offload_cost.py (no timing checked)."""
    from benchmarks import offload_cost

    argv = ["--vocab", "600", "--sizes", "1", "20", "--repeats", "1"]
    assert offload_cost.main([*argv, "--corpus-chars", "200000"]) == 0
    out = capsys.readouterr().out
    assert "| 20 | 21," in out and "offloaded above 16,384 bytes" in out
