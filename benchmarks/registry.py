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
Uses scratch tables of its own (``cbreg_<random>_``, ``cbreg_hot_<random>``; BENCH_SCRATCH_PREFIX
replaces ``cbreg_``), dropped afterwards.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue as queue_module
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
#: what the name of every table the run makes (and drops) starts with
SCRATCH = os.environ.get("BENCH_SCRATCH_PREFIX", "cbreg_")


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


def writer(prefix: str, run_ids: list[str], ready: multiprocessing.Queue, start: multiprocessing.Event,
           done: multiprocessing.Queue) -> None:
    """One pool process's share: record a COMPLETED transition per run through its own group commit."""
    from celery_batches.models import RunStatus
    from celery_batches.store import RunEvent

    b = registry(prefix)
    node = b.node
    with b.engine.connect() as conn:  # connected before the clock starts (the pool keeps the connection)
        conn.exec_driver_sql("SELECT 1")
    ready.put(os.getpid())
    start.wait()
    for run_id in run_ids:
        node.record(RunEvent(run_id, RunStatus.COMPLETED, 0))
    node.group_commit.flush()
    done.put(time.perf_counter())
    b.engine.dispose()


def gather(queue: multiprocessing.Queue, procs: list, what: str, timeout: float) -> list:
    """One item from ``queue`` per process; raises as soon as a process exits with an error (it will
    never put its item) or when ``timeout`` seconds have passed."""
    items, deadline = [], time.monotonic() + timeout
    while len(items) < len(procs):
        try:
            items.append(queue.get(timeout=0.5))
        except queue_module.Empty:
            if failed := [p.exitcode for p in procs if p.exitcode not in (None, 0)]:
                raise RuntimeError(f"a writer process failed (exit codes {failed}) before {what}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"not {what} within {timeout:g} s") from None
    return items


def transitions_per_second(n: int, writers: int, batches_n: int) -> tuple[float, int, int]:
    """Commit n transitions from ``writers`` processes; returns (per second, lost, doubled)."""
    import sqlalchemy as sa

    from celery_batches.store import drop_schema

    prefix = f"{SCRATCH}{uuid.uuid4().hex[:6]}_"
    ctx = multiprocessing.get_context("spawn")
    ready, start, done = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs: list[multiprocessing.Process] = []
    try:
        batch_ids, run_ids = write_batches(prefix, n, batches_n)
        procs = [ctx.Process(target=writer, args=(prefix, run_ids[i::writers], ready, start, done))
                 for i in range(writers)]
        for p in procs:
            p.start()
        gather(ready, procs, "every writer imported and connected", 300)
        t0 = time.perf_counter()
        start.set()
        ends = gather(done, procs, "every writer's last transition committed", 600)
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
        for p in procs:  # a writer still waiting for the start (the run failed): nothing else ends it
            if p.is_alive():
                p.terminate()
                p.join(10)
        drop_schema(registry(prefix).engine, prefix)


def pgbench_ceiling(clients: int, seconds: int) -> float:
    """pgbench's transactions per second on one hot row, two statements per transaction."""
    import sqlalchemy as sa

    url = sa.engine.make_url(DATABASE_URL)
    table = f"{SCRATCH}hot_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(DATABASE_URL, isolation_level="AUTOCOMMIT")
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(f"UPDATE {table} SET n = n + 1 WHERE id = 1;\nSELECT n FROM {table} WHERE id = 1;\n")
        script.flush()
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE TABLE {table} (id int PRIMARY KEY, n bigint NOT NULL)")
                conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1, 0)")
            out = subprocess.run(["pgbench", "-n", "-c", str(clients), "-j", str(clients), "-T", str(seconds),
                                  "-f", script.name, "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432),
                                  "-U", url.username or "postgres", url.database or "test"],
                                 capture_output=True, text=True, check=False,
                                 env=dict(os.environ, **({"PGPASSWORD": url.password} if url.password else {})))
            if out.returncode != 0:
                raise RuntimeError(f"pgbench exited with {out.returncode}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            return float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10, help="how long pgbench runs")
    args = parser.parse_args()
    if args.n < 100 or args.writers < 1 or args.seconds < 1:
        parser.error("-n must be at least 100 (the second round spreads it over 100 batches), "
                     "--writers and --seconds at least 1")

    ceiling = pgbench_ceiling(args.writers, args.seconds)
    print(f"pgbench, one hot row, two statements a transaction, {args.writers} clients: {ceiling:,.0f} tps")
    for batches_n in (1, 100):
        rate, lost, doubled = transitions_per_second(args.n, args.writers, batches_n)
        print(f"{args.n:,} transitions on {batches_n} batch(es), {args.writers} writers: {rate:,.0f}/s "
              f"= {rate / ceiling:.1f}x the hot-row ceiling; lost {lost}, doubled {doubled}", flush=True)
    print("target: >= 3x the ceiling on one batch, 0 lost, 0 doubled")


if __name__ == "__main__":
    main()
