"""The tokenizers a configuration names, as the key extractors of the token policies.

``tokenizer_path`` (``PATH`` or ``MODEL=PATH``, repeatable) and ``model_path`` name the
tokenizers that turn prompts into token keys for the policies that route on tokens
(:data:`TOKEN_POLICIES`); :func:`token_routes_from_config` loads each path once and
gives :func:`~cache_router.builder.build_router` the extractors, or None when requests
keep character keys. :data:`CODEPOINTS` names the simulated engine's tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from cache_router.config import RouterConfig
from cache_router.core.routing_key import KeyExtractor
from cache_router.core.token_keys import PromptTokenizer, token_routes

__all__ = ["CODEPOINTS", "TOKEN_POLICIES", "token_routes_from_config", "tokenizer_specs"]

# The builder's logger: these warnings are about how the router is built.
logger = logging.getLogger("cache_router")


#: The policies that route on token keys when tokenizers are configured.
TOKEN_POLICIES = frozenset({"precise_cache_aware"})
#: A ``tokenizer_path`` naming the simulated engine's tokenizer (one token per character),
#: for a router in front of :class:`cache_router.testing.SimulatedEngine`.
CODEPOINTS = "builtin:codepoints"


def token_routes_from_config(config: RouterConfig) -> dict[str, KeyExtractor] | None:
    """Key extractors that tokenize with the configured tokenizers, for the policies that
    route on tokens; each path is loaded once, however many models share it."""
    if not config.tokenizer_path and config.model_path is None:
        return None
    if config.policy not in TOKEN_POLICIES:
        logger.warning(
            "tokenizer_path and model_path serve the precise_cache_aware policy; with %s "
            "requests keep character keys",
            config.policy,
        )
        return None
    models, default = tokenizer_specs(config.tokenizer_path, config.model_path)
    loaded: dict[str, PromptTokenizer] = {}
    for path in {*models.values(), *([default] if default is not None else [])}:
        loaded[path] = _load_tokenizer(path)
    return token_routes(
        {model: loaded[path] for model, path in models.items()},
        None if default is None else loaded[default],
        max_tokens=config.max_routing_key_length,
    )


def tokenizer_specs(
    paths: Sequence[str], model_path: str | None
) -> tuple[dict[str, str], str | None]:
    """``tokenizer_path`` values (``PATH`` or ``MODEL=PATH``) and ``model_path`` as
    ``({model: path}, path for any model)``: a value that is an existing path is a path
    even with a ``=`` in it, and a ``PATH`` for any model comes before ``model_path`` (as
    SGLang's ``--tokenizer-path`` overrides its ``--model-path``)."""
    models: dict[str, str] = {}
    default: str | None = None
    for value in paths:
        model, sign, path = value.partition("=")
        if not sign or not model or not path or Path(value).expanduser().exists():
            if default is not None:
                raise ValueError(f"tokenizer_path: two paths for any model, {default} and {value}")
            default = value
        elif model in models:
            raise ValueError(f"tokenizer_path gives model {model!r} twice")
        else:
            models[model] = path
    return models, default if default is not None else model_path


def _load_tokenizer(path: str) -> PromptTokenizer:
    if path == CODEPOINTS:
        from cache_router.testing.tokenizer import CodePointTokenizer

        return CodePointTokenizer()
    try:
        from cache_router.ops.tokenizers import load_tokenizer
    except ImportError as exc:
        raise ValueError(
            f"tokenizer_path needs the precise extra (pip install 'cache_router[precise]'): {exc}"
        ) from None
    return load_tokenizer(path)
