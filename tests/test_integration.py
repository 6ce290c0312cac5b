"""End-to-end flows against real PostgreSQL, Redis and ``celery worker -P prefork -c 2`` processes.

The scenarios the embedded path shares (a failing member, a nested failure, an empty batch, nothing
written when creation fails) run on both backends in ``test_embedded.py``.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from celery_batches import BatchStatus, InvalidBatchError, RunStatus
from celery_batches.models import ContinuationStatus
from tests.helpers import (
    WAIT,
    continuations_become,
    count,
    drain,
    eventually,
    fired_once,
    needs,
    publish,
    relay_reported,
    stored_message,
    tag,
    with_continuations,
)

pytestmark = [*needs("postgres", "redis"), pytest.mark.timeout(180)]


@needs("worker")
def test_seed_order_example(proj, worker):
    seen = tag("seen")
    with proj.batches.batch("process-order-123", created_by="checkout") as b:
        b.enqueue(proj.noop, seen)
        b.enqueue(proj.noop.s(seen).set(queue=worker.queue))
        b.enqueue("tests.proj.noop", tag=seen)
        with b.batch("payment-processing") as payment:
            payment.enqueue(proj.noop, seen)
            payment.enqueue(proj.plain, seen)
        keys = with_continuations(b, proj)
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert (done.status, done.total_jobs, done.completed_jobs, done.failed_jobs) == (BatchStatus.COMPLETED, 4, 4, 0)
    assert done.progress == 1.0 and done.created_by == "checkout"
    assert done.expires_at - done.completed_at == proj.batches.settings.expires
    [child] = proj.batches.list_batches(parent_id=b.id)
    assert (child.name, child.status, child.total_jobs, child.completed_jobs) == (
        "payment-processing", BatchStatus.COMPLETED, 2, 2)
    jobs = proj.batches.get_batch_jobs(b.id)
    assert [j.order for j in jobs] == [0, 1, 2] and all(j.status == RunStatus.COMPLETED for j in jobs)
    assert jobs[2].kwargs == {"tag": seen} and jobs[1].queue == worker.queue
    assert all(j.started_at and j.finished_at and j.started_at <= j.finished_at for j in jobs)
    fired_once(proj, keys["success"])
    fired_once(proj, keys["complete"])
    assert count(proj, keys["failure"]) == 0
    continuations_become(proj.batches, b.id, [("complete", ContinuationStatus.DISPATCHED),
                                              ("failure", ContinuationStatus.SKIPPED),
                                              ("success", ContinuationStatus.DISPATCHED)])
    assert count(proj, seen) == 5


@needs("worker")
def test_a_nul_in_a_members_error_is_stored_escaped_and_stalls_nothing(proj, worker):
    """PostgreSQL text cannot hold NUL: stored as is, the error would fail its group commit on every
    retry and stall every later transition of that pool process."""
    ran = tag("ran")
    with proj.batches.batch("nul-error") as b:
        bad = b.enqueue(proj.fail, None, "bad\x00byte")
        for _ in range(6):
            b.enqueue(proj.noop, ran)
        keys = with_continuations(b, proj)
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert (done.status, done.completed_jobs, done.failed_jobs) == (BatchStatus.FAILED, 6, 1)
    failed = [j for j in proj.batches.get_batch_jobs(b.id) if j.id == bad][0]
    assert failed.error == "ValueError: bad\\x00byte"
    fired_once(proj, keys["failure"])


@needs("worker")
def test_hard_time_limit_counts_once(proj, worker):
    """Celery 5.7 sends task_failure twice (main process) for a hard time limit: counted once."""
    ran = tag("overrun")
    with proj.batches.batch("time-limit") as b:
        b.enqueue(proj.overrun, ran)
        b.enqueue(proj.add, 1, 1)
        keys = with_continuations(b, proj)
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert (done.status, done.total_jobs, done.completed_jobs, done.failed_jobs) == (BatchStatus.FAILED, 2, 1, 1)
    job = proj.batches.get_batch_jobs(b.id)[0]
    assert job.status == RunStatus.FAILED and "TimeLimitExceeded" in job.error
    fired_once(proj, keys["failure"])
    assert proj.batches.get_batch(b.id).failed_jobs == 1


@needs("worker")
def test_message_delivered_twice_counts_once(proj, worker):
    ran = tag("ran")
    with proj.batches.batch("duplicate") as b:
        run_id = b.enqueue(proj.sleep_then, 0.3, ran)
        b.enqueue(proj.add, 1, 1)
        keys = with_continuations(b, proj)
    # the same message again: same task id, same batch header (what a redelivery or a relay republish
    # sends), while the first delivery runs: the second finds the run claimed and is not executed
    assert publish(proj.app, [stored_message(proj, run_id, b.id)])
    done = proj.batches.wait(b.id, timeout=WAIT)
    drain(proj)
    assert count(proj, ran) == 1
    assert (done.status, done.total_jobs, done.completed_jobs) == (BatchStatus.COMPLETED, 2, 2)
    fired_once(proj, keys["success"])
    assert proj.batches.get_batch(b.id).completed_jobs == 2


@pytest.mark.slow
@needs("worker")
def test_last_two_members_finishing_together_fire_one_continuation(proj, worker):
    """Two members released by a barrier finish at the same instant on the two pool processes."""
    created = []
    for _ in range(15):
        barrier = tag("barrier")
        with proj.batches.batch("photo-finish") as b:
            b.enqueue(proj.barrier, barrier, 2)
            b.enqueue(proj.barrier, barrier, 2)
            keys = with_continuations(b, proj)
        created.append((b.id, keys))
        done = proj.batches.wait(b.id, timeout=WAIT)
        assert (done.status, done.completed_jobs) == (BatchStatus.COMPLETED, 2)
    drain(proj)
    for batch_id, keys in created:
        assert count(proj, keys["success"]) == 1, batch_id
        assert count(proj, keys["complete"]) == 1, batch_id
        assert count(proj, keys["failure"]) == 0, batch_id


@pytest.mark.slow
@needs("worker")
def test_fifty_concurrent_batches_have_exact_counters(proj, worker):
    def create(i: int) -> tuple[str, dict[str, str]]:
        with proj.batches.batch(f"concurrent-{i}") as b:
            for j in range(8):
                b.enqueue(proj.add, i, j)
            for _ in range(i % 3):  # 0, 1 or 2 failures
                b.enqueue(proj.fail)
            with b.batch("inner") as inner:
                inner.enqueue(proj.add, 0, 0)
            keys = with_continuations(b, proj)
        return b.id, keys

    with ThreadPoolExecutor(10) as pool:
        created = list(pool.map(create, range(50)))
    for i, (batch_id, _) in enumerate(created):
        done = proj.batches.wait(batch_id, timeout=WAIT)
        failures = i % 3
        assert (done.total_jobs, done.completed_jobs, done.failed_jobs, done.cancelled_jobs) == (
            8 + failures + 1, 9, failures, 0), done
        assert done.status == (BatchStatus.FAILED if failures else BatchStatus.COMPLETED)
    # a continuation is published just after the commit that finished its batch: wait until each ran
    # once, then drain, so a second run would be seen
    for i, (batch_id, keys) in enumerate(created):
        expected = "failure" if i % 3 else "success"
        eventually(lambda: count(proj, keys[expected]) >= 1 and count(proj, keys["complete"]) >= 1,
                   f"the continuations of {batch_id}", WAIT)
    drain(proj)
    for i, (batch_id, keys) in enumerate(created):
        expected = "failure" if i % 3 else "success"
        assert count(proj, keys[expected]) == 1 and count(proj, keys["complete"]) == 1, batch_id
        assert count(proj, keys["failure" if expected == "success" else "success"]) == 0, batch_id


@needs("worker")
def test_current_batch_id_inside_a_member(proj, worker):
    key = tag("whoami")
    with proj.batches.batch("who") as b:
        with b.batch("inner") as inner:
            inner.enqueue(proj.whoami, key)
    proj.batches.wait(b.id, timeout=WAIT)
    assert proj.r.get(key).decode() == inner.id


@pytest.mark.slow
@needs("worker")
def test_group_commit_lost_with_a_killed_pool_process_is_recovered(proj, start_worker):
    """Completions held in a pool process's group-commit buffer die with it (SIGKILL); the
    reconciler recovers them from the result backend, each counted once, with its return value
    (a ``results=True`` batch)."""
    w = start_worker(TEST_FLUSH_INTERVAL="3600", TEST_FLUSH_MAX="100000",
                     TEST_RELAY_INTERVAL="0.5", TEST_RECONCILE_GRACE="1")
    ran, key = tag("ran"), tag("complete")
    with proj.batches.batch("recovered", results=True) as b:
        ids = [b.enqueue(proj.noop.s(ran).set(queue=w.queue)) for _ in range(6)]
        ids += [b.enqueue(proj.add.s(i, i).set(queue=w.queue)) for i in (1, 2)]
        b.on_complete(proj.remember.s(key).set(queue=w.queue))
    eventually(lambda: all(proj.app.AsyncResult(i).state == "SUCCESS" for i in ids), "results stored", WAIT)
    assert count(proj, ran) == 6
    assert proj.batches.get_batch(b.id).completed_jobs == 0  # still in the pool processes' buffers
    assert w.kill_children()
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert (done.status, done.completed_jobs, done.failed_jobs) == (BatchStatus.COMPLETED, 8, 0)
    eventually(lambda: proj.r.llen(key) >= 1, "the continuation", WAIT)
    drain(proj, w.queue)
    assert [json.loads(item) for item in proj.r.lrange(key, 0, -1)] == [[None] * 6 + [2, 4]]
    assert count(proj, ran) == 6
    relay_reported("runs_reconciled=")


@pytest.mark.slow
@needs("worker")
def test_relay_publishes_runs_a_dead_producer_left_unpublished(proj, start_worker):
    """Commit without publishing (what a producer killed between the two leaves behind):
    the relay publishes each run once after the publish lease lapsed."""
    from celery_batches.builder import BatchBuilder
    from celery_batches.store import utcnow

    w = start_worker(TEST_RELAY_INTERVAL="0.5", TEST_PUBLISH_LEASE="1")
    ran, key = tag("ran"), tag("complete")
    builder = BatchBuilder(proj.app, "orphaned")
    for _ in range(5):
        builder.enqueue(proj.noop.s(ran).set(queue=w.queue))
    builder.on_complete(proj.record.s(key).set(queue=w.queue))
    with proj.batches.engine.begin() as conn:  # a lease of 1 s, which nobody renews
        lease = proj.batches.settings.publish_lease
        proj.batches.trees.insert_tree(conn, builder.seal(), utcnow() - timedelta(seconds=lease - 1))
    done = proj.batches.wait(builder.id, timeout=WAIT)
    assert (done.status, done.completed_jobs) == (BatchStatus.COMPLETED, 5)
    fired_once(proj, key, w.queue)
    assert count(proj, ran) == 5
    relay_reported("runs_published=5")


def test_migrate_from_many_processes_at_once(proj):
    """Several processes migrating a fresh schema at the same time: all succeed, one schema."""
    import subprocess
    import sys

    from celery_batches.store import drop_schema
    from celery_batches.store.migrate import head_revision

    prefix = f"cbt_mig_{uuid.uuid4().hex[:6]}_"
    code = ("import sys; from celery import Celery; from celery_batches import Batches; "
            f"Batches(Celery('m'), database_url={str(proj.batches.engine.url.render_as_string(False))!r}, "
            f"table_prefix={prefix!r}).migrate(); print('migrated')")
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
        with proj.batches.engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            version = conn.exec_driver_sql(f"SELECT version_num FROM {prefix}alembic_version").scalars().all()
        assert {f"{prefix}{t}" for t in ("batches", "runs", "batch_jobs", "batch_continuations")} <= tables
        assert version == [head_revision()]
    finally:
        drop_schema(proj.batches.engine, prefix)


def test_malformed_ids_and_arguments_are_refused(proj):
    assert proj.batches.get_batch("not-a-uuid") is None  # names no batch, like an unknown id
    with pytest.raises(InvalidBatchError):
        proj.batches.wait("42", timeout=1)
    with pytest.raises(InvalidBatchError):
        proj.batches.list_batches(limit=-1)
    with pytest.raises(InvalidBatchError):
        proj.batches.list_batches(status=9)
    assert proj.batches.get_batch(str(uuid.uuid4())) is None


def test_list_batches_name_search_ignores_case_and_wildcards(proj):
    token = uuid.uuid4().hex[:8]
    with proj.batches.batch(f"Report_{token}-100%") as b:
        pass
    with proj.batches.batch(f"reportX{token}-1000") as other:
        pass
    assert [x.id for x in proj.batches.list_batches(name=f"report_{token}")] == [b.id]
    assert [x.id for x in proj.batches.list_batches(name=f"{token}-100%")] == [b.id]
    assert {x.id for x in proj.batches.list_batches(name=token.upper())} == {b.id, other.id}
