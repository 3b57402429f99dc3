"""Routing-key extraction: which part of each request body the policy routes on.

The key must start with the prompt (never the serialized body) and token ids must be
keyed as tokens, one code point each, so that different sequences never collide.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_router.core import routing_key
from cache_router.core.routing_key import (
    BOUNDED_EXTRACTORS,
    DEFAULT_TYPED_ROUTES,
    MAX_KEY_ITEMS,
    BodyError,
    KeyExtractor,
    RoutingKey,
    chat_key,
    generic_key,
    parse_json_object,
    parse_routing_fields,
)
from cache_router.core.tree import encode_tokens


def typed(path: str, body: dict[str, Any]) -> tuple[str, bool]:
    return DEFAULT_TYPED_ROUTES[path](body)


# -- typed routes ------------------------------------------------------------------------


def test_default_typed_routes_are_the_inference_endpoints() -> None:
    assert set(DEFAULT_TYPED_ROUTES) == {
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/rerank",
        "/v1/responses",
    }


def test_generate_prefers_text_over_input_ids() -> None:
    assert typed("/generate", {"text": "hello", "input_ids": [1, 2]}) == ("hello", False)


def test_generate_falls_back_to_input_ids_as_tokens() -> None:
    assert typed("/generate", {"input_ids": [5, 6, 7]}) == (encode_tokens([5, 6, 7]), True)


def test_generate_batch_routes_on_first_prompt() -> None:
    assert typed("/generate", {"text": ["first", "second"]}) == ("first", False)
    assert typed("/generate", {"input_ids": [[9, 8], [1]]}) == (encode_tokens([9, 8]), True)


def test_generate_without_prompt_has_empty_key() -> None:
    assert typed("/generate", {"sampling_params": {"max_new_tokens": 4}}) == ("", False)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a string prompt", ("a string prompt", False)),
        (["first of batch", "second"], ("first of batch", False)),
        ([101, 102, 103], (encode_tokens([101, 102, 103]), True)),
        ([[7, 8, 9], [1, 2]], (encode_tokens([7, 8, 9]), True)),
        ([], ("", False)),
        (None, ("", False)),
    ],
)
def test_completions_prompt_shapes(prompt: object, expected: tuple[str, bool]) -> None:
    assert typed("/v1/completions", {"model": "m", "prompt": prompt}) == expected


def test_chat_key_joins_every_message_text_in_order() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    }
    assert typed("/v1/chat/completions", body) == (
        "You are terse.\nWhat is 2+2?\n4\nAnd 3+3?",
        False,
    )


def test_chat_key_takes_text_parts_of_multimodal_content() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "this picture"},
                ],
            },
        ]
    }
    key, tokens = chat_key(body)
    assert key == "sys\nlook at\nthis picture"
    assert "base64" not in key
    assert tokens is False


def test_chat_key_is_a_prefix_of_the_next_turn() -> None:
    # Later turns of the same conversation extend the key, so they find the cached prefix.
    turn1 = [{"role": "user", "content": "hello"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    key1, _ = chat_key({"messages": turn1})
    key2, _ = chat_key({"messages": turn2})
    assert key2.startswith(key1)
    assert key2 != key1


def test_chat_key_ignores_non_text_and_missing_messages() -> None:
    assert chat_key({"messages": "not a list"}) == ("", False)
    assert chat_key({}) == ("", False)
    assert chat_key({"messages": [{"role": "user", "content": None}, 42]}) == ("", False)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"input": "embed me"}, ("embed me", False)),
        ({"input": ["one", "two"]}, ("one", False)),
        ({"input": [3, 4]}, (encode_tokens([3, 4]), True)),
    ],
)
def test_embeddings_key_is_input(body: dict[str, Any], expected: tuple[str, bool]) -> None:
    assert typed("/v1/embeddings", body) == expected


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_rerank_key_is_the_query_not_the_documents(path: str) -> None:
    body = {"query": "what is a llama", "documents": ["doc a", "doc b"]}
    assert typed(path, body) == ("what is a llama", False)


def test_responses_key_from_string_or_message_items() -> None:
    assert typed("/v1/responses", {"input": "plain input"}) == ("plain input", False)
    items = [
        {"role": "user", "content": "first"},
        {"role": "user", "content": [{"type": "input_text", "text": "second"}]},
    ]
    assert typed("/v1/responses", {"input": items}) == ("first\nsecond", False)


# -- token ids --------------------------------------------------------------------------


def test_token_ids_do_not_collide() -> None:
    # A decimal join ("1,23" vs "12,3") or a length would collide; code points do not.
    pairs = [([1, 23], [12, 3]), ([1, 2, 3], [123]), ([0], []), ([10], [1, 0])]
    for left, right in pairs:
        left_key = typed("/v1/completions", {"prompt": left}) if left else ("", False)
        right_key = typed("/v1/completions", {"prompt": right}) if right else ("", False)
        assert left_key != right_key, (left, right)


def test_token_key_length_equals_token_count_and_preserves_prefixes() -> None:
    short, _ = typed("/generate", {"input_ids": [100, 200, 300]})
    long, _ = typed("/generate", {"input_ids": [100, 200, 300, 400, 500]})
    assert len(short) == 3
    assert len(long) == 5
    assert long.startswith(short)


def test_token_and_text_keys_are_flagged_apart() -> None:
    # "AB" as text and [65, 66] as tokens encode to the same characters: the flag keeps
    # them in different trees.
    text_key = typed("/v1/completions", {"prompt": "AB"})
    token_key = typed("/v1/completions", {"prompt": [65, 66]})
    assert text_key[0] == token_key[0]
    assert text_key[1] is False
    assert token_key[1] is True


@pytest.mark.parametrize("bad", [[1, -1], [1, "x"], [1, 2.5], [1, 0x110000]])
def test_invalid_token_ids_raise_body_error(bad: list[Any]) -> None:
    with pytest.raises(BodyError):
        typed("/v1/completions", {"prompt": bad})


# -- transparent (generic) key -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"token_ids": [1, 2, 3]}, (encode_tokens([1, 2, 3]), True)),
        ({"input_ids": [4, 5]}, (encode_tokens([4, 5]), True)),
        ({"text": "some text"}, ("some text", False)),
        ({"prompt": "a prompt"}, ("a prompt", False)),
        ({"messages": [{"role": "user", "content": "hi"}]}, ("hi", False)),
        ({"input": "an input"}, ("an input", False)),
        ({"input": [{"role": "user", "content": "item"}]}, ("item", False)),
    ],
)
def test_generic_key_fields(body: dict[str, Any], expected: tuple[str, bool]) -> None:
    assert generic_key(body) == expected


def test_generic_key_field_order() -> None:
    body = {
        "input": "input",
        "messages": [{"role": "user", "content": "messages"}],
        "prompt": "prompt",
        "text": "text",
        "input_ids": [2],
        "token_ids": [1],
    }
    assert generic_key(body) == (encode_tokens([1]), True)
    del body["token_ids"]
    assert generic_key(body) == (encode_tokens([2]), True)
    del body["input_ids"]
    assert generic_key(body) == ("text", False)
    del body["text"]
    assert generic_key(body) == ("prompt", False)
    del body["prompt"]
    assert generic_key(body) == ("messages", False)
    del body["messages"]
    assert generic_key(body) == ("input", False)


def test_generic_key_skips_empty_fields_to_the_next_one() -> None:
    assert generic_key({"token_ids": [], "text": "fallback"}) == ("fallback", False)


def test_generic_key_of_object_without_prompt_fields_is_empty_not_the_body() -> None:
    body = {"model": "llama", "sampling_params": {"temperature": 0}, "stream": True}
    key, tokens = generic_key(body)
    assert key == ""
    assert tokens is False
    # In particular not the serialized body, which would make every request "share a
    # prefix" of field names.
    assert "model" not in key


# -- parse_json_object -------------------------------------------------------------------


def test_parse_json_object_accepts_objects() -> None:
    body = {"a": [1, 2], "b": "ü"}
    assert parse_json_object(json.dumps(body).encode()) == body


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"42", "JSON object"),
        (b"null", "JSON object"),
    ],
)
def test_parse_json_object_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(BodyError, match=message):
        parse_json_object(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # JavaScript's JSON.stringify writes a truncated emoji as a lone surrogate escape.
        (b'{"prompt": "cut emoji \\ud83d"}', {"prompt": "cut emoji \ud83d"}),
        (b'{"x": 1e400}', {"x": float("inf")}),
        (b'\xef\xbb\xbf{"a": 1}', {"a": 1}),
    ],
)
def test_parse_json_object_accepts_valid_json_orjson_refuses(
    raw: bytes, expected: dict[str, Any]
) -> None:
    # Engines parse with the standard library; the router must not refuse what they accept.
    assert parse_json_object(raw) == expected


@pytest.mark.parametrize("raw", [b'{"x": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}'])
def test_parse_json_object_refuses_non_json_constants(raw: bytes) -> None:
    with pytest.raises(BodyError, match="not valid JSON"):
        parse_json_object(raw)


def test_parse_json_object_survives_deep_nesting() -> None:
    with pytest.raises(BodyError):
        parse_json_object(b"[" * 100_000 + b"]" * 100_000)


def test_a_body_orjson_refuses_as_malformed_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []
    loads = json.loads

    def spy(body: bytes, **options: Any) -> Any:
        seen.append(body)
        return loads(body, **options)

    monkeypatch.setattr(routing_key._json, "loads", spy)
    for raw in (b'{"prompt": [1, 2,}', b'{"prompt": "x"', b'{"a": tru}', b"{" * 10):
        with pytest.raises(BodyError, match="not valid JSON"):
            parse_json_object(raw)
    assert seen == []
    # What the standard library might accept still gets its opinion (and is accepted).
    assert parse_json_object(b'{"prompt": "\\ud83d"}') == {"prompt": "\ud83d"}
    assert len(seen) == 1


# -- large bodies: routing fields decoded only as far as the key reaches --------------------

LIMIT = 5
EXTRACTORS = sorted(BOUNDED_EXTRACTORS, key=lambda extract: extract.__name__)


def cut(extract: KeyExtractor, parsed: dict[str, Any], limit: int) -> RoutingKey | str:
    try:
        key, tokens = extract(parsed)
    except BodyError:
        return "BodyError"
    return key[:limit], tokens


def assert_same_keys(raw: bytes, limit: int) -> None:
    """Every built-in extractor gives the same key, cut to ``limit``, on the skimmed
    fields as on the whole parsed body; the model is the same too."""
    whole = parse_json_object(raw)
    skimmed = parse_routing_fields(raw, limit)
    assert skimmed.get("model") == whole.get("model")
    for extract in EXTRACTORS:
        assert cut(extract, skimmed, limit) == cut(extract, whole, limit), extract.__name__


_text = st.one_of(st.text(max_size=150), st.text(alphabet="0123456789, -", max_size=150))
_tokens = st.lists(st.integers(0, 300_000), max_size=120)
_prompt = st.one_of(
    _text,
    _tokens,
    st.lists(_text, min_size=1, max_size=3),
    st.lists(_tokens, min_size=1, max_size=3),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=40),
    st.dictionaries(st.text(max_size=3), _text, max_size=3),
)
_part = st.one_of(_text, st.fixed_dictionaries({"type": st.just("text"), "text": _text}))
_message = st.one_of(
    _text,
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system"]),
            "content": st.one_of(_text, st.lists(_part, max_size=4)),
        }
    ),
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=10),
        "prompt": _prompt,
        "text": _prompt,
        "input_ids": _prompt,
        "token_ids": _prompt,
        "query": _prompt,
        "input": st.one_of(_prompt, st.lists(_message, max_size=5)),
        "messages": st.lists(_message, max_size=6),
        "padding": _text,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=_fields,
    ascii_only=st.booleans(),
    limit=st.integers(1, 12),
    block=st.sampled_from([None, 16, 64]),
)
def test_skimmed_fields_give_the_same_cut_key_as_the_whole_body(
    fields: dict[str, Any], ascii_only: bool, limit: int, block: int | None
) -> None:
    # With a small limit, most of these bodies are larger than the skim's windows, so the
    # heads (strings cut inside escapes, surrogate pairs and UTF-8; token lists cut at a
    # comma) are what is compared. With small blocks, runs of numbers are cut out and
    # checked apart, including runs inside strings (which must not be refused).
    raw = json.dumps(fields, ensure_ascii=ascii_only).encode()
    with pytest.MonkeyPatch.context() as patch:
        if block is not None:
            patch.setattr(routing_key, "_BLOCK", block)
            patch.setattr(routing_key, "_PIECE", block // 2)
        assert_same_keys(raw, limit)


@pytest.mark.parametrize(
    "run",
    [
        b"1,,2",
        b"1,01,2",
        b"1,1.,2",
        b"1,+1,2",
        b"1,1e,2",
        b"1,-,2",
        b"1,1 2,3",
        b"1,--1,2",
    ],
)
def test_runs_of_numbers_checked_apart_are_still_checked(
    monkeypatch: pytest.MonkeyPatch, run: bytes
) -> None:
    monkeypatch.setattr(routing_key, "_BLOCK", 16)
    monkeypatch.setattr(routing_key, "_PIECE", 8)
    for where in range(0, 400, 7):
        numbers = b"3," * where + run + b",4" * (400 - where)
        raw = b'{"prompt": [' + numbers + b'], "model": "m"}'
        assert routing_key._number_runs(raw, routing_key._intact(1))  # cut out, checked apart
        with pytest.raises(BodyError, match="not valid JSON"):
            parse_routing_fields(raw, 1)
        with pytest.raises(BodyError):
            parse_json_object(raw)


def test_a_run_of_numbers_inside_a_string_is_a_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing_key, "_BLOCK", 16)
    raw = b'{"padding": "' + b"1,,01," * 200 + b'", "text": "' + b"9, " * 300 + b'"}'
    assert routing_key._number_runs(raw, routing_key._intact(1))
    assert parse_routing_fields(raw, 2)["text"][:2] == "9,"
    assert_same_keys(raw, 2)


def test_skimmed_token_list_is_decoded_only_as_far_as_the_key() -> None:
    raw = b'{"prompt": [' + b"7, " * 1_000_000 + b'7], "model": "m"}'
    parsed = parse_routing_fields(raw, 1000)
    assert parsed == {"prompt": [7] * 1000, "model": "m"}
    assert_same_keys(raw, 1000)


def test_skimmed_string_is_decoded_only_as_far_as_the_key() -> None:
    raw = json.dumps({"text": "\U0001f600" * 100_000 + "tail"}).encode()  # 12-byte escapes
    parsed = parse_routing_fields(raw, 50)
    assert 50 < len(parsed["text"]) < 100
    assert parsed["text"][:50] == "\U0001f600" * 50
    assert_same_keys(raw, 50)


def test_skimmed_fields_skip_what_no_key_reads() -> None:
    raw = json.dumps({"sampling_params": {"n": list(range(100_000))}, "text": "hi"}).encode()
    assert parse_routing_fields(raw, 10) == {"text": "hi"}


def test_skimmed_messages_stop_after_max_key_items() -> None:
    messages = [{"role": "user", "content": f"m{index}"} for index in range(MAX_KEY_ITEMS + 50)]
    raw = json.dumps({"messages": messages}).encode()
    limit = 3  # every window is smaller than the list, so the list is cut to its head
    assert len(parse_routing_fields(raw, limit)["messages"]) == MAX_KEY_ITEMS
    key, _ = chat_key(parse_json_object(raw))
    assert key.split("\n") == [f"m{index}" for index in range(MAX_KEY_ITEMS)]
    assert_same_keys(raw, 10_000)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": [1, 2, "x"' + b", 3" * 1000 + b"]}",
        b'{"prompt": [1, 2, [3, 4]' + b", 3" * 1000 + b"]}",
        b'{"prompt": [1, -2' + b", 3" * 1000 + b"]}",
    ],
)
def test_skimmed_token_list_with_a_non_token_in_the_key_is_refused(raw: bytes) -> None:
    with pytest.raises(BodyError):
        DEFAULT_TYPED_ROUTES["/v1/completions"](parse_routing_fields(raw, 100))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"prompt": [' + b"1," * 1000 + b"1]", "not valid JSON"),
        (b'{"prompt": "' + b"a" * 1000 + b'", "x": [1,,2]}', "not valid JSON"),
        (b'{"prompt": "a", "x": NaN}', "not valid JSON"),
        (b"[" + b"1," * 1000 + b"1]", "JSON object"),
        (b'"just a string"', "JSON object"),
        (b"", "not valid JSON"),
    ],
)
def test_skim_refuses_what_is_not_a_json_object(raw: bytes, message: str) -> None:
    with pytest.raises(BodyError, match=message):
        parse_routing_fields(raw, 10)


def test_skim_accepts_a_byte_order_mark_like_the_whole_parse() -> None:
    raw = b'\xef\xbb\xbf{"prompt": "' + b"b" * 1000 + b'"}'
    assert parse_routing_fields(raw, 4)["prompt"][:4] == "bbbb"
    assert_same_keys(raw, 4)


def test_cache_scope_marks_salts_extra_keys_and_adapters() -> None:
    assert routing_key.cache_scope({"prompt": "p"}) == ""
    for empty in ({"cache_salt": ""}, {"cache_salt": None}, {"cache_salt": 7}, {"extra_key": []}):
        assert routing_key.cache_scope(empty) == ""
    salt = routing_key.cache_scope({"cache_salt": "tenant-1"})
    assert len(salt) == routing_key.SCOPE_MARKER_CHARS
    assert routing_key.cache_scope({"cache_salt": "tenant-1", "prompt": "other"}) == salt
    assert routing_key.cache_scope({"cache_salt": ["tenant-1", "tenant-2"]}) == salt
    others = [
        {"cache_salt": "tenant-2"},
        {"extra_key": "tenant-1"},
        {"lora_path": "tenant-1"},
        {"cache_salt": "tenant-1", "extra_key": "x"},
        {"cache_salt": "tenant-1", "lora_path": "x"},
    ]
    markers = {routing_key.cache_scope(body) for body in others}
    assert salt not in markers and len(markers) == len(others)
    # A lone surrogate (valid JSON) is hashed, not refused.
    assert len(routing_key.cache_scope({"cache_salt": "\ud83d"})) == routing_key.SCOPE_MARKER_CHARS


def test_skimmed_fields_carry_the_cache_scope() -> None:
    body = {"prompt": "x" * 50_000, "cache_salt": "tenant-1", "lora_path": ["a", "b"], "n": 1}
    raw = json.dumps(body).encode()
    skimmed = routing_key.parse_routing_fields(raw, 64)
    assert routing_key.cache_scope(skimmed) == routing_key.cache_scope(body) != ""
