"""A Kubernetes API server that serves pods, for the discovery tests.

It answers the two requests the router makes, with the shapes of the core/v1 API
(``PodList``; watch events ``{"type", "object"}`` on a chunked stream, one JSON document per
line, ``ERROR`` carrying a ``Status``):

- ``GET /api/v1/namespaces/{ns}/pods`` (or ``/api/v1/pods``) ``?labelSelector=``: the list,
  with the current ``resourceVersion``;
- the same with ``?watch=true&resourceVersion=V``: every change after ``V``, then new ones
  as the test makes them, until ``timeoutSeconds``. A version older than the compacted
  history gets an ``ERROR`` event with a 410 ``Status`` ("too old resource version"), as
  etcd compaction causes on a real server.

The test drives it from its own thread: :meth:`put` and :meth:`delete` change pods,
:meth:`drop_watches` cuts the open watch streams mid-body (the connection closes without
the final chunk), :meth:`compact` forgets the history. Requests and the bearer token they
carried are recorded. Only equality label selectors are understood, ``key in (...)`` too.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TOKEN = "test-sa-token"


def pod(
    name: str,
    ip: str,
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    namespace: str = "default",
    annotations: dict[str, str] | None = None,
    terminating: bool = False,
) -> dict[str, Any]:
    """A Pod as the API returns it (the fields discovery reads, and some it does not)."""
    ready_text = "True" if ready else "False"
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{name}",
        "labels": {"app": "sglang", **(labels or {})},
        "annotations": annotations or {},
        "creationTimestamp": "2026-01-01T00:00:00Z",
    }
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:05:00Z"
        meta["deletionGracePeriodSeconds"] = 30
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {
            "containers": [
                {"name": "engine", "image": "sglang:latest", "ports": [{"containerPort": 8000}]}
            ],
            "nodeName": "node-1",
        },
        "status": {
            "phase": phase,
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": ready_text},
                {"type": "ContainersReady", "status": ready_text},
                {"type": "PodScheduled", "status": "True"},
            ],
            "hostIP": "10.0.0.1",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": "2026-01-01T00:00:01Z",
        },
    }


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    if not selector:
        return True
    for term in re.findall(r"[^,()]+ in \([^)]*\)|[^,]+", selector):
        if " in (" in term:
            key, _, values = term.partition(" in (")
            if labels.get(key.strip()) not in values.rstrip(")").split(","):
                return False
        else:
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
    return True


class FakeKubeApi:
    """The API server's state and its Starlette app (``app``); see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pods: dict[str, dict[str, Any]] = {}
        self.version = 1000
        self.history: list[tuple[int, dict[str, Any]]] = []
        self.compacted = 0  # versions at or below this are gone from the history
        self.drops = 0  # watch streams started before a drop end abruptly
        self.requests: list[dict[str, Any]] = []
        path = "/api/v1/namespaces/{namespace}/pods"
        self.app = Starlette(routes=[Route(path, self._pods), Route("/api/v1/pods", self._pods)])

    # -- driven by the test --------------------------------------------------------------

    def put(self, item: dict[str, Any]) -> None:
        """Create or change a pod (ADDED or MODIFIED)."""
        with self._lock:
            key = item["metadata"]["name"]
            kind = "MODIFIED" if key in self.pods else "ADDED"
            self._record(kind, item)
            self.pods[key] = item

    def delete(self, name: str) -> None:
        with self._lock:
            item = self.pods.pop(name)
            self._record("DELETED", item)

    def drop_watches(self) -> None:
        with self._lock:
            self.drops += 1

    def compact(self) -> None:
        with self._lock:
            self.compacted = self.version
            self.history.clear()

    def lists(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if not r["watch"]]

    def watches(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["watch"]]

    def _record(self, kind: str, item: dict[str, Any]) -> None:
        self.version += 1
        item = json.loads(json.dumps(item))
        item["metadata"]["resourceVersion"] = str(self.version)
        self.history.append((self.version, {"type": kind, "object": item}))

    # -- served ----------------------------------------------------------------------------

    async def _pods(self, request: Request) -> Response:
        query = request.query_params
        watch = query.get("watch") in ("true", "1")
        self.requests.append(
            {
                "path": request.url.path,
                "watch": watch,
                "resourceVersion": query.get("resourceVersion"),
                "labelSelector": query.get("labelSelector"),
                "authorization": request.headers.get("authorization"),
            }
        )
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse(_status(401, "Unauthorized", "Unauthorized"), status_code=401)
        namespace = request.path_params.get("namespace")
        selector = query.get("labelSelector")
        if not watch:
            with self._lock:
                items = [
                    item
                    for item in self.pods.values()
                    if _matches(item["metadata"]["labels"], selector)
                    and namespace in (None, item["metadata"]["namespace"])
                ]
                body = {
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": items,
                }
            return JSONResponse(body)
        since = int(query.get("resourceVersion") or 0)
        seconds = float(query.get("timeoutSeconds") or 30)
        return StreamingResponse(
            self._stream(since, seconds, selector), media_type="application/json"
        )

    async def _stream(
        self, since: int, seconds: float, selector: str | None
    ) -> AsyncIterator[bytes]:
        import anyio

        drops = self.drops
        if since < self.compacted:
            message = f"too old resource version: {since} ({self.compacted})"
            yield _line({"type": "ERROR", "object": _status(410, message, "Expired")})
            return
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:  # bounded by the watch's timeoutSeconds
            with self._lock:  # a drop cuts the stream before any later change
                if self.drops != drops:
                    raise ConnectionResetError("watch dropped by the test")
                events = [event for version, event in self.history if version > since]
                if self.history:
                    since = max(since, self.history[-1][0])
            for event in events:
                if _matches(event["object"]["metadata"]["labels"], selector):
                    yield _line(event)
            await anyio.sleep(0.01)


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


def _status(code: int, message: str, reason: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
