"""The registry at its limit: run transitions committed per second through the real group commit.

Writes a batch of N runs (nothing published), then W writer processes, each with its own
``Batches`` and so its own group commit (as W pool processes have), record one COMPLETED
transition per run, every run exactly once, as fast as they can; timed until the last one is
committed. The same again with the runs spread over 100 batches. Then it checks what the
registry says: every run COMPLETED, every counter equal to its runs (lost and doubled updates: 0).

Next to it, pgbench's hot-row ceiling measured in the same run: W clients, each transaction two
statements on one row (``UPDATE … SET n = n + 1``, then ``SELECT n``), for ``--seconds``.

    python benchmarks/registry.py [-n 100000] [--writers 8] [--seconds 10]

Needs PostgreSQL (127.0.0.1:5432, database ``test``; BENCH_DATABASE_URL) and ``pgbench``.
Uses scratch tables of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def registry(prefix: str):
    from celery import Celery

    from celery_batches import Batches

    return Batches(Celery("bench-registry", broker="memory://", set_as_current=False), database_url=DATABASE_URL,
                   table_prefix=prefix, relay_interval=0)


def write_batches(prefix: str, n: int, batches_n: int) -> tuple[list[str], list[str]]:
    """``batches_n`` batches of ``n`` runs in all, committed, not published; returns (batch ids, run ids)."""
    from celery_batches.builder import BatchBuilder
    from celery_batches.store import utcnow

    b = registry(prefix)
    b.migrate()
    batch_ids, run_ids = [], []
    for i in range(batches_n):
        builder = BatchBuilder(b.app, f"registry-{i}")
        share = n // batches_n + (1 if i < n % batches_n else 0)
        run_ids += [builder.enqueue("bench.noop", j) for j in range(share)]
        with b.engine.begin() as conn:
            b.trees.insert_tree(conn, builder.seal(), utcnow())
        batch_ids.append(builder.id)
    b.engine.dispose()
    return batch_ids, run_ids


def writer(prefix: str, run_ids: list[str], start: multiprocessing.Event, done: multiprocessing.Queue) -> None:
    """One pool process's share: record a COMPLETED transition per run through its own group commit."""
    from celery_batches.models import RunStatus
    from celery_batches.store import RunEvent

    b = registry(prefix)
    node = b.node
    start.wait()
    for run_id in run_ids:
        node.record(RunEvent(run_id, RunStatus.COMPLETED, 0))
    node.group_commit.flush()
    done.put(time.perf_counter())
    b.engine.dispose()


def transitions_per_second(n: int, writers: int, batches_n: int) -> tuple[float, int, int]:
    """Commit n transitions from ``writers`` processes; returns (per second, lost, doubled)."""
    import sqlalchemy as sa

    from celery_batches.store import drop_schema

    prefix = f"cbreg_{uuid.uuid4().hex[:6]}_"
    batch_ids, run_ids = write_batches(prefix, n, batches_n)
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(prefix, run_ids[i::writers], start, done)) for i in range(writers)]
    try:
        for p in procs:
            p.start()
        time.sleep(2)  # every writer imported and connected
        t0 = time.perf_counter()
        start.set()
        ends = [done.get(timeout=600) for _ in procs]
        seconds = max(ends) - t0
        for p in procs:
            p.join(60)
        b = registry(prefix)
        r, t = b.transitions.tables.runs, b.transitions.tables.batches
        with b.engine.connect() as conn:
            completed_runs = conn.scalar(sa.select(sa.func.count()).select_from(r).where(r.c.status == 3))
            counted = conn.scalar(sa.select(sa.func.sum(t.c.completed_jobs)).where(t.c.id.in_(batch_ids)))
        lost = n - completed_runs + max(n - counted, 0)
        doubled = max(counted - n, 0)
        return n / seconds, lost, doubled
    finally:
        drop_schema(registry(prefix).engine, prefix)


def pgbench_ceiling(clients: int, seconds: int) -> float:
    """pgbench's transactions per second on one hot row, two statements per transaction."""
    import sqlalchemy as sa

    url = sa.engine.make_url(DATABASE_URL)
    table = f"cbreg_hot_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(DATABASE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (id int PRIMARY KEY, n bigint NOT NULL)")
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1, 0)")
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
            script.write(f"UPDATE {table} SET n = n + 1 WHERE id = 1;\nSELECT n FROM {table} WHERE id = 1;\n")
        out = subprocess.run(["pgbench", "-n", "-c", str(clients), "-j", str(clients), "-T", str(seconds),
                              "-f", script.name, "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432),
                              "-U", url.username or "postgres", url.database or "test"],
                             capture_output=True, text=True, check=True)
        return float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))
    finally:
        os.unlink(script.name)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10, help="how long pgbench runs")
    args = parser.parse_args()

    ceiling = pgbench_ceiling(args.writers, args.seconds)
    print(f"pgbench, one hot row, two statements a transaction, {args.writers} clients: {ceiling:,.0f} tps")
    for batches_n in (1, 100):
        rate, lost, doubled = transitions_per_second(args.n, args.writers, batches_n)
        print(f"{args.n:,} transitions on {batches_n} batch(es), {args.writers} writers: {rate:,.0f}/s "
              f"= {rate / ceiling:.1f}x the hot-row ceiling; lost {lost}, doubled {doubled}", flush=True)
    print("target: >= 3x the ceiling on one batch, 0 lost, 0 doubled")


if __name__ == "__main__":
    main()
