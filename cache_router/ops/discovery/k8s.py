"""Kubernetes service discovery: engine pods found by label selector, watched over HTTP.

SGLang's router flags (``--service-discovery``, ``--selector k=v ...``,
``--service-discovery-port``, ``--service-discovery-namespace``, ``--prefill-selector``,
``--decode-selector``, ``--bootstrap-port-annotation``) with its rules: a pod matching a
selector is a worker at ``http://{podIP}:{port}`` once it is Running, its ``Ready``
condition is true and it is not being deleted; the prefill selector is tried first, then
the decode one, then the regular one; a prefill pod's bootstrap port is read from the
annotation. Unlike SGLang's router, a pod that stops being ready is drained too, not only a
deleted one: a ready pod is what a Service would send traffic to.

The API is spoken with plain httpx (the watch protocol is four lines of JSON handling and
the ``kubernetes_asyncio`` client is a large dependency): list the pods, then watch from
the list's ``resourceVersion``. A watch that ends or drops is resumed from the last
version seen (events, bookmarks), so nothing is missed or replayed; a ``410 Gone`` (the
version is older than the API server keeps) means a fresh list, reconciled against what
the router has. Failures wait a doubling delay (bounded) and try again; the workers found
so far stay while the API is unreachable.

Credentials: in a pod, the service account (token file re-read at every connection, as
the kubelet rotates it; its CA; ``KUBERNETES_SERVICE_HOST``/``_PORT``); elsewhere the
current context of ``$KUBECONFIG`` or ``~/.kube/config`` (server, CA file or data, bearer
token or token file, client certificate and key files or data; exec plugins are not run).
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from cache_router.ops.discovery.common import (
    ROLES,
    Backoff,
    Reconciler,
    Role,
    Target,
    WorkerSink,
    worker_url,
)

__all__ = [
    "BOOTSTRAP_PORT_ANNOTATION",
    "SERVICE_ACCOUNT_DIR",
    "KubeAccess",
    "KubeConfigError",
    "KubernetesDiscovery",
    "PodMatcher",
    "in_cluster_access",
    "kubeconfig_access",
    "load_access",
    "parse_selector",
]

logger = logging.getLogger("cache_router.ops.discovery.k8s")

#: The annotation SGLang's router reads a prefill pod's bootstrap port from.
BOOTSTRAP_PORT_ANNOTATION = "sglang.ai/bootstrap-port"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# Label keys: an optional DNS-subdomain prefix and a name; values: a name or empty.
_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"(?:{_LABEL_NAME})?")
#: Seconds the API server keeps one watch open before ending it (it is then resumed).
WATCH_SECONDS = 300


class KubeConfigError(ValueError):
    """No usable credentials: not in a pod, and no kubeconfig the router can use."""


def parse_selector(items: Sequence[str]) -> dict[str, str]:
    """``["app=sglang", "tier=gpu,zone=a"]`` as a label mapping; ``ValueError`` names a
    malformed item. Equality only, as SGLang's router takes it."""
    labels: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
                raise ValueError(f"{part.strip()!r} is not a label selector key=value")
            labels[key] = value
    return labels


class PodMatcher:
    """Which pods are workers, in which role, at which URL (see the module docstring).

    ``selectors`` maps a role to its labels; roles with an empty selector are off.
    """

    def __init__(
        self,
        selectors: Mapping[Role, Mapping[str, str]],
        port: int,
        bootstrap_port_annotation: str = BOOTSTRAP_PORT_ANNOTATION,
    ) -> None:
        # Prefill first, then decode, then regular: SGLang's order for a pod matching two.
        self.selectors: tuple[tuple[Role, dict[str, str]], ...] = tuple(
            (role, dict(selectors[role]))
            for role in ("prefill", "decode", "regular")
            if selectors.get(role)
        )
        if not self.selectors:
            raise ValueError("service discovery needs a selector")
        unknown = set(selectors) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s): {', '.join(sorted(unknown))}")
        self.port = port
        self.annotation = bootstrap_port_annotation

    def role(self, labels: Mapping[str, str]) -> Role | None:
        for role, selector in self.selectors:
            if all(labels.get(key) == value for key, value in selector.items()):
                return role
        return None

    def label_selector(self) -> str | None:
        """A ``labelSelector`` every matching pod satisfies, so the API sends only those:
        per key in all selectors, ``key=value`` or ``key in (values)``; None if no key is
        shared (then every pod of the namespace is listed and filtered here)."""
        shared = set.intersection(*(set(selector) for _, selector in self.selectors))
        terms = []
        for key in sorted(shared):
            values = sorted({selector[key] for _, selector in self.selectors})
            if len(values) == 1:
                terms.append(f"{key}={values[0]}")
            else:
                terms.append(f"{key} in ({','.join(values)})")
        return ",".join(terms) or None

    def target(self, pod: Mapping[str, Any]) -> tuple[str, Target] | None:
        """The worker URL and target of a pod that should serve now, else None."""
        meta = pod.get("metadata") or {}
        role = self.role(meta.get("labels") or {})
        if role is None or meta.get("deletionTimestamp"):
            return None
        status = pod.get("status") or {}
        address = status.get("podIP")
        if not isinstance(address, str) or not address or status.get("phase") != "Running":
            return None
        ready = any(
            condition.get("type") == "Ready" and condition.get("status") == "True"
            for condition in status.get("conditions") or ()
        )
        if not ready:
            return None
        bootstrap = None
        if role == "prefill":
            bootstrap = _port((meta.get("annotations") or {}).get(self.annotation))
        return worker_url(address, self.port), Target(role, bootstrap)


def _port(text: object) -> int | None:
    if isinstance(text, str) and text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    return None


def _pod_key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


# -- credentials ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KubeAccess:
    """How to reach the API server: its URL, TLS and bearer token (or token file)."""

    server: str
    ssl_context: ssl.SSLContext | None = None
    token: str | None = None
    token_file: str | None = None
    #: The namespace of the pod or the kubeconfig context (informational).
    namespace: str | None = None

    def headers(self) -> dict[str, str]:
        """The request headers; the token file is read now (tokens rotate)."""
        token = self.token
        if self.token_file is not None:
            token = Path(self.token_file).read_text(encoding="utf-8").strip()
        return {"authorization": f"Bearer {token}"} if token else {}


def in_cluster_access(
    environ: Mapping[str, str] | None = None, root: str = SERVICE_ACCOUNT_DIR
) -> KubeAccess | None:
    """The pod's service account, when running in a pod (else None)."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    token = Path(root, "token")
    if not host or not port or not token.is_file():
        return None
    context = ssl.create_default_context(cafile=str(Path(root, "ca.crt")))
    namespace = Path(root, "namespace")
    return KubeAccess(
        server=worker_url(host, int(port), "https"),
        ssl_context=context,
        token_file=str(token),
        namespace=namespace.read_text(encoding="utf-8").strip() if namespace.is_file() else None,
    )


def kubeconfig_access(
    path: str | None = None, environ: Mapping[str, str] | None = None
) -> KubeAccess:
    """The current context of a kubeconfig: ``path``, else the first file of
    ``$KUBECONFIG``, else ``~/.kube/config``. Raises :class:`KubeConfigError`."""
    env = os.environ if environ is None else environ
    if path is None:
        listed = [item for item in env.get("KUBECONFIG", "").split(os.pathsep) if item]
        path = listed[0] if listed else str(Path.home() / ".kube" / "config")
    try:
        yaml: Any = importlib.import_module("yaml")  # PyYAML ships no type stubs
    except ImportError:
        raise KubeConfigError(
            "reading a kubeconfig needs PyYAML: pip install 'cache_router[k8s]'"
        ) from None
    try:
        with open(path, encoding="utf-8") as stream:
            config = yaml.safe_load(stream)
    except (OSError, yaml.YAMLError) as exc:
        raise KubeConfigError(f"kubeconfig {path}: {exc}") from None
    try:
        return _from_kubeconfig(config, Path(path).parent)
    except (KeyError, TypeError, ValueError, OSError, ssl.SSLError) as exc:
        raise KubeConfigError(f"kubeconfig {path}: {exc}") from None


def _named(config: Mapping[str, Any], section: str, name: object) -> Mapping[str, Any]:
    for entry in config.get(section) or ():
        if entry.get("name") == name:
            return entry[section[:-1]] or {}  # "clusters" -> "cluster"
    raise KeyError(f"no {section[:-1]} named {name!r}")


def _from_kubeconfig(config: Mapping[str, Any], base: Path) -> KubeAccess:
    context = _named(config, "contexts", config["current-context"])
    cluster = _named(config, "clusters", context["cluster"])
    user = _named(config, "users", context.get("user")) if context.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise ValueError("exec and auth-provider credentials are not supported: use a token")
    server = str(cluster["server"])

    def file(name: str) -> str:
        return str(base / os.path.expanduser(str(name)))

    context_ssl = None
    if server.startswith("https://"):
        context_ssl = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify"):
            context_ssl.check_hostname = False
            context_ssl.verify_mode = ssl.CERT_NONE
        elif "certificate-authority-data" in cluster:
            pem = base64.b64decode(cluster["certificate-authority-data"]).decode("ascii")
            context_ssl.load_verify_locations(cadata=pem)
        elif "certificate-authority" in cluster:
            context_ssl.load_verify_locations(cafile=file(cluster["certificate-authority"]))
        _client_cert(context_ssl, user, file)
    token_file = user.get("tokenFile")
    return KubeAccess(
        server=server.rstrip("/"),
        ssl_context=context_ssl,
        token=user.get("token"),
        token_file=None if token_file is None else file(token_file),
        namespace=context.get("namespace"),
    )


def _client_cert(context: ssl.SSLContext, user: Mapping[str, Any], file: Any) -> None:
    """Load the user's client certificate and key, from files or inline base64 data
    (``load_cert_chain`` reads files only: inline data goes through a private temp dir)."""
    if "client-certificate" in user:
        key = user.get("client-key")
        context.load_cert_chain(
            file(user["client-certificate"]), None if key is None else file(key)
        )
        return
    if "client-certificate-data" not in user:
        return
    with tempfile.TemporaryDirectory() as folder:  # mode 0700: the key stays private
        cert = Path(folder, "cert.pem")
        cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
        key_path = None
        if "client-key-data" in user:
            key_file = Path(folder, "key.pem")
            key_file.write_bytes(base64.b64decode(user["client-key-data"]))
            key_path = str(key_file)
        context.load_cert_chain(str(cert), key_path)


def load_access(environ: Mapping[str, str] | None = None) -> KubeAccess:
    """In-cluster credentials when in a pod, else the kubeconfig's; raises
    :class:`KubeConfigError`."""
    try:
        access = in_cluster_access(environ)
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise KubeConfigError(f"in-cluster credentials: {exc}") from None
    return access or kubeconfig_access(environ=environ)


# -- the watch ------------------------------------------------------------------------------


class _Gone(Exception):
    """The resourceVersion is too old: list again."""


class _ApiError(Exception):
    """An answer the watch cannot use (status, malformed body): retry after a delay."""


class KubernetesDiscovery:
    """Watches the pods ``matcher`` selects and feeds them to ``sink``; a background task
    (``run``). ``namespace`` None watches every namespace (SGLang's default; needs a
    ClusterRole). ``access`` is the API server and credentials (:func:`load_access`).
    """

    def __init__(
        self,
        sink: WorkerSink,
        access: KubeAccess,
        matcher: PodMatcher,
        *,
        namespace: str | None = None,
        watch_seconds: int = WATCH_SECONDS,
        backoff: Backoff | None = None,
    ) -> None:
        self.sink = sink
        self.access = access
        self.matcher = matcher
        self.namespace = namespace
        self.watch_seconds = watch_seconds
        self.backoff = backoff or Backoff()
        self.path = "/api/v1/pods" if namespace is None else f"/api/v1/namespaces/{namespace}/pods"
        self.selector = matcher.label_selector()
        #: The last resourceVersion seen (None: list first); the pods that serve, by key.
        self.version: str | None = None
        self.pods: dict[str, tuple[str, Target]] = {}
        self.reconciler: Reconciler | None = None

    async def run(self) -> None:
        timeout = httpx.Timeout(10.0, read=self.watch_seconds + 30.0)
        async with (
            httpx.AsyncClient(
                base_url=self.access.server,
                verify=self.access.ssl_context or True,
                trust_env=False,
                timeout=timeout,
            ) as client,
            anyio.create_task_group() as group,
        ):
            self.reconciler = Reconciler(self.sink, group)
            logger.info(
                "watching pods %s in %s on %s",
                self.selector or "(all, filtered here)",
                self.namespace or "every namespace",
                self.access.server,
            )
            while True:
                await self.step(client)

    async def step(self, client: httpx.AsyncClient) -> None:
        """List if needed, then watch until the stream ends; wait after a failure."""
        try:
            if self.version is None:
                await self._list(client)
            await self._watch(client)
            self.backoff.reset()
        except _Gone:
            logger.info("pod watch: resourceVersion %s expired, listing again", self.version)
            self.version = None
        except (
            httpx.HTTPError,
            OSError,
            _ApiError,
            ValueError,
            LookupError,
            TypeError,
            AttributeError,
        ) as exc:
            delay = self.backoff.next()
            logger.warning("pod watch failed (%s), retrying in %g s", _reason(exc), delay)
            await anyio.sleep(delay)

    def _params(self, **extra: str) -> dict[str, str]:
        return extra if self.selector is None else {"labelSelector": self.selector, **extra}

    async def _list(self, client: httpx.AsyncClient) -> None:
        response = await client.get(self.path, params=self._params(), headers=self.access.headers())
        _check(response)
        body = response.json()
        pods: dict[str, tuple[str, Target]] = {}
        for pod in body.get("items") or ():
            found = self.matcher.target(pod)
            if found is not None:
                pods[_pod_key(pod)] = found
        self.pods = pods
        self.version = str(body["metadata"]["resourceVersion"])
        self._reconcile()

    async def _watch(self, client: httpx.AsyncClient) -> None:
        assert self.version is not None
        params = self._params(
            watch="true",
            resourceVersion=self.version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(self.watch_seconds),
        )
        async with client.stream(
            "GET", self.path, params=params, headers=self.access.headers()
        ) as response:
            if response.status_code != 200:
                await response.aread()
                _check(response)
            async for line in response.aiter_lines():
                if line.strip():
                    self._event(json.loads(line))

    def _event(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":  # a Status object
            if obj.get("code") == 410:
                raise _Gone
            raise _ApiError(f"watch error {obj.get('code')}: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            key = _pod_key(obj)
            found = None if kind == "DELETED" else self.matcher.target(obj)
            if found is None:
                self.pods.pop(key, None)
            else:
                self.pods[key] = found
            self._reconcile()
        if version is not None:  # BOOKMARK events carry only this
            self.version = str(version)

    def _reconcile(self) -> None:
        assert self.reconciler is not None
        self.reconciler.replace(dict(self.pods.values()))


def _check(response: httpx.Response) -> None:
    if response.status_code == 410:
        raise _Gone
    if response.status_code != 200:
        hint = ""
        if response.status_code == 403:
            hint = " (RBAC: the router needs get, list and watch on pods)"
        raise _ApiError(f"{response.request.method} pods: status {response.status_code}{hint}")


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
