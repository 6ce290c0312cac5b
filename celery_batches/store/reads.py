"""The registry's reads for the API and the worker: a batch, its jobs and continuations, lists of
batches, and the open runs the reconciler walks. Nothing here writes.

Every function takes the registry (:class:`Db`: an engine and its tables). The one batch filter
builder (:func:`batch_filters`) serves these lists and the dashboard's pages (:mod:`.pages`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import sqlalchemy as sa

from ..models import Batch, BatchStatus, Continuation, JobResult, JobRun, RunStatus
from ..settings import PAGE_SIZE
from .results import unit_results
from .rows import batch_from_row, continuation_from_row, run_from_row
from .tables import Tables

__all__ = ["Db", "batch_filters", "batch_list", "batch_status", "get_batch", "get_continuations", "get_run",
           "get_jobs", "batch_list_rows", "open_runs", "results"]



class Db(Protocol):
    """What a read needs: the engine and the tables (the state machine, :class:`~.transitions.Transitions`, is one)."""

    engine: sa.Engine
    tables: Tables


def get_batch(db: Db, batch_id: str, *, conn: sa.Connection | None = None) -> Batch | None:
    """The batch, read on ``conn`` if given (a caller's transaction sees its own uncommitted batches)."""
    b = db.tables.batches
    query = sa.select(b).where(b.c.id == batch_id)
    if conn is not None:
        row = conn.execute(query).first()
    else:
        with db.engine.connect() as own:
            row = own.execute(query).first()
    return batch_from_row(row) if row else None


def batch_status(db: Db, batch_id: str) -> BatchStatus | None:
    b = db.tables.batches
    with db.engine.connect() as conn:
        status = conn.scalar(sa.select(b.c.status).where(b.c.id == batch_id))
    return None if status is None else BatchStatus(status)


def get_jobs(db: Db, batch_id: str, *, limit: int | None = None, offset: int = 0) -> list[JobRun]:
    """A batch's direct jobs in enqueue order."""
    r, j = db.tables.runs, db.tables.batch_jobs
    q = (sa.select(r, j.c.position).join(j, j.c.run_id == r.c.id)
         .where(j.c.batch_id == batch_id).order_by(j.c.position).limit(limit).offset(offset))
    with db.engine.connect() as conn:
        return [run_from_row(row) for row in conn.execute(q)]


def get_run(db: Db, run_id: str) -> JobRun | None:
    """One run, or None."""
    r = db.tables.runs
    with db.engine.connect() as conn:
        row = conn.execute(sa.select(r).where(r.c.id == run_id)).first()
    return None if row is None else run_from_row(row)


def get_continuations(db: Db, batch_id: str) -> list[Continuation]:
    c = db.tables.continuations
    q = sa.select(c).where(c.c.batch_id == batch_id).order_by(c.c.kind, c.c.position)
    with db.engine.connect() as conn:
        return [continuation_from_row(row) for row in conn.execute(q)]


def results(db: Db, batch_id: str) -> list[JobResult] | None:
    """A ``results=True`` batch's units in order (:func:`.results.unit_results`); None if no such
    batch keeps results."""
    b = db.tables.batches
    with db.engine.connect() as conn:
        if not conn.scalar(sa.select(b.c.results).where(b.c.id == batch_id)):
            return None
        return unit_results(conn, db.tables, batch_id)


def batch_filters(t: Tables, *, status: BatchStatus | None = None, name: str | None = None,
                  parent_id: str | None = None, tag: str | None = None) -> list[sa.ColumnElement]:
    """The WHERE clauses of every list of batches: top-level batches unless ``parent_id`` is given,
    ``status`` exactly, ``name`` a substring ignoring case (``%`` and ``_`` match themselves),
    ``tag`` one of the batch's tags."""
    b = t.batches
    filters = [b.c.parent_id.is_(None) if parent_id is None else b.c.parent_id == parent_id]
    if status is not None:
        filters.append(b.c.status == int(status))
    if name:
        filters.append(b.c.name.icontains(name, autoescape=True))
    if tag is not None:
        filters.append(b.c.id.in_(sa.select(t.batch_tags.c.batch_id).where(t.batch_tags.c.tag == tag)))
    return filters


def batch_list(db: Db, *, status: BatchStatus | None = None, name: str | None = None,
               parent_id: str | None = None, tag: str | None = None, limit: int = PAGE_SIZE,
               offset: int = 0) -> list[Batch]:
    """Batches newest first, ``offset`` rows in (what :meth:`Batches.list_batches` returns)."""
    b = db.tables.batches
    return [batch_from_row(row) for row in batch_list_rows(db, sa.select(b), status, name, parent_id, tag,
                                                          limit, offset)]


def batch_list_rows(db: Db, query: sa.Select, status: BatchStatus | None, name: str | None,
                    parent_id: str | None, tag: str | None, limit: int, offset: int) -> list[sa.Row]:
    b = db.tables.batches
    query = (query.where(*batch_filters(db.tables, status=status, name=name, parent_id=parent_id, tag=tag))
             .order_by(b.c.created_at.desc(), b.c.id.desc()).limit(limit).offset(offset))
    with db.engine.connect() as conn:
        return conn.execute(query).all()




def open_runs(db: Db, older_than: datetime, limit: int, *, after: tuple[datetime, str] | None = None
              ) -> list[sa.Row]:
    """Published runs with no final state whose last known change is older than ``older_than``, in
    ``(created_at, id)`` order, starting after the cursor ``after``: rows of ``id``, ``since``,
    ``created_at``, ``reset_at`` and ``keeps_results`` (its batch keeps results).

    A run a worker has touched counts as published whether or not its flag was written; one that
    started late is measured from its start, one ``retry_failed`` put back from then, not from when
    it was created.
    """
    r, b = db.tables.runs, db.tables.batches
    since = sa.func.coalesce(r.c.started_at, r.c.reset_at, r.c.created_at)
    keeps = sa.select(b.c.results).where(b.c.id == r.c.batch_id).scalar_subquery()
    q = (sa.select(r.c.id, since.label("since"), r.c.created_at, r.c.reset_at, keeps.label("keeps_results"))
         .where(r.c.status < int(RunStatus.COMPLETED),
                sa.or_(r.c.published, r.c.status > int(RunStatus.PENDING)),
                r.c.created_at < older_than, since < older_than)
         .order_by(r.c.created_at, r.c.id).limit(limit))
    if after is not None:
        q = q.where(sa.or_(r.c.created_at > after[0], sa.and_(r.c.created_at == after[0], r.c.id > after[1])))
    with db.engine.connect() as conn:
        return conn.execute(q).all()
