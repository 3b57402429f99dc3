"""The container's command lines are the ones tested: the Dockerfile's ENTRYPOINT, CMD and
HEALTHCHECK and docker-compose.yml's commands run here as written, as subprocesses on
127.0.0.1 (only the listen address, the ports and the service names are swapped), and a
completion is routed through them. No docker needed."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import yaml
from test_cli import ROOT, free_port
from test_engine_cli import running, wait_ready

from cache_router import WorkerRegistry
from cache_router.ops.probes import probe_app

pytestmark = pytest.mark.timeout(90)

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def instruction(name: str) -> list[str]:
    """The exec-form (JSON) argument of the Dockerfile instruction ``name``, continuation
    lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(.*)$", text, re.M)
    assert len(found) == 1, f"one {name} expected"
    argument = found[0]
    if name == "HEALTHCHECK":
        argument = argument[argument.index("CMD ") + 4 :]
    parsed = json.loads(argument)
    assert isinstance(parsed, list), f"{name} must be in exec form"
    return [str(item) for item in parsed]


def localized(argv: Sequence[str], ports: Mapping[str, int], own_port: int) -> list[str]:
    """``argv`` on 127.0.0.1: listen address and port swapped, service names resolved."""
    out = list(argv)
    for index, word in enumerate(out[:-1]):
        if word == "--host":
            out[index + 1] = "127.0.0.1"
        elif word == "--port":
            out[index + 1] = str(own_port)
    for index, word in enumerate(out):
        for service, port in ports.items():
            word = re.sub(rf"//{re.escape(service)}:\d+", f"//127.0.0.1:{port}", word)
        out[index] = word
    if out[0] == "cache-router":  # the console script: this interpreter and this checkout
        out[:1] = [sys.executable, "-m", "cache_router"]
    return out


def routed_engine(router_url: str) -> str:
    answer = httpx.post(
        f"{router_url}/v1/completions",
        json={"model": "sim-model", "prompt": "Hello from the container test", "max_tokens": 2},
        trust_env=False,
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == " tok0 tok1"
    return answer.headers["x-engine"]


def engine_services() -> dict[str, list[str]]:
    services = COMPOSE["services"]
    engines = {name: spec["command"] for name, spec in services.items() if name != "router"}
    assert len(engines) == 2
    assert all(command[0] == "engine" for command in engines.values())
    return engines


def start_engines(stack: ExitStack, entrypoint: list[str]) -> dict[str, int]:
    """The compose file's engines, each on a free port (stopped with ``stack``)."""
    ports = {name: free_port() for name in engine_services()}
    for name, command in engine_services().items():
        argv = localized(entrypoint + command, ports, ports[name])
        process = stack.enter_context(running(argv))
        health = COMPOSE["services"][name]["healthcheck"]["test"]
        assert "/health" in " ".join(health)
        wait_ready(process, f"http://127.0.0.1:{ports[name]}/health")
    return ports


def test_the_image_runs_serve_as_a_non_root_user_with_a_liveness_healthcheck() -> None:
    assert re.search(r"^FROM python:3\.\d+-slim$", DOCKERFILE, re.M)
    users = re.findall(r"^USER\s+(\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
    assert instruction("ENTRYPOINT") == ["cache-router"]
    assert instruction("CMD")[0] == "serve"
    probe = " ".join(instruction("HEALTHCHECK"))
    assert "/liveness" in probe
    assert "/liveness" in {route.path for route in probe_app(WorkerRegistry()).routes}


def test_compose_router_routes_to_the_compose_engines() -> None:
    entrypoint = instruction("ENTRYPOINT")
    router_command = COMPOSE["services"]["router"]["command"]
    with ExitStack() as stack:
        ports = start_engines(stack, entrypoint)
        router_port = free_port()
        argv = localized(entrypoint + router_command, ports, router_port)
        router = stack.enter_context(running(argv))
        url = f"http://127.0.0.1:{router_port}"
        wait_ready(router, f"{url}/readiness")
        assert routed_engine(url) in engine_services()
        # The image's HEALTHCHECK, pointed at this router's port.
        check = [
            word.replace("127.0.0.1:30000", f"127.0.0.1:{router_port}")
            for word in instruction("HEALTHCHECK")
        ]
        assert subprocess.run(check, timeout=10).returncode == 0
        router.send_signal(signal.SIGTERM)  # docker stop
        _, stderr = router.communicate(timeout=20)
        assert router.returncode == -signal.SIGTERM, stderr
        assert "Traceback" not in stderr


def test_the_image_default_command_with_workers_from_the_environment() -> None:
    entrypoint = instruction("ENTRYPOINT")
    with ExitStack() as stack:
        ports = start_engines(stack, entrypoint)
        router_port = free_port()
        argv = localized(entrypoint + instruction("CMD"), ports, router_port)
        workers = " ".join(f"http://127.0.0.1:{port}" for port in ports.values())
        router = stack.enter_context(running(argv, {"CACHE_ROUTER_WORKER_URLS": workers}))
        url = f"http://127.0.0.1:{router_port}"
        wait_ready(router, f"{url}/readiness")
        assert routed_engine(url) in engine_services()
