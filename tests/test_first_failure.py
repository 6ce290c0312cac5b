"""``on_first_failure``: once, at the first failed unit, without waiting for the rest; up the tree when
a nested batch fails; never when nothing fails or the batch is cancelled. On the session's real
worker (prefork, Redis, PostgreSQL); jobs meant to stay pending go to a queue no worker consumes.
"""

from __future__ import annotations


from celery_batches import BatchStatus
from celery_batches.models import ContinuationStatus
from tests.helpers import WAIT, continuations_become, count, drain, eventually, needs, tag

pytestmark = needs("postgres", "redis", "worker")


def test_fires_once_when_a_hundred_members_fail_together(proj, worker):
    first, failure, success = tag("first"), tag("failure"), tag("success")
    with proj.batches.batch("many-fail") as b:
        for i in range(100):
            b.enqueue(proj.fail)
        for i in range(20):
            b.enqueue(proj.add, i, i)
        b.on_first_failure(proj.record, first)
        b.on_failure(proj.record, failure)
        b.on_success(proj.record, success)
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert (done.status, done.failed_jobs, done.completed_jobs) == (BatchStatus.FAILED, 100, 20)
    drain(proj)
    assert (count(proj, first), count(proj, failure), count(proj, success)) == (1, 1, 0)


def test_fires_without_waiting_for_the_rest(proj, worker, nowhere):
    first, complete = tag("first"), tag("complete")
    with proj.batches.batch("early") as b:
        b.enqueue(proj.fail)
        b.enqueue(proj.noop.s("never").set(queue=nowhere))  # stays pending
        b.on_first_failure(proj.record, first)
        b.on_complete(proj.record, complete)
    eventually(lambda: count(proj, first) == 1, "the first-failure continuation to run")
    batch = proj.batches.get_batch(b.id)
    assert (batch.status, batch.failed_jobs, batch.pending_jobs) == (BatchStatus.STARTED, 1, 1)
    assert count(proj, complete) == 0

    # added to a batch whose first failure is behind it: due at once, with the add
    late = tag("late")
    proj.batches.add_jobs_to_batch(b.id, lambda more: more.on_first_failure(proj.record, late))
    eventually(lambda: count(proj, late) == 1, "the late first-failure continuation to run")
    proj.batches.cancel_batch(b.id)
    drain(proj)
    assert (count(proj, first), count(proj, late), count(proj, complete)) == (1, 1, 0)


def test_a_failed_nested_batch_is_its_parents_first_failure(proj, worker):
    outer, inner = tag("outer"), tag("inner")
    with proj.batches.batch("parent") as b:
        b.enqueue(proj.add, 1, 1)
        with b.batch("child") as child:
            child.enqueue(proj.fail)
            child.enqueue(proj.fail)
            child.on_first_failure(proj.record, inner)
        b.on_first_failure(proj.record, outer)
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.FAILED
    drain(proj)
    assert (count(proj, inner), count(proj, outer)) == (1, 1)
    assert proj.batches.get_batch(child.id).status == BatchStatus.FAILED


def test_never_fires_when_nothing_fails_or_the_batch_is_cancelled(proj, worker, nowhere):
    ok, cancelled = tag("ok"), tag("cancelled")
    with proj.batches.batch("all-good") as good:
        good.enqueue(proj.add, 1, 2)
        good.on_first_failure(proj.record, ok)
    with proj.batches.batch("cancelled") as gone:
        gone.enqueue(proj.noop.s("never").set(queue=nowhere))
        gone.on_first_failure(proj.record, cancelled)
    proj.batches.cancel_batch(gone.id)
    assert proj.batches.wait(good.id, timeout=WAIT).status == BatchStatus.COMPLETED
    continuations_become(proj.batches, good.id, [("first_failure", ContinuationStatus.SKIPPED)])
    continuations_become(proj.batches, gone.id, [("first_failure", ContinuationStatus.SKIPPED)])
    drain(proj)
    assert (count(proj, ok), count(proj, cancelled)) == (0, 0)
