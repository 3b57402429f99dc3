"""Model discovery: ask each engine which models it serves.

A worker that serves any ``model`` string lets every new string cost the cache-aware policy
a prefix tree of its own. Knowing the models lets the router refuse an unknown one with a
404 before anything is chosen or counted, and answer ``GET /v1/models`` from memory.

An engine is asked ``GET /v1/models`` (OpenAI, vLLM, SGLang) and, if that fails, SGLang's
``GET /get_model_info`` (``served_model_name`` and ``model_path``). Its answer is untrusted
input: the body is read up to :data:`MAX_MODELS_ANSWER` bytes, uncompressed, and at most
:data:`MAX_MODELS` ids of at most :data:`MAX_MODEL_ID_LENGTH` printable characters are
taken. An engine that cannot say keeps serving any model (or the models it reported last)
and that is logged once, not on every health check.

Nothing here owns an HTTP client: the health checker, the admin API and the command line's
start-up probe each pass the one they already have.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import anyio
import httpx

from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.ops.engine_key import worker_headers

__all__ = [
    "MAX_MODELS",
    "MAX_MODELS_ANSWER",
    "MAX_MODEL_ID_LENGTH",
    "DiscoveryError",
    "ModelDiscovery",
    "fetch_models",
    "get_json",
]

logger = logging.getLogger("cache_router.ops.models")

#: Largest engine answer read while discovering models, in bytes.
MAX_MODELS_ANSWER = 1024 * 1024
#: Most model ids taken from one engine; a longer list is refused as a whole.
MAX_MODELS = 256
#: Longest model id taken.
MAX_MODEL_ID_LENGTH = 1024

#: Asked for on every discovery request: a compressed answer could inflate past the cap
#: within a single chunk, so only identity-encoded bodies are read.
_IDENTITY = {"accept-encoding": "identity"}
#: Model ids named in one log line.
_LOGGED_IDS = 8


class DiscoveryError(Exception):
    """An engine did not say which models it serves; the message says why."""


async def fetch_models(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[str, ...]:
    """The models the engine at ``url`` serves; raises :class:`DiscoveryError`.

    Each of the (at most two) requests is bounded by ``timeout`` as a whole, however
    slowly the engine answers.
    """
    sent = headers or {}
    try:
        return _openai_ids(await get_json(client, url, "/v1/models", sent, timeout))
    except DiscoveryError as first:
        try:
            return _model_info_ids(await get_json(client, url, "/get_model_info", sent, timeout))
        except DiscoveryError as second:
            raise DiscoveryError(f"{first}; {second}") from None


async def get_json(
    client: httpx.AsyncClient, url: str, path: str, headers: Mapping[str, str], timeout: float
) -> Any:
    """The JSON answer of the engine at ``url`` to ``GET path``, read as untrusted input
    (identity-encoded, at most :data:`MAX_MODELS_ANSWER` bytes, ``timeout`` for the whole
    exchange); raises :class:`DiscoveryError` saying why not."""
    sent = {**headers, **_IDENTITY}
    with anyio.move_on_after(timeout):
        try:
            async with client.stream("GET", url + path, headers=sent, timeout=timeout) as answer:
                if not 200 <= answer.status_code < 300:
                    raise DiscoveryError(f"GET {path} answered {answer.status_code}")
                if answer.headers.get("content-encoding", "identity").lower() != "identity":
                    raise DiscoveryError(f"GET {path} answered with a compressed body")
                body = bytearray()
                # Identity only, so the decoded bytes are the bytes received.
                async for chunk in answer.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_MODELS_ANSWER:
                        raise DiscoveryError(
                            f"GET {path} answered more than {MAX_MODELS_ANSWER} bytes"
                        )
        except DiscoveryError:
            raise
        except Exception as exc:  # refused, reset, malformed: an engine must not crash us
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise DiscoveryError(f"GET {path} failed ({reason})") from None
        try:
            return json.loads(body)
        except ValueError:
            raise DiscoveryError(f"GET {path} did not answer JSON") from None
    raise DiscoveryError(f"GET {path} gave no answer within {timeout:g}s")


def _openai_ids(answer: Any) -> tuple[str, ...]:
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise DiscoveryError("GET /v1/models answered no data list")
    return _checked_ids(
        [entry.get("id") for entry in data if isinstance(entry, dict)], "/v1/models"
    )


def _model_info_ids(answer: Any) -> tuple[str, ...]:
    if not isinstance(answer, dict):
        raise DiscoveryError("GET /get_model_info answered no JSON object")
    return _checked_ids(
        [answer.get("served_model_name"), answer.get("model_path")], "/get_model_info"
    )


def _checked_ids(candidates: list[Any], path: str) -> tuple[str, ...]:
    """The usable ids among ``candidates``, deduplicated in order; at least one."""
    if len(candidates) > MAX_MODELS:
        raise DiscoveryError(f"GET {path} listed more than {MAX_MODELS} models")
    ids = dict.fromkeys(
        candidate
        for candidate in candidates
        if isinstance(candidate, str)
        and 0 < len(candidate) <= MAX_MODEL_ID_LENGTH
        and candidate.isprintable()
    )
    if not ids:
        raise DiscoveryError(f"GET {path} named no usable model id")
    return tuple(ids)


class ModelDiscovery:
    """Discovers workers' models into ``registry`` and logs each worker's failure once.

    ``headers`` go with every discovery request (the engine's API key, as the router sends
    it on requests; a worker's own ``api_key`` replaces its authorization); ``timeout``
    bounds each request. Workers registered with a model are never asked. A failure
    leaves the worker as it was: serving any model if it never answered, else the models
    it reported last (an engine that is down for a moment must not open itself to every
    model). Successful answers replace earlier ones.
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.registry = registry
        self.headers = dict(headers or {})
        self.timeout = timeout
        self._failing: set[Worker] = set()
        registry.on_remove(self._failing.discard)

    async def probe(
        self, client: httpx.AsyncClient, url: str, api_key: str | None = None
    ) -> tuple[str, ...] | str:
        """The models the engine at ``url`` serves, or why they could not be had;
        ``api_key`` is the worker's own engine key, if it has one."""
        headers = worker_headers(self.headers, api_key)
        try:
            return await fetch_models(client, url, headers=headers, timeout=self.timeout)
        except DiscoveryError as exc:
            return str(exc)

    async def discover(self, client: httpx.AsyncClient, *workers: Worker) -> None:
        """Ask the engine of ``workers`` (one engine's ranks, or one worker) once, unless
        they were registered with a model, and record the answer on each."""
        asking = [worker for worker in workers if worker.model is None]
        if asking:
            outcome = await self.probe(client, asking[0].address, asking[0].api_key)
            for worker in asking:
                self.record(worker, outcome)

    def record(self, worker: Worker, outcome: tuple[str, ...] | str) -> None:
        """Apply a :meth:`probe` outcome to ``worker``, if it is still registered."""
        if self.registry.get(worker.url) is not worker or worker.model is not None:
            return
        if isinstance(outcome, str):
            if worker not in self._failing:
                self._failing.add(worker)
                keeps = (
                    "requests for any model still go there"
                    if worker.discovered_models is None
                    else f"it keeps its last known models {list(worker.discovered_models)}"
                )
                logger.warning(
                    "could not discover the models of worker %s (%s); %s until it answers",
                    worker.url,
                    outcome,
                    keeps,
                )
            return
        self._failing.discard(worker)
        if self.registry.set_models(worker, outcome):
            shown = ", ".join(outcome[:_LOGGED_IDS])
            more = len(outcome) - _LOGGED_IDS
            logger.info(
                "worker %s serves %s%s", worker.url, shown, f" and {more} more" if more > 0 else ""
            )
