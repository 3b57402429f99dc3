"""Starting, probing, measuring and stopping the processes of a benchmark run.

Every process started here is stopped here: :class:`Managed` terminates its process group
(the group is the started process's own id, so nothing else is touched) and kills it if it
has not exited a few seconds later, on every exit path including Ctrl-C. The simulated
engines also exit by themselves when the harness's pipe to their stdin closes.

Router CPU time is read from ``/proc/<pid>/stat`` (user + system, all threads, plus any
child processes), so Python and Rust routers are measured the same way, whatever their
threading.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = [
    "ROUTERS",
    "EngineFleet",
    "Managed",
    "PDLaunch",
    "RedisProcess",
    "RouterSpec",
    "Thresholds",
    "cpu_seconds",
    "free_port",
    "http_get_json",
    "peer_bin_dirs",
    "process_tree",
    "redis_installed",
    "rss_bytes",
]

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
# Proxies from the environment must never see loopback benchmark traffic.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(child) for child in f.read().split())
    return found


def process_tree(pid: int) -> Iterator[int]:
    """``pid`` and its live descendants (at most 256 processes)."""
    stack: list[int] = [pid]
    seen: set[int] = set()
    while stack and len(seen) < 256:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current
        stack.extend(_children(current))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (10 ms resolution)."""
    total = 0.0
    for current in process_tree(pid):
        fields = _stat_fields(current)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and its live descendants, in bytes."""
    total = 0
    for current in process_tree(pid):
        fields = _stat_fields(current)
        if fields is not None:
            total += int(fields[21]) * _PAGE  # rss, in pages
    return total


def http_get_json(url: str, timeout: float = 5.0) -> Any:
    with _OPENER.open(url, timeout=timeout) as response:
        return json.load(response)


def http_post_json(url: str, payload: object, timeout: float = 10.0) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}
    )
    with _OPENER.open(request, timeout=timeout) as response:
        return json.load(response)


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


_M = TypeVar("_M", bound="Managed")
_PORT_ATTEMPTS = 4
_BIND_FAILURES = ("address already in use", "addrinuse", "os error 98", "errno 98")


def _lost_port(log: str) -> bool:
    """Whether a process's log says it could not bind its port."""
    text = log.lower()
    return any(failure in text for failure in _BIND_FAILURES)


class Managed:
    """A child process in its own session, stopped (group-wide) on ``stop`` or exit."""

    def __init__(self, argv: Sequence[str], name: str, *, log_dir: Path, stdin_pipe: bool = False):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdin_pipe else self._log,
            stderr=self._log,
            start_new_session=True,
            cwd=REPO_ROOT,
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "NO_COLOR": "1",
                # ``python -m benchmarks...`` must work whatever the caller's directory.
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
                ),
            },
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            self._log.flush()
            text = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join(text[-lines:])
        return ""

    def stop(self, grace: float = 5.0) -> None:
        process = self.process
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        else:
            # The leader is gone; make sure nothing it started lingers in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if process.stdout is not None:
            process.stdout.close()
        self._log.close()

    def _start_on_free_port(
        self,
        launch: Callable[[int], tuple[list[str], str]],
        ready: Callable[[], None],
        *,
        log_dir: Path,
    ) -> None:
        """Start ``launch(port)`` (its argv and name) on a free port and wait for ``ready``.

        :func:`free_port` lets its port go before the process binds it, so another process
        may take it in between; a start that failed for that alone is tried again on another
        port. ``ready`` raises when the process exits; anything else stops it and propagates.
        """
        for attempt in range(_PORT_ATTEMPTS):
            self.port = free_port()
            argv, name = launch(self.port)
            Managed.__init__(self, argv, name, log_dir=log_dir)
            try:
                ready()
                return
            except BaseException:
                lost = not self.alive() and _lost_port(self.log_tail(40))
                self.stop()
                if not lost or attempt == _PORT_ATTEMPTS - 1:
                    raise

    def __enter__(self: _M) -> _M:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class EngineFleet(Managed):
    """The ``benchmarks._engines`` process: N simulated engines plus a control port.

    With ``pd`` (a protocol) the first ``prefill`` engines are prefill engines, the rest
    decode engines, and :attr:`pd_workers` is the fleet as a router's flags.
    """

    def __init__(
        self,
        count: int,
        *,
        log_dir: Path,
        startup_timeout: float = 20.0,
        kv_events: bool = False,
        pd: str | None = None,
        prefill: int = 1,
    ) -> None:
        argv = [sys.executable, "-m", "benchmarks._engines", "--count", str(count)]
        if kv_events:
            argv.append("--kv-events")
        if pd is not None:
            argv += ["--pd", pd, "--prefill", str(prefill)]
        super().__init__(argv, "engines", log_dir=log_dir, stdin_pipe=True)
        try:
            line = self._read_line(startup_timeout)
            info = json.loads(line)
        except Exception:
            self.stop()
            raise
        self.urls: list[str] = info["engines"]
        self.control: str = info["control"]
        #: Per engine ``[endpoint, replay_endpoint]`` of its KV events (``kv_events``).
        self.kv_events: list[list[str | None]] = info.get("kv_events", [])
        #: ``--prefill URL [PORT] ... --decode URL ...`` (empty for a plain fleet).
        self.pd_workers: list[str] = []
        for url, port in info.get("prefill", ()):
            self.pd_workers += ["--prefill", url, *([str(port)] if port is not None else [])]
        for url in info.get("decode", ()):
            self.pd_workers += ["--decode", url]

    def _read_line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"engines did not start in {timeout} s:\n{self.log_tail()}")
        line = self.process.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"engines exited at startup:\n{self.log_tail()}")
        return line

    def reset(self, knobs: dict[str, Any]) -> None:
        """Fresh engines (empty caches, zero counters) with ``knobs`` on the same ports."""
        http_post_json(f"{self.control}/reset", knobs)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http_get_json(f"{self.control}/stats")
        return result


@dataclass(frozen=True)
class Thresholds:
    """The cache-aware knobs every router gets (SGLang's CLI defaults)."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: int = 120
    max_tree_size: int = 2**26

    def flags(self) -> list[str]:
        return [
            "--cache-threshold", str(self.cache_threshold),
            "--balance-abs-threshold", str(self.balance_abs_threshold),
            "--balance-rel-threshold", str(self.balance_rel_threshold),
            "--eviction-interval-secs", str(self.eviction_interval_secs),
            "--max-tree-size", str(self.max_tree_size),
        ]  # fmt: skip


CommandBuilder = Callable[[list[str], str, int, Thresholds], list[str]]


@dataclass(frozen=True)
class PDLaunch:
    """A disaggregated fleet as a router is told it (SGLang's flag names, which all share)."""

    protocol: str  # "sglang" (bootstrap rooms) or "vllm" (two steps, kv_transfer_params)
    workers: tuple[str, ...]  # --prefill URL [PORT] ... --decode URL ...
    prefill_policy: str = "cache_aware"
    decode_policy: str = "power_of_two"


def _no_flags() -> list[str]:
    return []


@dataclass(frozen=True)
class RouterSpec:
    """How to launch one router and how to tell it is ready.

    ``extra`` flags go after the fleet's and the policy's in both modes; ``pd_flags`` maps
    each PD protocol the router speaks to the flag that turns it on.
    """

    name: str
    command: Callable[[], list[str] | None]  # the launcher prefix, None if not installed
    flags: CommandBuilder
    ready_path: str = "/readiness"
    extra: Callable[[], list[str]] = _no_flags
    pd_flags: Mapping[str, str] = field(default_factory=dict)
    #: Started with ``--redis-url`` (a :class:`RedisProcess`) and a fleet name of its own.
    redis: bool = False
    #: Run when no router list is given (variants of a router are run only by name).
    default: bool = True
    #: Router processes it runs (``--workers``): with ``redis``, all join before it is used.
    processes: int = 1

    def _prefix(self) -> list[str]:
        prefix = self.command()
        if prefix is None:
            raise RuntimeError(f"{self.name} is not installed")
        return prefix

    def argv(self, urls: list[str], policy: str, port: int, thresholds: Thresholds) -> list[str]:
        return [*self._prefix(), *self.flags(urls, policy, port, thresholds), *self.extra()]

    def pd_argv(self, pd: PDLaunch, port: int, thresholds: Thresholds) -> list[str]:
        flag = self.pd_flags.get(pd.protocol)
        if flag is None:
            raise RuntimeError(f"{self.name} does not speak the {pd.protocol} PD protocol")
        return [
            *self._prefix(), "--host", HOST, "--port", str(port), flag, *pd.workers,
            "--prefill-policy", pd.prefill_policy, "--decode-policy", pd.decode_policy,
            *thresholds.flags(), *self.extra(),
        ]  # fmt: skip

    @property
    def installed(self) -> bool:
        return self.command() is not None


def peer_bin_dirs() -> list[str]:
    """Where peer routers are looked for: ``$PEER_ROUTER_BIN``, /work/peer-venv/bin, PATH."""
    dirs = [os.environ.get("PEER_ROUTER_BIN", ""), "/work/peer-venv/bin"]
    return [d for d in dirs if d and os.path.isdir(d)]


def _peer(module: str, subcommand: str | None) -> Callable[[], list[str] | None]:
    """Run a peer as ``<its venv's python> -m module [subcommand]``.

    The module, not the console script: sglang-router and smg both install a script called
    ``smg``, and whichever was installed last owns it.
    """

    def command() -> list[str] | None:
        for directory in peer_bin_dirs():
            python = Path(directory) / "python"
            package = module.split(".")[0]
            found = list((Path(directory).parent / "lib").glob(f"python3*/site-packages/{package}"))
            if python.exists() and found:
                return [str(python), "-m", module, *([subcommand] if subcommand else [])]
        return None

    return command


def _cache_router_command() -> list[str] | None:
    """``cache-router serve`` when the CLI exists; else the benchmarks' own launcher."""
    if os.environ.get("CACHE_ROUTER_LAUNCHER") != "module" and importlib.util.find_spec(
        "cache_router.cli"
    ):
        script = shutil.which("cache-router", path=str(Path(sys.executable).parent))
        if script:
            return [script, "serve"]
        return [sys.executable, "-c", "from cache_router.cli import main; main()", "serve"]
    return [sys.executable, "-m", "benchmarks._router_main"]


def _common(urls: list[str], policy: str, port: int, thresholds: Thresholds) -> list[str]:
    return [
        "--host", HOST, "--port", str(port), "--worker-urls", *urls, "--policy", policy,
        *thresholds.flags(),
    ]  # fmt: skip


def _rust_router(log_level: str) -> Callable[[], list[str]]:
    def extra() -> list[str]:
        return [
            "--prometheus-host", HOST, "--prometheus-port", str(free_port()),
            "--log-level", log_level,
            "--worker-startup-check-interval", "1",
        ]  # fmt: skip

    return extra


_SGLANG_PD = {"sglang": "--pd-disaggregation"}


def _cache_router_flags(*flags: str) -> Callable[[], list[str]]:
    """``cache-router serve`` at the peers' log level (warnings only: no access line per
    request), plus ``flags``."""
    return lambda: ["--log-level", "warning", *flags]


_CACHE_ROUTER_PD = {"sglang": "--pd-disaggregation", "vllm": "--vllm-pd-disaggregation"}

ROUTERS: dict[str, RouterSpec] = {
    spec.name: spec
    for spec in (
        RouterSpec(
            "cache_router",
            _cache_router_command,
            _common,
            extra=_cache_router_flags(),
            pd_flags=_CACHE_ROUTER_PD,
        ),
        RouterSpec(
            "cache_router-w2",
            _cache_router_command,
            _common,
            extra=_cache_router_flags("--workers", "2"),
            processes=2,
            default=False,
        ),
        RouterSpec(
            "cache_router-w2-redis",
            _cache_router_command,
            _common,
            extra=_cache_router_flags("--workers", "2"),
            processes=2,
            redis=True,
            default=False,
        ),
        RouterSpec(
            "sglang-router",
            _peer("sglang_router", "launch"),
            _common,
            extra=_rust_router("warn"),
            pd_flags=_SGLANG_PD,
        ),
        RouterSpec(
            "vllm-router",
            _peer("vllm_router.launch_router", None),
            _common,
            extra=_rust_router("warning"),
            pd_flags={"vllm": "--vllm-pd-disaggregation"},
        ),
        RouterSpec(
            "smg", _peer("smg", "launch"), _common, extra=_rust_router("warn"), pd_flags=_SGLANG_PD
        ),
    )
}


class RedisProcess(Managed):
    """A throwaway ``redis-server`` on a free loopback port: no persistence, stopped on exit."""

    def __init__(self, *, log_dir: Path, startup_timeout: float = 10.0) -> None:
        self.port = 0

        def launch(port: int) -> tuple[list[str], str]:
            self.url = f"redis://{HOST}:{port}/0"
            argv = [
                "redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                "--appendonly", "no",
            ]  # fmt: skip
            return argv, f"redis-{port}"

        def ready() -> None:
            deadline = time.monotonic() + startup_timeout
            while not self._answers():
                if not self.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")
                time.sleep(0.02)

        self._start_on_free_port(launch, ready, log_dir=log_dir)

    def _answers(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def replicas(self, fleet: str) -> int:
        """Replicas that joined ``fleet`` (cache_router's fleet registry in this Redis)."""
        import redis

        with redis.Redis(host=HOST, port=self.port, socket_timeout=2) as client:
            return int(client.scard(f"cache_router:{{{fleet}}}:replicas"))


def redis_installed() -> bool:
    return shutil.which("redis-server") is not None


class RouterProcess(Managed):
    """One router process, ready to serve when the constructor returns."""

    def __init__(
        self,
        spec: RouterSpec,
        urls: list[str],
        policy: str,
        thresholds: Thresholds,
        *,
        log_dir: Path,
        startup_timeout: float = 30.0,
        pd: PDLaunch | None = None,
        redis_url: str | None = None,
    ) -> None:
        self.port = 0

        def launch(port: int) -> tuple[list[str], str]:
            self.url = f"http://{HOST}:{port}"
            if pd is not None:
                argv = spec.pd_argv(pd, port, thresholds)
            else:
                argv = spec.argv(urls, policy, port, thresholds)
            if spec.redis:
                if redis_url is None:
                    raise RuntimeError(f"{spec.name} needs a redis_url")
                argv += ["--redis-url", redis_url, "--fleet-name", f"bench-{port}"]
            return argv, f"{spec.name}-{policy}-{port}"

        def ready() -> None:
            self._wait_ready(spec.ready_path, startup_timeout)
            if spec.redis and redis_url is not None:
                self._wait_joined(redis_url, f"bench-{self.port}", spec.processes, startup_timeout)

        self._start_on_free_port(launch, ready, log_dir=log_dir)

    def _wait_joined(self, redis_url: str, fleet: str, count: int, timeout: float) -> None:
        """Until ``count`` processes joined ``fleet`` in Redis (each ready on its own)."""
        import redis

        deadline = time.monotonic() + timeout
        with redis.Redis.from_url(redis_url, socket_timeout=2) as client:
            while int(client.scard(f"cache_router:{{{fleet}}}:replicas")) < count:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited at startup:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: not all processes joined its fleet")
                time.sleep(0.05)

    def _wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = 0
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited at startup:\n{self.log_tail()}")
            status = http_status(self.url + path)
            if status == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"{self.name} not ready after {timeout} s (last status {status}):\n{self.log_tail()}"
        )

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)


#: Where the runs' log directories go, when set (the tests point it at pytest's own
#: temporary directory, which pytest prunes); else the system's temporary directory.
LOG_ROOT_ENV = "BENCHMARKS_LOG_ROOT"  # not CACHE_ROUTER_*: serve refuses unknown ones


def make_log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="cache-router-bench-", dir=os.environ.get(LOG_ROOT_ENV)))
