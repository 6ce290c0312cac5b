"""The registry's state machine: run transitions, counters, finishing batches, continuations,
continue-with stages, and cancel (writing whole trees is :mod:`.trees`).

Transitions are conditional statements keyed by run or batch id, executed in the transaction
that changes the counters, so a duplicate signal, a redelivery or a second ``task_failure`` of
the same run changes nothing, and exactly one transaction finishes a batch.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Iterable

import sqlalchemy as sa

from .. import kombujson
from ..message import Message
from ..errors import BatchClosedError, BatchNotFoundError
from ..models import Batch, BatchStatus, ContinuationKind, ContinuationStatus, RunStatus
from .rows import (
    Publication,
    RunEvent,
    batch_from_row,
    continuation_message,
    from_epoch,
    is_run_id,
    run_message,
    storable_text,
    utcnow,
)
from .results import result_values, unit_results
from .tables import Tables

__all__ = ["Transitions", "Tx"]

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


class Tx:
    """One registry transaction: its connection, its clock, and (made on first use) its publish lease.

    Everything a transaction makes publishable carries the lease's id; the publisher renews it
    while it publishes, and the relay takes only what carries a lapsed lease. So the relay never
    publishes what a live producer (or the group commit that released it) is still publishing.
    """

    __slots__ = ("conn", "now", "_transitions", "_lease", "_leased_at")

    def __init__(self, transitions: "Transitions", conn: sa.Connection, now: datetime) -> None:
        self.conn, self.now, self._transitions, self._lease = conn, now, transitions, None
        self._leased_at = 0.0

    def lease(self) -> str:
        if self._lease is None:
            self._lease = str(uuid.uuid4())
            self._leased_at = time.monotonic()
            self.conn.execute(sa.insert(self._transitions.tables.publications).values(
                id=self._lease, expires_at=utcnow() + self._transitions.publish_lease))
        return self._lease

    def publication(self, runs: list[Message] | None = None, continuations: list[Message] | None = None) -> Publication:
        """What the transaction made publishable, as its last step. A lease taken long before (a
        million-job batch takes a minute to write) counts again from now: the publisher must find it
        held when the commit is through, or it leaves everything to the relay."""
        lease = self._transitions.publish_lease
        if self._lease is not None and time.monotonic() - self._leased_at > lease.total_seconds() / 4:
            p = self._transitions.tables.publications
            self.conn.execute(sa.update(p).where(p.c.id == self._lease).values(expires_at=utcnow() + lease))
            self._leased_at = time.monotonic()
        return Publication(runs or [], continuations or [], self._lease)


class Transitions:
    def __init__(self, engine: sa.Engine, tables: Tables, expires: timedelta,
                 publish_lease: timedelta = timedelta(seconds=30)) -> None:
        self.engine = engine
        self.tables = tables
        self.expires = expires
        self.publish_lease = publish_lease

    def sql_name(self, table: sa.Table) -> str:
        """A table's name for hand-written SQL, quoted where the dialect needs it (a mixed-case prefix)."""
        return self.engine.dialect.identifier_preparer.format_table(table)

    # -- transitions (the group commit) -----------------------------------------------------------
    def apply_events(self, events: Iterable[RunEvent], *, portable: bool = False) -> Publication:
        """Apply a group of run transitions in one transaction; returns the continuations now due.

        Per run the group keeps its latest progress event and its first final event; a progress
        event of a run that also finished in this group is folded into the final one, so a short
        task costs one row update, not two.
        """
        progress: dict[str, RunEvent] = {}
        final: dict[str, RunEvent] = {}
        lost: dict[str, RunEvent] = {}  # continuations a worker discarded
        for event in events:
            if not is_run_id(event.run_id):
                continue  # a task of the app that is no batch member (its id is not a UUID we made)
            if event.continuation:
                lost.setdefault(event.run_id, event)
            elif event.status.is_final:
                final.setdefault(event.run_id, event)
            else:
                seen = progress.get(event.run_id)
                if seen is None or event.rank() > seen.rank():
                    progress[event.run_id] = event
        for run_id, event in final.items():
            started = progress.pop(run_id, None)
            if started is not None:
                final[run_id] = replace(event, retries=max(event.retries, started.retries), started=started.at)
        if not progress and not final and not lost:
            return Publication()
        with self.engine.begin() as conn:
            if lost:
                self._fail_continuations(conn, list(lost.values()))
            # ``portable``: the row-at-a-time path on PostgreSQL too (the tests hold the two paths equal)
            apply = self._apply_pg if conn.dialect.name == "postgresql" and not portable else self._apply_rows
            counted = apply(conn, list(progress.values()), list(final.values()))
            tx = Tx(self, conn, utcnow())
            publication = self._count(tx, [(batch_id, status) for batch_id, status, _ in counted])
            # each job that ended frees its place in its batch's window (if it has one) for the next
            publication.extend(self.release(tx, Counter(batch_id for batch_id, _, window in counted if window)))
            return publication

    # On PostgreSQL a whole group is two statements: the events travel as arrays and are joined
    # to the runs with unnest(). Conditions (all keyed by run id, final statuses are >= COMPLETED):
    #   progress: never touches a final run; a later attempt wins; within one attempt RUNNING may
    #             become RETRYING but not back;
    #   final:    only the first final event of a run changes it (and only that one is counted); its
    #             value (``result``) is kept only in a results=True batch, looked up only when one came.
    _PG_PROGRESS = """
        UPDATE {runs} AS r SET status = v.status, retries = v.retries, started_at = coalesce(r.started_at, v.at),
               node = CASE WHEN v.status = {retrying} THEN NULL ELSE coalesce(v.node, r.node) END,
               claimed_at = CASE WHEN v.node IS NULL THEN r.claimed_at ELSE v.at END
        FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS smallint[]), CAST(:retries AS integer[]),
                    CAST(:ats AS timestamptz[]), CAST(:nodes AS text[])) AS v(id, status, retries, at, node)
        WHERE r.id = v.id AND r.status < {completed}
          AND (r.retries < v.retries OR (r.retries = v.retries AND r.status <= {running}))"""
    _PG_FINAL = """
        UPDATE {runs} AS r SET status = v.status, finished_at = v.at, error = v.error,
               result = CASE WHEN v.result IS NOT NULL
                             THEN (SELECT v.result FROM {batches} AS b WHERE b.id = r.batch_id AND b.results) END,
               started_at = coalesce(r.started_at, v.started), retries = greatest(r.retries, v.retries)
        FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS smallint[]), CAST(:retries AS integer[]),
                    CAST(:ats AS timestamptz[]), CAST(:starts AS timestamptz[]), CAST(:errors AS text[]),
                    CAST(:results AS text[]))
             AS v(id, status, retries, at, started, error, result)
        WHERE r.id = v.id AND r.status < {completed}
        RETURNING r.batch_id, r.status, (SELECT b.max_concurrency FROM {batches} AS b WHERE b.id = r.batch_id)"""

    def _fail_continuations(self, conn: sa.Connection, events: list[RunEvent]) -> None:
        """Continuations whose message a worker took and will never run (no worker knows the task):
        FAILED with the reason, so nothing publishes them again."""
        c = self.tables.continuations
        conn.execute(sa.update(c).where(c.c.id == sa.bindparam("b_id"), c.c.status.in_(
            [int(ContinuationStatus.DUE), int(ContinuationStatus.DISPATCHED)]))
            .values(status=int(ContinuationStatus.FAILED), error=sa.bindparam("b_error")),
            [{"b_id": e.run_id, "b_error": storable_text(e.error)} for e in events])

    def _apply_pg(self, conn: sa.Connection, progress: list[RunEvent],
                  final: list[RunEvent]) -> list[tuple[str, RunStatus, int | None]]:
        names = {"runs": self.sql_name(self.tables.runs), "batches": self.sql_name(self.tables.batches),
                 "completed": int(RunStatus.COMPLETED),
                 "running": int(RunStatus.RUNNING), "retrying": int(RunStatus.RETRYING)}
        if progress:
            conn.execute(sa.text(self._PG_PROGRESS.format(**names)), {
                "ids": [e.run_id for e in progress], "statuses": [int(e.status) for e in progress],
                "retries": [e.retries for e in progress], "ats": [from_epoch(e.at) for e in progress],
                "nodes": [e.node for e in progress],
            })
        if not final:
            return []
        rows = conn.execute(sa.text(self._PG_FINAL.format(**names)), {
            "ids": [e.run_id for e in final], "statuses": [int(e.status) for e in final],
            "retries": [e.retries for e in final], "ats": [from_epoch(e.at) for e in final],
            "starts": [from_epoch(e.started) for e in final], "errors": [storable_text(e.error) for e in final],
            "results": [e.result for e in final],
        }).all()
        return [(str(row[0]), RunStatus(row[1]), row[2]) for row in rows]

    def _apply_rows(self, conn: sa.Connection, progress: list[RunEvent],
                    final: list[RunEvent]) -> list[tuple[str, RunStatus, int | None]]:
        """The same conditions as the PostgreSQL statements, one row at a time (SQLite)."""
        r = self.tables.runs
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
                [{"b_id": e.run_id, "b_status": int(e.status), "b_retries": e.retries, "b_at": from_epoch(e.at),
                  "b_node": e.node} for e in progress],
            )
        counted = []
        b = self.tables.batches
        window = sa.select(b.c.max_concurrency).where(b.c.id == r.c.batch_id).scalar_subquery()
        for e in final:
            keeps = sa.select(sa.literal(e.result)).where(b.c.id == r.c.batch_id, b.c.results.is_(True))
            row = conn.execute(
                sa.update(r).where(r.c.id == e.run_id, unfinished)
                .values(status=int(e.status), finished_at=from_epoch(e.at), error=storable_text(e.error),
                        result=None if e.result is None else keeps.scalar_subquery(),
                        started_at=sa.func.coalesce(r.c.started_at, from_epoch(e.started)),
                        retries=sa.case((r.c.retries > e.retries, r.c.retries), else_=e.retries))
                .returning(r.c.batch_id, window)
            ).first()
            if row is not None:
                counted.append((row[0], e.status, row[1]))
        return counted

    def _count(self, tx: Tx, finished_units: list[tuple[str, RunStatus | BatchStatus]]) -> Publication:
        """Count finished units (runs or child batches) in their batches, then finish what is complete."""
        if not finished_units:
            return tx.publication()
        deltas: dict[str, Counter] = defaultdict(Counter)
        for batch_id, status in finished_units:
            deltas[batch_id][_COUNTER[status.name]] += 1
        self._bump(tx.conn, deltas)
        failing = [batch_id for batch_id, d in deltas.items() if d["failed_jobs"]]
        publication = self.first_failures(tx, failing)
        publication.extend(self._fail_fast(tx, failing))
        publication.extend(self.finish(tx, list(deltas)))
        return publication

    def _fail_fast(self, tx: Tx, batch_ids: list[str]) -> Publication:
        """``cancel_on_failure`` batches among these (each has a failed unit by now): every waiting
        run of their subtrees is CANCELLED and counted, in this transaction; running ones finish.
        The batch then finishes FAILED, like any batch with a unit not completed."""
        b, r, conn = self.tables.batches, self.tables.runs, tx.conn
        fast = conn.execute(sa.select(b.c.id).where(b.c.id.in_(sorted(batch_ids)), b.c.cancel_on_failure.is_(True),
                                                     b.c.status == int(BatchStatus.STARTED))).scalars().all() \
            if batch_ids else []
        publication = tx.publication()
        for batch_id in fast:
            tree = self._subtree(batch_id, successors=False)
            runs = conn.execute(
                sa.update(r)
                .where(r.c.batch_id.in_(sa.select(tree.c.id)),
                       r.c.status.in_([int(RunStatus.PENDING), int(RunStatus.RETRYING)]))
                .values(status=int(RunStatus.CANCELLED), finished_at=tx.now,
                        error=f"cancelled: batch {batch_id} has a failed unit (cancel_on_failure)")
                .returning(r.c.batch_id)
            ).all()
            publication.extend(self._count(tx, [(row.batch_id, RunStatus.CANCELLED) for row in runs]))
        return publication

    # -- max_concurrency ---------------------------------------------------------------------------
    def release(self, tx: Tx, places: dict[str, int]) -> Publication:
        """Publish up to ``places[batch]`` held runs of each batch, in enqueue order. Called under the
        batch's row lock (the transaction already updated its counters), so two transactions that
        end jobs of one batch release one after the other, never the same runs or more than freed."""
        r, conn = self.tables.runs, tx.conn
        publication = tx.publication()
        for batch_id, n in sorted(places.items()):
            if n <= 0:
                continue
            ids = conn.execute(sa.select(r.c.id).where(r.c.batch_id == batch_id, r.c.held,
                                                       r.c.status == int(RunStatus.PENDING))
                               .order_by(r.c.position).limit(n)).scalars().all()
            if not ids:
                continue
            runs = conn.execute(
                sa.update(r).where(r.c.id.in_(ids)).values(held=None, publication_id=tx.lease())
                .returning(r.c.id, r.c.task_name, r.c.args, r.c.kwargs, r.c.options, r.c.batch_id, r.c.position,
                           r.c.retries)
            ).all()
            publication.extend(tx.publication(runs=[run_message(row) for row in sorted(runs, key=lambda row: row.position)]))
        return publication

    def in_flight(self, conn: sa.Connection, batch_id: str) -> int:
        """The batch's direct jobs published (or about to be) and not finished: its window's occupants."""
        r = self.tables.runs
        return conn.scalar(sa.select(sa.func.count()).where(r.c.batch_id == batch_id,
                                                            r.c.status < int(RunStatus.COMPLETED),
                                                            r.c.held.isnot(True))) or 0

    def first_failures(self, tx: Tx, batch_ids: list[str]) -> Publication:
        """``on_first_failure`` continuations of these batches (each has a failed unit by now) become
        due: only a WAITING row moves, so each fires once, in the transaction of the first failure."""
        c, conn = self.tables.continuations, tx.conn
        waiting = sa.and_(c.c.batch_id.in_(sorted(batch_ids)), c.c.kind == ContinuationKind.FIRST_FAILURE.value,
                          c.c.status == int(ContinuationStatus.WAITING))
        if not batch_ids or not conn.scalar(sa.select(sa.exists().where(waiting))):
            return tx.publication()  # the usual case: no lease taken for nothing
        due = sorted(self._make_due(tx, waiting), key=lambda row: (str(row.batch_id), row.position))
        return tx.publication(continuations=[continuation_message(row) for row in due])

    def _bump(self, conn: sa.Connection, deltas: dict[str, Counter]) -> None:
        b = self.tables.batches
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

    def finish(self, tx: Tx, batch_ids: list[str]) -> Publication:
        """Finish the given batches that have every unit done: one conditional UPDATE decides."""
        if not batch_ids:
            return tx.publication()
        b, conn, now = self.tables.batches, tx.conn, tx.now
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
            return tx.publication()
        statuses = {row.id: BatchStatus(row.status) for row in finished}
        publication = self._fire_continuations(tx, statuses)
        publication.extend(self.settle_successors(tx, statuses))
        publication.extend(self._count(tx, [(row.parent_id, statuses[row.id]) for row in finished if row.parent_id]))
        return publication

    def _fire_continuations(self, tx: Tx, finished: dict[str, BatchStatus]) -> Publication:
        """Make the matching continuations of finished batches due (outbox rows); skip the others."""
        c, conn = self.tables.continuations, tx.conn
        by_status: dict[BatchStatus, list[str]] = defaultdict(list)
        for batch_id, status in finished.items():
            by_status[status].append(batch_id)
        fires = [sa.and_(c.c.batch_id.in_(ids), c.c.kind.in_(_FIRES_ON[status]))
                 for status, ids in by_status.items() if status in _FIRES_ON]
        firing = sa.and_(c.c.status == int(ContinuationStatus.WAITING), sa.or_(sa.false(), *fires))
        due = self._make_due(tx, firing) if fires else []
        conn.execute(
            sa.update(c).where(c.c.batch_id.in_(list(finished)), c.c.status == int(ContinuationStatus.WAITING))
            .values(status=int(ContinuationStatus.SKIPPED))
        )
        due = sorted(due, key=lambda row: (str(row.batch_id), row.kind, row.position))
        return tx.publication(continuations=[continuation_message(row) for row in due])

    def _make_due(self, tx: Tx, firing: sa.ColumnElement[bool]) -> list[sa.Row]:
        """The WAITING continuations ``firing`` selects become due, under the transaction's lease;
        those of a ``results=True`` batch get its results first."""
        c = self.tables.continuations
        self._give_results(tx.conn, firing)
        return tx.conn.execute(
            sa.update(c).where(firing)
            .values(status=int(ContinuationStatus.DUE), due_at=tx.now, publication_id=tx.lease())
            .returning(c.c.id, c.c.task_name, c.c.args, c.c.kwargs, c.c.options, c.c.batch_id, c.c.kind,
                       c.c.position)
        ).all()

    def _give_results(self, conn: sa.Connection, firing: sa.ColumnElement[bool]) -> None:
        """The continuations about to fire (``firing``) of ``results=True`` batches get the batch's
        results as their first argument, written into their rows: a republish sends the same."""
        b, c = self.tables.batches, self.tables.continuations
        rows = conn.execute(sa.select(c.c.id, c.c.batch_id, c.c.args).join(b, b.c.id == c.c.batch_id)
                            .where(firing, b.c.results.is_(True))).all()
        if not rows:
            return
        values = {batch_id: result_values(unit_results(conn, self.tables, batch_id))
                  for batch_id in {row.batch_id for row in rows}}
        conn.execute(sa.update(c).where(c.c.id == sa.bindparam("b_id")).values(args=sa.bindparam("b_args")),
                     [{"b_id": row.id, "b_args": kombujson.dumps([values[row.batch_id], *kombujson.loads(row.args)])}
                      for row in rows])

    def settle_successors(self, tx: Tx, finished: dict[str, BatchStatus]) -> Publication:
        """Continue-with: start the stages waiting on these batches whose ``when`` matches; cancel the rest."""
        b = self.tables.batches
        waiting = tx.conn.execute(
            sa.select(b.c.id, b.c.antecedent_id, b.c.continue_when)
            .where(b.c.antecedent_id.in_(list(finished)), b.c.status == int(BatchStatus.CREATED))
        ).all()
        publication = tx.publication()
        for row in waiting:
            status = finished[row.antecedent_id]
            if status in _WHEN_MATCHES.get(row.continue_when, ()):
                publication.extend(self._start_stage(tx, row.id))
            else:
                publication.extend(self._cancel_tree(tx, row.id)[1])
        return publication

    def _start_stage(self, tx: Tx, batch_id: str) -> Publication:
        """Start a continue-with stage: its runs become publishable under this transaction's lease."""
        b, r, conn = self.tables.batches, self.tables.runs, tx.conn
        tree = self._subtree(batch_id, successors=False)
        started = conn.execute(
            sa.update(b).where(b.c.id.in_(sa.select(tree.c.id)), b.c.status == int(BatchStatus.CREATED))
            .values(status=int(BatchStatus.STARTED)).returning(b.c.id, b.c.total_jobs)
        ).all()
        runs = conn.execute(
            sa.update(r)
            .where(r.c.batch_id.in_([row.id for row in started]), r.c.status == int(RunStatus.PENDING),
                   sa.not_(r.c.published), r.c.held.isnot(True))
            .values(publication_id=tx.lease())
            .returning(r.c.id, r.c.task_name, r.c.args, r.c.kwargs, r.c.options, r.c.batch_id, r.c.position)
        ).all() if started else []
        runs = sorted(runs, key=lambda row: (str(row.batch_id), row.position))
        publication = tx.publication(runs=[run_message(row) for row in runs])
        # a stage whose units all finished while it waited (a cancelled child, an empty stage) finishes now
        publication.extend(self.finish(tx, [row.id for row in started]))
        return publication

    def _subtree(self, batch_id: str, *, successors: bool) -> sa.CTE:
        """The batch, its descendants and (with ``successors``) the continue-with stages waiting on them."""
        b = self.tables.batches
        tree = sa.select(b.c.id).where(b.c.id == batch_id).cte("tree", recursive=True)
        link = b.c.parent_id == tree.c.id
        if successors:
            link = sa.or_(link, sa.and_(b.c.antecedent_id == tree.c.id, b.c.status == int(BatchStatus.CREATED)))
        return tree.union_all(sa.select(b.c.id).join(tree, link))

    def lock_batch(self, conn: sa.Connection, batch_id: str) -> Batch:
        """Lock the batch and its whole lineage, top first; return the batch as it is under the locks.

        The lineage is the chain of parents up to the root and on through the antecedent of a
        continue-with stage. Every transaction that changes a tree's shape or cancels part of it
        (add, cancel, a new stage) takes these locks, so two of them that share any batch of a
        lineage run one after the other: a cancel sees every add under any descendant that
        committed before it, and an add that waited for a cancel finds its batch CANCELLED.
        Locking top first everywhere keeps two such transactions from deadlocking.
        """
        return batch_from_row(self.lock_lineage(conn, batch_id)[-1])

    def lock_lineage(self, conn: sa.Connection, batch_id: str) -> list[sa.Row]:
        """:meth:`lock_batch`, returning the lineage's rows, top first (the batch last)."""
        b = self.tables.batches
        up = (sa.select(b.c.id, sa.func.coalesce(b.c.parent_id, b.c.antecedent_id).label("above"),
                        sa.literal(0).label("depth"))
              .where(b.c.id == batch_id).cte("lineage", recursive=True))
        up = up.union_all(sa.select(b.c.id, sa.func.coalesce(b.c.parent_id, b.c.antecedent_id), up.c.depth + 1)
                          .join(up, b.c.id == up.c.above))
        rows = conn.execute(sa.select(b).join(up, up.c.id == b.c.id).order_by(up.c.depth.desc())
                            .with_for_update(of=b)).all()
        if not rows:
            raise BatchNotFoundError(batch_id)
        return rows

    # -- retry the failed -------------------------------------------------------------------------
    def retry_failed(self, conn: sa.Connection, batch_id: str, now: datetime) -> tuple[list[str], Publication]:
        """Every FAILED run of the batch's subtree back to PENDING, to be published again (same run
        id); counters move back with them; FAILED batches that get an open unit again re-open
        (STARTED), up through the ancestors that counted them as failed; continuations that did not
        fire (SKIPPED) of a re-opened batch wait again; what fired stays fired. One transaction,
        under the lineage's locks (as cancel)."""
        lineage = self.lock_lineage(conn, batch_id)
        if any(row.status == int(BatchStatus.CANCELLED) for row in lineage):
            raise BatchClosedError(batch_id, BatchStatus.CANCELLED)
        b, r, c = self.tables.batches, self.tables.runs, self.tables.continuations
        tree = self._subtree(batch_id, successors=False)
        rows = {row.id: row for row in lineage}
        rows.update({row.id: row for row in conn.execute(
            sa.select(b.c.id, b.c.parent_id, b.c.status).where(b.c.id.in_(sa.select(tree.c.id))))})
        open_batches = [i for i, row in rows.items() if row.status in (int(BatchStatus.STARTED), int(BatchStatus.FAILED))
                        and i not in {x.id for x in lineage[:-1]}]  # the subtree's, not the ancestors' own runs
        failed = conn.execute(sa.select(sa.exists().where(r.c.batch_id.in_(open_batches),
                                                          r.c.status == int(RunStatus.FAILED)))).scalar()
        tx = Tx(self, conn, now)
        if not failed:
            return [], tx.publication()
        runs = conn.execute(
            sa.update(r).where(r.c.batch_id.in_(open_batches), r.c.status == int(RunStatus.FAILED))
            .values(status=int(RunStatus.PENDING), published=False, publication_id=tx.lease(), error=None,
                    started_at=None, finished_at=None, node=None, claimed_at=None, retries=0,
                    result=None, reset_at=now, replaced=None)
            .returning(r.c.id, r.c.task_name, r.c.args, r.c.kwargs, r.c.options, r.c.batch_id, r.c.position,
                       r.c.retries)
        ).all()
        windows = dict(conn.execute(sa.select(b.c.id, b.c.max_concurrency).where(
            b.c.id.in_({row.batch_id for row in runs}), b.c.max_concurrency.isnot(None))).all())
        if windows:  # behind their windows like new jobs: held, then as many released as there is room
            conn.execute(sa.update(r).where(r.c.batch_id.in_(list(windows)), r.c.publication_id == tx.lease(),
                                            r.c.status == int(RunStatus.PENDING), sa.not_(r.c.published))
                         .values(held=True, publication_id=None))
        deltas: dict[str, Counter] = defaultdict(Counter)
        reopen: list[str] = []
        for row in runs:
            deltas[row.batch_id]["failed_jobs"] -= 1
        pending = [i for i in deltas if rows[i].status == int(BatchStatus.FAILED)]
        while pending:  # a FAILED batch with an open unit again: re-open it, and un-count it in its parent
            i = pending.pop()
            if i in reopen:
                continue
            reopen.append(i)
            parent = rows[i].parent_id
            if parent is not None:
                deltas[parent]["failed_jobs"] -= 1
                if rows[parent].status == int(BatchStatus.FAILED):
                    pending.append(parent)
        self._bump(conn, deltas)
        if reopen:
            conn.execute(sa.update(b).where(b.c.id.in_(reopen))
                         .values(status=int(BatchStatus.STARTED), completed_at=None, expires_at=None))
            conn.execute(sa.update(c).where(c.c.batch_id.in_(reopen), c.c.status == int(ContinuationStatus.SKIPPED))
                         .values(status=int(ContinuationStatus.WAITING)))
        publish = sorted((row for row in runs if row.batch_id not in windows),
                         key=lambda row: (str(row.batch_id), row.position))
        publication = tx.publication(runs=[run_message(row) for row in publish])
        publication.extend(self.release(tx, {i: window - self.in_flight(conn, i) for i, window in windows.items()}))
        return [str(row.id) for row in runs], publication

    # -- cancel -----------------------------------------------------------------------------------
    def cancel(self, conn: sa.Connection, batch_id: str, now: datetime) -> tuple[list[str], Publication]:
        """Cancel a batch's whole subtree; returns the cancelled run ids (to revoke) and what to publish."""
        batch = self.lock_batch(conn, batch_id)
        if batch.status.is_final:
            return [], Publication()
        return self._cancel_tree(Tx(self, conn, now), batch_id)

    def _cancel_tree(self, tx: Tx, batch_id: str) -> tuple[list[str], Publication]:
        b, r, c, conn, now = self.tables.batches, self.tables.runs, self.tables.continuations, tx.conn, tx.now
        tree = self._subtree(batch_id, successors=True)
        cancelled = conn.execute(
            sa.update(b)
            .where(b.c.id.in_(sa.select(tree.c.id)), b.c.status <= int(BatchStatus.STARTED))
            .values(status=int(BatchStatus.CANCELLED), completed_at=now, expires_at=now + self.expires)
            .returning(b.c.id, b.c.parent_id)
        ).all()
        ids = {row.id for row in cancelled}
        if not ids:
            return [], tx.publication()
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
