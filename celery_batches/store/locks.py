"""The lineage locks: every transaction that changes a tree's shape or cancels part of it takes them."""

from __future__ import annotations

import sqlalchemy as sa

from ..errors import BatchNotFoundError
from ..models import Batch
from .queries import ancestry
from .rows import batch_from_row

__all__ = ["lock_batch", "lock_lineage"]


def lock_batch(conn: sa.Connection, batches: sa.Table, batch_id: str) -> Batch:
    """Lock the batch and its whole lineage, top first; return the batch as it is under the locks.

    The lineage is the chain of parents up to the root and on through the antecedent of a
    continue-with stage. Every transaction that changes a tree's shape or cancels part of it
    (add, cancel, a new stage) takes these locks, so two of them that share any batch of a
    lineage run one after the other: a cancel sees every add under any descendant that
    committed before it, and an add that waited for a cancel finds its batch CANCELLED.
    Locking top first everywhere keeps two such transactions from deadlocking.
    """
    return batch_from_row(lock_lineage(conn, batches, batch_id)[-1])


def lock_lineage(conn: sa.Connection, batches: sa.Table, batch_id: str) -> list[sa.Row]:
    """:func:`lock_batch`, returning the lineage's rows, top first (the batch last)."""
    b = batches
    up = ancestry(b, batch_id, sa.func.coalesce(b.c.parent_id, b.c.antecedent_id))
    rows = conn.execute(sa.select(b).join(up, up.c.id == b.c.id).order_by(up.c.depth.desc())
                        .with_for_update(of=b)).all()
    if not rows:
        raise BatchNotFoundError(batch_id)
    return rows
