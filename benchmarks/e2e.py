"""End-to-end throughput: N no-op tasks as plain delay() (the floor, with acks_late off and on), a
Celery chord, and a batch.

Starts one real ``celery worker -P prefork -c 2`` and runs the ways against it, each timed
from the first call to the moment its counter/callback/continuation ran. Then times committing
a 10,000-job batch and measures the peak memory of creating a 100,000-job batch.

    python benchmarks/e2e.py [-n 10000] [--rounds 1]
    BENCH_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// python benchmarks/e2e.py   # on RabbitMQ
    BENCH_PREPARED_STATEMENTS=1 python benchmarks/e2e.py   # with server-side prepared statements

Needs Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, database ``test``); override with
BENCH_REDIS_URL / BENCH_DATABASE_URL. The broker is Redis unless BENCH_BROKER_URL names another.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.benchapp import app, batches, done, noop, noop_late, r  # noqa: E402
from benchmarks.big import probe  # noqa: E402
from celery import chord  # noqa: E402


def wait_for(predicate, timeout: float = 600.0) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step did not finish in time")
        time.sleep(0.002)
    return time.perf_counter()


def floor(n: int, task=noop) -> float:
    key = f"bench:floor:{uuid.uuid4()}"
    t0 = time.perf_counter()
    for _ in range(n):
        task.delay(key)
    return wait_for(lambda: int(r.get(key) or 0) >= n) - t0


def floor_acks_late(n: int) -> float:
    return floor(n, noop_late)


def with_chord(n: int) -> float:
    key, flag = f"bench:chord:{uuid.uuid4()}", f"bench:chord-done:{uuid.uuid4()}"
    t0 = time.perf_counter()
    chord(noop.s(key) for _ in range(n))(done.s(key=flag))
    return wait_for(lambda: r.exists(flag)) - t0


def with_batch(n: int) -> float:
    key, flag = f"bench:batch:{uuid.uuid4()}", f"bench:batch-done:{uuid.uuid4()}"
    t0 = time.perf_counter()
    with batches.batch("bench") as b:
        for _ in range(n):
            b.enqueue(noop, key)
        b.on_complete(done, key=flag)
    return wait_for(lambda: r.exists(flag)) - t0


def purge_queue(queue: str | None = None, *, delete: bool = False) -> None:
    """Nothing left in a queue (the benchmark's unless named) from an earlier run."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        try:
            if delete:
                channel.queue_delete(queue)
            else:
                channel.queue_purge(queue or app.conf.task_default_queue)
        except Exception:  # noqa: BLE001  (RabbitMQ: the queue does not exist yet)
            pass


def start_worker() -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchmarks.benchapp", "worker", "-P", "prefork", "-c", "2",
         "-l", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    key = f"bench:ready:{uuid.uuid4()}"
    noop.delay(key)
    wait_for(lambda: r.exists(key), timeout=60)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--memory-jobs", type=int, default=100_000)
    args = parser.parse_args()

    from celery_batches.store import drop_schema

    drop_schema(batches.engine, batches.settings.table_prefix)  # a fresh registry: nothing left to relay
    batches.migrate()
    purge_queue()
    worker = start_worker()
    ways = (("floor", floor), ("floor-late", floor_acks_late), ("chord", with_chord), ("batch", with_batch))
    results: dict[str, list[float]] = {name: [] for name, _ in ways}
    try:
        for rnd in range(args.rounds):
            for name, run in ways:
                seconds = run(args.n)
                results[name].append(seconds)
                print(f"round {rnd + 1}: {name:10s} {seconds:7.2f} s  {args.n / seconds:7.0f} tasks/s", flush=True)
    finally:
        worker.terminate()
        worker.wait(60)

    med = {k: statistics.median(v) for k, v in results.items()}
    broker = app.connection_for_write().transport.driver_type
    print(f"\nN = {args.n} no-op tasks, broker {broker}, one worker -P prefork -c 2, median of {args.rounds} round(s)")
    for name in results:
        print(f"  {name:10s} {med[name]:7.2f} s  {args.n / med[name]:7.0f} tasks/s  "
              f"{med[name] / med['floor']:.2f}x floor")
    print(f"  batch / floor = {med['batch'] / med['floor']:.3f}  (target <= 1.15)")
    print(f"  chord / batch = {med['chord'] / med['batch']:.3f}  (target >= 1.4)")

    small, big = probe("batch", 10_000), probe("batch", args.memory_jobs)  # fresh processes (benchmarks/big.py)
    print(f"\nbuild a 10,000-job batch in memory: {small['build']:.3f} s; commit it on "
          f"{batches.engine.dialect.name}: {small['commit']:.3f} s  (target <= 0.5 s)")
    print(f"peak memory creating a {args.memory_jobs:,}-job batch: +{big['peak_mb']:.0f} MB over baseline  "
          f"(target <= 200 MB)")


if __name__ == "__main__":
    main()
