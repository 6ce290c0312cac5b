"""What a user asks of a whole batch: cancel it, or retry its failed runs (or one failed run). Each is one transaction
under the batch's lineage locks (:mod:`.locks`), built on the state machine's transitions."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime

import sqlalchemy as sa

from ..errors import BatchClosedError, InvalidBatchError, RunNotFoundError
from ..models import BatchStatus, ContinuationStatus, RunStatus
from .locks import lock_batch, lock_lineage
from .queries import run_message_columns, subtree
from .rows import Publication, run_message
from .transitions import Transitions
from .windows import in_flight, release

__all__ = ["Commands"]


class Commands:
    def __init__(self, machine: Transitions) -> None:
        self.machine = machine
        self.tables = machine.tables

    def cancel(self, conn: sa.Connection, batch_id: str, now: datetime) -> tuple[list[str], Publication]:
        """Cancel a batch's whole subtree; returns the cancelled run ids (to revoke) and what to publish."""
        batch = lock_batch(conn, self.tables.batches, batch_id)
        if batch.status.is_final:
            return [], Publication()
        return self.machine.cancel_tree(self.machine.tx(conn, now), batch_id)

    def retry_failed(self, conn: sa.Connection, batch_id: str, now: datetime) -> tuple[list[str], Publication]:
        """Every FAILED run of the batch's subtree back to PENDING, to be published again (same run
        id); counters move back with them; FAILED batches that get an open unit again re-open
        (STARTED), up through the ancestors that counted them as failed; continuations that did not
        fire (SKIPPED) of a re-opened batch wait again; what fired stays fired. One transaction,
        under the lineage's locks (as cancel)."""
        lineage = self._open_lineage(conn, batch_id)
        b, r = self.tables.batches, self.tables.runs
        tree = subtree(b, b.c.id == batch_id)
        rows = {row.id: row for row in lineage}
        rows.update({row.id: row for row in conn.execute(
            sa.select(b.c.id, b.c.parent_id, b.c.status).where(b.c.id.in_(sa.select(tree.c.id))))})
        open_batches = [i for i, row in rows.items() if row.status in (int(BatchStatus.STARTED), int(BatchStatus.FAILED))
                        and i not in {x.id for x in lineage[:-1]}]  # the subtree's, not the ancestors' own runs
        return self._retry(conn, now, rows, r.c.batch_id.in_(open_batches))

    def retry_run(self, conn: sa.Connection, run_id: str, now: datetime) -> tuple[str, Publication]:
        """One FAILED run back to PENDING, exactly as :meth:`retry_failed` puts back each of a
        subtree's (same locks, counters, re-opening and continuations); returns its batch's id.
        ``RunNotFoundError`` for no such run, ``InvalidBatchError`` for a run that is not FAILED,
        ``BatchClosedError`` if its batch (or one above it) was cancelled."""
        r = self.tables.runs
        batch_id = conn.execute(sa.select(r.c.batch_id).where(r.c.id == run_id)).scalar()
        if batch_id is None:
            raise RunNotFoundError(run_id)
        lineage = self._open_lineage(conn, str(batch_id))
        status = conn.execute(sa.select(r.c.status).where(r.c.id == run_id)).scalar()  # as it is under the locks
        if status is None:  # purged meanwhile
            raise RunNotFoundError(run_id)
        if status != int(RunStatus.FAILED):
            raise InvalidBatchError(f"run {run_id} is {RunStatus(status).name}: only a FAILED run can be retried")
        _, publication = self._retry(conn, now, {row.id: row for row in lineage}, r.c.id == run_id)
        return str(batch_id), publication

    def _open_lineage(self, conn: sa.Connection, batch_id: str) -> list[sa.Row]:
        """The batch's lineage, locked (top first); ``BatchClosedError`` if any of it was cancelled."""
        lineage = lock_lineage(conn, self.tables.batches, batch_id)
        if any(row.status == int(BatchStatus.CANCELLED) for row in lineage):
            raise BatchClosedError(batch_id, BatchStatus.CANCELLED)
        return lineage

    def _retry(self, conn: sa.Connection, now: datetime, rows: dict[str, sa.Row],
               which: sa.ColumnElement[bool]) -> tuple[list[str], Publication]:
        """The FAILED runs matching ``which`` back to PENDING (``rows``: their batches and every
        ancestor, locked, with ``id``, ``parent_id`` and ``status``): the one implementation of
        :meth:`retry_failed` and :meth:`retry_run`."""
        b, r, c = self.tables.batches, self.tables.runs, self.tables.continuations
        failed = conn.execute(sa.select(sa.exists().where(which, r.c.status == int(RunStatus.FAILED)))).scalar()
        tx = self.machine.tx(conn, now)
        if not failed:
            return [], tx.publication()
        runs = conn.execute(
            sa.update(r).where(which, r.c.status == int(RunStatus.FAILED))
            .values(status=int(RunStatus.PENDING), published=False, publication_id=tx.lease(), error=None, traceback=None,
                    started_at=None, finished_at=None, node=None, claimed_at=None, retries=0,
                    result=None, reset_at=now, replaced=None)
            .returning(*run_message_columns(r))
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
        self.machine.bump(conn, deltas)
        if reopen:
            conn.execute(sa.update(b).where(b.c.id.in_(reopen))
                         .values(status=int(BatchStatus.STARTED), completed_at=None, expires_at=None))
            conn.execute(sa.update(c).where(c.c.batch_id.in_(reopen), c.c.status == int(ContinuationStatus.SKIPPED))
                         .values(status=int(ContinuationStatus.WAITING)))
        publish = sorted((row for row in runs if row.batch_id not in windows),
                         key=lambda row: (str(row.batch_id), row.position))
        publication = tx.publication(runs=[run_message(row) for row in publish])
        publication.extend(release(tx, r, {i: window - in_flight(conn, r, i) for i, window in windows.items()}))
        return [str(row.id) for row in runs], publication
