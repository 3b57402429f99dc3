"""``cache-router engine``: a :class:`SimulatedEngine` served from the shell.

So ``serve`` can be tried, and a container fleet composed, without a GPU or a script. The
engine's knobs become flags by reading the constructor's signature (name, type, default);
only their one-line help is written here, and a test checks every knob has one, so a knob
added to the engine is a flag here or a failing test, never silently missing.

uvicorn shuts down gracefully on SIGTERM and SIGINT, and then re-raises the signal:
SIGTERM ends the process with status 143 (killed by SIGTERM), Ctrl-C with 130; a port in
use is status 3, as for ``serve``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any

from cache_router.serve import run_server
from cache_router.testing.engine import SimulatedEngine

__all__ = ["ENGINE_HELP", "NOT_FLAGS", "add_engine_parser", "engine_knobs", "run_engine"]


#: One line of help per constructor knob (the class docstring has the long version).
ENGINE_HELP = {
    "name": "reported in /stats and the x-engine response header",
    "model": "the model name served (/v1/models and the answers' model field)",
    "capacity": "prefix-cache size in characters; least recently used prefixes are evicted",
    "max_running": "requests decoded at once; later ones wait in a FIFO queue",
    "max_queued": "queue length beyond which requests get 503 (default: unbounded)",
    "prefill_seconds_per_char": "prefill cost per uncached prompt character",
    "decode_seconds_per_token": "cost per generated token (one streamed chunk each)",
    "default_max_tokens": "tokens generated when a request does not say",
    "max_tokens_limit": "larger max_tokens values are refused with 400",
    "block_size": "cache whole blocks of this many tokens, as vLLM does (needs the precise extra)",
    "dp_size": "the dp_size GET /get_server_info states, for --dp-aware routers (default: none)",
}


#: Knobs that are no flag: a prefill/decode engine needs a second server beside it (its
#: bootstrap or side-channel app), which ``cache_router.testing.serve_pd_fleet`` starts;
#: a KV-event publisher is an object with sockets of its own (and the form of its removal
#: events goes with it).
NOT_FLAGS = frozenset(
    {
        "kv_events",
        "kv_removals",
        "role",
        "pd_protocol",
        "transfer_timeout",
        "pd_store_size",
        "pd_store_ttl",
        "default_bootstrap_port",
    }
)


def engine_knobs() -> dict[str, tuple[type, Any]]:
    """``SimulatedEngine``'s keyword arguments that are flags: name -> (scalar type,
    default)."""
    # Each flag's annotation is evaluated on its own: the others may name types that are
    # imported for type checking only (an optional extra's).
    namespace = vars(sys.modules[SimulatedEngine.__module__])
    knobs: dict[str, tuple[type, Any]] = {}
    for name, parameter in inspect.signature(SimulatedEngine.__init__).parameters.items():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or name in NOT_FLAGS:
            continue
        hint = parameter.annotation
        if isinstance(hint, str):
            hint = eval(hint, dict(namespace))  # our own annotations, never input
        # ``int | None`` and the like: the flag parses the non-None member.
        kinds = [kind for kind in getattr(hint, "__args__", (hint,)) if kind is not type(None)]
        knobs[name] = (kinds[0], parameter.default)
    return knobs


def add_engine_parser(commands: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add the ``engine`` command to ``cache-router``'s subparsers."""
    engine = commands.add_parser(
        "engine",
        help="serve a simulated engine (no GPU) to try serve against",
        description=(
            "Serve a simulated OpenAI/SGLang-compatible engine whose latency follows its "
            "prefix cache and load. SIGTERM or Ctrl-C stops it gracefully."
        ),
        formatter_class=formatter_class,
    )
    engine.add_argument("--host", default="127.0.0.1", help="address to listen on")
    engine.add_argument("--port", type=int, required=True, metavar="PORT", help="port")
    engine.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error", "critical"),
        help="uvicorn's log level (info logs every request)",
    )
    knobs = engine.add_argument_group("engine knobs (SimulatedEngine's arguments)")
    for name, (kind, default) in engine_knobs().items():
        knobs.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"knob_{name}",
            type=kind,
            default=default,
            metavar={int: "N", float: "SECS"}.get(kind, "TEXT"),
            help=ENGINE_HELP[name],
        )


def run_engine(args: argparse.Namespace) -> int:
    """Serve the engine ``args`` describe until a signal; returns the exit status."""
    try:
        import uvicorn
    except ImportError:
        print(
            "cache-router engine needs uvicorn: pip install 'cache_router[serve]'", file=sys.stderr
        )
        return 1
    prefix = "knob_"
    options = {
        name[len(prefix) :]: value for name, value in vars(args).items() if name.startswith(prefix)
    }
    try:
        engine = SimulatedEngine(**options)
    except ValueError as exc:
        print(f"cache-router engine: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"simulated engine {engine.name!r} serving model {engine.model!r} on "
        f"http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        engine, host=args.host, port=args.port, log_level=args.log_level, lifespan="off"
    )
    return run_server(uvicorn.Server(config))
