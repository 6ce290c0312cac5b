"""Big batches: build, commit and publish N jobs, next to a ``delay()`` loop of the same N.

For each N (10,000, 100,000 and 1,000,000 by default) a fresh process builds one batch of N no-op
jobs in memory, writes and commits it (PostgreSQL), and publishes it to a queue no worker
consumes (deleted afterwards); it prints the seconds of each phase, the total, and its peak RSS
over its baseline (VmHWM after the phases minus VmRSS before them, after imports and the first
database and broker connections). Then it times ``delay()`` for the same N in a fresh process,
up to ``--delay-max`` calls; beyond that the ``delay()`` time is extrapolated linearly from the
largest N measured, and marked so.

    python benchmarks/big.py [--sizes 10000,100000,1000000] [--delay-max 100000]
    BENCH_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// python benchmarks/big.py   # on RabbitMQ

Needs PostgreSQL (database ``test``), Redis, and the broker named by BENCH_BROKER_URL (Redis by
default). Each probe uses a scratch table prefix (``cbbig_<random>_``) and a queue (``bench-big-<random>``)
of its own, dropped afterwards; BENCH_SCRATCH_PREFIX=<stem> names both ``<stem><random>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys, time, uuid
sys.path.insert(0, {root!r})
from benchmarks.benchapp import app, batches, noop
from celery_batches import Batches
from celery_batches.builder import BatchBuilder
from celery_batches.store import drop_schema, utcnow


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


app.conf.task_default_queue = {queue!r}
scratch = Batches(app, database_url=batches.engine.url.render_as_string(hide_password=False),
                  table_prefix={prefix!r}, relay_interval=0)
scratch.migrate()
with scratch.engine.connect():
    pass
with app.connection_for_write() as c:
    c.ensure_connection()
out = {{}}
try:
    if {way!r} == "delay":
        before = status("VmRSS")
        t0 = time.perf_counter()
        for _ in range({n}):
            noop.delay("bench:big")
        out["delay"] = time.perf_counter() - t0
    else:
        before = status("VmRSS")
        t0 = time.perf_counter()
        builder = BatchBuilder(app, "bench-big")
        for _ in range({n}):
            builder.enqueue(noop, "bench:big")
        plan = builder.seal()
        t1 = time.perf_counter()
        with scratch.engine.begin() as conn:
            publication = scratch.trees.insert_tree(conn, plan, utcnow())
        t2 = time.perf_counter()
        report = scratch.publisher.publish(publication)
        t3 = time.perf_counter()
        assert report.runs == {n} and not report.broker_down, report
        out.update(build=t1 - t0, commit=t2 - t1, publish=t3 - t2, total=t3 - t0)
    out["peak_mb"] = (status("VmHWM") - before) / 1024
finally:
    drop_schema(scratch.engine, {prefix!r})
print(json.dumps(out))
"""


def probe(way: str, n: int) -> dict:
    scratch = os.environ.get("BENCH_SCRATCH_PREFIX")  # what every name the probe makes starts with
    run = uuid.uuid4().hex[:8]
    queue, prefix = (f"{scratch}{run}", f"{scratch}{run}_") if scratch else (f"bench-big-{run}", f"cbbig_{run[:6]}_")
    code = PROBE.format(root=str(ROOT), queue=queue, prefix=prefix, way=way, n=n)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        delete_queue(queue)


def delete_queue(queue: str) -> None:
    """Delete ``queue`` with its messages, and the exchange of the same name Celery declared for it."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.benchapp import app

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if conn.transport.driver_type == "redis":
            # kombu's virtual queue_delete only deletes bindings this connection declared itself: a
            # fresh connection would leave the probe's (up to a million) messages in Redis
            # (the probe's exchange is named after its queue, as Celery names a default queue's)
            channel.client.delete(queue, channel.keyprefix_queue % queue, channel.keyprefix_binding_permanent % queue)
            return
        # RabbitMQ keeps a durable exchange after its queue is gone; a channel an error closed is not
        # used again, hence one channel each
        for delete in (lambda ch: ch.queue_delete(queue), lambda ch: ch.exchange_delete(queue)):
            try:
                with conn.channel() as ch:
                    delete(ch)
            except Exception:  # noqa: BLE001  (never declared)
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--delay-max", type=int, default=100_000, help="largest N timed as a delay() loop")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    sys.path.insert(0, str(ROOT))
    from benchmarks.benchapp import app

    broker = app.connection_for_write().transport.driver_type
    print(f"broker {broker}; one process per row; seconds")
    print(f"{'N':>9} {'build':>7} {'commit':>7} {'publish':>8} {'total':>8} {'peak MB':>8} "
          f"{'delay()':>9} {'total/delay':>11}")
    measured: dict[int, float] = {}
    for n in sizes:
        batch = probe("batch", n)
        if n <= args.delay_max:
            measured[n] = delay = probe("delay", n)["delay"]
            mark = ""
        else:
            base = max(measured) if measured else None
            delay = measured[base] * n / base if base else float("nan")
            mark = "*"
        print(f"{n:>9,} {batch['build']:7.2f} {batch['commit']:7.2f} {batch['publish']:8.2f} "
              f"{batch['total']:8.2f} {batch['peak_mb']:8.0f} {delay:8.2f}{mark or ' '} "
              f"{batch['total'] / delay:11.3f}", flush=True)
    if any(n > args.delay_max for n in sizes):
        print(f"* delay() extrapolated linearly from N = {max(measured):,}" if measured else
              f"* delay() not measured: no size is <= --delay-max {args.delay_max:,}")
    print("targets: 10,000 jobs total/delay <= 0.15; 100,000 jobs total <= 10 s; "
          "1,000,000 jobs total <= 120 s and peak <= 600 MB")


if __name__ == "__main__":
    main()
