"""The reconciler: runs with no final state after ``reconcile_grace`` seconds are checked against
the result backend (SUCCESS, FAILURE, REVOKED) — a worker process killed before its group commit, a
write that kept failing; with ``run_timeout`` set, a run older than that with no outcome anywhere
is marked FAILED. It walks the open runs with a cursor, so old runs that stay open never hide
newer ones. Run by the relay pass (:mod:`.relay`)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Callable, Sequence

from celery.backends.base import DisabledBackend

from ..models import RunStatus
from ..settings import RELAY_STEP
from ..store import RunEvent, reads
from ..store.rows import as_utc
from .recovery import backend_outcome

if TYPE_CHECKING:
    from celery import Celery

    from ..settings import Settings
    from ..store import Transitions

__all__ = ["Reconciler"]


class Reconciler:
    def __init__(self, settings: "Settings", app: "Celery", transitions: "Transitions",
                 record: Callable[[Sequence[RunEvent]], None]) -> None:
        self.settings, self.app, self.transitions = settings, app, transitions
        self.record = record  # commit RunEvents and publish what they made due
        self._cursor: tuple[datetime, str] | None = None

    def run_once(self, now: datetime) -> int:
        """One step of the walk: the open runs older than ``reconcile_grace`` after the cursor. Returns
        how many it recorded an outcome for."""
        stale = reads.open_runs(self.transitions, now - timedelta(seconds=self.settings.reconcile_grace), RELAY_STEP,
                               after=self._cursor)
        self._cursor = (stale[-1].created_at, str(stale[-1].id)) if len(stale) == RELAY_STEP else None  # wrap around
        if not stale:
            return 0
        if isinstance(self.app.backend, DisabledBackend) and self.settings.run_timeout is None:
            return 0
        timeout = self.settings.run_timeout
        events: list[RunEvent] = []
        for row in stale:
            event = backend_outcome(self.app, str(row.id), self.settings.result_max_bytes,
                                    keeps_results=bool(row.keeps_results), not_before=as_utc(row.reset_at))
            if event is not None:
                events.append(event)
            elif timeout is not None and as_utc(row.since) < now - timedelta(seconds=timeout):
                events.append(RunEvent(str(row.id), RunStatus.FAILED, 0, f"no outcome recorded within {timeout}s"))
        if events:
            self.record(events)
        return len(events)
