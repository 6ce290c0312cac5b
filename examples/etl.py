"""Fan-out / fan-in ETL: extract per source in nested batches, then a continue-with load stage.

    python examples/etl.py

Stage 1 ("extract") has one nested batch per source, each with one job per partition. Stage 2
("load") is stored right away with ``continue_batch_with(..., when="success")``: its jobs are not
published until every extract finished, and never if one failed.
"""

from __future__ import annotations

import sys

from celery_batches import Batches, BatchStatus

try:
    from examples.embedded import continuation_ran, make_app, start_worker, wait_for_continuation
except ImportError:  # run as a script from the examples folder
    from embedded import continuation_ran, make_app, start_worker, wait_for_continuation

app = make_app("etl")
batches = Batches(app)
SOURCES = {"orders": 4, "customers": 2, "invoices": 3}


@batches.task(name="etl.extract")
def extract(source: str, partition: int) -> int:
    return partition  # pretend to copy one partition into staging


@batches.task(name="etl.load")
def load(table: str) -> None:
    """Pretend to merge the staged rows of one table."""


@app.task(name="etl.report")
def report(run: str) -> None:
    print(f"  -> continuation: {run} loaded every table", flush=True)
    continuation_ran.set()


def main() -> int:
    batches.migrate()
    start_worker(app)
    with batches.batch("nightly-extract") as extract_stage:
        for source, partitions in SOURCES.items():
            with extract_stage.batch(f"extract-{source}") as per_source:
                for p in range(partitions):
                    per_source.enqueue(extract, source, p)
    load_id = batches.continue_batch_with(
        extract_stage.id, "nightly-load",
        lambda b: ([b.enqueue(load, table) for table in SOURCES], b.on_success(report, "nightly")),
        when="success")
    print(f"extract stage {extract_stage.id}: {len(SOURCES)} nested batches; "
          f"load stage {load_id}: {batches.get_batch(load_id).status.name} until the extract succeeds")
    first = batches.wait(extract_stage.id, timeout=60)
    second = batches.wait(load_id, timeout=60)
    for child in batches.list_batches(parent_id=extract_stage.id):
        print(f"  {child.name}: {child.status.name} {child.completed_jobs}/{child.total_jobs}")
    print(f"extract: {first.status.name} {first.completed_jobs}/{first.total_jobs} sources; "
          f"load: {second.status.name} {second.completed_jobs}/{second.total_jobs} tables")
    if second.status == BatchStatus.COMPLETED:
        wait_for_continuation()
    return 0 if second.status == BatchStatus.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
