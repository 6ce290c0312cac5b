"""Prometheus metrics of a registry (design.md section 7), served at the dashboard's ``/metrics`` and
printed by ``celery -A proj batches metrics``.

Every number comes from the registry's maintained counts (:mod:`celery_batches.store.tallies`), so
every process shows the same values and a scrape costs a few indexed reads at any size. The text
format is ``prometheus_client``'s (the ``[metrics]`` extra), imported only when metrics are asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from .store import utcnow

if TYPE_CHECKING:
    from .api import Batches
    from .store.tallies import Snapshot

__all__ = ["CONTENT_TYPE", "MetricsUnavailable", "render", "snapshot"]

#: the Prometheus text exposition format, version 0.0.4 (what ``prometheus_client`` writes)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsUnavailable(RuntimeError):
    """``prometheus_client`` is not installed."""

    def __init__(self) -> None:
        super().__init__("celery_batches: metrics need prometheus_client: pip install 'celery_batches[metrics]'")


def snapshot(batches: "Batches") -> "Snapshot":
    """The registry's numbers now (no ``prometheus_client`` needed)."""
    return batches.tallies.snapshot(utcnow())


class _Collector:
    """One scrape's metric families, from one snapshot."""

    def __init__(self, snap: "Snapshot") -> None:
        self.snap = snap

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.snap
        batches = GaugeMetricFamily("celery_batches_batches", "Batches by status.", labels=["status"])
        for status, n in s.batches.items():
            batches.add_metric([status], n)
        runs = GaugeMetricFamily("celery_batches_runs", "Jobs (runs) by status.", labels=["status"])
        for status, n in s.runs.items():
            runs.add_metric([status], n)
        recovered = CounterMetricFamily("celery_batches_runs_recovered", "Runs recovery or the reconciler had to "
                                        "resolve, by how (kept in the registry).", labels=["how"])
        for how, n in sorted(s.recovered.items()):
            recovered.add_metric([how], n)
        durations = HistogramMetricFamily(
            "celery_batches_batch_duration_seconds", "Seconds from creation to finish of top-level batches.",
            buckets=[("+Inf" if le == float("inf") else f"{le:g}", n) for le, n in s.duration_buckets],
            sum_value=s.duration_sum)
        yield from (
            batches, runs,
            GaugeMetricFamily("celery_batches_unpublished_runs", "Committed runs not published yet (the outbox "
                              "backlog; runs held behind max_concurrency are not counted).", value=s.unpublished_runs),
            GaugeMetricFamily("celery_batches_oldest_unpublished_seconds", "Age of the oldest unpublished run "
                              "(0 when there is none).", value=s.oldest_unpublished_seconds),
            GaugeMetricFamily("celery_batches_continuations_due", "Continuations due and not published yet.",
                              value=s.continuations_due),
            recovered, durations)


def render(batches: "Batches") -> bytes:
    """The Prometheus text of the registry's metrics now; :class:`MetricsUnavailable` without the extra."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest
    except ImportError:
        raise MetricsUnavailable() from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot(batches)))
    return generate_latest(registry)
