"""Read-only pages of the dashboard (``celery_batches.dashboard``) and of ``celery batches list/show``.

Every statement is index-backed and bounded, so a page answers in milliseconds on a registry of
100,000 batches and millions of runs:

* batch lists are keyset-paginated on ``(created_at, id)`` (``ix_*_batches_created`` and
  ``ix_*_batches_status_created``); a cursor is the id of the row the page continues from;
* a batch's jobs are keyset-paginated on ``runs (batch_id, position)`` (the unique index);
* trees and their roll-ups walk ``batches.parent_id`` (``ix_*_batches_parent``) with recursive CTEs
  and read the batches' counters, never the runs: the direct (leaf) jobs of a batch are its units
  minus its child batches, per outcome, because a child batch counts exactly once in its parent.

The filters of :func:`~.reads.batch_filters` serve the offset-paginated lists of
:meth:`Batches.list_batches <celery_batches.Batches.list_batches>` and ``celery batches list``
(:func:`batch_rows`) and the dashboard's keyset pages (:func:`batch_page`).

Nothing here writes; every function takes the registry (:class:`~.reads.Db`).
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple, Sequence

import sqlalchemy as sa

from ..models import BatchStatus, ContinuationStatus, RunStatus
from .pagerows import (
    BatchDetail,
    BatchPage,
    BatchRef,
    BatchRow,
    ContinuationRow,
    Counts,
    JobPage,
    JobRow,
    RunDetail,
    TreeEntry,
)
from ..settings import JOBS_PAGE_SIZE, MAX_ANCESTORS, PAGE_SIZE, SUCCESSORS_LIMIT, TREE_LIMIT
from . import queries
from .reads import Db, batch_list_rows, batch_filters
from .rows import as_utc, batch_from_row

__all__ = [
    "BatchDetail",
    "BatchPage",
    "BatchRef",
    "BatchRow",
    "ContinuationRow",
    "Counts",
    "JobPage",
    "JobRow",
    "TreeEntry",
    "batch_detail",
    "batch_page",
    "batch_row",
    "batch_rows",
    "job_page",
    "job_rows",
    "run_detail",
]



# -- batch lists -----------------------------------------------------------------------------------

def _children(db: Db) -> sa.ScalarSelect:
    b = db.tables.batches
    kids = b.alias("kids")
    return sa.select(sa.func.count()).where(kids.c.parent_id == b.c.id).scalar_subquery()


def _row(row: sa.Row) -> BatchRow:
    return BatchRow(batch_from_row(row), row.children, row.antecedent_id, row.continue_when)


def batch_rows(db: Db, *, status: BatchStatus | None = None, name: str | None = None,
               parent_id: str | None = None, tag: str | None = None, limit: int = PAGE_SIZE,
               offset: int = 0) -> list[BatchRow]:
    """:func:`batch_list` with each batch's links (children, antecedent), as the dashboard lists them."""
    b = db.tables.batches
    query = sa.select(b, _children(db).label("children"))
    return [_row(row) for row in batch_list_rows(db, query, status, name, parent_id, tag, limit, offset)]


def batch_row(db: Db, batch_id: str) -> BatchRow | None:
    """One batch with its links, as :func:`batch_rows` lists it; None for an unknown id."""
    b = db.tables.batches
    with db.engine.connect() as conn:
        row = conn.execute(sa.select(b, _children(db).label("children")).where(b.c.id == batch_id)).first()
    return None if row is None else _row(row)


def batch_page(db: Db, *, status: BatchStatus | None = None, name: str | None = None,
               parent_id: str | None = None, tag: str | None = None, limit: int = PAGE_SIZE,
               before: str | None = None, after: str | None = None) -> BatchPage:
    """A page of batches, newest first, keyset-paginated; the filters are :func:`batch_filters`'.

    ``before``: the page of batches older than the batch with this id; ``after``: the page newer
    than it (an unknown cursor id reads the newest page).
    """
    b = db.tables.batches
    filters = batch_filters(db.tables, status=status, name=name, parent_id=parent_id, tag=tag)
    base = sa.select(b, _children(db).label("children")).where(*filters)

    def exists(condition: sa.ColumnElement) -> sa.Select:
        return sa.select(sa.exists(sa.select(b.c.id).where(*filters, condition)))

    with db.engine.connect() as conn:
        cursor = None
        if before or after:
            cursor = conn.execute(sa.select(b.c.created_at, b.c.id).where(b.c.id == (before or after))).first()
        if cursor is not None and after:
            rows = conn.execute(base.where(_newer(b, cursor.created_at, cursor.id))
                                .order_by(b.c.created_at, b.c.id).limit(limit + 1)).all()
            has_newer = len(rows) > limit
            rows = rows[:limit][::-1]
            edge = rows[-1] if rows else cursor
            has_older = bool(conn.scalar(exists(_older(b, edge.created_at, edge.id, inclusive=not rows))))
        else:
            q = base
            if cursor is not None:
                q = q.where(_older(b, cursor.created_at, cursor.id))
            rows = conn.execute(q.order_by(b.c.created_at.desc(), b.c.id.desc()).limit(limit + 1)).all()
            has_older = len(rows) > limit
            rows = rows[:limit]
            has_newer = False
            if cursor is not None:
                edge = rows[0] if rows else cursor
                has_newer = bool(conn.scalar(exists(_newer(b, edge.created_at, edge.id, inclusive=not rows))))
    return BatchPage([_row(row) for row in rows], has_newer=has_newer, has_older=has_older)


def _older(b: sa.Table, created_at: datetime, batch_id: str, inclusive: bool = False) -> sa.ColumnElement:
    """Rows after ``(created_at, id)`` in newest-first order; the redundant first term lets the
    planner range-scan the created_at index."""
    same = b.c.id <= batch_id if inclusive else b.c.id < batch_id
    return sa.and_(b.c.created_at <= created_at, sa.or_(b.c.created_at < created_at, same))


def _newer(b: sa.Table, created_at: datetime, batch_id: str, inclusive: bool = False) -> sa.ColumnElement:
    same = b.c.id >= batch_id if inclusive else b.c.id > batch_id
    return sa.and_(b.c.created_at >= created_at, sa.or_(b.c.created_at > created_at, same))


# -- one batch -------------------------------------------------------------------------------------

def batch_detail(db: Db, batch_id: str, *, tree_limit: int = TREE_LIMIT,
                 successors_limit: int = SUCCESSORS_LIMIT) -> BatchDetail | None:
    """Everything the batch page shows except its jobs; None for an unknown id."""
    b = db.tables.batches
    with _snapshot(db) as conn:
        row = conn.execute(sa.select(b, _children(db).label("children")).where(b.c.id == batch_id)).first()
        if row is None:
            return None
        batch = _row(row)
        ancestors = _ancestors(db, conn, batch.batch.parent_id)
        antecedent = None
        if batch.antecedent_id:
            ref = conn.execute(sa.select(b.c.id, b.c.name, b.c.status).where(b.c.id == batch.antecedent_id)).first()
            antecedent = ref and BatchRef(ref.id, ref.name, BatchStatus(ref.status))
        successors = [
            BatchRef(r.id, r.name, BatchStatus(r.status), r.continue_when)
            for r in conn.execute(
                sa.select(b.c.id, b.c.name, b.c.status, b.c.continue_when).where(b.c.antecedent_id == batch_id)
                .order_by(b.c.created_at, b.c.id).limit(successors_limit))
        ]
        tree, truncated = _tree(db, conn, batch_id, tree_limit)
        continuations = _continuations(db, conn, batch_id)
    if not tree:  # deleted (purged) between two statements of a non-snapshot read
        return None
    return BatchDetail(batch, ancestors, antecedent, successors, tree, truncated, continuations)


def _snapshot(db: Db) -> sa.Connection:
    """A connection whose statements all read one snapshot (PostgreSQL), so the batch, its tree and
    its continuations agree with each other. SQLite reads in one transaction anyway."""
    conn = db.engine.connect()
    if conn.dialect.name == "postgresql":
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
    return conn


def _ancestors(db: Db, conn: sa.Connection, parent_id: str | None) -> list[BatchRef]:
    if parent_id is None:
        return []
    b = db.tables.batches
    up = queries.ancestry(b, parent_id, b.c.parent_id, b.c.name, b.c.status, first_depth=1, max_depth=MAX_ANCESTORS)
    rows = conn.execute(sa.select(up.c.id, up.c.name, up.c.status).order_by(up.c.depth.desc())).all()
    return [BatchRef(r.id, r.name, BatchStatus(r.status)) for r in rows]


def _tree(db: Db, conn: sa.Connection, batch_id: str, limit: int) -> tuple[list[TreeEntry], bool]:
    """The subtree under ``batch_id`` with per-entry counters and subtree roll-ups.

    One statement reads the subtree (a recursive walk of the ``parent_id`` index) with each batch's
    unit counters; the roll-ups are summed here, in one pass from the leaves up: a batch's direct
    jobs per outcome are its unit counters minus its child batches per status (a finished child
    counts once in its parent: COMPLETED → completed, FAILED → failed, CANCELLED → cancelled), and
    its subtree's jobs are those plus its children's subtrees'. (In SQL, as an ancestor/descendant
    join, this took twice as long as the walk itself.)
    """
    b = db.tables.batches
    tree = queries.subtree(b, b.c.id == batch_id, depth=True)
    rows = [_TreeRow(*r) for r in conn.execute(
        sa.select(b.c.id, b.c.name, b.c.parent_id, b.c.status, b.c.total_jobs, b.c.completed_jobs,
                  b.c.failed_jobs, b.c.cancelled_jobs, b.c.created_at, tree.c.depth).join(tree, tree.c.id == b.c.id))]
    if not any(r.id == batch_id for r in rows):
        return [], False
    kids: dict[str, list[_TreeRow]] = {}
    for r in rows:
        if r.id != batch_id:
            kids.setdefault(r.parent_id, []).append(r)
    finished = {int(BatchStatus.COMPLETED): 1, int(BatchStatus.FAILED): 2, int(BatchStatus.CANCELLED): 3}
    jobs: dict[str, list[int]] = {}
    subtree: dict[str, list[int]] = {}  # total, completed, failed, cancelled jobs; batches
    for r in sorted(rows, key=lambda r: -r.depth):  # children before their parent
        mine = kids.get(r.id, ())
        own = [r.total_jobs - len(mine), r.completed_jobs, r.failed_jobs, r.cancelled_jobs]
        whole = [0, 0, 0, 0, 1]
        for k in mine:
            if k.status in finished:
                own[finished[k.status]] -= 1
            below = subtree[k.id]
            for i in range(5):
                whole[i] += below[i]
        for i in range(4):
            whole[i] += own[i]
        jobs[r.id], subtree[r.id] = own, whole
    # breadth-first, so the first ``limit`` rows are a connected top of the tree (each parent comes first)
    top = sorted(rows, key=lambda r: (r.depth, r.created_at, r.name, r.id))[:limit + 1]
    truncated = len(top) > limit
    top = top[:limit]
    entries = {r.id: _entry(r, jobs[r.id], subtree[r.id]) for r in top}
    children: dict[str | None, list[str]] = {}
    for r in top:  # already in sibling order (created_at, name, id)
        if r.id != batch_id:
            children.setdefault(r.parent_id, []).append(r.id)
    out: list[TreeEntry] = []
    stack = [batch_id]
    while stack:  # depth-first for display
        entry = entries[stack.pop()]
        out.append(entry)
        stack.extend(reversed(children.get(entry.id, ())))
    return out, truncated


class _TreeRow(NamedTuple):
    id: str
    name: str
    parent_id: str | None
    status: int
    total_jobs: int
    completed_jobs: int
    failed_jobs: int
    cancelled_jobs: int
    created_at: datetime
    depth: int


def _entry(r: _TreeRow, jobs: list[int], subtree: list[int]) -> TreeEntry:
    status = BatchStatus(r.status)
    final = status.is_final
    return TreeEntry(r.id, r.name, r.parent_id, status, r.depth,
                     Counts(r.total_jobs, r.completed_jobs, r.failed_jobs, r.cancelled_jobs, final),
                     Counts(*jobs, final), Counts(*subtree[:4], final), subtree[4])


def _continuations(db: Db, conn: sa.Connection, batch_id: str) -> list[ContinuationRow]:
    c = db.tables.continuations
    q = (sa.select(c.c.id, c.c.kind, c.c.task_name, c.c.args, c.c.kwargs, c.c.status, c.c.due_at,
                   c.c.dispatched_at, c.c.error).where(c.c.batch_id == batch_id).order_by(c.c.position, c.c.kind))
    return [ContinuationRow(r.id, r.kind, r.task_name, r.args, r.kwargs, ContinuationStatus(r.status),
                            as_utc(r.due_at), as_utc(r.dispatched_at), r.error) for r in conn.execute(q)]


# -- jobs ------------------------------------------------------------------------------------------

def job_page(db: Db, batch_id: str, *, status: Sequence[RunStatus] | RunStatus | None = None,
             start: int | None = None, before: int | None = None, limit: int = JOBS_PAGE_SIZE,
             text_chars: int | None = None) -> JobPage:
    """A page of a batch's direct jobs in enqueue order, on the ``(batch_id, position)`` index.

    ``start``: the first position of the page (inclusive); ``before``: the page that ends just
    before this position. ``status`` keeps only jobs in that status (or those statuses).
    ``text_chars`` truncates args, kwargs, error and result in SQL (for list views of huge arguments).
    """
    r = db.tables.runs
    filters = _job_filters(r, batch_id, status)
    cols = _job_columns(r, text_chars)

    def exists(condition: sa.ColumnElement) -> sa.Select:
        return sa.select(sa.exists(sa.select(r.c.id).where(*filters, condition)))

    with db.engine.connect() as conn:
        if before is not None:
            rows = conn.execute(sa.select(*cols).where(*filters, r.c.position < before)
                                .order_by(r.c.position.desc()).limit(limit + 1)).all()
            has_previous = len(rows) > limit
            rows = rows[:limit][::-1]
            has_next = bool(conn.scalar(exists(r.c.position >= before)))
        else:
            q = sa.select(*cols).where(*filters)
            if start is not None:
                q = q.where(r.c.position >= start)
            rows = conn.execute(q.order_by(r.c.position).limit(limit + 1)).all()
            has_next = len(rows) > limit
            rows = rows[:limit]
            has_previous = bool(start) and bool(conn.scalar(exists(r.c.position < start)))
    return JobPage([_job_row(row) for row in rows], has_previous=has_previous, has_next=has_next)


def job_rows(db: Db, batch_id: str, *, status: Sequence[RunStatus] | RunStatus | None = None,
             limit: int = JOBS_PAGE_SIZE, offset: int = 0, text_chars: int | None = None) -> list[JobRow]:
    """:func:`job_page`'s jobs by offset (``celery batches jobs``): the ``offset``-th matching job on,
    in enqueue order. The database skips ``offset`` index entries, so deep offsets cost in proportion."""
    r = db.tables.runs
    q = (sa.select(*_job_columns(r, text_chars)).where(*_job_filters(r, batch_id, status))
         .order_by(r.c.position).limit(limit).offset(offset))
    with db.engine.connect() as conn:
        return [_job_row(row) for row in conn.execute(q)]


def _job_filters(r: sa.Table, batch_id: str, status: Sequence[RunStatus] | RunStatus | None) -> list:
    filters = [r.c.batch_id == batch_id]
    if status is not None:
        wanted = [status] if isinstance(status, RunStatus) else list(status)
        filters.append(r.c.status == int(wanted[0]) if len(wanted) == 1 else r.c.status.in_([int(s) for s in wanted]))
    return filters


def _job_columns(r: sa.Table, text_chars: int | None) -> list:
    def text(column: sa.Column) -> sa.ColumnElement:
        return (sa.func.substr(column, 1, text_chars) if text_chars else column).label(column.name)

    return [r.c.id, r.c.position, r.c.status, r.c.task_name, text(r.c.args), text(r.c.kwargs), r.c.queue,
            r.c.retries, r.c.created_at, r.c.started_at, r.c.finished_at, text(r.c.error), text(r.c.result)]


def _job_row(row: sa.Row) -> JobRow:
    return JobRow(row.id, row.position, RunStatus(row.status), row.task_name, row.args, row.kwargs, row.queue,
                  row.retries, as_utc(row.created_at), as_utc(row.started_at), as_utc(row.finished_at), row.error,
                  row.result)


def run_detail(db: Db, run_id: str) -> RunDetail | None:
    """One run with its batch and traceback (the dashboard's job page), or None; one statement on two primary keys."""
    r, b = db.tables.runs, db.tables.batches
    q = (sa.select(*_job_columns(r, None), r.c.traceback, b.c.id.label("b_id"), b.c.name.label("b_name"),
                   b.c.status.label("b_status"))
         .join(b, b.c.id == r.c.batch_id).where(r.c.id == run_id))
    with db.engine.connect() as conn:
        row = conn.execute(q).first()
    if row is None:
        return None
    return RunDetail(_job_row(row), BatchRef(row.b_id, row.b_name, BatchStatus(row.b_status)), row.traceback)
