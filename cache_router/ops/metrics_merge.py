"""One scrape out of several processes' scrapes (``serve --workers N --prometheus-port``).

Each ``--workers`` process counts only the requests it served, so the fleet's figures are
the sum of theirs. Counters, histograms and summaries add up sample by sample (a bucket
of one process plus the same bucket of another). Gauges are of two kinds: amounts that add
up (requests in flight on a worker, characters in the prefix trees, named by the caller)
and states every process reports of the same thing, each from its own probes (a worker's
health, its circuit breaker, an event stream being live): for those the largest value
is taken, so one process that sees a worker unhealthy (0) does not hide behind another
that sees it healthy (1) under a sum of 1 that means neither. ``*_created`` timestamps
take the earliest. Families or label sets only some processes have are kept as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

__all__ = ["merge_expositions"]

_ADDITIVE_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


def _combine(kind: str, additive: bool) -> Any:
    if kind in _ADDITIVE_TYPES or additive:
        return lambda a, b: a + b
    if kind == "gauge":
        return max
    return lambda a, b: a  # info, stateset, unknown: the first process's


class _Merged:
    """The families of every process, merged; a prometheus_client collector."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> Iterator[Any]:
        yield from self._families


def merge_families(expositions: Iterable[str], additive_gauges: frozenset[str]) -> list[Any]:
    """The metric families of ``expositions`` (Prometheus text format) merged into one
    list, in the order they first appear; gauges named in ``additive_gauges`` add up."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    merged: dict[str, Any] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            kind = family.type
            if family.name.endswith("_created") and kind == "gauge":
                combine = min
            else:
                combine = _combine(kind, family.name in additive_gauges)
            if family.name not in merged:
                merged[family.name] = (Metric(family.name, family.documentation, kind), combine)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = samples.get(key)
                samples[key] = sample.value if seen is None else combine(seen, sample.value)
    families = []
    for name, (metric, _) in merged.items():
        metric.samples = [
            Sample(sample_name, dict(labels), value)
            for (sample_name, labels), value in values[name].items()
        ]
        families.append(metric)
    return families


def merge_expositions(
    expositions: Sequence[str], additive_gauges: frozenset[str], extra: Iterable[Any] = ()
) -> bytes:
    """:func:`merge_families` and then the families of ``extra``, rendered back to
    Prometheus text format."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged([*merge_families(expositions, additive_gauges), *extra]))
    body: bytes = generate_latest(registry)
    return body
