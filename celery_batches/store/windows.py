"""Windows (``max_concurrency``): how many of a batch's runs are in flight, and releasing held runs
into the places a finished job freed."""

from __future__ import annotations

import sqlalchemy as sa

from ..models import RunStatus
from .queries import run_message_columns
from .rows import Publication, run_message
from .tx import Tx

__all__ = ["in_flight", "release"]


def release(tx: Tx, runs: sa.Table, places: dict[str, int]) -> Publication:
    """Publish up to ``places[batch]`` held runs of each batch, in enqueue order. Called under the
    batch's row lock (the transaction already updated its counters), so two transactions that
    end jobs of one batch release one after the other, never the same runs or more than freed."""
    r, conn = runs, tx.conn
    publication = tx.publication()
    for batch_id, n in sorted(places.items()):
        if n <= 0:
            continue
        ids = conn.execute(sa.select(r.c.id).where(r.c.batch_id == batch_id, r.c.held,
                                                   r.c.status == int(RunStatus.PENDING))
                           .order_by(r.c.position).limit(n)).scalars().all()
        if not ids:
            continue
        rows = conn.execute(sa.update(r).where(r.c.id.in_(ids)).values(held=None, publication_id=tx.lease())
                            .returning(*run_message_columns(r))).all()
        publication.extend(tx.publication(runs=[run_message(row) for row in sorted(rows, key=lambda row: row.position)]))
    return publication


def in_flight(conn: sa.Connection, runs: sa.Table, batch_id: str) -> int:
    """The batch's direct jobs published (or about to be) and not finished: its window's occupants."""
    r = runs
    return conn.scalar(sa.select(sa.func.count()).where(r.c.batch_id == batch_id,
                                                        r.c.status < int(RunStatus.COMPLETED),
                                                        r.c.held.isnot(True))) or 0
