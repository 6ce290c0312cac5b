"""The registry's state machine: run transitions, counters, finishing batches, continuations,
continue-with stages, and cancelling a subtree (writing whole trees is :mod:`.trees`; what a user
asks of a batch, :mod:`.commands`; windows, :mod:`.windows`).

Transitions are conditional statements keyed by run or batch id, executed in the transaction
that changes the counters, so a duplicate signal, a redelivery or a second ``task_failure`` of
the same run changes nothing, and exactly one transaction finishes a batch.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Iterable

import sqlalchemy as sa

from .. import kombujson
from ..models import WHEN_MATCHES, BatchStatus, ContinuationKind, ContinuationStatus, RunStatus
from .rows import (
    Finished,
    Publication,
    as_utc,
    RunEvent,
    continuation_message,
    from_epoch,
    is_run_id,
    run_message,
    storable_text,
    utcnow,
)
from .queries import run_message_columns, sql_name, subtree
from .results import result_values, unit_results
from .tables import Tables
from .tx import Tx
from .windows import release

__all__ = ["Transitions"]

_FIRES_ON = {
    BatchStatus.COMPLETED: (ContinuationKind.SUCCESS.value, ContinuationKind.COMPLETE.value),
    BatchStatus.FAILED: (ContinuationKind.FAILURE.value, ContinuationKind.COMPLETE.value),
}
# keyed by name: RunStatus and BatchStatus are IntEnums whose values overlap
_COUNTER = {"COMPLETED": "completed_jobs", "FAILED": "failed_jobs", "CANCELLED": "cancelled_jobs"}


class Transitions:
    def __init__(self, engine: sa.Engine, tables: Tables, expires: timedelta,
                 publish_lease: timedelta = timedelta(seconds=30)) -> None:
        self.engine = engine
        self.tables = tables
        self.expires = expires
        self.publish_lease = publish_lease

    def tx(self, conn: sa.Connection, now: datetime) -> Tx:
        """A transaction of the state machine on ``conn`` (its publish lease taken on first use)."""
        return Tx(conn, now, self.tables.publications, self.publish_lease)

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
            tx = self.tx(conn, utcnow())
            publication = self.count(tx, [(batch_id, status) for batch_id, status, _ in counted])
            # each job that ended frees its place in its batch's window (if it has one) for the next
            publication.extend(release(tx, self.tables.runs, Counter(batch_id for batch_id, _, window in counted if window)))
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
        UPDATE {runs} AS r SET status = v.status, finished_at = v.at, error = v.error, traceback = v.traceback,
               result = CASE WHEN v.result IS NOT NULL
                             THEN (SELECT v.result FROM {batches} AS b WHERE b.id = r.batch_id AND b.results) END,
               started_at = coalesce(r.started_at, v.started), retries = greatest(r.retries, v.retries)
        FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS smallint[]), CAST(:retries AS integer[]),
                    CAST(:ats AS timestamptz[]), CAST(:starts AS timestamptz[]), CAST(:errors AS text[]),
                    CAST(:results AS text[]), CAST(:tracebacks AS text[]))
             AS v(id, status, retries, at, started, error, result, traceback)
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
        names = {"runs": sql_name(conn.dialect, self.tables.runs), "batches": sql_name(conn.dialect, self.tables.batches),
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
            "results": [e.result for e in final], "tracebacks": [storable_text(e.traceback) for e in final],
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
                        traceback=storable_text(e.traceback),
                        result=None if e.result is None else keeps.scalar_subquery(),
                        started_at=sa.func.coalesce(r.c.started_at, from_epoch(e.started)),
                        retries=sa.case((r.c.retries > e.retries, r.c.retries), else_=e.retries))
                .returning(r.c.batch_id, window)
            ).first()
            if row is not None:
                counted.append((row[0], e.status, row[1]))
        return counted

    def count(self, tx: Tx, finished_units: list[tuple[str, RunStatus | BatchStatus]]) -> Publication:
        """Count finished units (runs or child batches) in their batches, then finish what is complete."""
        if not finished_units:
            return tx.publication()
        deltas: dict[str, Counter] = defaultdict(Counter)
        for batch_id, status in finished_units:
            deltas[batch_id][_COUNTER[status.name]] += 1
        self.bump(tx.conn, deltas)
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
            tree = subtree(self.tables.batches, self.tables.batches.c.id == batch_id)
            runs = conn.execute(
                sa.update(r)
                .where(r.c.batch_id.in_(sa.select(tree.c.id)),
                       r.c.status.in_([int(RunStatus.PENDING), int(RunStatus.RETRYING)]))
                .values(status=int(RunStatus.CANCELLED), finished_at=tx.now,
                        error=f"cancelled: batch {batch_id} has a failed unit (cancel_on_failure)")
                .returning(r.c.batch_id)
            ).all()
            publication.extend(self.count(tx, [(row.batch_id, RunStatus.CANCELLED) for row in runs]))
        return publication

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

    def bump(self, conn: sa.Connection, deltas: dict[str, Counter]) -> None:
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
            .returning(b.c.id, b.c.parent_id, b.c.status, b.c.name, b.c.total_jobs, b.c.created_at)
        ).all()
        if not finished:
            return tx.publication()
        statuses = {row.id: BatchStatus(row.status) for row in finished}
        publication = self._fire_continuations(tx, statuses)
        publication.finished += self._finished(tx, finished, statuses)
        publication.extend(self.settle_successors(tx, statuses))
        publication.extend(self.count(tx, [(row.parent_id, statuses[row.id]) for row in finished if row.parent_id]))
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
        results as their first argument, written into their rows: a republish sends the same. An
        immutable one (``.si()``) gets none, as an immutable chord body."""
        b, c = self.tables.batches, self.tables.continuations
        rows = conn.execute(sa.select(c.c.id, c.c.batch_id, c.c.args).join(b, b.c.id == c.c.batch_id)
                            .where(firing, b.c.results.is_(True), c.c.immutable.is_(False))).all()
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
            if status in WHEN_MATCHES.get(row.continue_when, ()):
                publication.extend(self._start_stage(tx, row.id))
            else:
                publication.extend(self.cancel_tree(tx, row.id)[1])
        return publication

    def _start_stage(self, tx: Tx, batch_id: str) -> Publication:
        """Start a continue-with stage: its runs become publishable under this transaction's lease."""
        b, r, conn = self.tables.batches, self.tables.runs, tx.conn
        tree = subtree(self.tables.batches, self.tables.batches.c.id == batch_id)
        started = conn.execute(
            sa.update(b).where(b.c.id.in_(sa.select(tree.c.id)), b.c.status == int(BatchStatus.CREATED))
            .values(status=int(BatchStatus.STARTED)).returning(b.c.id, b.c.total_jobs)
        ).all()
        runs = conn.execute(
            sa.update(r)
            .where(r.c.batch_id.in_([row.id for row in started]), r.c.status == int(RunStatus.PENDING),
                   sa.not_(r.c.published), r.c.held.isnot(True))
            .values(publication_id=tx.lease())
            .returning(*run_message_columns(r))
        ).all() if started else []
        runs = sorted(runs, key=lambda row: (str(row.batch_id), row.position))
        publication = tx.publication(runs=[run_message(row) for row in runs])
        # a stage whose units all finished while it waited (a cancelled child, an empty stage) finishes now
        publication.extend(self.finish(tx, [row.id for row in started]))
        return publication

    # -- cancel ------------------------------------------------------------------------------------
    def cancel_tree(self, tx: Tx, batch_id: str) -> tuple[list[str], Publication]:
        b, r, c, conn, now = self.tables.batches, self.tables.runs, self.tables.continuations, tx.conn, tx.now
        tree = subtree(self.tables.batches, self.tables.batches.c.id == batch_id, successors=True)
        cancelled = conn.execute(
            sa.update(b)
            .where(b.c.id.in_(sa.select(tree.c.id)), b.c.status <= int(BatchStatus.STARTED))
            .values(status=int(BatchStatus.CANCELLED), completed_at=now, expires_at=now + self.expires)
            .returning(b.c.id, b.c.parent_id, b.c.name, b.c.total_jobs, b.c.created_at)
        ).all()
        ids = {row.id for row in cancelled}
        if not ids:
            return [], tx.publication()
        finished = self._finished(tx, sorted(cancelled, key=lambda row: str(row.id)),
                                  dict.fromkeys(ids, BatchStatus.CANCELLED))
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
            self.bump(conn, deltas)
        publication = tx.publication()
        publication.finished += finished
        publication.extend(self.count(tx, outside))
        return [row.id for row in runs], publication

    @staticmethod
    def _finished(tx: Tx, rows: Iterable[sa.Row], statuses: dict[str, BatchStatus]) -> list[Finished]:
        """The batches this transaction finished, for the announcement after its commit."""
        return [Finished(str(row.id), row.name, statuses[row.id], row.total_jobs,
                         max(0.0, (as_utc(tx.now) - as_utc(row.created_at)).total_seconds())) for row in rows]
