"""An order and its batch committed together, in the caller's own transaction.

A web request inserts an ``orders`` row and creates the batch that processes it, in ONE database
transaction: if the request fails after the batch block, the rollback removes both and no job
ever runs; if it commits, the jobs are published right after the commit.

    python examples/web_order.py

Embedded by default (SQLite file + in-process worker); set ``CELERY_BROKER_URL`` and
``CELERY_BATCHES_DATABASE_URL`` for Redis + PostgreSQL with ``celery -A examples.web_order worker``.
The orders table lives in the same database as the registry (that is what makes one transaction
possible).
"""

from __future__ import annotations

import sys
import time

import sqlalchemy as sa

from celery_batches import Batches, BatchStatus

try:
    from examples.embedded import make_app, start_worker
except ImportError:  # run as a script from the examples folder
    from embedded import make_app, start_worker

app = make_app("webshop")
batches = Batches(app)
engine = sa.create_engine(batches.settings.database_url.replace("postgresql://", "postgresql+psycopg://"))
metadata = sa.MetaData()
orders = sa.Table(
    "example_orders", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("customer", sa.String(100), nullable=False),
    sa.Column("total_cents", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False, default="new"),
    sa.Column("batch_id", sa.String(36), nullable=True),
)


@batches.task(name="webshop.charge_card")
def charge_card(order_id: int) -> None:
    """Pretend to charge the customer."""


@batches.task(name="webshop.reserve_stock")
def reserve_stock(order_id: int) -> None:
    """Pretend to reserve the goods."""


@app.task(name="webshop.mark_paid")
def mark_paid(order_id: int) -> None:
    """Continuation: runs once when every job of the order's batch completed."""
    with engine.begin() as conn:
        conn.execute(sa.update(orders).where(orders.c.id == order_id).values(status="paid"))


class OrderRejected(ValueError):
    def __init__(self, order_id: int, batch_id: str) -> None:
        super().__init__(f"order {order_id}: the total must be positive")
        self.order_id, self.batch_id = order_id, batch_id


def place_order(customer: str, total_cents: int) -> tuple[int, str]:
    """What a request handler does: one transaction for the order row and its batch."""
    with engine.begin() as conn:
        order_id = conn.execute(
            sa.insert(orders).values(customer=customer, total_cents=total_cents, status="new")
            .returning(orders.c.id)).scalar_one()
        with batches.batch(f"order-{order_id}", created_by="web", connection=conn) as b:
            b.enqueue(charge_card, order_id)
            b.enqueue(reserve_stock, order_id)
            b.on_success(mark_paid, order_id)
        conn.execute(sa.update(orders).where(orders.c.id == order_id).values(batch_id=b.id))
        if total_cents <= 0:
            raise OrderRejected(order_id, b.id)  # rolls back the order AND its batch
    return order_id, b.id


def main() -> int:
    batches.migrate()
    metadata.create_all(engine)
    start_worker(app)

    order_id, batch_id = place_order("ada", 4200)
    batch = batches.wait(batch_id, timeout=60)
    status = None
    for _ in range(600):  # the continuation runs right after the batch finished
        with engine.connect() as conn:
            status = conn.scalar(sa.select(orders.c.status).where(orders.c.id == order_id))
        if status == "paid":
            break
        time.sleep(0.05)
    print(f"order {order_id} committed with batch {batch_id}: batch {batch.status.name} "
          f"({batch.completed_jobs}/{batch.total_jobs}); the continuation marked the order {status!r}")

    try:
        place_order("bob", 0)
    except OrderRejected as rejected:
        with engine.connect() as conn:
            row = conn.execute(sa.select(orders).where(orders.c.id == rejected.order_id)).first()
        left = batches.get_batch(rejected.batch_id)
        print(f"rejected: {rejected}; after the rollback the order row is {'there' if row else 'gone'} "
              f"and the batch is {'there' if left else 'gone'}")
        if row is not None or left is not None:
            return 1
    return 0 if batch.status == BatchStatus.COMPLETED and status == "paid" else 1


if __name__ == "__main__":
    sys.exit(main())
