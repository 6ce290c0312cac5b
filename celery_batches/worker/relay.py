"""The relay pass, run periodically by the worker bootstep on one node at a time: the outbox's
publisher of last resort, then recovery, then the reconciler.

* Relay: runs and continuations whose publish lease lapsed while still unpublished (the producer
  died between commit and publish, the broker was down, a flag could not be written) are
  published under a lease of the relay's own (:mod:`celery_batches.publishing.publisher`). The task id is the
  run id, so a republish can never make a second distinct job.
* Recovery (:mod:`.recovery`): runs a gone node or a dead pool process left open, and published
  runs whose message the broker lost, are resolved.
* Reconciler (:mod:`.reconcile`): runs with no final state after ``reconcile_grace`` seconds get
  the outcome the result backend kept.
* What recovery and the reconciler resolved is added to the registry's recovery counter (the
  metric ``celery_batches_runs_recovered_total{how}``); once a minute the metrics' totals are
  recorded for the dashboard's charts, and the metrics' ledger is folded.

Only one worker node runs a pass at a time: it holds the ``relay`` lease row for the pass (a row,
not a session lock, so it works through PgBouncer's transaction pooling and on SQLite).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from .. import retry
from ..publishing.publisher import Report
from ..settings import LEASE_PRUNE_AGE, RELAY_PASS_TTL, RELAY_STEP, TALLY_COMPACT_INTERVAL
from ..store import utcnow

if TYPE_CHECKING:
    from ..publishing.publisher import Publisher
    from ..settings import Settings
    from ..store.outbox import Outbox
    from ..store.tallies import Tallies
    from .reconcile import Reconciler
    from .recovery import Recovery

__all__ = ["Relay"]

log = logging.getLogger(__name__)

#: what a pass reports -> the ``how`` of the recovery counter (runs only: restored messages and
#: republished continuations are not runs)
RECOVERED = {"runs_worker_lost": "worker_lost", "runs_replacement_lost": "replacement_lost",
             "runs_handed_back": "handed_back", "runs_republished": "republished", "runs_cancelled": "cancelled",
             "runs_reconciled": "reconciled"}


class Relay:
    def __init__(self, settings: "Settings", publisher: "Publisher", outbox: "Outbox", recovery: "Recovery",
                 reconciler: "Reconciler", tallies: "Tallies", holder: str) -> None:
        self.settings, self.publisher, self.outbox = settings, publisher, outbox
        self.recovery, self.reconciler, self.tallies = recovery, reconciler, tallies
        self._compacted_at = -float("inf")  # time.monotonic() of the last folding of the ledger
        self._sampled: object = None  # the minute of the last sample this node recorded
        self.holder = holder  # the node's name: who holds the relay lease during a pass
        self._failed_at = -float("inf")  # time.monotonic() of the last pass the registry failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.settings.relay_interval <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="celery_batches-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.relay_interval):
            self.run_once()

    def run_once(self) -> dict[str, int]:
        """One pass, if this node holds (or takes) the relay lease. Returns what it did; a pass that
        fails is logged; one the registry failed holds the next lease's takeovers back (:meth:`_takeover`)."""
        try:
            return self._pass()
        except Exception as exc:
            if retry.registry_away(exc):
                self._failed_at = time.monotonic()
            log.exception("celery_batches: relay/reconciler pass failed; retrying in %.1fs",
                          self.settings.relay_interval)
            return {}

    def _pass(self) -> dict[str, int]:
        leases = self.outbox
        if not leases.elect("relay", self.holder, timedelta(seconds=RELAY_PASS_TTL)):
            return {}
        ttl = timedelta(seconds=RELAY_PASS_TTL)
        try:
            report = self._takeover()
            done = {"runs_published": report.runs, "continuations_published": report.continuations,
                    "refused": report.refused}
            leases.elect("relay", self.holder, ttl)
            done.update(self.recovery.run_once())
            leases.elect("relay", self.holder, ttl)
            done["runs_reconciled"] = self.reconciler.run_once(utcnow())
            self.tallies.recovered({how: done.get(key, 0) for key, how in RECOVERED.items()})
            leases.prune(timedelta(seconds=LEASE_PRUNE_AGE))
            now = utcnow()
            if now.replace(second=0, microsecond=0) != self._sampled:  # the charts' record: once a minute
                self.tallies.sample(now)
                self._sampled = now.replace(second=0, microsecond=0)
            if time.monotonic() - self._compacted_at >= TALLY_COMPACT_INTERVAL:
                self.tallies.compact()
                self._compacted_at = time.monotonic()
        finally:  # the next pass is anyone's (a node that dies mid-pass loses the lease after RELAY_PASS_TTL)
            leases.resign("relay", self.holder)
        if any(done.values()):
            log.warning("celery_batches: relay/reconciler %s", ", ".join(f"{k}={v}" for k, v in done.items()))
        return done

    def _takeover(self) -> "Report":
        """Publish what waits under lapsed leases, unless the registry failed a pass less than a lease ago: leases
        that lapsed while the registry was away belong to publishers that may have sent their runs
        and now write the flags they owe (``Publisher._owe``); they get a lease to do it first."""
        if time.monotonic() - self._failed_at < self.outbox.lease_time.total_seconds():
            return Report()
        return self.publisher.relay(RELAY_STEP)
