"""The relay (outbox publisher) and the reconciler, run periodically by the worker bootstep.

* Relay: runs and continuations committed but still unpublished after ``relay_grace`` seconds
  (the producer died between commit and publish, or the broker was down) are published. The task
  id is the run id, so a republish can never make a second distinct job.
* Reconciler: runs with no final state after ``reconcile_grace`` seconds are checked against the
  result backend (SUCCESS, FAILURE, REVOKED) — a worker process killed before its group commit, a
  write that kept failing;
  with ``run_timeout`` set, a run older than that with no outcome anywhere is marked FAILED.

Only one worker node does this at a time: on PostgreSQL a session advisory lock elects it.
"""

from __future__ import annotations

import logging
import threading
import zlib
from datetime import timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from celery import states
from celery.backends.base import DisabledBackend

from ..models import RunStatus
from ..store import RunEvent, utcnow

if TYPE_CHECKING:
    from ..api import Batches

__all__ = ["Maintenance"]

log = logging.getLogger(__name__)
BATCH = 500


class Maintenance:
    def __init__(self, batches: "Batches") -> None:
        self.batches = batches
        self.settings = batches.settings
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
        """One pass, if this node wins the lock. Returns what it did."""
        engine = self.batches.engine
        if engine.dialect.name != "postgresql":
            return self._pass()
        key = zlib.crc32(f"celery_batches.relay:{self.settings.table_prefix}".encode())
        with engine.connect() as lock:
            if not lock.scalar(sa.select(sa.func.pg_try_advisory_lock(key))):
                return {}
            lock.commit()
            try:
                return self._pass()
            finally:
                lock.execute(sa.select(sa.func.pg_advisory_unlock(key)))
                lock.commit()

    def _pass(self) -> dict[str, int]:
        b = self.batches
        now = utcnow()
        done = {"runs_published": 0, "continuations_published": 0, "runs_reconciled": 0}
        relay_cutoff = now - timedelta(seconds=self.settings.relay_grace)
        runs = b.store.unpublished_runs(relay_cutoff, BATCH)
        if runs:
            done["runs_published"] = len(b._publish_runs(runs))
        conts = b.store.due_continuations(relay_cutoff, BATCH)
        if conts:
            done["continuations_published"] = len(b._publish_continuations(conts))
        done["runs_reconciled"] = self._reconcile(now)
        if any(done.values()):
            log.warning("celery_batches: relay/reconciler %s", ", ".join(f"{k}={v}" for k, v in done.items()))
        return done

    def _reconcile(self, now) -> int:  # type: ignore[no-untyped-def]
        b = self.batches
        stale = b.store.open_runs(now - timedelta(seconds=self.settings.reconcile_grace), BATCH)
        if not stale:
            return 0
        backend = b.app.backend
        timeout = self.settings.run_timeout
        events: list[RunEvent] = []
        for run_id, since in stale:
            state, result = None, None
            if not isinstance(backend, DisabledBackend):
                meta = backend.get_task_meta(run_id)
                state, result = meta.get("status"), meta.get("result")
            if state == states.SUCCESS:
                events.append(RunEvent(run_id, RunStatus.COMPLETED))
            elif state == states.FAILURE:
                events.append(RunEvent(run_id, RunStatus.FAILED, 0, f"{type(result).__name__}: {result}"))
            elif state == states.REVOKED:
                events.append(RunEvent(run_id, RunStatus.CANCELLED, 0, "revoked"))
            elif timeout is not None and since < now - timedelta(seconds=timeout):
                events.append(RunEvent(run_id, RunStatus.FAILED, 0, f"no outcome recorded within {timeout}s"))
        if events:
            b._write_events(events)
        return len(events)
