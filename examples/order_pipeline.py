"""The order example, end to end.

With no configuration it runs on a fresh machine with no services: the registry is a SQLite file
(``celery_batches.sqlite3`` in the working directory), the broker is Celery's in-memory transport
and a worker runs in this process. Run it with::

    python examples/order_pipeline.py

With ``CELERY_BROKER_URL`` and ``CELERY_BATCHES_DATABASE_URL`` set, it uses Redis (or RabbitMQ)
and PostgreSQL instead, and expects a worker started separately::

    export CELERY_BROKER_URL=redis://127.0.0.1:6379/0
    export CELERY_BATCHES_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test
    celery -A examples.order_pipeline worker -l INFO      # in another terminal
    python examples/order_pipeline.py
"""

from __future__ import annotations

import random
import sys
import time

from celery_batches import Batches, BatchStatus

try:
    from examples.embedded import continuation_ran, make_app, start_worker, wait_for_continuation
except ImportError:  # run as a script from the examples folder
    from embedded import continuation_ran, make_app, start_worker, wait_for_continuation

app = make_app("shop")
# database URL: CELERY_BATCHES_DATABASE_URL if set, else the embedded SQLite default
batches = Batches(app)


def work(step: str, order_id: int) -> str:
    time.sleep(random.uniform(0.1, 0.4))  # pretend to do something
    return f"{step} done for order {order_id}"


@batches.task(name="shop.validate_order")
def validate_order(order_id: int) -> str:
    return work("validation", order_id)


@batches.task(name="shop.check_inventory")
def check_inventory(order_id: int) -> str:
    return work("inventory check", order_id)


@batches.task(name="shop.calculate_shipping")
def calculate_shipping(order_id: int) -> str:
    return work("shipping", order_id)


@batches.task(name="shop.process_payment")
def process_payment(order_id: int) -> str:
    return work("payment", order_id)


@batches.task(name="shop.send_receipt")
def send_receipt(order_id: int) -> str:
    return work("receipt", order_id)


@app.task(name="shop.complete_order")
def complete_order(order_id: int) -> None:
    print(f"  -> continuation: order {order_id} is complete (on_success)", flush=True)
    continuation_ran.set()


@app.task(name="shop.notify_failure")
def notify_failure(order_id: int) -> None:
    print(f"  -> continuation: order {order_id} failed (on_failure)", flush=True)
    continuation_ran.set()


def main() -> int:
    batches.migrate()
    start_worker(app)
    order_id = 123
    with batches.batch(f"process-order-{order_id}", created_by="checkout") as b:
        b.enqueue(validate_order, order_id)
        b.enqueue(check_inventory, order_id)
        b.enqueue(calculate_shipping, order_id)
        with b.batch("payment-processing") as payment:
            payment.enqueue(process_payment, order_id)
            payment.enqueue(send_receipt, order_id)
        b.on_success(complete_order, order_id)
        b.on_failure(notify_failure, order_id)
    print(f"created batch {b.id} ({batches.settings.database_url})")

    deadline = time.monotonic() + 60
    batch = batches.get_batch(b.id)
    while batch is not None and not batch.is_finished and time.monotonic() < deadline:
        print(f"  {batch.name}: {batch.status.name:9s} {batch.completed_jobs}/{batch.total_jobs} done "
              f"({batch.progress:4.0%})", flush=True)
        time.sleep(0.3)
        batch = batches.get_batch(b.id)
    batch = batches.wait(b.id, timeout=max(deadline - time.monotonic(), 1))
    print(f"batch {batch.name}: {batch.status.name}, total={batch.total_jobs} completed={batch.completed_jobs} "
          f"failed={batch.failed_jobs} cancelled={batch.cancelled_jobs}")
    for child in batches.list_batches(parent_id=b.id):
        print(f"  nested {child.name}: {child.status.name}, {child.completed_jobs}/{child.total_jobs} completed")
    for job in batches.get_batch_jobs(b.id):
        print(f"  job #{job.order} {job.task_name}{tuple(job.args)}: {job.status.name}")
    wait_for_continuation()
    return 0 if batch.status == BatchStatus.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
