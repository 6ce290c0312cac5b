"""Event-loop lag while an asyncio producer creates and publishes a big batch (issue 21).

A ticker coroutine sleeps 1 ms at a time on the loop and records how late each wake-up is (its lag:
how long something else held the loop, or the loop's thread waited for the GIL). Meanwhile one
batch of N no-op jobs is created and published, one way at a time:

- ``abatch``: ``async with batches.abatch(...) as b`` and a plain ``for`` loop of ``b.enqueue`` in it
  (the contract's pattern); the jobs are validated, written and published in a worker thread as the
  block exits;
- ``abatch+yield``: the same, with ``await asyncio.sleep(0)`` every 1,000 enqueues (docs/asyncio.md
  recommends it for batches of many thousand jobs);
- ``abatch-nocede``: ``abatch`` with the commit thread's pauses turned off (``celery_batches.ceding``):
  what they are worth;
- ``acreate_batch``: ``await batches.acreate_batch(name, configure)``: the enqueue loop itself runs in
  the worker thread;
- ``process``: the sync ``batch()`` in a process pool's process (``loop.run_in_executor(pool, ...)``,
  the pool started beforehand): the loop's process does no work at all meanwhile (docs/asyncio.md: the
  way to a lag budget the GIL would break);
- ``thread-floor``: for comparison, ``--floor-seconds`` (1) of pure-Python work in a worker thread (no library, no
  I/O): the lag any busy thread of the process causes the loop on this machine, the GIL's floor;
- ``eager``: for comparison, the sync ``BatchBuilder.enqueue`` (validation and serialisation at each
  call) of the same N jobs on the loop, nothing written: what ``abatch`` would cost if it did not defer.

For each round it prints the enqueue loop's seconds, the create+publish seconds (entering the block
to the end of its publication), the worst lag while enqueueing and while the thread committed and
published (GIL contention: the loop only ticks then), and the p99 lag of the whole round. Every
batch is checked: N runs in the registry and N messages on the queue.

    python benchmarks/looplag.py [-n 10000] [--rounds 3] [--tick 0.001] [--switch-interval 0.005] [--floor-seconds 1] [--gc-freeze]

Needs PostgreSQL (BENCH_DATABASE_URL, database ``test``) and Redis (BENCH_REDIS_URL, the broker). The
registry's tables (``<stem><random>_``) and the queue, no worker consumes it, are dropped afterwards;
BENCH_SCRATCH_PREFIX names the stem (``cblag_`` by default).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import Celery  # noqa: E402

from celery_batches import Batches, ceding  # noqa: E402
from celery_batches.builder import BatchBuilder  # noqa: E402
from celery_batches.store import drop_schema  # noqa: E402

env = os.environ.get
DATABASE = env("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = env("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
STEM = env("BENCH_SCRATCH_PREFIX", "cblag_")
WAYS = ("abatch", "abatch+yield", "abatch-nocede", "acreate_batch", "process", "eager", "thread-floor")
#: the process pool's own registry (``process``): built once in the child by ``_child_init``
_CHILD: Batches | None = None


def _child_init(database: str, prefix: str, redis: str, queue: str) -> None:
    global _CHILD
    app = Celery("looplag-child", broker=redis, set_as_current=False)
    app.conf.task_default_queue = queue
    _CHILD = Batches(app, database_url=database, table_prefix=prefix, relay_interval=0)


def _child_create(n: int) -> str:
    """In the pool's process: the sync API, the whole batch (its jobs named, no task object needed)."""
    assert _CHILD is not None
    with _CHILD.batch("looplag", tags=["looplag"]) as b:
        for i in range(n):
            b.enqueue("looplag.noop", i)
    return b.id


class Ticker:
    """Wakes every ``period`` seconds on the loop; records (when it should have woken, how late it was)."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.period
            await asyncio.sleep(self.period)
            self.samples.append((due, loop.time() - due))

    def __enter__(self) -> "Ticker":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def lags(self, start: float, end: float) -> list[float]:
        """The lags of the wake-ups whose wait overlaps [start, end): one that was due just before
        ``start`` and woke long after it was held up by what ran from ``start``."""
        return [lag for due, lag in self.samples if due < end and due + lag > start]

    def due(self, start: float, end: float) -> list[float]:
        """The lags of the wake-ups due in [start, end): what happened from ``start`` on."""
        return [lag for due, lag in self.samples if start <= due < end]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else (values[0] if values else 0.0)


async def one_round(batches: Batches, noop: Any, way: str, n: int, ticker: Ticker, pool: Any,
                    floor: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.05)  # the ticker settles; the last round's lag is over
    start = loop.time()
    batch_id = None
    if way in ("abatch", "abatch+yield", "abatch-nocede"):
        every = 1000 if way == "abatch+yield" else 0
        slice_, ceding.SLICE = ceding.SLICE, math.inf if way == "abatch-nocede" else ceding.SLICE
        try:
            async with batches.abatch("looplag", tags=["looplag"]) as b:
                for i in range(n):
                    b.enqueue(noop, i)
                    if every and i % every == every - 1:
                        await asyncio.sleep(0)
                enqueued = loop.time()
        finally:
            ceding.SLICE = slice_
        batch_id = b.id
    elif way == "acreate_batch":
        def configure(b: BatchBuilder) -> None:
            for i in range(n):
                b.enqueue(noop, i)
        enqueued = start  # the enqueue loop runs in the thread
        batch_id = await batches.acreate_batch("looplag", configure)
    elif way == "process":
        enqueued = start
        batch_id = await loop.run_in_executor(pool, _child_create, n)
    elif way == "thread-floor":
        def busy(seconds: float) -> int:
            end, x = time.perf_counter() + seconds, 0
            while time.perf_counter() < end:
                x += 1
            return x
        enqueued = start
        await asyncio.to_thread(busy, floor)
    else:  # eager: the sync builder's enqueue on the loop, nothing written
        b = BatchBuilder(batches.app, "looplag")
        for i in range(n):
            b.enqueue(noop, i)
        enqueued = loop.time()
    done = loop.time()
    await asyncio.sleep(0.01)  # the last late wake-up is recorded
    lags = ticker.lags(start, done)
    return dict(batch_id=batch_id, enqueue=enqueued - start, total=done - start,
                enqueue_lag=max(ticker.lags(start, enqueued), default=0.0) if enqueued > start else 0.0,
                commit_lag=max(ticker.due(enqueued, done), default=0.0),
                max_lag=max(lags, default=0.0), p99=p99(lags), ticks=len(lags))


async def measure(batches: Batches, noop: Any, ways: list[str], n: int, rounds: int, tick: float,
                  check: Callable[[str | None], Awaitable[None]], pool: Any,
                  floor: float) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    with Ticker(tick) as ticker:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(0.5)
        idle = ticker.lags(t0, loop.time())
        print(f"idle loop: max lag {ms(max(idle))} ms, p99 {ms(p99(idle))} ms over {len(idle)} ticks")
        for r in range(1, rounds + 1):
            for way in ways:
                res = await one_round(batches, noop, way, n, ticker, pool, floor)
                await check(res["batch_id"])
                results[way].append(res)
                print(f"round {r}: {way:<14} enqueue {res['enqueue']:.3f} s, create+publish {res['total']:.3f} s, "
                      f"max lag {ms(res['max_lag'])} ms (enqueueing {ms(res['enqueue_lag'])} ms, committing "
                      f"{ms(res['commit_lag'])} ms), p99 lag {ms(res['p99'])} ms", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="jobs in the batch (default 10,000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tick", type=float, default=0.001, help="the ticker's period in seconds (default 1 ms)")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval (Python's default: 0.005 s)")
    parser.add_argument("--floor-seconds", type=float, default=1.0, help="how long thread-floor's thread works")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() once set up, as a server does after its imports (docs/asyncio.md)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"some of {', '.join(WAYS)}")
    args = parser.parse_args()
    ways = args.ways.split(",")
    assert set(ways) <= set(WAYS), f"--ways: some of {WAYS}"
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    suffix = uuid.uuid4().hex[:6]
    prefix, queue = f"{STEM}{suffix}_", f"{STEM}{suffix}-q"
    app = Celery("looplag", broker=REDIS, set_as_current=False)
    app.conf.task_default_queue = queue
    batches = Batches(app, database_url=DATABASE, table_prefix=prefix, relay_interval=0)

    @app.task(name="looplag.noop")
    def noop(i: int) -> None:
        pass

    batches.migrate()
    redis = app.connection_for_write().default_channel.client
    published = 0

    async def check(batch_id: str | None) -> None:
        nonlocal published
        if batch_id is None:
            return
        batch = await batches.aget_batch(batch_id)
        assert batch is not None and batch.total_jobs == args.n, batch
        published += args.n
        queued = await asyncio.to_thread(redis.llen, queue)
        assert queued == published, f"{queued} messages on the queue, {published} expected"

    try:
        print(f"looplag: N = {args.n:,} jobs, {batches.engine.dialect.name} + redis, tick {ms(args.tick)} ms, "
              f"switch interval {ms(sys.getswitchinterval())} ms, gc.freeze() {'yes' if args.gc_freeze else 'no'}, "
              f"{args.rounds} round(s), Python "
              f"{sys.version.split()[0]}, {os.cpu_count()} cores", flush=True)
        pool = None
        if "process" in ways:
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"), initializer=_child_init,
                                       initargs=(DATABASE, prefix, REDIS, queue))
            pool.submit(os.getpid).result()  # started, imported and connected before the measurement
        if args.gc_freeze:  # what is alive now (the imports, the app, the engine) is never scanned again
            gc.collect()
            gc.freeze()
        try:
            results = asyncio.run(measure(batches, noop, ways, args.n, args.rounds, args.tick, check, pool,
                                          args.floor_seconds))
        finally:
            if pool is not None:
                pool.shutdown()
        print(f"summary of {args.rounds} round(s), N = {args.n:,}: worst max lag, median p99 lag, "
              f"median enqueue and create+publish")
        for way, rows in results.items():
            print(f"  {way:<14} max lag {ms(max(r['max_lag'] for r in rows))} ms "
                  f"(enqueueing {ms(max(r['enqueue_lag'] for r in rows))} ms, committing "
                  f"{ms(max(r['commit_lag'] for r in rows))} ms), p99 lag "
                  f"{ms(statistics.median(r['p99'] for r in rows))} ms, enqueue "
                  f"{statistics.median(r['enqueue'] for r in rows):.3f} s, create+publish "
                  f"{statistics.median(r['total'] for r in rows):.3f} s")
    finally:
        drop_schema(batches.engine, prefix)
        batches.engine.dispose()
        redis.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        print(f"dropped the tables under prefix {prefix!r} and the queue {queue!r}")


if __name__ == "__main__":
    main()
