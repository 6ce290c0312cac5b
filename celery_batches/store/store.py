"""Every query celery_batches runs. Nothing outside ``store/`` writes SQL.

Transitions are conditional statements keyed by run or batch id, executed in the transaction
that changes the counters, so a duplicate signal, a redelivery or a second ``task_failure`` of
the same run changes nothing, and exactly one transaction finishes a batch.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence

import sqlalchemy as sa
from kombu.utils import json as kjson

from ..builder import BatchPlan, Message
from ..models import (
    FINAL_RUN_STATUSES,
    Batch,
    BatchStatus,
    Continuation,
    ContinuationKind,
    ContinuationStatus,
    JobRun,
    RunStatus,
)
from .tables import Tables

__all__ = ["RunEvent", "Store", "utcnow"]

_FIRES_ON = {
    BatchStatus.COMPLETED: (ContinuationKind.SUCCESS.value, ContinuationKind.COMPLETE.value),
    BatchStatus.FAILED: (ContinuationKind.FAILURE.value, ContinuationKind.COMPLETE.value),
}
# keyed by name: RunStatus and BatchStatus are IntEnums whose values overlap
_COUNTER = {"COMPLETED": "completed_jobs", "FAILED": "failed_jobs", "CANCELLED": "cancelled_jobs"}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


@dataclass(frozen=True, slots=True)
class RunEvent:
    """A run's transition as a worker signal saw it: the unit of the group commit."""

    run_id: str
    status: RunStatus
    retries: int = 0
    error: str | None = None

    def rank(self) -> tuple[int, int]:
        """Order of two progress events of one run: the later attempt, then RETRYING after RUNNING."""
        return (self.retries, int(self.status == RunStatus.RETRYING))


class Store:
    def __init__(self, engine: sa.Engine, tables: Tables, expires: timedelta) -> None:
        self.engine = engine
        self.t = tables
        self.expires = expires

    # -- creation -------------------------------------------------------------------------------
    def insert_tree(self, conn: sa.Connection, root: BatchPlan, now: datetime) -> list[Message]:
        """Write a batch tree with set-based inserts; returns continuations due because empty batches finished."""
        t = self.t
        batch_rows, run_rows, link_rows, cont_rows = [], [], [], []
        for node in root.walk():
            batch_rows.append({
                "id": node.id, "name": node.name, "parent_id": node.parent_id,
                "status": int(BatchStatus.STARTED), "total_jobs": node.total_units,
                "completed_jobs": 0, "failed_jobs": 0, "cancelled_jobs": 0,
                "created_by": node.created_by, "created_at": now,
            })
            for position, job in enumerate(node.jobs):
                run_rows.append(self._run_row(job, now))
                link_rows.append({"batch_id": node.id, "position": position, "run_id": job.id})
            for position, cont in enumerate(node.continuations):
                m = cont.message
                cont_rows.append({
                    "id": m.id, "batch_id": node.id, "kind": cont.kind.value, "position": position,
                    "task_name": m.task_name, "args": m.args, "kwargs": m.kwargs, "options": m.options,
                    "status": int(ContinuationStatus.WAITING),
                })
        conn.execute(sa.insert(t.batches), batch_rows)
        if run_rows:
            conn.execute(sa.insert(t.runs), run_rows)
            conn.execute(sa.insert(t.batch_jobs), link_rows)
        if cont_rows:
            conn.execute(sa.insert(t.continuations), cont_rows)
        empty = [node.id for node in root.walk() if node.total_units == 0]
        return self._finish(conn, empty, now)

    @staticmethod
    def _run_row(job: Message, now: datetime) -> dict:
        return {
            "id": job.id, "batch_id": job.batch_id, "status": int(RunStatus.PENDING),
            "task_name": job.task_name, "args": job.args, "kwargs": job.kwargs, "queue": job.queue,
            "options": job.options, "created_at": now, "retries": 0, "published": False,
        }

    def mark_published(self, run_ids: Sequence[str]) -> None:
        r = self.t.runs
        with self.engine.begin() as conn:
            conn.execute(sa.update(r).where(r.c.id.in_(run_ids)).values(published=True))

    def mark_dispatched(self, continuation_ids: Sequence[str]) -> None:
        c = self.t.continuations
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(c)
                .where(c.c.id.in_(continuation_ids), c.c.status == int(ContinuationStatus.DUE))
                .values(status=int(ContinuationStatus.DISPATCHED), dispatched_at=utcnow())
            )

    # -- transitions (the group commit) -----------------------------------------------------------
    def apply_events(self, events: Iterable[RunEvent]) -> list[Message]:
        """Apply a group of run transitions in one transaction; returns the continuations now due.

        Per run, the group keeps its latest progress event (so ``retries`` is right) and its
        first final event; redundant events are dropped before any SQL runs.
        """
        progress: dict[str, RunEvent] = {}
        final: dict[str, RunEvent] = {}
        for event in events:
            if event.status.is_final:
                final.setdefault(event.run_id, event)
            else:
                seen = progress.get(event.run_id)
                if seen is None or event.rank() > seen.rank():
                    progress[event.run_id] = event
        if not progress and not final:
            return []
        with self.engine.begin() as conn:
            return self._apply(conn, list(progress.values()), list(final.values()), utcnow())

    def _apply(self, conn: sa.Connection, progress: list[RunEvent], events: list[RunEvent],
               now: datetime) -> list[Message]:
        r = self.t.runs
        final = [int(s) for s in FINAL_RUN_STATUSES]
        if progress:
            # a later attempt always wins; within one attempt RUNNING may become RETRYING, not back
            conn.execute(
                sa.update(r)
                .where(
                    r.c.id == sa.bindparam("b_id"),
                    r.c.status.notin_(final),
                    sa.or_(
                        r.c.retries < sa.bindparam("b_retries"),
                        sa.and_(r.c.retries == sa.bindparam("b_retries"),
                                r.c.status.in_([int(RunStatus.PENDING), int(RunStatus.RUNNING)])),
                    ),
                )
                .values(status=sa.bindparam("b_status"), retries=sa.bindparam("b_retries"),
                        started_at=sa.func.coalesce(r.c.started_at, now)),
                [{"b_id": e.run_id, "b_status": int(e.status), "b_retries": e.retries} for e in progress],
            )
        counted: list[tuple[str, RunStatus]] = []
        completed = [e.run_id for e in events if e.status == RunStatus.COMPLETED]
        if completed:
            rows = conn.execute(
                sa.update(r).where(r.c.id.in_(completed), r.c.status.notin_(final))
                .values(status=int(RunStatus.COMPLETED), finished_at=now).returning(r.c.batch_id)
            ).all()
            counted += [(row.batch_id, RunStatus.COMPLETED) for row in rows]
        for e in events:  # failures carry their own error text; they are few
            if e.status in (RunStatus.FAILED, RunStatus.CANCELLED):
                row = conn.execute(
                    sa.update(r).where(r.c.id == e.run_id, r.c.status.notin_(final))
                    .values(status=int(e.status), finished_at=now, error=e.error).returning(r.c.batch_id)
                ).first()
                if row is not None:
                    counted.append((row.batch_id, e.status))
        return self._count(conn, counted, now)

    def _count(self, conn: sa.Connection, finished_units: list[tuple[str, RunStatus | BatchStatus]],
               now: datetime) -> list[Message]:
        """Count finished units (runs or child batches) in their batches, then finish what is complete."""
        if not finished_units:
            return []
        deltas: dict[str, Counter] = defaultdict(Counter)
        for batch_id, status in finished_units:
            deltas[batch_id][_COUNTER[status.name]] += 1
        b = self.t.batches
        # lock rows in one order so two groups touching the same batches cannot deadlock each other
        conn.execute(
            sa.update(b).where(b.c.id == sa.bindparam("b_id")).values(
                completed_jobs=b.c.completed_jobs + sa.bindparam("b_c"),
                failed_jobs=b.c.failed_jobs + sa.bindparam("b_f"),
                cancelled_jobs=b.c.cancelled_jobs + sa.bindparam("b_x"),
            ),
            [{"b_id": bid, "b_c": d["completed_jobs"], "b_f": d["failed_jobs"], "b_x": d["cancelled_jobs"]}
             for bid, d in sorted(deltas.items())],
        )
        return self._finish(conn, list(deltas), now)

    def _finish(self, conn: sa.Connection, batch_ids: list[str], now: datetime) -> list[Message]:
        """Finish the given batches that have every unit done: one conditional UPDATE decides."""
        if not batch_ids:
            return []
        b, c = self.t.batches, self.t.continuations
        done = b.c.completed_jobs + b.c.failed_jobs + b.c.cancelled_jobs
        finished = conn.execute(
            sa.update(b)
            .where(b.c.id.in_(sorted(batch_ids)), b.c.status == int(BatchStatus.STARTED), done >= b.c.total_jobs)
            .values(
                status=sa.case((b.c.completed_jobs == b.c.total_jobs, int(BatchStatus.COMPLETED)),
                               else_=int(BatchStatus.FAILED)),
                completed_at=now,
                expires_at=now + self.expires,
            )
            .returning(b.c.id, b.c.parent_id, b.c.status)
        ).all()
        if not finished:
            return []
        by_status: dict[BatchStatus, list[str]] = defaultdict(list)
        for row in finished:
            by_status[BatchStatus(row.status)].append(row.id)
        fires = sa.or_(*(sa.and_(c.c.batch_id.in_(ids), c.c.kind.in_(_FIRES_ON[status]))
                         for status, ids in by_status.items()))
        due = conn.execute(
            sa.update(c).where(c.c.status == int(ContinuationStatus.WAITING), fires)
            .values(status=int(ContinuationStatus.DUE), due_at=now)
            .returning(c.c.id, c.c.task_name, c.c.args, c.c.kwargs, c.c.options)
        ).all()
        conn.execute(
            sa.update(c).where(c.c.batch_id.in_([row.id for row in finished]),
                               c.c.status == int(ContinuationStatus.WAITING))
            .values(status=int(ContinuationStatus.SKIPPED))
        )
        messages = [Message(row.id, row.task_name, row.args, row.kwargs, row.options) for row in due]
        parents = [(row.parent_id, BatchStatus(row.status)) for row in finished if row.parent_id]
        return messages + self._count(conn, parents, now)

    # -- reads ------------------------------------------------------------------------------------
    def get_batch(self, batch_id: str) -> Batch | None:
        b = self.t.batches
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(b).where(b.c.id == batch_id)).first()
        return _batch(row) if row else None

    def list_batches(self, *, status: BatchStatus | None, parent_id: str | None, name: str | None,
                     limit: int, offset: int) -> list[Batch]:
        b = self.t.batches
        q = sa.select(b).where(b.c.parent_id.is_(None) if parent_id is None else b.c.parent_id == parent_id)
        if status is not None:
            q = q.where(b.c.status == int(status))
        if name:
            q = q.where(b.c.name.contains(name, autoescape=True))
        q = q.order_by(b.c.created_at.desc(), b.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [_batch(row) for row in conn.execute(q)]

    def get_jobs(self, batch_id: str, *, limit: int | None = None, offset: int = 0) -> list[JobRun]:
        r, j = self.t.runs, self.t.batch_jobs
        q = (sa.select(r, j.c.position).join(j, j.c.run_id == r.c.id)
             .where(j.c.batch_id == batch_id).order_by(j.c.position).limit(limit).offset(offset))
        with self.engine.connect() as conn:
            return [_run(row) for row in conn.execute(q)]

    def get_continuations(self, batch_id: str) -> list[Continuation]:
        c = self.t.continuations
        q = sa.select(c).where(c.c.batch_id == batch_id).order_by(c.c.kind, c.c.position)
        with self.engine.connect() as conn:
            return [
                Continuation(row.id, row.batch_id, ContinuationKind(row.kind), row.task_name,
                             kjson.loads(row.args), kjson.loads(row.kwargs), ContinuationStatus(row.status),
                             _aware(row.dispatched_at))
                for row in conn.execute(q)
            ]

    # -- outbox and reconciliation ----------------------------------------------------------------
    def unpublished_runs(self, older_than: datetime, limit: int) -> list[Message]:
        """Runs committed but never published (the producer died, or the broker was down)."""
        r, b = self.t.runs, self.t.batches
        q = (sa.select(r.c.id, r.c.task_name, r.c.args, r.c.kwargs, r.c.options, r.c.batch_id)
             .join(b, b.c.id == r.c.batch_id)
             .where(sa.not_(r.c.published), r.c.created_at < older_than,
                    r.c.status == int(RunStatus.PENDING), b.c.status == int(BatchStatus.STARTED))
             .order_by(r.c.created_at).limit(limit))
        with self.engine.connect() as conn:
            return [Message(row.id, row.task_name, row.args, row.kwargs, row.options, row.batch_id)
                    for row in conn.execute(q)]

    def due_continuations(self, older_than: datetime, limit: int) -> list[Message]:
        c = self.t.continuations
        q = (sa.select(c.c.id, c.c.task_name, c.c.args, c.c.kwargs, c.c.options)
             .where(c.c.status == int(ContinuationStatus.DUE), c.c.due_at < older_than)
             .order_by(c.c.due_at).limit(limit))
        with self.engine.connect() as conn:
            return [Message(row.id, row.task_name, row.args, row.kwargs, row.options) for row in conn.execute(q)]

    def open_runs(self, older_than: datetime, limit: int) -> list[tuple[str, datetime]]:
        """Published runs with no final state whose last known change is older than ``older_than``."""
        r = self.t.runs
        since = sa.func.coalesce(r.c.started_at, r.c.created_at)
        q = (sa.select(r.c.id, since.label("since"))
             .where(r.c.status.notin_([int(s) for s in FINAL_RUN_STATUSES]), r.c.published,
                    r.c.created_at < older_than, since < older_than)
             .order_by(r.c.created_at).limit(limit))
        with self.engine.connect() as conn:
            return [(row.id, _aware(row.since)) for row in conn.execute(q)]


def _batch(row: sa.Row) -> Batch:
    return Batch(
        id=row.id, name=row.name, parent_id=row.parent_id, status=BatchStatus(row.status),
        total_jobs=row.total_jobs, completed_jobs=row.completed_jobs, failed_jobs=row.failed_jobs,
        cancelled_jobs=row.cancelled_jobs, created_by=row.created_by, created_at=_aware(row.created_at),
        completed_at=_aware(row.completed_at), expires_at=_aware(row.expires_at),
    )


def _run(row: sa.Row) -> JobRun:
    return JobRun(
        id=row.id, batch_id=row.batch_id, task_name=row.task_name, args=kjson.loads(row.args),
        kwargs=kjson.loads(row.kwargs), queue=row.queue, status=RunStatus(row.status), order=row.position,
        created_at=_aware(row.created_at), started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at), error=row.error, retries=row.retries,
    )
