"""``max_concurrency``: at most N of a batch's direct jobs published and unfinished at once, the next
released by the transaction that records a job's end; with add, cancel, retry_failed and
continue-with. On real prefork workers (8 pool processes, so that more than the window could run at
once), Redis and PostgreSQL; each job counts how many run with it.
"""

from __future__ import annotations

import os
import uuid

import pytest

from celery_batches import BatchStatus, InvalidBatchError, RunStatus
from tests.helpers import WAIT, Worker, counters, eventually, needs, tag

pytestmark = needs("postgres", "redis")


@pytest.fixture(scope="module")
def wide(request, proj):
    """A worker of 8 pool processes on a queue of its own."""
    w = Worker(proj, f"{os.environ['TEST_QUEUE']}-wide-{uuid.uuid4().hex[:6]}", 8)
    yield w
    w.stop()


def most_at_once(proj, key: str) -> int:
    return int(proj.r.get(f"{key}:max") or 0)


@needs("worker")
def test_never_more_than_the_window_at_once_and_all_finish(proj, wide):
    free, windowed = tag("free"), tag("windowed")
    with proj.batches.batch("no-window") as control:
        for _ in range(60):
            control.enqueue(proj.concurrent.s(free, 0.05).set(queue=wide.queue))
    with proj.batches.batch("window", max_concurrency=5) as b:
        for _ in range(200):
            b.enqueue(proj.concurrent.s(windowed, 0.02).set(queue=wide.queue))
    assert counters(proj.batches.wait(control.id, timeout=WAIT)) == (BatchStatus.COMPLETED, 60, 60, 0, 0)
    assert counters(proj.batches.wait(b.id, timeout=WAIT * 2)) == (BatchStatus.COMPLETED, 200, 200, 0, 0)
    assert most_at_once(proj, free) > 5  # without a window this worker runs more than 5 at once
    assert 1 <= most_at_once(proj, windowed) <= 5
    assert proj.batches.get_batch(b.id).max_concurrency == 5
    started = [j.started_at for j in proj.batches.get_batch_jobs(b.id)]
    assert max(started[:5]) <= min(started[10:])  # released in enqueue order: the first five went first


@needs("worker")
def test_added_jobs_wait_their_turn_and_nested_batches_have_their_own_window(proj, wide):
    key, inner = tag("add"), tag("inner")
    with proj.batches.batch("window-add", max_concurrency=1) as b:
        for _ in range(10):
            b.enqueue(proj.concurrent.s(key, 0.05).set(queue=wide.queue))
        with b.batch("inner", max_concurrency=2) as child:
            for _ in range(12):
                child.enqueue(proj.concurrent.s(inner, 0.05).set(queue=wide.queue))
    proj.batches.add_jobs_to_batch(b.id, lambda more: [more.enqueue(proj.concurrent.s(key, 0.05).set(queue=wide.queue))
                                                       for _ in range(10)])
    assert counters(proj.batches.wait(b.id, timeout=WAIT * 2)) == (BatchStatus.COMPLETED, 21, 21, 0, 0)
    assert most_at_once(proj, key) == 1 and 1 <= most_at_once(proj, inner) <= 2


@needs("worker")
def test_cancel_cancels_the_held_jobs_too(proj, wide):
    key = tag("cancel")
    with proj.batches.batch("window-cancel", max_concurrency=2) as b:
        for _ in range(30):
            b.enqueue(proj.concurrent.s(key, 0.5).set(queue=wide.queue))
    eventually(lambda: most_at_once(proj, key) >= 1, "the first jobs to start")
    cancelled = proj.batches.cancel_batch(b.id)
    assert cancelled >= 26  # everything but the (at most 2, plus what finished) in flight
    batch = proj.batches.wait(b.id, timeout=WAIT)
    assert batch.status == BatchStatus.CANCELLED
    eventually(lambda: proj.batches.get_batch(b.id).pending_jobs == 0, "the running ones to finish")
    statuses = [j.status for j in proj.batches.get_batch_jobs(b.id)]
    assert statuses.count(RunStatus.CANCELLED) == cancelled and most_at_once(proj, key) <= 2


@needs("worker")
def test_retry_failed_keeps_the_window(proj, wide):
    key, flag = tag("retry"), tag("flag")
    with proj.batches.batch("window-retry", max_concurrency=2) as b:
        for _ in range(10):
            b.enqueue(proj.concurrent_unless.s(key, flag).set(queue=wide.queue))
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.FAILED, 10, 0, 10, 0)
    proj.r.set(flag, 1)
    proj.r.delete(f"{key}:max")
    assert proj.batches.retry_failed(b.id) == 10
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.COMPLETED, 10, 10, 0, 0)
    assert most_at_once(proj, key) == 2 or most_at_once(proj, key) == 1


@needs("worker")
def test_a_continue_with_stage_starts_within_its_window(proj, wide):
    key = tag("stage")
    with proj.batches.batch("antecedent") as b:
        b.enqueue(proj.sleep_then.s(1).set(queue=wide.queue))
    stage = proj.batches.continue_batch_with(
        b.id, "stage", lambda s: [s.enqueue(proj.concurrent.s(key, 0.05).set(queue=wide.queue)) for _ in range(12)],
        when="success", max_concurrency=3)
    assert proj.batches.get_batch(stage).status == BatchStatus.CREATED
    assert counters(proj.batches.wait(stage, timeout=WAIT)) == (BatchStatus.COMPLETED, 12, 12, 0, 0)
    assert 1 <= most_at_once(proj, key) <= 3


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "5"])
def test_max_concurrency_must_be_a_positive_integer(proj, bad):
    with pytest.raises(InvalidBatchError, match="max_concurrency"):
        with proj.batches.batch("bad", max_concurrency=bad):
            pass
