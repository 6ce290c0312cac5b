"""Writing whole batch trees: a new batch (or continue-with stage) with its nested batches, runs
and continuations; jobs, nested batches and continuations added to an open batch; a batch's
properties merged; expired trees purged. The counting and finishing these writes can cause is the state machine's
(:class:`~.transitions.Transitions`), in the same transaction.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from typing import Iterable

import sqlalchemy as sa

from ..builder import BatchPlan
from ..ceding import pause
from ..message import Message
from ..errors import BatchClosedError
from ..models import BatchStatus, ContinuationKind, ContinuationStatus, RunStatus
from ..settings import PURGE_CHUNK
from .rows import Created, Publication, batch_from_row
from .locks import lock_batch, lock_lineage
from .queries import sql_name, subtree
from .transitions import Transitions
from .tx import Tx
from .windows import in_flight

__all__ = ["Trees"]


class Trees:
    def __init__(self, machine: Transitions) -> None:
        self.machine = machine
        self.engine = machine.engine
        self.tables = machine.tables
        self.expires = machine.expires

    # -- creation -------------------------------------------------------------------------------
    def insert_tree(self, conn: sa.Connection, root: BatchPlan, now: datetime, *,
                    antecedent: tuple[str, str] | None = None) -> Publication:
        """Write a new batch tree with set-based inserts; returns what to publish after commit.

        With ``antecedent=(batch_id, when)`` the tree is a continue-with stage: stored CREATED with
        its runs unpublished, settled at once if the antecedent has already finished.
        """
        tx = self.machine.tx(conn, now)
        parts = list(root.walk())
        status = BatchStatus.CREATED if antecedent else BatchStatus.STARTED
        if antecedent:
            antecedent_row = lock_batch(conn, self.tables.batches, antecedent[0])
        self._insert_batches(conn, parts, status, now, root_extra={
            "antecedent_id": antecedent[0], "continue_when": antecedent[1]} if antecedent else {})
        self._insert_runs(tx, ((part.id, position, job, _held(part, position)) for part in parts
                               for position, job in enumerate(part.jobs)),
                          new_batches=[part.id for part in parts], publishable=not antecedent)
        self._insert_continuations(conn, [(part.id, 0, part) for part in parts])
        publication = tx.publication()
        publication.created += _created(parts)
        if antecedent:
            if antecedent_row.status.is_final:
                publication.extend(self.machine.settle_successors(tx, {antecedent_row.id: antecedent_row.status}))
            return publication
        publication.extend(tx.publication(runs=[job for part in parts for position, job in enumerate(part.jobs)
                                                if not _held(part, position)]))
        publication.extend(self.machine.finish(tx, [part.id for part in parts if part.total_units == 0]))
        return publication

    def add_to_batch(self, conn: sa.Connection, batch_id: str, plan: BatchPlan, now: datetime) -> Publication:
        """Add jobs, nested batches and continuations to an unfinished batch, its row locked throughout.

        Inserting the runs and raising ``total_jobs`` happen under that lock in one transaction, so
        the batch cannot finish in between: a worker's group commit waits for it.
        """
        r, c, b = self.tables.runs, self.tables.continuations, self.tables.batches
        tx = self.machine.tx(conn, now)
        lineage = lock_lineage(conn, self.tables.batches, batch_id)
        batch = batch_from_row(lineage[-1])
        if batch.status.is_final:
            raise BatchClosedError(batch_id, batch.status)
        if _failing_fast(lineage):
            raise BatchClosedError(batch_id, "failing (a cancel_on_failure batch above it has a failed unit)")
        first_job = conn.scalar(sa.select(sa.func.coalesce(sa.func.max(r.c.position) + 1, 0))
                                .where(r.c.batch_id == batch_id))
        first_cont = conn.scalar(sa.select(sa.func.coalesce(sa.func.max(c.c.position) + 1, 0))
                                 .where(c.c.batch_id == batch_id))
        children = [part for child in plan.children for part in child.walk()]
        # a nested batch's place among the batch's units counts the units it had before
        self._insert_batches(conn, children, batch.status, now, units_before=(batch_id, batch.total_jobs))
        free = len(plan.jobs) if batch.max_concurrency is None else \
            batch.max_concurrency - in_flight(conn, self.tables.runs, batch_id)
        jobs = [(batch_id, first_job + i, job, i >= free) for i, job in enumerate(plan.jobs)]
        jobs += [(part.id, i, job, _held(part, i)) for part in children for i, job in enumerate(part.jobs)]
        started = batch.status == BatchStatus.STARTED
        self._insert_runs(tx, iter(jobs), new_batches=[part.id for part in children],
                          appended=(batch_id, first_job), publishable=started)
        self._insert_continuations(conn, [(batch_id, first_cont, plan)] + [(part.id, 0, part) for part in children])
        conn.execute(sa.update(b).where(b.c.id == batch_id).values(total_jobs=b.c.total_jobs + plan.total_units))
        publication = tx.publication()
        publication.created += _created(children)
        if not started:
            return publication  # a continue-with stage still waiting: published when it starts
        publication.extend(tx.publication(runs=[job for _, _, job, held in jobs if not held]))
        if batch.failed_jobs and any(s.kind == ContinuationKind.FIRST_FAILURE for s in plan.continuations):
            publication.extend(self.machine.first_failures(tx, [batch_id]))  # its first failure is behind it
        publication.extend(self.machine.finish(tx, [part.id for part in children if part.total_units == 0]))
        return publication

    def _insert_batches(self, conn: sa.Connection, parts: list[BatchPlan], status: BatchStatus, now: datetime,
                      root_extra: dict | None = None, units_before: tuple[str, int] | None = None) -> None:
        def unit_position(part: BatchPlan) -> int | None:
            if part.unit_position is None or units_before is None or part.parent_id != units_before[0]:
                return part.unit_position
            return units_before[1] + part.unit_position

        if parts:
            conn.execute(sa.insert(self.tables.batches), [{
                "id": part.id, "name": part.name, "parent_id": part.parent_id, "status": int(status),
                "total_jobs": part.total_units, "completed_jobs": 0, "failed_jobs": 0, "cancelled_jobs": 0,
                "created_by": part.created_by, "created_at": now, "antecedent_id": None, "continue_when": None,
                "description": part.description, "properties": part.properties,
                "tags": json.dumps(list(part.tags)) if part.tags else None,
                "cancel_on_failure": part.cancel_on_failure or None, "max_concurrency": part.max_concurrency,
                "results": part.results or None, "unit_position": unit_position(part),
                **(root_extra if i == 0 and root_extra else {}),
            } for i, part in enumerate(parts)])
            tags = [{"tag": tag, "batch_id": part.id} for part in parts for tag in part.tags]
            if tags:
                conn.execute(sa.insert(self.tables.batch_tags), tags)

    def _insert_continuations(self, conn: sa.Connection, owners: list[tuple[str, int, BatchPlan]]) -> None:
        rows = [{
            "id": cont.message.id, "batch_id": batch_id, "kind": cont.kind.value, "position": first + i,
            "task_name": cont.message.task_name, "args": cont.message.args, "kwargs": cont.message.kwargs,
            "options": cont.message.options, "status": int(ContinuationStatus.WAITING), "immutable": cont.immutable,
        } for batch_id, first, part in owners for i, cont in enumerate(part.continuations)]
        if rows:
            conn.execute(sa.insert(self.tables.continuations), rows)

    _RUN_COLUMNS = ("id", "batch_id", "position", "status", "task_name", "args", "kwargs", "queue", "options",
                    "created_at", "retries", "published", "publication_id", "held")

    def _insert_runs(self, tx: Tx, jobs: Iterable[tuple[str, int, Message, bool]], *, new_batches: list[str],
                     appended: tuple[str, int] | None = None, publishable: bool) -> None:
        """Insert runs, streaming: COPY on PostgreSQL, chunked executemany elsewhere; then their links.

        ``jobs``: ``(batch_id, position, message, held)``, held behind its batch's window.
        ``new_batches`` hold only new runs; ``appended=(batch_id, first_position)`` names the runs
        added to an existing batch. Both are index ranges, so linking never rescans old runs.
        ``publishable`` runs (not held) are published after the commit, under the transaction's lease.
        """
        r, j, conn, now = self.tables.runs, self.tables.batch_jobs, tx.conn, tx.now
        lease = tx.lease() if publishable else None
        rows = ((job.id, batch_id, position, int(RunStatus.PENDING), job.task_name, job.args, job.kwargs,
                 job.queue, job.options, now, 0, False, None if held else lease, held or None)
                for batch_id, position, job, held in jobs)
        if conn.dialect.name == "postgresql":
            cursor = conn.connection.driver_connection.cursor()  # same transaction as `conn`
            with cursor.copy(f"COPY {sql_name(conn.dialect, r)} ({', '.join(self._RUN_COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    pause()  # an event loop waiting on this thread gets the GIL now and then (ceding.py)
        else:
            while chunk := list(itertools.islice(rows, 1000)):
                conn.execute(sa.insert(r), [dict(zip(self._RUN_COLUMNS, row, strict=True)) for row in chunk])
        # the batch_jobs links are derived in SQL from the runs just written: no second client round trip per job
        new = r.c.batch_id.in_(new_batches)
        if appended:
            new = sa.or_(new, sa.and_(r.c.batch_id == appended[0], r.c.position >= appended[1]))
        conn.execute(sa.insert(j).from_select(["batch_id", "position", "run_id"],
                                              sa.select(r.c.batch_id, r.c.position, r.c.id).where(new)))

    # -- properties -------------------------------------------------------------------------------
    def merge_properties(self, batch_id: str, mapping: dict) -> dict | None:
        """Merge ``mapping``'s keys into the batch's properties under its row lock (concurrent merges
        all land); the new properties, or None if no batch has that id."""
        b = self.tables.batches
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(b.c.properties).where(b.c.id == batch_id).with_for_update()).first()
            if row is None:
                return None
            merged = {**(json.loads(row.properties) if row.properties else {}), **mapping}
            conn.execute(sa.update(b).where(b.c.id == batch_id).values(properties=json.dumps(merged)))
        return merged

    # -- expiry -----------------------------------------------------------------------------------
    def purge_expired(self, now: datetime, chunk: int = PURGE_CHUNK) -> int:
        """Delete expired top-level batches with their whole tree, ``chunk`` trees per transaction."""
        b, r, j, c = self.tables.batches, self.tables.runs, self.tables.batch_jobs, self.tables.continuations
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
                tree = subtree(b, b.c.id.in_(roots))
                ids = conn.execute(sa.select(tree.c.id)).scalars().all()
                conn.execute(sa.update(b).where(b.c.antecedent_id.in_(ids)).values(antecedent_id=None))
                conn.execute(sa.delete(c).where(c.c.batch_id.in_(ids)))
                conn.execute(sa.delete(self.tables.batch_tags).where(self.tables.batch_tags.c.batch_id.in_(ids)))
                conn.execute(sa.delete(j).where(j.c.batch_id.in_(ids)))
                conn.execute(sa.delete(r).where(r.c.batch_id.in_(ids)))
                deleted += conn.execute(sa.delete(b).where(b.c.id.in_(ids))).rowcount


def _failing_fast(lineage: list[sa.Row]) -> bool:
    """Is the batch (the last row) in the subtree of a ``cancel_on_failure`` batch that has a failed
    unit (itself included)? Its runs would escape that cancel."""
    rows = {row.id: row for row in lineage}
    row = lineage[-1]
    while row is not None:
        if row.cancel_on_failure and row.failed_jobs:
            return True
        row = rows.get(row.parent_id)
    return False


def _held(part: BatchPlan, position: int) -> bool:
    """Does a new batch's job wait behind its window (the first ``max_concurrency`` go at once)?"""
    return part.max_concurrency is not None and position >= part.max_concurrency


def _created(parts: Iterable[BatchPlan]) -> list[Created]:
    """The batches a transaction writes, for the announcement after its commit."""
    return [Created(part.id, part.name, part.total_units) for part in parts]
