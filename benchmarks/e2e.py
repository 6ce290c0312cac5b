"""End-to-end throughput: N no-op tasks as plain delay() (the floor, with acks_late off and on), a
Celery chord, and a batch.

Starts one real ``celery worker -P prefork -c 2`` and runs the ways against it, each timed
from the first call to the moment its counter/callback/continuation ran, and each costed in CPU
seconds per 1,000 jobs summed over every process involved (this producer, the worker and its pool
processes, PostgreSQL's backends, the broker; read from /proc by benchmarks/cpu.py). Then times
committing a 10,000-job batch (``--commit-jobs``) and measures the peak memory of creating a 100,000-job
batch (``--memory-jobs``).

    python benchmarks/e2e.py [-n 10000] [--rounds 1] [--commit-jobs 10000] [--memory-jobs 100000] [--drop]
    BENCH_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// python benchmarks/e2e.py   # on RabbitMQ
    BENCH_PREPARED_STATEMENTS=1 python benchmarks/e2e.py   # with server-side prepared statements

Needs Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, database ``test``); override with
BENCH_REDIS_URL / BENCH_DATABASE_URL. The broker is Redis unless BENCH_BROKER_URL names another.
The registry's tables are under BENCH_PREFIX (``cbbench_``, dropped at the start), the queue is
BENCH_QUEUE (``celery_batches_bench``, purged at the start); ``--drop`` removes both at the end,
with the run's Redis counters, and its results too when BENCH_KEY_PREFIX puts them under a prefix.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import benchapp, cpu  # noqa: E402
from benchmarks.benchapp import app, batches, done, noop, noop_late, r  # noqa: E402
from benchmarks.big import delete_queue, probe  # noqa: E402
from celery import chord  # noqa: E402


#: the Redis counters and flags this run made (``--drop`` deletes them)
MADE: list[str] = []


def new_key(kind: str) -> str:
    MADE.append(benchapp.bench_key(kind))
    return MADE[-1]


def wait_for(predicate, timeout: float = 600.0) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step did not finish in time")
        time.sleep(0.002)
    return time.perf_counter()


def floor(n: int, task=noop) -> float:
    key = new_key("floor")
    t0 = time.perf_counter()
    for _ in range(n):
        task.delay(key)
    return wait_for(lambda: int(r.get(key) or 0) >= n) - t0


def floor_acks_late(n: int) -> float:
    return floor(n, noop_late)


def with_chord(n: int) -> float:
    key, flag = new_key("chord"), new_key("chord-done")
    t0 = time.perf_counter()
    chord(noop.s(key) for _ in range(n))(done.s(key=flag))
    return wait_for(lambda: r.exists(flag)) - t0


def with_batch(n: int) -> float:
    key, flag = new_key("batch"), new_key("batch-done")
    t0 = time.perf_counter()
    with batches.batch("bench") as b:
        for _ in range(n):
            b.enqueue(noop, key)
        b.on_complete(done, key=flag)
    return wait_for(lambda: r.exists(flag)) - t0


def cpu_line(cost: cpu.Cpu) -> str:
    """One way's CPU seconds per 1,000 jobs: the total, then who spent them."""
    return f"{cost.total:7.3f} s per 1000 jobs  (" + "  ".join(
        f"{f.name} {getattr(cost, f.name):.3f}" for f in fields(cost)) + ")"


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
    key = new_key("ready")
    noop.delay(key)
    wait_for(lambda: r.exists(key), timeout=60)
    return proc


def drop(queue: str) -> None:
    """Everything the run made: its registry tables, its queue, its Redis counters and flags, and
    with BENCH_KEY_PREFIX its results (without it they expire after Celery's ``result_expires``)."""
    from celery_batches.store import drop_schema

    drop_schema(batches.engine, batches.settings.table_prefix)
    delete_queue(queue)
    if benchapp.KEYS:
        keys = f"{benchapp.drop_keys()} Redis keys under {benchapp.KEYS!r}"
    else:
        keys = f"{r.delete(*MADE) if MADE else 0} Redis counters (results expire by themselves)"
    print(f"dropped the tables under prefix {batches.settings.table_prefix!r}, the queue {queue!r} and {keys}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--commit-jobs", type=int, default=10_000, help="jobs of the batch whose commit is timed")
    parser.add_argument("--memory-jobs", type=int, default=100_000)
    parser.add_argument("--drop", action="store_true", help="drop the registry tables, the queue and the Redis keys "
                        "of the run at the end")
    args = parser.parse_args()

    queue = app.conf.task_default_queue
    try:
        run(args)
    finally:
        if args.drop:
            drop(queue)


def run(args: argparse.Namespace) -> None:
    from celery_batches.store import drop_schema

    broker = app.connection_for_write().transport.driver_type
    # before this run opens any connection of its own: every client backend is someone else's
    others, others_active = cpu.other_postgres_clients()
    drop_schema(batches.engine, batches.settings.table_prefix)  # a fresh registry: nothing left to relay
    batches.migrate()
    purge_queue()
    worker = start_worker()
    ways = (("floor", floor), ("floor-late", floor_acks_late), ("chord", with_chord), ("batch", with_batch))
    results: dict[str, list[float]] = {name: [] for name, _ in ways}
    costs: dict[str, list[cpu.Cpu]] = {name: [] for name, _ in ways}
    try:
        for rnd in range(args.rounds):
            for name, way in ways:
                before = cpu.snapshot(worker.pid, broker)
                seconds = way(args.n)
                cost = cpu.snapshot(worker.pid, broker).minus(before).per(args.n)  # right after its wait
                results[name].append(seconds)
                costs[name].append(cost)
                print(f"round {rnd + 1}: {name:10s} {seconds:7.2f} s  {args.n / seconds:7.0f} tasks/s", flush=True)
                print(f"round {rnd + 1}: {name:10s} cpu {cpu_line(cost)}", flush=True)
    finally:
        worker.terminate()
        worker.wait(60)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nN = {args.n} no-op tasks, broker {broker}, one worker -P prefork -c 2, median of {args.rounds} round(s)")
    for name in results:
        print(f"  {name:10s} {med[name]:7.2f} s  {args.n / med[name]:7.0f} tasks/s  "
              f"{med[name] / med['floor']:.2f}x floor")
    print(f"  batch / floor = {med['batch'] / med['floor']:.3f}  (target <= 1.15)")
    print(f"  chord / batch = {med['chord'] / med['batch']:.3f}  (target >= 1.4)")

    # each column's median on its own (the total is the median of the rounds' totals, not the sum of
    # the medians); from /proc, so other users of the same PostgreSQL/Redis/RabbitMQ are counted too
    print(f"\nCPU seconds per 1,000 jobs, median of {args.rounds} round(s), summed over the producer, the worker "
          f"and its pool, PostgreSQL and the broker ({'redis-server' if broker == 'redis' else 'beam.smp'}"
          f"{'' if broker == 'redis' else '; results: redis-server, the result backend and counters'})")
    print("  (pg_ours: the part of postgres spent by the backends this run's processes are connected to; "
          "not in the total)")
    if others:
        print(f"  noise: {others} other PostgreSQL client backend(s) were connected before the run "
              f"({others_active} active); their work is counted in the postgres column")
    else:
        print("  noise: no other PostgreSQL client backend was connected before the run")
    cols = [f.name for f in fields(cpu.Cpu) if broker != "redis" or f.name != "results"]  # pg_ours last
    print("  " + " " * 10 + "".join(f"{c:>9s}" for c in ("total", *cols)) + "    wall x floor   cpu x floor")
    total = {k: statistics.median(c.total for c in v) for k, v in costs.items()}
    for name, v in costs.items():
        parts = [statistics.median(getattr(c, col) for c in v) for col in cols]
        cpu_ratio = total[name] / total["floor"] if total["floor"] > 0 else float("nan")
        print(f"  {name:10s}{total[name]:9.3f}" + "".join(f"{p:9.3f}" for p in parts)
              + f"    {med[name] / med['floor']:11.2f}   {cpu_ratio:11.2f}")
    for way in ("batch", "chord"):
        ratio = total[way] / total["floor"] if total["floor"] > 0 else float("nan")
        print(f"  cpu {way} / floor = {ratio:.3f}  (wall {med[way] / med['floor']:.3f})")

    # fresh processes (benchmarks/big.py), each on tables and a queue of its own
    small, big = probe("batch", args.commit_jobs), probe("batch", args.memory_jobs)
    print(f"\nbuild a {args.commit_jobs:,}-job batch in memory: {small['build']:.3f} s; commit it on "
          f"{batches.engine.dialect.name}: {small['commit']:.3f} s  (target <= 0.5 s for 10,000)")
    print(f"peak memory creating a {args.memory_jobs:,}-job batch: +{big['peak_mb']:.0f} MB over baseline  "
          f"(target <= 200 MB for 100,000)")


if __name__ == "__main__":
    main()
