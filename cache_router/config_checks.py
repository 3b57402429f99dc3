"""The rules between a configuration's fields, checked when it is built.

Each value is checked on its own by :mod:`cache_router.config_values`; what is left is
what only a combination of fields can get wrong (two PD protocols at once, PD options
without PD, the metrics listener on the router's port, a fleet TTL shorter than its
heartbeat, KV-event options without the policy that reads them, ...). These would
otherwise fail later, when the router is built or, worse, once it runs; here each is a
problem naming both options and where each came from, reported with the rest of the
load's problems by :class:`~cache_router.config.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cache_router.config_values import Option
from cache_router.proxy.tls import TLSSettingError, client_ssl_context

__all__ = ["cross_checks"]

_MIN_FLUSH = 0.05  # RedisFleetState's flush_interval: max_flush_interval may not be shorter


def cross_checks(
    values: Mapping[str, Any],
    origins: Mapping[str, str],
    fallback: str,
    options: Mapping[str, Option],
) -> list[str]:
    """The rules between fields, those that today fail later, when the router is built.

    ``values`` are the checked values given, ``options`` supply the defaults of the rest;
    ``origins`` name where each given value came from (``fallback`` for the others)."""

    def get(name: str) -> Any:
        return values.get(name, options[name].default)

    def where(name: str) -> str:
        if name in origins:
            return origins[name]
        return "default" if get(name) == options[name].default else fallback

    problems: list[str] = []
    paired = get("pd_disaggregation") or get("vllm_pd_disaggregation")
    if get("pd_disaggregation") and get("vllm_pd_disaggregation"):
        problems.append(
            f"vllm_pd_disaggregation (from {where('vllm_pd_disaggregation')}): choose one "
            f"protocol; pd_disaggregation is set too (from {where('pd_disaggregation')})"
        )
    for name in ("prefill_urls", "decode_urls", "prefill_policy", "decode_policy"):
        if not paired and get(name) not in ((), None):
            problems.append(
                f"{name} (from {where(name)}): only used with pd_disaggregation or "
                "vllm_pd_disaggregation"
            )
    if paired and get("worker_urls"):
        problems.append(
            f"worker_urls (from {where('worker_urls')}): a disaggregated fleet has prefill "
            "and decode workers only (prefill_urls, decode_urls)"
        )
    metrics_port = get("prometheus_port")
    if metrics_port is not None and metrics_port == get("port") and metrics_port != 0:
        hosts = {get("host"), get("prometheus_host")}
        if len(hosts) == 1 or hosts & {"0.0.0.0", "::"}:
            problems.append(
                f"prometheus_port (from {where('prometheus_port')}): {metrics_port} is also "
                f"the router's port (from {where('port')}); the metrics listener needs its own"
            )
    tls = get("ca_cert_paths"), get("client_cert_path"), get("client_key_path")
    if tls != ((), None, None):
        try:  # the files are read once here, so a bad one stops the start, named
            client_ssl_context(*tls)
        except TLSSettingError as exc:
            problems.append(f"{exc.option} (from {where(exc.option)}): {exc.reason}")
    if get("redis_url") is not None:
        heartbeat, ttl = get("fleet_heartbeat_secs"), get("fleet_ttl_secs")
        if not ttl > heartbeat:
            problems.append(
                f"fleet_ttl_secs (from {where('fleet_ttl_secs')}): must be longer than "
                f"fleet_heartbeat_secs ({heartbeat:g}, from {where('fleet_heartbeat_secs')}), "
                f"got {ttl!r}"
            )
        flush = get("fleet_max_flush_secs")
        if flush is not None and not _MIN_FLUSH <= flush <= heartbeat:
            problems.append(
                f"fleet_max_flush_secs (from {where('fleet_max_flush_secs')}): must be "
                f"between {_MIN_FLUSH} and fleet_heartbeat_secs ({heartbeat:g}, from "
                f"{where('fleet_heartbeat_secs')}), got {flush!r}"
            )
    if "precise_cache_aware" not in (get("policy"), get("prefill_policy")):
        for name in ("kv_events", "kv_events_port", "kv_events_replay_port", "kv_block_size"):
            if get(name) not in ((), None):
                problems.append(
                    f"{name} (from {where(name)}): only used with policy precise_cache_aware"
                )
    selectors = get("selector") or get("prefill_selector") or get("decode_selector")
    if get("service_discovery") and not selectors:
        problems.append(
            f"service_discovery (from {where('service_discovery')}): needs --selector (or "
            "--prefill-selector and --decode-selector) to know which pods are workers"
        )
    return problems
