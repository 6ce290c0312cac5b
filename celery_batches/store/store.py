"""Every query celery_batches runs. Nothing outside ``store/`` writes SQL.

Transitions are conditional statements keyed by run or batch id, executed in the transaction
that changes the counters, so a duplicate signal, a redelivery or a second ``task_failure`` of
the same run changes nothing, and exactly one transaction finishes a batch.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Iterable

import sqlalchemy as sa
from kombu.utils import json as kjson

from ..builder import BatchPlan, Message
from ..errors import BatchClosedError, BatchNotFoundError
from ..models import (
    Batch,
    BatchStatus,
    Continuation,
    ContinuationKind,
    ContinuationStatus,
    JobRun,
    RunStatus,
)
from .tables import Tables

__all__ = ["Outbox", "RunEvent", "Store", "utcnow"]

_WHEN_MATCHES = {
    "success": (BatchStatus.COMPLETED,),
    "failure": (BatchStatus.FAILED,),
    "complete": (BatchStatus.COMPLETED, BatchStatus.FAILED),
}
_FIRES_ON = {
    BatchStatus.COMPLETED: (ContinuationKind.SUCCESS.value, ContinuationKind.COMPLETE.value),
    BatchStatus.FAILED: (ContinuationKind.FAILURE.value, ContinuationKind.COMPLETE.value),
}
# keyed by name: RunStatus and BatchStatus are IntEnums whose values overlap
_COUNTER = {"COMPLETED": "completed_jobs", "FAILED": "failed_jobs", "CANCELLED": "cancelled_jobs"}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _ts(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)


def storable_text(text: str | None) -> str | None:
    """Untrusted text (an exception's message) as every database can store it.

    PostgreSQL text cannot hold NUL, and no UTF-8 database takes a lone surrogate (what
    ``os.fsdecode`` makes of a non-UTF-8 path); either would fail the whole transaction that
    carries it, on every retry. Both are written as backslash escapes instead.
    """
    if not text:
        return text
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def is_run_id(value: object) -> bool:
    """Run ids are UUIDs (the Celery task id a batch gave its member); anything else is not ours."""
    try:
        return str(uuid.UUID(str(value))) == str(value).lower()
    except ValueError:
        return False


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


@dataclass
class Outbox:
    """What a transaction made publishable, to publish after it commits: runs and continuations,
    under the transaction's publish lease (``publication``, a row of the publications table)."""

    runs: list[Message] = field(default_factory=list)
    continuations: list[Message] = field(default_factory=list)
    publication: str | None = None

    def extend(self, other: "Outbox") -> None:
        self.runs += other.runs
        self.continuations += other.continuations
        self.publication = self.publication or other.publication


class Tx:
    """One registry transaction: its connection, its clock, and (made on first use) its publish lease.

    Everything a transaction makes publishable carries the lease's id; the publisher renews it
    while it publishes, and the relay takes only what carries a lapsed lease. So the relay never
    publishes what a live producer (or the group commit that released it) is still publishing.
    """

    __slots__ = ("conn", "now", "_store", "_publication")

    def __init__(self, store: "Store", conn: sa.Connection, now: datetime) -> None:
        self.conn, self.now, self._store, self._publication = conn, now, store, None

    def publication(self) -> str:
        if self._publication is None:
            self._publication = str(uuid.uuid4())
            self.conn.execute(sa.insert(self._store.t.publications).values(
                id=self._publication, expires_at=utcnow() + self._store.publish_lease))
        return self._publication

    def outbox(self, runs: list[Message] | None = None, continuations: list[Message] | None = None) -> Outbox:
        return Outbox(runs or [], continuations or [], self._publication)


@dataclass(frozen=True, slots=True)
class RunEvent:
    """A run's transition as a worker signal saw it: the unit of the group commit."""

    run_id: str
    status: RunStatus
    retries: int = 0
    error: str | None = None
    at: float = field(default_factory=time.time)  # when the signal fired (epoch seconds)
    started: float | None = None  # a final event's folded RUNNING time
    node: str | None = None  # RUNNING: the ``<node>/<pid>`` running it (when its claim could not be written);
    # RETRYING clears it: the retry is a new message, whoever holds it marks it

    def rank(self) -> tuple[int, int]:
        """Order of two progress events of one run: the later attempt, then RETRYING after RUNNING."""
        return (self.retries, int(self.status == RunStatus.RETRYING))


class Store:
    def __init__(self, engine: sa.Engine, tables: Tables, expires: timedelta,
                 publish_lease: timedelta = timedelta(seconds=30)) -> None:
        self.engine = engine
        self.t = tables
        self.expires = expires
        self.publish_lease = publish_lease

    def _sql_name(self, table: sa.Table) -> str:
        """A table's name for hand-written SQL, quoted where the dialect needs it (a mixed-case prefix)."""
        return self.engine.dialect.identifier_preparer.format_table(table)

    # -- creation -------------------------------------------------------------------------------
    def insert_tree(self, conn: sa.Connection, root: BatchPlan, now: datetime, *,
                    antecedent: tuple[str, str] | None = None) -> Outbox:
        """Write a new batch tree with set-based inserts; returns what to publish after commit.

        With ``antecedent=(batch_id, when)`` the tree is a continue-with stage: stored CREATED with
        its runs unpublished, settled at once if the antecedent has already finished.
        """
        tx = Tx(self, conn, now)
        nodes = list(root.walk())
        status = BatchStatus.CREATED if antecedent else BatchStatus.STARTED
        if antecedent:
            antecedent_row = self._lock_batch(conn, antecedent[0])
        self._insert_nodes(conn, nodes, status, now, root_extra={
            "antecedent_id": antecedent[0], "continue_when": antecedent[1]} if antecedent else {})
        self._insert_runs(tx, ((node.id, position, job) for node in nodes for position, job in enumerate(node.jobs)),
                          new_batches=[node.id for node in nodes], publishable=not antecedent)
        self._insert_continuations(conn, [(node.id, 0, node) for node in nodes])
        if antecedent:
            if antecedent_row.status.is_final:
                return self._settle_successors(tx, {antecedent_row.id: antecedent_row.status})
            return tx.outbox()
        outbox = tx.outbox(runs=[job for node in nodes for job in node.jobs])
        outbox.extend(self._finish(tx, [node.id for node in nodes if node.total_units == 0]))
        return outbox

    def add_to_batch(self, conn: sa.Connection, batch_id: str, plan: BatchPlan, now: datetime) -> Outbox:
        """Add jobs, nested batches and continuations to an unfinished batch, its row locked throughout.

        Inserting the runs and raising ``total_jobs`` happen under that lock in one transaction, so
        the batch cannot finish in between: a worker's group commit waits for it.
        """
        r, c, b = self.t.runs, self.t.continuations, self.t.batches
        tx = Tx(self, conn, now)
        batch = self._lock_batch(conn, batch_id)
        if batch.status.is_final:
            raise BatchClosedError(batch_id, batch.status)
        first_job = conn.scalar(sa.select(sa.func.coalesce(sa.func.max(r.c.position) + 1, 0))
                                .where(r.c.batch_id == batch_id))
        first_cont = conn.scalar(sa.select(sa.func.coalesce(sa.func.max(c.c.position) + 1, 0))
                                 .where(c.c.batch_id == batch_id))
        children = [node for child in plan.children for node in child.walk()]
        self._insert_nodes(conn, children, batch.status, now)
        jobs = [(batch_id, first_job + i, job) for i, job in enumerate(plan.jobs)]
        jobs += [(node.id, i, job) for node in children for i, job in enumerate(node.jobs)]
        started = batch.status == BatchStatus.STARTED
        self._insert_runs(tx, iter(jobs), new_batches=[node.id for node in children],
                          appended=(batch_id, first_job), publishable=started)
        self._insert_continuations(conn, [(batch_id, first_cont, plan)] + [(node.id, 0, node) for node in children])
        conn.execute(sa.update(b).where(b.c.id == batch_id).values(total_jobs=b.c.total_jobs + plan.total_units))
        if not started:
            return tx.outbox()  # a continue-with stage still waiting: published when it starts
        outbox = tx.outbox(runs=[job for _, _, job in jobs])
        outbox.extend(self._finish(tx, [node.id for node in children if node.total_units == 0]))
        return outbox

    def _lock_batch(self, conn: sa.Connection, batch_id: str) -> Batch:
        """Lock the batch and its whole lineage, top first; return the batch as it is under the locks.

        The lineage is the chain of parents up to the root and on through the antecedent of a
        continue-with stage. Every transaction that changes a tree's shape or cancels part of it
        (add, cancel, a new stage) takes these locks, so two of them that share any batch of a
        lineage run one after the other: a cancel sees every add under any descendant that
        committed before it, and an add that waited for a cancel finds its batch CANCELLED.
        Locking top first everywhere keeps two such transactions from deadlocking.
        """
        b = self.t.batches
        up = (sa.select(b.c.id, sa.func.coalesce(b.c.parent_id, b.c.antecedent_id).label("above"),
                        sa.literal(0).label("depth"))
              .where(b.c.id == batch_id).cte("lineage", recursive=True))
        up = up.union_all(sa.select(b.c.id, sa.func.coalesce(b.c.parent_id, b.c.antecedent_id), up.c.depth + 1)
                          .join(up, b.c.id == up.c.above))
        rows = conn.execute(sa.select(b).join(up, up.c.id == b.c.id).order_by(up.c.depth.desc())
                            .with_for_update(of=b)).all()
        if not rows:
            raise BatchNotFoundError(batch_id)
        return batch_from_row(rows[-1])

    def _insert_nodes(self, conn: sa.Connection, nodes: list[BatchPlan], status: BatchStatus, now: datetime,
                      root_extra: dict | None = None) -> None:
        if nodes:
            conn.execute(sa.insert(self.t.batches), [{
                "id": node.id, "name": node.name, "parent_id": node.parent_id, "status": int(status),
                "total_jobs": node.total_units, "completed_jobs": 0, "failed_jobs": 0, "cancelled_jobs": 0,
                "created_by": node.created_by, "created_at": now, "antecedent_id": None, "continue_when": None,
                **(root_extra if i == 0 and root_extra else {}),
            } for i, node in enumerate(nodes)])

    def _insert_continuations(self, conn: sa.Connection, owners: list[tuple[str, int, BatchPlan]]) -> None:
        rows = [{
            "id": cont.message.id, "batch_id": batch_id, "kind": cont.kind.value, "position": first + i,
            "task_name": cont.message.task_name, "args": cont.message.args, "kwargs": cont.message.kwargs,
            "options": cont.message.options, "status": int(ContinuationStatus.WAITING),
        } for batch_id, first, node in owners for i, cont in enumerate(node.continuations)]
        if rows:
            conn.execute(sa.insert(self.t.continuations), rows)

    _RUN_COLUMNS = ("id", "batch_id", "position", "status", "task_name", "args", "kwargs", "queue", "options",
                    "created_at", "retries", "published", "publication_id")

    def _insert_runs(self, tx: Tx, jobs: Iterable[tuple[str, int, Message]], *, new_batches: list[str],
                     appended: tuple[str, int] | None = None, publishable: bool) -> None:
        """Insert runs, streaming: COPY on PostgreSQL, chunked executemany elsewhere; then their links.

        ``new_batches`` hold only new runs; ``appended=(batch_id, first_position)`` names the runs
        added to an existing batch. Both are index ranges, so linking never rescans old runs.
        ``publishable`` runs are published after the commit, under the transaction's lease.
        """
        r, j, conn, now = self.t.runs, self.t.batch_jobs, tx.conn, tx.now
        publication = tx.publication() if publishable else None
        rows = ((job.id, batch_id, position, int(RunStatus.PENDING), job.task_name, job.args, job.kwargs,
                 job.queue, job.options, now, 0, False, publication) for batch_id, position, job in jobs)
        if conn.dialect.name == "postgresql":
            cursor = conn.connection.driver_connection.cursor()  # same transaction as `conn`
            with cursor.copy(f"COPY {self._sql_name(r)} ({', '.join(self._RUN_COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            while chunk := list(itertools.islice(rows, 1000)):
                conn.execute(sa.insert(r), [dict(zip(self._RUN_COLUMNS, row, strict=True)) for row in chunk])
        # the batch_jobs links are derived in SQL from the runs just written: no second client round trip per job
        new = r.c.batch_id.in_(new_batches)
        if appended:
            new = sa.or_(new, sa.and_(r.c.batch_id == appended[0], r.c.position >= appended[1]))
        conn.execute(sa.insert(j).from_select(["batch_id", "position", "run_id"],
                                              sa.select(r.c.batch_id, r.c.position, r.c.id).where(new)))

    # -- transitions (the group commit) -----------------------------------------------------------
    def apply_events(self, events: Iterable[RunEvent]) -> Outbox:
        """Apply a group of run transitions in one transaction; returns the continuations now due.

        Per run the group keeps its latest progress event and its first final event; a progress
        event of a run that also finished in this group is folded into the final one, so a short
        task costs one row update, not two.
        """
        progress: dict[str, RunEvent] = {}
        final: dict[str, RunEvent] = {}
        for event in events:
            if not is_run_id(event.run_id):
                continue  # a task of the app that is no batch member (its id is not a UUID we made)
            if event.status.is_final:
                final.setdefault(event.run_id, event)
            else:
                seen = progress.get(event.run_id)
                if seen is None or event.rank() > seen.rank():
                    progress[event.run_id] = event
        for run_id, event in final.items():
            started = progress.pop(run_id, None)
            if started is not None:
                final[run_id] = replace(event, retries=max(event.retries, started.retries), started=started.at)
        if not progress and not final:
            return Outbox()
        with self.engine.begin() as conn:
            apply = self._apply_pg if conn.dialect.name == "postgresql" else self._apply_rows
            counted = apply(conn, list(progress.values()), list(final.values()))
            return self._count(Tx(self, conn, utcnow()), counted)

    # On PostgreSQL a whole group is two statements: the events travel as arrays and are joined
    # to the runs with unnest(). Conditions (all keyed by run id, final statuses are >= 3):
    #   progress: never touches a final run; a later attempt wins; within one attempt RUNNING may
    #             become RETRYING but not back;
    #   final:    only the first final event of a run changes it (and only that one is counted).
    _PG_PROGRESS = """
        UPDATE {runs} AS r SET status = v.status, retries = v.retries, started_at = coalesce(r.started_at, v.at),
               node = CASE WHEN v.status = 2 THEN NULL ELSE coalesce(v.node, r.node) END,
               claimed_at = CASE WHEN v.node IS NULL THEN r.claimed_at ELSE v.at END
        FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS smallint[]), CAST(:retries AS integer[]),
                    CAST(:ats AS timestamptz[]), CAST(:nodes AS text[])) AS v(id, status, retries, at, node)
        WHERE r.id = v.id AND r.status < 3
          AND (r.retries < v.retries OR (r.retries = v.retries AND r.status <= 1))"""
    _PG_FINAL = """
        UPDATE {runs} AS r SET status = v.status, finished_at = v.at, error = v.error,
               started_at = coalesce(r.started_at, v.started), retries = greatest(r.retries, v.retries)
        FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS smallint[]), CAST(:retries AS integer[]),
                    CAST(:ats AS timestamptz[]), CAST(:starts AS timestamptz[]), CAST(:errors AS text[]))
             AS v(id, status, retries, at, started, error)
        WHERE r.id = v.id AND r.status < 3
        RETURNING r.batch_id, r.status"""

    def _apply_pg(self, conn: sa.Connection, progress: list[RunEvent],
                  final: list[RunEvent]) -> list[tuple[str, RunStatus]]:
        runs = self._sql_name(self.t.runs)
        if progress:
            conn.execute(sa.text(self._PG_PROGRESS.format(runs=runs)), {
                "ids": [e.run_id for e in progress], "statuses": [int(e.status) for e in progress],
                "retries": [e.retries for e in progress], "ats": [_ts(e.at) for e in progress],
                "nodes": [e.node for e in progress],
            })
        if not final:
            return []
        rows = conn.execute(sa.text(self._PG_FINAL.format(runs=runs)), {
            "ids": [e.run_id for e in final], "statuses": [int(e.status) for e in final],
            "retries": [e.retries for e in final], "ats": [_ts(e.at) for e in final],
            "starts": [_ts(e.started) for e in final], "errors": [storable_text(e.error) for e in final],
        }).all()
        return [(str(row.batch_id), RunStatus(row.status)) for row in rows]

    def _apply_rows(self, conn: sa.Connection, progress: list[RunEvent],
                    final: list[RunEvent]) -> list[tuple[str, RunStatus]]:
        """The same conditions as the PostgreSQL statements, one row at a time (SQLite)."""
        r = self.t.runs
        unfinished = r.c.status < int(RunStatus.COMPLETED)
        if progress:
            conn.execute(
                sa.update(r)
                .where(r.c.id == sa.bindparam("b_id"), unfinished,
                       sa.or_(r.c.retries < sa.bindparam("b_retries"),
                              sa.and_(r.c.retries == sa.bindparam("b_retries"),
                                      r.c.status <= int(RunStatus.RUNNING))))
                .values(status=sa.bindparam("b_status"), retries=sa.bindparam("b_retries"),
                        started_at=sa.func.coalesce(r.c.started_at, sa.bindparam("b_at")),
                        node=sa.case((sa.bindparam("b_status") == int(RunStatus.RETRYING), None),
                                     else_=sa.func.coalesce(sa.bindparam("b_node", type_=sa.String), r.c.node)),
                        claimed_at=sa.case((sa.bindparam("b_node", type_=sa.String).is_(None), r.c.claimed_at),
                                           else_=sa.bindparam("b_at"))),
                [{"b_id": e.run_id, "b_status": int(e.status), "b_retries": e.retries, "b_at": _ts(e.at),
                  "b_node": e.node} for e in progress],
            )
        counted = []
        for e in final:
            row = conn.execute(
                sa.update(r).where(r.c.id == e.run_id, unfinished)
                .values(status=int(e.status), finished_at=_ts(e.at), error=storable_text(e.error),
                        started_at=sa.func.coalesce(r.c.started_at, _ts(e.started)),
                        retries=sa.case((r.c.retries > e.retries, r.c.retries), else_=e.retries))
                .returning(r.c.batch_id)
            ).first()
            if row is not None:
                counted.append((row.batch_id, e.status))
        return counted

    def _count(self, tx: Tx, finished_units: list[tuple[str, RunStatus | BatchStatus]]) -> Outbox:
        """Count finished units (runs or child batches) in their batches, then finish what is complete."""
        if not finished_units:
            return tx.outbox()
        deltas: dict[str, Counter] = defaultdict(Counter)
        for batch_id, status in finished_units:
            deltas[batch_id][_COUNTER[status.name]] += 1
        self._bump(tx.conn, deltas)
        return self._finish(tx, list(deltas))

    def _bump(self, conn: sa.Connection, deltas: dict[str, Counter]) -> None:
        b = self.t.batches
        # rows in one order, so two transactions touching the same batches wait instead of deadlocking
        conn.execute(
            sa.update(b).where(b.c.id == sa.bindparam("b_id")).values(
                completed_jobs=b.c.completed_jobs + sa.bindparam("b_c"),
                failed_jobs=b.c.failed_jobs + sa.bindparam("b_f"),
                cancelled_jobs=b.c.cancelled_jobs + sa.bindparam("b_x"),
            ),
            [{"b_id": bid, "b_c": d["completed_jobs"], "b_f": d["failed_jobs"], "b_x": d["cancelled_jobs"]}
             for bid, d in sorted(deltas.items())],
        )

    def _finish(self, tx: Tx, batch_ids: list[str]) -> Outbox:
        """Finish the given batches that have every unit done: one conditional UPDATE decides."""
        if not batch_ids:
            return tx.outbox()
        b, conn, now = self.t.batches, tx.conn, tx.now
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
            return tx.outbox()
        statuses = {row.id: BatchStatus(row.status) for row in finished}
        outbox = self._fire_continuations(tx, statuses)
        outbox.extend(self._settle_successors(tx, statuses))
        outbox.extend(self._count(tx, [(row.parent_id, statuses[row.id]) for row in finished if row.parent_id]))
        return outbox

    def _fire_continuations(self, tx: Tx, finished: dict[str, BatchStatus]) -> Outbox:
        """Make the matching continuations of finished batches due (outbox rows); skip the others."""
        c, conn = self.t.continuations, tx.conn
        by_status: dict[BatchStatus, list[str]] = defaultdict(list)
        for batch_id, status in finished.items():
            by_status[status].append(batch_id)
        fires = [sa.and_(c.c.batch_id.in_(ids), c.c.kind.in_(_FIRES_ON[status]))
                 for status, ids in by_status.items() if status in _FIRES_ON]
        due = conn.execute(
            sa.update(c).where(c.c.status == int(ContinuationStatus.WAITING), sa.or_(sa.false(), *fires))
            .values(status=int(ContinuationStatus.DUE), due_at=tx.now, publication_id=tx.publication())
            .returning(c.c.id, c.c.task_name, c.c.args, c.c.kwargs, c.c.options, c.c.batch_id, c.c.kind,
                       c.c.position)
        ).all() if fires else []
        conn.execute(
            sa.update(c).where(c.c.batch_id.in_(list(finished)), c.c.status == int(ContinuationStatus.WAITING))
            .values(status=int(ContinuationStatus.SKIPPED))
        )
        due = sorted(due, key=lambda row: (str(row.batch_id), row.kind, row.position))
        return tx.outbox(continuations=[continuation_message(row) for row in due])

    def _settle_successors(self, tx: Tx, finished: dict[str, BatchStatus]) -> Outbox:
        """Continue-with: start the stages waiting on these batches whose ``when`` matches; cancel the rest."""
        b = self.t.batches
        waiting = tx.conn.execute(
            sa.select(b.c.id, b.c.antecedent_id, b.c.continue_when)
            .where(b.c.antecedent_id.in_(list(finished)), b.c.status == int(BatchStatus.CREATED))
        ).all()
        outbox = tx.outbox()
        for row in waiting:
            status = finished[row.antecedent_id]
            if status in _WHEN_MATCHES.get(row.continue_when, ()):
                outbox.extend(self._start_stage(tx, row.id))
            else:
                outbox.extend(self._cancel_tree(tx, row.id)[1])
        return outbox

    def _start_stage(self, tx: Tx, batch_id: str) -> Outbox:
        """Start a continue-with stage: its runs become publishable under this transaction's lease."""
        b, r, conn = self.t.batches, self.t.runs, tx.conn
        tree = self._subtree(batch_id, successors=False)
        started = conn.execute(
            sa.update(b).where(b.c.id.in_(sa.select(tree.c.id)), b.c.status == int(BatchStatus.CREATED))
            .values(status=int(BatchStatus.STARTED)).returning(b.c.id, b.c.total_jobs)
        ).all()
        runs = conn.execute(
            sa.update(r)
            .where(r.c.batch_id.in_([row.id for row in started]), r.c.status == int(RunStatus.PENDING),
                   sa.not_(r.c.published))
            .values(publication_id=tx.publication())
            .returning(r.c.id, r.c.task_name, r.c.args, r.c.kwargs, r.c.options, r.c.batch_id, r.c.position)
        ).all() if started else []
        runs = sorted(runs, key=lambda row: (str(row.batch_id), row.position))
        outbox = tx.outbox(runs=[run_message(row) for row in runs])
        # a stage whose units all finished while it waited (a cancelled child, an empty stage) finishes now
        outbox.extend(self._finish(tx, [row.id for row in started]))
        return outbox

    def _subtree(self, batch_id: str, *, successors: bool) -> sa.CTE:
        """The batch, its descendants and (with ``successors``) the continue-with stages waiting on them."""
        b = self.t.batches
        tree = sa.select(b.c.id).where(b.c.id == batch_id).cte("tree", recursive=True)
        link = b.c.parent_id == tree.c.id
        if successors:
            link = sa.or_(link, sa.and_(b.c.antecedent_id == tree.c.id, b.c.status == int(BatchStatus.CREATED)))
        return tree.union_all(sa.select(b.c.id).join(tree, link))

    # -- cancel -----------------------------------------------------------------------------------
    def cancel(self, conn: sa.Connection, batch_id: str, now: datetime) -> tuple[list[str], Outbox]:
        """Cancel a batch's whole subtree; returns the cancelled run ids (to revoke) and what to publish."""
        batch = self._lock_batch(conn, batch_id)
        if batch.status.is_final:
            return [], Outbox()
        return self._cancel_tree(Tx(self, conn, now), batch_id)

    def _cancel_tree(self, tx: Tx, batch_id: str) -> tuple[list[str], Outbox]:
        b, r, c, conn, now = self.t.batches, self.t.runs, self.t.continuations, tx.conn, tx.now
        tree = self._subtree(batch_id, successors=True)
        cancelled = conn.execute(
            sa.update(b)
            .where(b.c.id.in_(sa.select(tree.c.id)), b.c.status <= int(BatchStatus.STARTED))
            .values(status=int(BatchStatus.CANCELLED), completed_at=now, expires_at=now + self.expires)
            .returning(b.c.id, b.c.parent_id)
        ).all()
        ids = {row.id for row in cancelled}
        if not ids:
            return [], tx.outbox()
        runs = conn.execute(
            sa.update(r)
            .where(r.c.batch_id.in_(list(ids)), r.c.status.in_([int(RunStatus.PENDING), int(RunStatus.RETRYING)]))
            .values(status=int(RunStatus.CANCELLED), finished_at=now, error="cancelled")
            .returning(r.c.id, r.c.batch_id)
        ).all()
        conn.execute(sa.update(c).where(c.c.batch_id.in_(list(ids)), c.c.status == int(ContinuationStatus.WAITING))
                     .values(status=int(ContinuationStatus.SKIPPED)))
        deltas: dict[str, Counter] = defaultdict(Counter)
        for row in runs:
            deltas[row.batch_id]["cancelled_jobs"] += 1
        outside = []  # a cancelled batch whose parent goes on: one cancelled unit of that parent
        for row in cancelled:
            if row.parent_id in ids:
                deltas[row.parent_id]["cancelled_jobs"] += 1
            elif row.parent_id is not None:
                outside.append((row.parent_id, BatchStatus.CANCELLED))
        if deltas:
            self._bump(conn, deltas)
        return [row.id for row in runs], self._count(tx, outside)

    def batch_status(self, batch_id: str) -> BatchStatus | None:
        b = self.t.batches
        with self.engine.connect() as conn:
            status = conn.scalar(sa.select(b.c.status).where(b.c.id == batch_id))
        return None if status is None else BatchStatus(status)

    # -- expiry -----------------------------------------------------------------------------------
    def purge_expired(self, now: datetime, chunk: int = 100) -> int:
        """Delete expired top-level batches with their whole tree, ``chunk`` trees per transaction."""
        b, r, j, c = self.t.batches, self.t.runs, self.t.batch_jobs, self.t.continuations
        deleted = 0
        while True:
            with self.engine.begin() as conn:
                roots = conn.execute(
                    sa.select(b.c.id).where(b.c.parent_id.is_(None), b.c.expires_at < now,
                                            b.c.status >= int(BatchStatus.COMPLETED))
                    .order_by(b.c.expires_at).limit(chunk).with_for_update(skip_locked=True)
                ).scalars().all()
                if not roots:
                    return deleted
                tree = sa.select(b.c.id).where(b.c.id.in_(roots)).cte("tree", recursive=True)
                tree = tree.union_all(sa.select(b.c.id).join(tree, b.c.parent_id == tree.c.id))
                ids = conn.execute(sa.select(tree.c.id)).scalars().all()
                conn.execute(sa.update(b).where(b.c.antecedent_id.in_(ids)).values(antecedent_id=None))
                conn.execute(sa.delete(c).where(c.c.batch_id.in_(ids)))
                conn.execute(sa.delete(j).where(j.c.batch_id.in_(ids)))
                conn.execute(sa.delete(r).where(r.c.batch_id.in_(ids)))
                deleted += conn.execute(sa.delete(b).where(b.c.id.in_(ids))).rowcount

    # -- reads ------------------------------------------------------------------------------------
    def get_batch(self, batch_id: str) -> Batch | None:
        b = self.t.batches
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(b).where(b.c.id == batch_id)).first()
        return batch_from_row(row) if row else None

    def list_batches(self, *, status: BatchStatus | None, parent_id: str | None, name: str | None,
                     limit: int, offset: int) -> list[Batch]:
        b = self.t.batches
        q = sa.select(b).where(b.c.parent_id.is_(None) if parent_id is None else b.c.parent_id == parent_id)
        if status is not None:
            q = q.where(b.c.status == int(status))
        if name:
            q = q.where(b.c.name.icontains(name, autoescape=True))  # case-insensitive, like the dashboard
        q = q.order_by(b.c.created_at.desc(), b.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [batch_from_row(row) for row in conn.execute(q)]

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
                             as_utc(row.dispatched_at), row.error)
                for row in conn.execute(q)
            ]

    # -- reconciliation -------------------------------------------------------------------------
    def open_runs(self, older_than: datetime, limit: int, *, after: tuple[datetime, str] | None = None
                  ) -> list[tuple[str, datetime, datetime]]:
        """Published runs with no final state whose last known change is older than ``older_than``,
        as ``(id, since, created_at)`` in ``(created_at, id)`` order, starting after the cursor ``after``.

        A run a worker has touched counts as published whether or not its flag was written; one that
        started late is measured from its start, not from when it was created.
        """
        r = self.t.runs
        since = sa.func.coalesce(r.c.started_at, r.c.created_at)
        q = (sa.select(r.c.id, since.label("since"), r.c.created_at)
             .where(r.c.status < int(RunStatus.COMPLETED),
                    sa.or_(r.c.published, r.c.status > int(RunStatus.PENDING)),
                    r.c.created_at < older_than, since < older_than)
             .order_by(r.c.created_at, r.c.id).limit(limit))
        if after is not None:
            q = q.where(sa.or_(r.c.created_at > after[0], sa.and_(r.c.created_at == after[0], r.c.id > after[1])))
        with self.engine.connect() as conn:
            return [(str(row.id), as_utc(row.since), row.created_at) for row in conn.execute(q)]


def run_message(row: sa.Row) -> Message:
    """A run row as the message that publishes it: its next attempt is ``retries`` (0 for a new run)."""
    return Message(str(row.id), row.task_name, row.args, row.kwargs, row.options, str(row.batch_id),
                   retries=getattr(row, "retries", 0) or 0)


def continuation_message(row: sa.Row) -> Message:
    """A continuation row as the message that publishes it (it knows the batch that fired it)."""
    return Message(str(row.id), row.task_name, row.args, row.kwargs, row.options, continuation_of=str(row.batch_id))


def batch_from_row(row: sa.Row) -> Batch:
    return Batch(
        id=row.id, name=row.name, parent_id=row.parent_id, status=BatchStatus(row.status),
        total_jobs=row.total_jobs, completed_jobs=row.completed_jobs, failed_jobs=row.failed_jobs,
        cancelled_jobs=row.cancelled_jobs, created_by=row.created_by, created_at=as_utc(row.created_at),
        completed_at=as_utc(row.completed_at), expires_at=as_utc(row.expires_at),
    )


def _run(row: sa.Row) -> JobRun:
    return JobRun(
        id=row.id, batch_id=row.batch_id, task_name=row.task_name, args=kjson.loads(row.args),
        kwargs=kjson.loads(row.kwargs), queue=row.queue, status=RunStatus(row.status), order=row.position,
        created_at=as_utc(row.created_at), started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at), error=row.error, retries=row.retries,
    )
