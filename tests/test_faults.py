"""Fault tests with real processes: workers, producers, Redis and PostgreSQL connections killed.

Each asserts exact final counters and that continuations fired exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from celery import Celery

from celery_batches import BatchClosedError, BatchStatus, RunStatus
from tests.helpers import (
    FAULT_WAIT,
    ROOT,
    Worker,
    count,
    drain,
    eventually,
    fired_once,
    free_port,
    needs,
    private_registry,
    relay_reported,
    start_redis,
    tag,
)

pytestmark = [*needs("postgres", "redis", "worker"), pytest.mark.slow, pytest.mark.timeout(240)]


def test_worker_killed_mid_batch_with_acks_late(proj, start_worker):
    """SIGKILL the whole worker while acks_late members run; a new worker finishes the batch."""
    env = dict(TEST_VISIBILITY_TIMEOUT="3", TEST_RECONCILE_GRACE="2", TEST_RELAY_INTERVAL="0.5")
    first = start_worker(**env)
    started, key = tag("started"), tag("complete")
    with proj.batches.batch("killed-worker") as b:
        for _ in range(6):
            b.enqueue(proj.slow_ack.s(1.5, started).set(queue=first.queue))
        b.on_complete(proj.record.s(key).set(queue=first.queue))
    eventually(lambda: count(proj, started) >= 2, "two members to be running", FAULT_WAIT)
    first.kill()
    assert not proj.batches.get_batch(b.id).is_finished
    with Worker(proj, first.queue, **env):
        done = proj.batches.wait(b.id, timeout=FAULT_WAIT)
        assert (done.status, done.total_jobs, done.completed_jobs, done.failed_jobs) == (BatchStatus.COMPLETED, 6, 6, 0)
        fired_once(proj, key, first.queue, FAULT_WAIT)
        assert count(proj, started) >= 6  # the interrupted members ran again


PRODUCER = """
import sys
sys.path.insert(0, {root!r})
from tests.proj import batches, noop, record
with batches.batch("dying-producer") as b:
    for _ in range({n}):
        b.enqueue(noop.s({ran!r}).set(queue={queue!r}))
    b.on_complete(record.s({key!r}).set(queue={queue!r}))
    print(b.id, flush=True)
"""


def test_producer_killed_between_commit_and_publish(proj, start_worker):
    """SIGKILL the producer while it publishes: the relay publishes the rest, each job runs once."""
    w = start_worker(TEST_RELAY_INTERVAL="0.5", TEST_PUBLISH_LEASE="8")
    n, ran, key = 3000, tag("ran"), tag("complete")
    code = PRODUCER.format(root=str(ROOT), n=n, ran=ran, key=key, queue=w.queue)
    producer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    batch_id = producer.stdout.readline().strip()
    # committed: the batch row exists; now wait for the first messages and kill it mid-publish
    eventually(lambda: proj.batches.get_batch(batch_id) is not None, "the commit", FAULT_WAIT, 0.005)
    eventually(lambda: count(proj, ran) >= 1 or producer.poll() is not None, "publishing to start", FAULT_WAIT,
               0.005)
    producer.send_signal(signal.SIGKILL)
    producer.wait(10)
    assert count(proj, ran) < n, "the producer finished publishing before it was killed; nothing was tested"
    done = proj.batches.wait(batch_id, timeout=FAULT_WAIT)
    assert (done.status, done.total_jobs, done.completed_jobs) == (BatchStatus.COMPLETED, n, n)
    fired_once(proj, key, w.queue, FAULT_WAIT)
    assert count(proj, ran) == n, "every job ran exactly once"
    relay_reported("runs_published=", FAULT_WAIT)


def test_redis_down_while_a_batch_is_created(proj, tmp_path):
    """The broker is down at creation: the batch is committed, publishing is deferred to the
    relay, and after Redis returns every job runs once and the continuation fires once."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    server = start_redis(port)
    # a registry of its own: the session's worker publishes to the session's broker, not this one
    private = Celery("private-registry", broker=url, set_as_current=False)
    try:
        with private_registry(private, "cbt_redis") as batches:
            env = dict(TEST_BROKER_URL=url, TEST_BACKEND_URL=url, TEST_RELAY_INTERVAL="0.5", TEST_PUBLISH_LEASE="2",
                       TEST_PREFIX=batches.settings.table_prefix)
            with Worker(proj, f"cbt-redis-{uuid.uuid4().hex[:6]}", **env) as w:
                server.terminate()
                server.wait(10)
                ran, key = tag("ran"), tag("complete")
                code = PRODUCER.format(root=str(ROOT), n=10, ran=ran, key=key, queue=w.queue)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                                     timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT), **env))
                assert out.returncode == 0, out.stderr[-3000:]
                batch_id = out.stdout.strip().splitlines()[-1]
                assert "the relay will publish the rest" in out.stderr
                batch = batches.get_batch(batch_id)
                assert batch.status == BatchStatus.STARTED and count(proj, ran) == 0
                server = start_redis(port)
                done = batches.wait(batch_id, timeout=FAULT_WAIT)
                assert (done.status, done.completed_jobs) == (BatchStatus.COMPLETED, 10)
                # drained through the private broker: sentinels behind everything else
                fired_once(proj, key, w.queue, FAULT_WAIT, app=private)
                assert count(proj, ran) == 10
    finally:
        server.terminate()
        server.wait(10)


def test_postgresql_connections_killed_mid_batch(proj, start_worker):
    """pg_terminate_backend on every connection of the worker, repeatedly, while a batch runs:
    group commits are retried, counters stay exact, the continuation fires once."""
    app_name = f"cbt-fault-{uuid.uuid4().hex[:8]}"
    w = start_worker(TEST_APPLICATION_NAME=app_name, TEST_FLUSH_INTERVAL="0.05")
    ran, key = tag("ran"), tag("complete")
    with proj.batches.batch("pg-killed") as b:
        for _ in range(300):
            b.enqueue(proj.sleep_then.s(0.01, ran).set(queue=w.queue))
        b.enqueue(proj.fail.s().set(queue=w.queue))
        b.on_complete(proj.record.s(key).set(queue=w.queue))
    killed, stop = [0], threading.Event()

    def killer() -> None:
        with proj.batches.engine.connect() as conn:
            while not stop.is_set():
                killed[0] += len(conn.execute(sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :n"),
                    {"n": app_name}).all())
                conn.commit()
                time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        eventually(lambda: count(proj, ran) >= 300, "every member to run", FAULT_WAIT)
    finally:
        stop.set()
        t.join(10)
    assert killed[0] > 0, "no connection was killed; nothing was tested"
    done = proj.batches.wait(b.id, timeout=FAULT_WAIT)
    assert (done.status, done.total_jobs, done.completed_jobs, done.failed_jobs) == (BatchStatus.FAILED, 301, 300, 1)
    fired_once(proj, key, w.queue, FAULT_WAIT)
    assert count(proj, ran) == 300
    # the failed statements were logged, then repeated on a fresh connection and succeeded: group
    # commits, or the claims each member makes as it starts (every retry logs the same way)
    log = w.log.read_text()
    assert "failed (attempt 1)" in log and "succeeded after" in log


def test_cancel_racing_with_completion(proj, worker):
    """Cancel while the last members finish, many times: either the batch completed (cancel
    returns 0, continuation once) or it is CANCELLED (nothing fires) — never both, never neither."""
    outcomes = []
    for _ in range(20):
        ran, key = tag("ran"), tag("complete")
        with proj.batches.batch("race-cancel") as b:
            b.enqueue(proj.noop, ran)
            b.enqueue(proj.noop, ran)
            b.on_complete(proj.record, key)
        time.sleep(random.uniform(0, 0.05))
        cancelled = proj.batches.cancel_batch(b.id)
        final = eventually(lambda: (x := proj.batches.get_batch(b.id)).is_finished and
                           x.completed_jobs + x.failed_jobs + x.cancelled_jobs == x.total_jobs and x, "settled",
                           FAULT_WAIT)
        outcomes.append((b.id, final.status, cancelled, key))
    drain(proj)
    for batch_id, status, cancelled, key in outcomes:
        if status == BatchStatus.COMPLETED:
            assert cancelled == 0 and count(proj, key) == 1, batch_id
        else:
            assert status == BatchStatus.CANCELLED and count(proj, key) == 0, batch_id
            jobs = proj.batches.get_batch_jobs(batch_id)
            assert sum(j.status == RunStatus.CANCELLED for j in jobs) == cancelled
    print("cancel race outcomes:", {s.name: sum(o[1] == s for o in outcomes) for s in BatchStatus})


def test_add_racing_with_the_last_member_finishing(proj, worker):
    """Add while the only member finishes, many times: the add either succeeds and the batch waits
    for the new job, or raises BatchClosedError; never a finished batch with unfinished jobs."""
    results = []
    for _ in range(20):
        key = tag("complete")
        with proj.batches.batch("race-add") as b:
            b.enqueue(proj.add, 1, 1)
            b.on_complete(proj.record, key)
        time.sleep(random.uniform(0, 0.05))
        try:
            proj.batches.add_jobs_to_batch(b.id, lambda x: x.enqueue(proj.add, 2, 2))
            added = True
        except BatchClosedError:
            added = False
        done = proj.batches.wait(b.id, timeout=FAULT_WAIT)
        assert done.status == BatchStatus.COMPLETED
        assert done.total_jobs == (2 if added else 1) == done.completed_jobs
        results.append((added, key))
    drain(proj)
    assert all(count(proj, key) == 1 for _, key in results)
    print("add race outcomes: added", sum(a for a, _ in results), "closed", sum(not a for a, _ in results))
