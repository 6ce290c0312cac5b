"""The relay (the outbox's publisher of last resort) and the reconciler, run periodically by the worker bootstep.

* Relay: runs and continuations whose publish lease lapsed while still unpublished (the producer
  died between commit and publish, the broker was down, a flag could not be written) are
  published under a lease of the relay's own (:mod:`celery_batches.publishing.publisher`). The task id is the
  run id, so a republish can never make a second distinct job.
* Recovery (:mod:`.recovery`): runs a gone node or a dead pool process left open, and published
  runs whose message the broker lost, are resolved.
* Reconciler: runs with no final state after ``reconcile_grace`` seconds are checked against the
  result backend (SUCCESS, FAILURE, REVOKED) — a worker process killed before its group commit, a
  write that kept failing; with ``run_timeout`` set, a run older than that with no outcome
  anywhere is marked FAILED. It walks the open runs with a cursor, so old runs that stay open
  never hide newer ones.

Only one worker node runs a pass at a time: it holds the ``relay`` lease row for the pass (a row,
not a session lock, so it works through PgBouncer's transaction pooling and on SQLite).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from celery.backends.base import DisabledBackend

from ..models import RunStatus
from ..settings import RELAY_PASS_TTL, RELAY_STEP
from ..store import RunEvent, reads, utcnow
from ..store.rows import as_utc
from .recovery import Recovery, backend_outcome

if TYPE_CHECKING:
    from .node import Node

__all__ = ["Relay"]

log = logging.getLogger(__name__)


class Relay:
    def __init__(self, node: "Node") -> None:
        self.node = node
        self.settings = node.settings
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._cursor: tuple[datetime, str] | None = None
        self.recovery = Recovery(node)
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
            try:
                self.run_once()
            except Exception:
                log.exception("celery_batches: relay/reconciler pass failed; retrying in %.1fs",
                              self.settings.relay_interval)

    def run_once(self) -> dict[str, int]:
        """One pass, if this node holds (or takes) the relay lease. Returns what it did."""
        leases = self.node.publisher.outbox
        if not leases.elect("relay", self.holder, timedelta(seconds=RELAY_PASS_TTL)):
            return {}
        ttl = timedelta(seconds=RELAY_PASS_TTL)
        try:
            report = self.node.publisher.relay(RELAY_STEP)
            done = {"runs_published": report.runs, "continuations_published": report.continuations,
                    "refused": report.refused}
            leases.elect("relay", self.holder, ttl)
            done.update(self.recovery.run_once())
            leases.elect("relay", self.holder, ttl)
            done["runs_reconciled"] = self._reconcile(utcnow())
            leases.prune(timedelta(hours=1))
        finally:  # the next pass is anyone's (a node that dies mid-pass loses the lease after RELAY_PASS_TTL)
            leases.resign("relay", self.holder)
        if any(done.values()):
            log.warning("celery_batches: relay/reconciler %s", ", ".join(f"{k}={v}" for k, v in done.items()))
        return done

    def _reconcile(self, now: datetime) -> int:
        node = self.node
        stale = reads.open_runs(node.transitions, now - timedelta(seconds=self.settings.reconcile_grace), RELAY_STEP,
                               after=self._cursor)
        self._cursor = (stale[-1].created_at, str(stale[-1].id)) if len(stale) == RELAY_STEP else None  # wrap around
        if not stale:
            return 0
        if isinstance(node.app.backend, DisabledBackend) and self.settings.run_timeout is None:
            return 0
        timeout = self.settings.run_timeout
        events: list[RunEvent] = []
        for row in stale:
            event = backend_outcome(node.app, str(row.id), self.settings.result_max_bytes,
                                    keeps_results=bool(row.keeps_results), not_before=as_utc(row.reset_at))
            if event is not None:
                events.append(event)
            elif timeout is not None and as_utc(row.since) < now - timedelta(seconds=timeout):
                events.append(RunEvent(str(row.id), RunStatus.FAILED, 0, f"no outcome recorded within {timeout}s"))
        if events:
            node.write_events(events)
        return len(events)
