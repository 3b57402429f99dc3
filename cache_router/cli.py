"""``cache-router``: run the standalone router, or the built-in demo.

``cache-router serve`` takes the flags of SGLang's router (``python -m
sglang_router.launch_router``) under the same names and with the same defaults, so a
deployment switches routers by changing the command name only. ``cache-router demo`` (also
what a bare ``cache-router`` runs) compares the policies on simulated engines.

This module only turns argv into a value: ``serve``'s flags are generated from
:data:`cache_router.config.OPTIONS`, and only the flags the user gave reach
:meth:`RouterConfig.load <cache_router.config.RouterConfig.load>`, which adds the
environment and the ``--config`` file beneath them. Running the router is
:func:`cache_router.serve.run`.

Every failure a user can cause -- a bad flag, a malformed worker URL, a knob out of range,
workers that never come up -- ends with a one-line message and a non-zero exit status,
never a traceback: exit 2 for bad usage (argparse's convention), 1 for runtime failures,
3 when the server cannot start (the port in use, as uvicorn's own command), 130 when
interrupted, and a SIGTERM ends the process after a graceful shutdown (143 in a shell).
``cache-router engine`` serves a simulated engine (:mod:`cache_router.testing.engine_cli`).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cache_router import __version__
from cache_router.config import OPTIONS, ConfigError, Option, RouterConfig
from cache_router.core.policies import POLICY_NAMES
from cache_router.ops.allowlist import HostAllowList

__all__ = ["build_parser", "main", "serve_config"]


# -- argument parsing -----------------------------------------------------------------------


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones ("default: None" tells nobody anything)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _allow_pattern(text: str) -> str:
    try:
        HostAllowList([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _bounded(
    kind: type[int] | type[float], low: float | None = None, high: float | None = None
) -> Any:
    """An argparse ``type`` that parses ``kind`` and checks ``low <= value [<= high]``."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if low is not None and (value < low or (high is not None and value > high)):
            limits = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {limits}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _policy_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICY_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(unknown) or repr(text)}; "
            f"choose from {', '.join(POLICY_NAMES)}"
        )
    return names


# -- serve: one flag per RouterConfig option ------------------------------------------------

#: Help groups, each opened by the first option of a section of ``RouterConfig``.
_GROUPS = {
    "worker_urls": "workers and the server",
    "pd_disaggregation": "prefill/decode disaggregation (see docs/pd.md)",
    "policy": "routing policy",
    "max_payload_size": "requests and workers",
    "health_check_interval_secs": "health checks",
    "retry_max_retries": "retries and circuit breakers",
    "max_concurrent_requests": "admission",
    "admin_prefix": "admin API (see docs/operations.md)",
    "redis_url": "scale-out: several router processes or replicas (see docs/scale-out.md)",
    "service_discovery": "service discovery: Kubernetes and DNS (see docs/operations.md)",
}

#: Metavars that say more than the type's (N for integers, SECS for other numbers).
_METAVARS = {
    "worker_urls": "URL",
    "decode_urls": "URL",
    "host": "HOST",
    "port": "PORT",
    "cache_threshold": "FRACTION",
    "balance_rel_threshold": "FACTOR",
    "max_tree_size": "CHARS",
    "max_payload_size": "BYTES",
    "transparent_prefixes": "PATH",
    "tokenizer_path": "[MODEL=]PATH",
    "model_path": "PATH",
    "health_check_endpoint": "PATH",
    "admin_prefix": "PATH",
    "api_key": "KEY",
    "router_api_key": "KEY",
    "admin_api_key": "KEY",
    "worker_allow": "PATTERN",
    "redis_url": "URL",
    "fleet_name": "NAME",
    "selector": "KEY=VALUE",
    "prefill_selector": "KEY=VALUE",
    "decode_selector": "KEY=VALUE",
    "service_discovery_namespace": "NAMESPACE",
    "bootstrap_port_annotation": "NAME",
    "discover_dns": "NAME:PORT",
    "discover_dns_nameserver": "IP[:PORT]",
}

#: Checks made as the flag is parsed, beyond the type and range every number gets; the
#: rest (URLs, path prefixes, keys) is checked by ``RouterConfig`` for every source alike.
_TYPES: dict[str, Any] = {"worker_allow": _allow_pattern}


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(option: Option) -> str:
    """The option's help, its default when it has one worth showing, and its variable."""
    default = option.default
    shown = not (default is None or default is False or default == ())  # 0 is worth showing
    extra = f"default: {_shown(default)}; " if shown else ""
    return f"{option.help} ({extra}${option.env})".replace("%", "%%")


class _PrefillWorker(argparse.Action):
    """``--prefill URL [BOOTSTRAP_PORT]``, repeatable, as SGLang's router takes it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if not 1 <= len(values) <= 2:
            parser.error(f"{option_string} takes URL [BOOTSTRAP_PORT], got {' '.join(values)}")
        entries = list(getattr(namespace, self.dest, None) or ())
        entries.append(" ".join(values))
        setattr(namespace, self.dest, entries)


#: Options whose flag takes more than one value per use.
_ACTIONS: dict[str, dict[str, Any]] = {
    "prefill_urls": {"action": _PrefillWorker, "nargs": "+", "metavar": ("URL", "BOOTSTRAP_PORT")},
}


def _add_option(group: Any, option: Option) -> None:
    settings: dict[str, Any] = {"dest": option.name, "help": _help(option)}
    if option.name in _ACTIONS:
        settings.update(_ACTIONS[option.name])
    elif option.kind is bool:
        settings["action"] = "store_true"
    else:
        if option.is_list:
            settings.update(action="extend", nargs="+")
        if option.choices is not None:
            settings["choices"] = option.choices
        else:
            settings["metavar"] = _METAVARS.get(
                option.name, {int: "N", float: "SECS"}.get(option.kind, "VALUE")
            )
        if option.kind in (int, float):
            settings["type"] = _bounded(option.kind, option.low, option.high)
        elif option.name in _TYPES:
            settings["type"] = _TYPES[option.name]
    group.add_argument(option.flag, **settings)


#: SGLang router flags that ``serve`` refuses, each with why and what to do instead: a
#: command line carrying one stops with a message naming it, never with the flag ignored.
_PD = (
    "prefill/decode disaggregation here takes --prefill and --decode workers (or workers "
    "added with a worker_type): SGLang's mini load balancer is not a router"
)
REFUSED_FLAGS: Mapping[str, str] = {
    "--mini-lb": _PD,
    "--enable-igw": (
        "there is no separate multi-model mode: every router routes by the request's model "
        "among the workers that serve it (model discovery)"
    ),
    "--rate-limit-tokens-per-second": (
        "there is no token bucket: --max-concurrent-requests caps the requests in flight, "
        "with --queue-size and --queue-timeout-secs"
    ),
}


class _Refused(argparse.Action):
    """A flag of SGLang's router that ``serve`` does not implement: stop, saying why."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(f"{option_string} is not supported by cache-router: {self.help}")


def _add_serve(commands: Any) -> None:
    # SUPPRESS: a flag not given leaves no attribute, so the environment, the file and the
    # defaults beneath it are not overridden by argparse's own defaults.
    serve = commands.add_parser(
        "serve",
        help="run the router in front of engine workers",
        description=(
            "Route OpenAI and SGLang inference requests across engine workers. Flag names "
            "and defaults are those of SGLang's router. Each option is read from its flag, "
            "else its CACHE_ROUTER_* variable, else the --config file, else the default "
            "(see docs/configuration.md)."
        ),
        usage="%(prog)s [--config FILE] [--worker-urls URL [URL ...]] [options]",
        formatter_class=_Formatter,
        argument_default=argparse.SUPPRESS,
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="read options from this TOML, YAML or JSON file (default: $CACHE_ROUTER_CONFIG)",
    )
    serve.set_defaults(usage_error=serve.error)
    group: Any = serve
    for option in OPTIONS.values():
        if option.name in _GROUPS:
            group = serve.add_argument_group(_GROUPS[option.name])
        _add_option(group, option)
    refused = serve.add_argument_group(
        "SGLang router flags that are refused (see docs/cli.md)",
        ", ".join(REFUSED_FLAGS),
    )
    for flag, reason in REFUSED_FLAGS.items():
        # The reason rides in ``help``, suppressed from the listing (the group names them).
        refused.add_argument(
            flag, nargs="*", action=_Refused, help=reason, dest="refused", metavar="ARG"
        )


def serve_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> RouterConfig:
    """The configuration of a parsed ``serve`` command line: the flags given, over the
    environment (``env``, else ``os.environ``), over the config file, over the defaults.
    Raises :class:`ConfigError`."""
    given = {name: value for name, value in vars(args).items() if name in OPTIONS}
    return RouterConfig.load(cli=given, env=env, file=getattr(args, "config", None))


def _add_demo(commands: Any) -> None:
    from cache_router.demo import DEFAULT_POLICIES, DemoConfig

    defaults = DemoConfig()
    demo = commands.add_parser(
        "demo",
        help="compare routing policies on simulated engines (the default command)",
        description=(
            "Start simulated engines and a router on 127.0.0.1, replay the same multi-turn "
            "chat workload through each policy, and print a table. Nothing leaves the machine."
        ),
        formatter_class=_Formatter,
    )
    demo.add_argument(
        "--engines",
        type=_bounded(int, 1, 64),
        default=defaults.engines,
        metavar="N",
        help="simulated engines behind the router",
    )
    demo.add_argument(
        "--requests",
        type=_bounded(int, 1),
        metavar="N",
        default=defaults.requests,
        help="chat requests per policy",
    )
    demo.add_argument(
        "--policies",
        type=_policy_list,
        default=",".join(DEFAULT_POLICIES),  # argparse runs string defaults through type
        metavar="NAME[,NAME...]",
        help=f"comma-separated, from {', '.join(POLICY_NAMES)}",
    )
    demo.add_argument(
        "--concurrency",
        type=_bounded(int, 1, 1024),
        metavar="N",
        default=defaults.concurrency,
        help="clients sending at once",
    )
    demo.add_argument("--seed", type=int, default=defaults.seed, metavar="N", help="workload seed")
    demo.add_argument(
        "--pd",
        nargs="?",
        const="sglang",
        choices=("sglang", "vllm"),
        metavar="PROTOCOL",
        help="a prefill/decode fleet instead of --engines: 'sglang' (bootstrap rooms, the "
        "default) or 'vllm' (two steps, kv_transfer_params)",
    )
    demo.add_argument(
        "--prefill",
        type=_bounded(int, 1, 32),
        default=defaults.prefill_engines,
        metavar="N",
        help="with --pd: prefill engines",
    )
    demo.add_argument(
        "--decode",
        type=_bounded(int, 1, 32),
        default=defaults.decode_engines,
        metavar="N",
        help="with --pd: decode engines",
    )
    demo.add_argument(
        "--plot", metavar="PNG", help="also write a chart to this file (needs matplotlib)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar, e.g. in CI logs")


def build_parser() -> argparse.ArgumentParser:
    """The ``cache-router`` argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="cache-router",
        description="Cache-aware LLM request routing. Without a command, runs the demo.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{serve,demo,engine}")
    _add_serve(commands)
    _add_demo(commands)
    from cache_router.testing.engine_cli import add_engine_parser

    add_engine_parser(commands, _Formatter)
    return parser


# -- demo -----------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    try:
        from rich.console import Console
    except ImportError:
        print("the demo needs rich: pip install rich (or 'cache_router[cli]')", file=sys.stderr)
        return 1
    if importlib.util.find_spec("uvicorn") is None:
        print(
            "the demo needs uvicorn: pip install uvicorn (or 'cache_router[cli]')",
            file=sys.stderr,
        )
        return 1
    if args.plot:  # before the run, not after a minute of it
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            print(
                "cache-router demo: --plot needs matplotlib: pip install matplotlib "
                "(or 'cache_router[plot]')",
                file=sys.stderr,
            )
            return 2
    from cache_router.demo import DemoConfig, plot_results, render_table, run_demo, summary

    config = DemoConfig(
        engines=args.engines,
        requests=args.requests,
        policies=args.policies,
        concurrency=args.concurrency,
        seed=args.seed,
        pd=args.pd,
        prefill_engines=args.prefill,
        decode_engines=args.decode,
    )
    console = Console()
    fleet = f"{config.engines} simulated engines"
    if config.pd is not None:
        fleet = (
            f"{config.prefill_engines} prefill and {config.decode_engines} decode simulated "
            f"engines ({config.pd} protocol)"
        )
    console.print(
        f"[bold]cache-router demo[/bold]: {fleet} and a router on 127.0.0.1, "
        f"{config.requests} chat requests per policy "
        "(run `cache-router serve --help` to route real engines)"
    )
    results = run_demo(config, console=console, progress=not args.no_progress)
    console.print(render_table(results, config))
    line = summary(results)
    if line is not None:
        console.print(line)
    if args.plot:
        try:
            plot_results(results, args.plot)
        except RuntimeError as exc:
            print(f"cache-router demo: {exc}", file=sys.stderr)
            return 1
        console.print(f"chart written to {args.plot}")
    return 0


# -- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(arguments or ["demo"])
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "serve":
            try:
                config = serve_config(args)
            except ConfigError as exc:
                args.usage_error(str(exc))  # prints usage and the message, exits 2
                return 2
            from cache_router import serve

            return serve.run(config)
        if args.command == "engine":
            from cache_router.testing.engine_cli import run_engine

            return run_engine(args)
        return _demo(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
