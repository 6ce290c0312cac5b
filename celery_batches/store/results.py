"""A ``results=True`` batch's results: each unit's outcome, in unit order, nested batches as lists.

Read by :meth:`Batches.get_results` and, in the transaction that makes them due, by the
continuations that get the list as their first argument (:mod:`.transitions`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from .. import kombujson
from ..models import BatchStatus, JobResult, RunStatus
from .queries import subtree
from .tables import Tables

__all__ = ["result_values", "unit_results"]


def unit_results(conn: sa.Connection, tables: Tables, batch_id: str) -> list[JobResult]:
    """The batch's units in order: its jobs (by position) and nested batches (at the place they
    were added, ``unit_position``). A job's value is its return value once COMPLETED, else None;
    a nested batch's value is its own list, whatever its status."""
    b, r = tables.batches, tables.runs
    tree = subtree(b, b.c.id == batch_id)
    children: dict[str, list[sa.Row]] = defaultdict(list)
    statuses: dict[str, int] = {}
    for row in conn.execute(sa.select(b.c.id, b.c.parent_id, b.c.unit_position, b.c.status)
                            .where(b.c.id.in_(sa.select(tree.c.id)))):
        statuses[str(row.id)] = row.status
        if row.parent_id is not None:
            children[str(row.parent_id)].append(row)
    jobs: dict[str, list[sa.Row]] = defaultdict(list)
    for row in conn.execute(sa.select(r.c.id, r.c.batch_id, r.c.status, r.c.result, r.c.error)
                            .where(r.c.batch_id.in_(sa.select(tree.c.id))).order_by(r.c.batch_id, r.c.position)):
        jobs[str(row.batch_id)].append(row)

    def units(of: str) -> list[JobResult]:
        nested = sorted(children[of], key=lambda row: (row.unit_position is None, row.unit_position or 0))
        out: list[JobResult] = []
        own = iter(jobs[of])
        i = 0
        for child in nested:  # jobs fill the places between the nested batches
            while child.unit_position is not None and i < child.unit_position:
                job = next(own, None)
                if job is None:
                    break
                out.append(_job(job))
                i += 1
            out.append(JobResult(str(child.id), BatchStatus(statuses[str(child.id)]), units(str(child.id)), None))
            i += 1
        out.extend(_job(job) for job in own)
        return out

    return units(str(batch_id))


def _job(row: sa.Row) -> JobResult:
    status = RunStatus(row.status)
    value = kombujson.loads(row.result) if status == RunStatus.COMPLETED and row.result is not None else None
    return JobResult(str(row.id), status, value, row.error)


def result_values(results: list[JobResult]) -> list[Any]:
    """The plain list a continuation gets: values, nested batches as nested lists."""
    return [result_values(u.value) if isinstance(u.status, BatchStatus) else u.value for u in results]
