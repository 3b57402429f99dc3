"""Kubernetes service discovery: pods to workers, the watch's resume and re-list, auth.

The integration tests run the production router (``build_router`` from a ``RouterConfig``
with ``service_discovery``) on uvicorn against an API server the tests start
(:mod:`k8s_api`, serving the core/v1 list and watch shapes), reached through a kubeconfig
with a bearer token. The engines are served on 127.0.0.1 and 127.0.0.2 with one port, as
pods share the discovery port on their own addresses.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from k8s_api import TOKEN, FakeKubeApi, pod
from mock_engine import MockEngine, wait_until

from cache_router.builder import Router, build_router
from cache_router.config import RouterConfig
from cache_router.ops.discovery.common import Backoff, Reconciler, Role, Target
from cache_router.ops.discovery.k8s import (
    KubeConfigError,
    PodMatcher,
    in_cluster_access,
    kubeconfig_access,
    parse_selector,
)
from cache_router.testing import SimulatedEngine
from cache_router.testing.server import BackgroundServer

pytestmark = pytest.mark.timeout(60)


# -- pods to targets ------------------------------------------------------------------------


def test_selectors_parse_as_sglang_takes_them() -> None:
    assert parse_selector(["app=sglang", "tier=gpu,zone=a"]) == {
        "app": "sglang",
        "tier": "gpu",
        "zone": "a",
    }
    assert parse_selector(["sglang.ai/role=prefill", "empty="]) == {
        "sglang.ai/role": "prefill",
        "empty": "",
    }
    for bad in (["app"], ["=x"], ["app=a b"], ["a b=c"], ["app!=x"]):
        with pytest.raises(ValueError, match="label selector"):
            parse_selector(bad)


def test_a_pod_serves_when_running_ready_addressed_and_not_terminating() -> None:
    matcher = PodMatcher({"regular": {"app": "sglang"}}, 8000)
    assert matcher.target(pod("a", "10.0.0.5")) == ("http://10.0.0.5:8000", Target("regular"))
    assert matcher.target(pod("a", "fd00::5")) == ("http://[fd00::5]:8000", Target("regular"))
    assert matcher.target(pod("a", "10.0.0.5", ready=False)) is None
    assert matcher.target(pod("a", "10.0.0.5", phase="Pending")) is None
    assert matcher.target(pod("a", "10.0.0.5", terminating=True)) is None
    assert matcher.target(pod("a", "")) is None
    assert matcher.target(pod("a", "10.0.0.5", labels={"app": "other"})) is None


def test_roles_map_prefill_first_then_decode_then_regular() -> None:
    selectors: dict[Role, dict[str, str]] = {
        "regular": {"app": "sglang"},
        "prefill": {"app": "sglang", "role": "prefill"},
        "decode": {"app": "sglang", "role": "decode"},
    }
    matcher = PodMatcher(selectors, 30000, "sglang.ai/bootstrap-port")
    port = {"sglang.ai/bootstrap-port": "8998"}
    prefill = pod("p", "10.0.0.1", labels={"role": "prefill"}, annotations=port)
    decode = pod("d", "10.0.0.2", labels={"role": "decode"}, annotations=port)
    assert matcher.target(prefill) == ("http://10.0.0.1:30000", Target("prefill", 8998))
    # The annotation is a prefill pod's only, as in SGLang's router.
    assert matcher.target(decode) == ("http://10.0.0.2:30000", Target("decode", None))
    assert matcher.target(pod("r", "10.0.0.3")) == ("http://10.0.0.3:30000", Target("regular"))
    bad_port = pod(
        "p", "10.0.0.1", labels={"role": "prefill"}, annotations={port.popitem()[0]: "x"}
    )
    assert matcher.target(bad_port) == ("http://10.0.0.1:30000", Target("prefill", None))


def test_the_api_is_asked_only_for_pods_every_selector_could_match() -> None:
    assert PodMatcher({"regular": {"app": "a", "t": "g"}}, 80).label_selector() == "app=a,t=g"
    pd = PodMatcher({"prefill": {"app": "s", "role": "p"}, "decode": {"app": "s", "role": "d"}}, 80)
    assert pd.label_selector() == "app=s,role in (d,p)"
    assert PodMatcher({"prefill": {"a": "1"}, "decode": {"b": "2"}}, 80).label_selector() is None
    with pytest.raises(ValueError, match="needs a selector"):
        PodMatcher({"regular": {}}, 80)


# -- the reconciler -------------------------------------------------------------------------


class RecordingSink:
    """Adds wait for the test's go-ahead; every call is recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.gate = anyio.Event()
        self.fail: set[str] = set()

    async def add(self, url: str, *, role: Role, bootstrap_port: int | None) -> bool:
        self.calls.append(("add", url, role))
        try:
            await self.gate.wait()
        except anyio.get_cancelled_exc_class():
            self.calls.append(("cancelled", url, role))
            raise
        return url not in self.fail

    async def remove(self, url: str) -> None:
        self.calls.append(("remove", url, None))
        await anyio.sleep(0.01)


async def settle() -> None:
    for _ in range(20):
        await anyio.sleep(0.005)


@pytest.mark.anyio
async def test_a_pending_add_no_longer_wanted_is_cancelled_not_removed() -> None:
    sink = RecordingSink()
    async with anyio.create_task_group() as group:
        reconciler = Reconciler(sink, group)
        reconciler.want("http://a:1")
        await settle()
        reconciler.drop("http://a:1")
        await settle()
        assert sink.calls == [
            ("add", "http://a:1", "regular"),
            ("cancelled", "http://a:1", "regular"),
        ]
        assert reconciler.added == {}
        group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_adds_removes_role_changes_and_retries_converge() -> None:
    sink = RecordingSink()
    sink.gate.set()
    sink.fail.add("http://bad:1")
    async with anyio.create_task_group() as group:
        reconciler = Reconciler(sink, group)
        reconciler.replace({"http://a:1": Target(), "http://bad:1": Target()})
        await settle()
        assert reconciler.added == {"http://a:1": Target()}
        # Wanting it again as another role drains it, then adds it back.
        reconciler.want("http://a:1", Target("prefill", 9))
        await settle()
        assert reconciler.added == {"http://a:1": Target("prefill", 9)}
        # A failed add is retried when the source wants the URL again.
        sink.fail.clear()
        reconciler.replace({"http://bad:1": Target()})
        await settle()
        assert reconciler.added == {"http://bad:1": Target()}
        group.cancel_scope.cancel()
    assert sink.calls == [
        ("add", "http://a:1", "regular"),
        ("add", "http://bad:1", "regular"),
        ("remove", "http://a:1", None),
        ("add", "http://a:1", "prefill"),
        ("remove", "http://a:1", None),
        ("add", "http://bad:1", "regular"),
    ]


def test_backoff_doubles_up_to_its_bound_and_resets() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


# -- credentials ----------------------------------------------------------------------------


def write_kubeconfig(path: Path, server: str, user: dict[str, Any], **cluster: Any) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "contexts": [
            {"name": "other", "context": {"cluster": "nowhere", "user": "nobody"}},
            {"name": "test", "context": {"cluster": "c", "user": "u", "namespace": "ns1"}},
        ],
        "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
        "users": [{"name": "u", "user": user}],
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_kubeconfig_reads_the_current_context_token_and_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    client = ca.issue_cert("router@test")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    path = write_kubeconfig(
        tmp_path / "config",
        "https://k8s.test:6443/",
        {
            "tokenFile": "token",  # relative to the kubeconfig's folder
            "client-certificate-data": base64.b64encode(client.cert_chain_pems[0].bytes()).decode(),
            "client-key-data": base64.b64encode(client.private_key_pem.bytes()).decode(),
        },
        **{"certificate-authority-data": base64.b64encode(ca.cert_pem.bytes()).decode()},
    )
    access = kubeconfig_access(environ={"KUBECONFIG": f"{path}:{tmp_path / 'second'}"})
    assert access.server == "https://k8s.test:6443"
    assert access.namespace == "ns1"
    assert access.ssl_context is not None
    assert access.headers() == {"authorization": "Bearer from-file"}
    token_file.write_text("rotated")  # re-read at each connection
    assert access.headers() == {"authorization": "Bearer rotated"}


def test_kubeconfig_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="No such file"):
        kubeconfig_access(str(tmp_path / "missing"))
    exec_user = {"exec": {"command": "aws", "apiVersion": "client.authentication.k8s.io/v1"}}
    path = write_kubeconfig(tmp_path / "exec", "https://k:6443", exec_user)
    with pytest.raises(KubeConfigError, match="exec and auth-provider"):
        kubeconfig_access(str(path))


def test_in_cluster_uses_the_service_account(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "namespace").write_text("inference")
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    access = in_cluster_access(env, root=str(tmp_path))
    assert access is not None
    assert access.server == "https://10.96.0.1:443"
    assert access.namespace == "inference"
    assert access.headers() == {"authorization": "Bearer sa-token"}
    assert in_cluster_access({}, root=str(tmp_path)) is None  # not in a pod
    assert in_cluster_access(env, root=str(tmp_path / "none")) is None


# -- the router against a live API server ---------------------------------------------------


@dataclass
class Cluster:
    api: FakeKubeApi
    router: Router
    client: httpx.Client
    engines: dict[str, Any]
    ips: dict[str, str]  # engine name -> pod IP

    def urls(self) -> set[str]:
        return {worker.url for worker in self.router.registry}

    def workers_api(self) -> set[str]:
        answer = self.client.get("/workers")
        assert answer.status_code == 200
        return {worker["url"] for worker in answer.json()["workers"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    kind = getattr(request, "param", SimulatedEngine)
    engines: dict[str, Any] = {name: kind(name=name) for name in ("a", "b")}
    api = FakeKubeApi()
    with ExitStack() as stack:
        port = free_port()  # one discovery port, on one loopback address per pod
        ips: dict[str, str] = {}
        for index, (name, engine) in enumerate(engines.items(), start=1):
            ips[name] = f"127.0.0.{index}"
            stack.enter_context(BackgroundServer(engine, host=ips[name], port=port))
        server = stack.enter_context(BackgroundServer(api.app))
        kubeconfig = write_kubeconfig(tmp_path / "config", server, {"token": TOKEN})
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        config = RouterConfig(
            service_discovery=True,
            selector=("app=sglang",),
            service_discovery_port=port,
            service_discovery_namespace="default",
            admin_prefix="/router",
            admin_allow_unauthenticated=True,
            worker_startup_timeout_secs=10,
            health_check_interval_secs=60,
        )
        router = build_router(config)
        for task in router.background:
            if hasattr(task, "backoff"):
                task.backoff = Backoff(0.05, 0.2)
        url = stack.enter_context(BackgroundServer(router.app(), lifespan="on"))
        client = stack.enter_context(httpx.Client(base_url=url, trust_env=False, timeout=20))
        yield Cluster(api, router, client, engines, ips)
        for engine in engines.values():
            if isinstance(engine, MockEngine):
                engine.release()


def url_of(cluster: Cluster, name: str) -> str:
    return f"http://{cluster.ips[name]}:{cluster.router.config.service_discovery_port}"


def test_ready_pods_become_workers_and_leave_when_not_ready(cluster: Cluster) -> None:
    api = cluster.api
    api.put(pod("a", cluster.ips["a"]))
    api.put(pod("b", cluster.ips["b"], ready=False))
    a, b = url_of(cluster, "a"), url_of(cluster, "b")
    wait_until(lambda: cluster.urls() == {a}, timeout=10)
    assert cluster.workers_api() == {a}
    # The list carried the selector, the watch the list's version, both the token.
    first = api.requests[0]
    assert first["path"] == "/api/v1/namespaces/default/pods" and not first["watch"]
    assert first["labelSelector"] == "app=sglang"
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in api.requests)
    api.put(pod("b", cluster.ips["b"]))
    wait_until(lambda: cluster.urls() == {a, b}, timeout=10)
    answer = cluster.client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert answer.status_code == 200
    # Models were discovered on the way in, as for a worker added through the API.
    assert cluster.router.registry.get(a).models == ("sim-model",)  # type: ignore[union-attr]
    api.put(pod("a", cluster.ips["a"], ready=False))
    wait_until(lambda: cluster.urls() == {b}, timeout=10)
    api.put(pod("b", cluster.ips["b"], terminating=True))
    wait_until(lambda: cluster.urls() == set(), timeout=10)
    assert cluster.workers_api() == set()


def test_a_dropped_watch_resumes_from_the_last_version(cluster: Cluster) -> None:
    api = cluster.api
    api.put(pod("a", cluster.ips["a"]))
    a, b = url_of(cluster, "a"), url_of(cluster, "b")
    wait_until(lambda: cluster.urls() == {a}, timeout=10)
    seen = api.version
    api.drop_watches()
    api.put(pod("b", cluster.ips["b"]))  # while the watch is down or coming back
    wait_until(lambda: cluster.urls() == {a, b}, timeout=10)
    assert len(api.lists()) == 1  # resumed, not re-listed
    watches = api.watches()
    assert len(watches) == 2 and watches[-1]["resourceVersion"] == str(seen)


def test_a_410_gone_relists_and_reconciles(cluster: Cluster) -> None:
    api = cluster.api
    api.put(pod("a", cluster.ips["a"]))
    api.put(pod("b", cluster.ips["b"]))
    a, b = url_of(cluster, "a"), url_of(cluster, "b")
    wait_until(lambda: cluster.urls() == {a, b}, timeout=10)
    api.drop_watches()
    api.delete("a")  # missed: the history is compacted before the watch comes back
    api.compact()
    wait_until(lambda: len(api.lists()) == 2, timeout=10)
    wait_until(lambda: cluster.urls() == {b}, timeout=10)
    # Pods kept across the re-list were not touched.
    worker = cluster.router.registry.get(b)
    assert worker is not None and not worker.draining


@pytest.mark.parametrize("cluster", [MockEngine], indirect=True)
def test_a_deleted_pod_drains_its_in_flight_request_first(cluster: Cluster) -> None:
    """MockEngine holds the request until released, so it is surely in flight."""
    api = cluster.api
    api.put(pod("a", cluster.ips["a"]))
    a = url_of(cluster, "a")
    wait_until(lambda: cluster.urls() == {a}, timeout=10)
    worker = cluster.router.registry.get(a)
    assert worker is not None
    mock: MockEngine = cluster.engines["a"]
    body = {"prompt": "in flight", "max_tokens": 2}
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(
            cluster.client.post, "/v1/completions", json=body, headers={"x-mock-hang": "1"}
        )
        wait_until(lambda: mock.in_flight == 1, timeout=10)
        assert worker.load == 1
        api.delete("a")
        wait_until(lambda: worker.draining, timeout=10)
        assert cluster.router.registry.get(a) is worker  # still there, draining
        assert not answer.done()
        mock.release()
        assert answer.result(timeout=20).status_code == 200
    wait_until(lambda: cluster.urls() == set(), timeout=10)
    assert worker.load == 0 and cluster.router.registry.total_load() == 0
    completions = [r for r in mock.requests if r.path == "/v1/completions"]
    assert len(completions) == 1 and mock.cancelled == 0


def test_serve_takes_sglangs_discovery_flags(tmp_path: Path) -> None:
    """The command line an SGLang deployment already has, against the test's API server."""
    from test_cli import serve_process

    api = FakeKubeApi()
    engine = SimulatedEngine(name="a")
    with BackgroundServer(engine) as engine_url, BackgroundServer(api.app) as server:
        port = engine_url.rpartition(":")[2]
        api.put(pod("a", "127.0.0.1"))
        api.put(pod("other", "127.0.0.2", labels={"app": "other"}))
        kubeconfig = write_kubeconfig(tmp_path / "config", server, {"token": TOKEN})
        env = {"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""}
        with serve_process(
            "--service-discovery",
            "--selector",
            "app=sglang",
            "--service-discovery-port",
            port,
            "--service-discovery-namespace",
            "default",
            env=env,
        ) as served:

            def listed() -> list[str]:
                answer = httpx.get(f"{served.url}/v1/models", trust_env=False)
                return [model["id"] for model in answer.json()["data"]]

            wait_until(lambda: listed() == ["sim-model"], timeout=15)
            answer = httpx.post(
                f"{served.url}/v1/completions",
                json={"prompt": "hi", "max_tokens": 2},
                trust_env=False,
            )
            assert answer.status_code == 200
            assert answer.headers["x-engine"] == "a"
    assert api.requests[0]["labelSelector"] == "app=sglang"


@pytest.mark.anyio
async def test_discovered_hosts_pass_only_the_allow_list_discovery_is_given() -> None:
    """The admin API's allow-list (empty here: nothing may be added through it) does not
    apply; ``--worker-allow``, when given, is passed as the sink's."""
    from cache_router.core.registry import WorkerRegistry
    from cache_router.ops.admin import AdminApp
    from cache_router.ops.discovery.common import AdminSink

    admin = AdminApp(WorkerRegistry([]))
    fenced = AdminSink(admin, allow=["10.8.0.0/16"], startup_wait=0)
    assert not await fenced.add("http://10.9.0.1:80", role="regular", bootstrap_port=None)
    assert await fenced.add("http://10.8.0.1:80", role="regular", bootstrap_port=None)
    anywhere = AdminSink(admin, startup_wait=0)
    assert await anywhere.add("http://10.9.0.1:80", role="regular", bootstrap_port=None)
    assert not await anywhere.add("http://10.9.0.2:80", role="prefill", bootstrap_port=1)
    assert [worker.url for worker in admin.registry] == ["http://10.8.0.1:80", "http://10.9.0.1:80"]
    await anywhere.remove("http://10.9.0.1:80")
    assert [worker.url for worker in admin.registry] == ["http://10.8.0.1:80"]


def test_prefill_and_decode_pods_become_a_disaggregated_fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SGLang's PD discovery flags: prefill pods (with their bootstrap port annotation)
    and decode pods become the two halves, and a generation is served by the pair."""
    prefill = SimulatedEngine(name="p", role="prefill", pd_protocol="sglang")
    decode = SimulatedEngine(name="d", role="decode", pd_protocol="sglang")
    api = FakeKubeApi()
    assert prefill.pd is not None and prefill.pd.app is not None
    with ExitStack() as stack:
        port = free_port()
        stack.enter_context(BackgroundServer(prefill, host="127.0.0.1", port=port))
        stack.enter_context(BackgroundServer(decode, host="127.0.0.2", port=port))
        bootstrap = stack.enter_context(BackgroundServer(prefill.pd.app, host="127.0.0.1"))
        server = stack.enter_context(BackgroundServer(api.app))
        kubeconfig = write_kubeconfig(tmp_path / "config", server, {"token": TOKEN})
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        annotation = {"sglang.ai/bootstrap-port": bootstrap.rpartition(":")[2]}
        api.put(pod("p", "127.0.0.1", labels={"role": "prefill"}, annotations=annotation))
        api.put(pod("d", "127.0.0.2", labels={"role": "decode"}))
        config = RouterConfig(
            pd_disaggregation=True,
            service_discovery=True,
            prefill_selector=("app=sglang", "role=prefill"),
            decode_selector=("app=sglang", "role=decode"),
            service_discovery_port=port,
            service_discovery_namespace="default",
            worker_startup_timeout_secs=10,
        )
        router = build_router(config)
        url = stack.enter_context(BackgroundServer(router.app(), lifespan="on"))
        wait_until(lambda: len(router.registry) == 2, timeout=15)
        roles = {worker.role: worker for worker in router.registry}
        assert roles["prefill"].bootstrap_port == int(annotation["sglang.ai/bootstrap-port"])
        assert roles["decode"].url == f"http://127.0.0.2:{port}"
        answer = httpx.post(f"{url}/generate", json={"text": "hi"}, trust_env=False, timeout=20)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-engine"] == "d"
        assert decode.stats().pd is not None and decode.stats().pd["paired"] == 1
    # A fleet of whole engines has no use for the role selectors.
    with pytest.raises(ValueError, match="pd-disaggregation"):
        build_router(RouterConfig(service_discovery=True, prefill_selector=("app=x",)))
