"""``cache-router serve`` with the simulated engines' tokenizer, for the precise benchmark.

The precise policy matches token keys only. The simulated engine's tokenizer maps one
character to one token (its code point) and its chat template is
:func:`cache_router.testing.engine.render_chat`, so the routing key of a chat request is
the rendered prompt and that of a completion its text, both marked as tokens: exactly the
keys a real tokenizer and chat template would give for a real engine. Everything else is
``cache-router serve``: the same flags, configuration and server settings.

    python -m benchmarks._precise_router --worker-urls URL... --policy precise_cache_aware \
        --kv-events URL=tcp://HOST:PORT,tcp://HOST:REPLAY ... --kv-block-size 16
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import uvicorn

from cache_router.builder import build_router
from cache_router.cli import build_parser, serve_config
from cache_router.core.routing_key import DEFAULT_TYPED_ROUTES, BodyError, RoutingKey
from cache_router.serve import _uvicorn_settings, run_server
from cache_router.testing.engine import render_chat


def chat_tokens(body: Mapping[str, Any]) -> RoutingKey:
    """The engine's prompt for a chat request, one token per character."""
    try:
        return render_chat(body.get("messages")), True
    except Exception as exc:  # the engine's own refusal (a 400): the router answers 400
        raise BodyError(str(exc)) from None


def completion_tokens(body: Mapping[str, Any]) -> RoutingKey:
    key = DEFAULT_TYPED_ROUTES["/v1/completions"](body)[0]
    return key, True  # text is tokens already (one per character); ids are, too


ROUTES = {
    **DEFAULT_TYPED_ROUTES,
    "/v1/chat/completions": chat_tokens,
    "/v1/completions": completion_tokens,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    config = serve_config(args)
    router = build_router(config)
    app = router.app(typed_routes=ROUTES)
    return run_server(uvicorn.Server(uvicorn.Config(app, **_uvicorn_settings(config))))


if __name__ == "__main__":
    raise SystemExit(main())
