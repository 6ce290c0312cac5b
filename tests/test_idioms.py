"""Celery's own idioms inside a batch, on the session's real worker with Celery's defaults:
``Task.replace()``, ``Ignore``, ``Reject``, a continuation that retries, a task no worker knows, a
message a worker refuses. Each ends its run (or runs its continuation) at once, the way Celery ends
the task, without waiting for the reconciler, and the batch finishes.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from celery_batches import BatchStatus, RunStatus
from celery_batches.models import ContinuationStatus
from tests.helpers import WAIT, count, eventually, fired_once, needs, tag

pytestmark = [*needs("postgres", "redis", "worker"), pytest.mark.timeout(180)]
#: well before the reconciler would look at an open run (the test app's reconcile grace is 30 s):
#: what these tests wait for is the normal path, not the fallback
PROMPT = 20.0


def finished(proj, batch_id, timeout):
    done = proj.batches.wait(batch_id, timeout=timeout)
    return done, {j.id: j for j in proj.batches.get_batch_jobs(batch_id)}


@pytest.mark.parametrize("how", ["direct", "chain", "plain"])
def test_a_member_that_replaces_itself_is_followed_to_its_replacements_end(proj, worker, how):
    """The replacement of a member that replaces itself runs under the member's id (the last link of a
    chain does), is recorded as the run, and the batch finishes at once; nothing runs twice."""
    key, cont = tag("replaced"), tag("cont")
    with proj.batches.batch(f"replace-{how}") as b:
        if how == "plain":
            ids = [b.enqueue(proj.plain_replace_with, key) for _ in range(3)]
        else:
            ids = [b.enqueue(proj.replace_with, key, how) for _ in range(3)]
        b.enqueue(proj.noop)
        b.on_success(proj.record, cont)
    done, jobs = finished(proj, b.id, PROMPT)
    assert (done.status, done.completed_jobs) == (BatchStatus.COMPLETED, 4)
    assert count(proj, f"{key}:replaced") == 3 and count(proj, key) == 3, "each member and each replacement once"
    assert all(jobs[i].status == RunStatus.COMPLETED for i in ids)
    fired_once(proj, cont)


def test_a_replacing_member_of_a_results_batch_gives_the_replacements_value(proj, worker):
    with proj.batches.batch("replace-results", results=True) as b:
        b.enqueue(proj.replace_with, tag("replaced"), "chain")  # the chain ends with add(1, 2)
    done, _ = finished(proj, b.id, PROMPT)
    assert done.status == BatchStatus.COMPLETED
    assert [r.value for r in proj.batches.get_results(b.id)] == [3]


def test_ignore_ends_the_run_cancelled_or_as_the_task_recorded_it(proj, worker):
    """A member raising Ignore with no state of its own ends CANCELLED (it did not do its work); one
    that recorded SUCCESS or FAILURE itself (update_state, then Ignore: Celery's custom-state idiom)
    ends that way."""
    key = tag("ignored")
    with proj.batches.batch("ignore") as b:
        bare = b.enqueue(proj.ignores, key)
        succeeded = b.enqueue(proj.ignores, key, "SUCCESS")
        failed = b.enqueue(proj.ignores, key, "FAILURE")
    done, jobs = finished(proj, b.id, PROMPT)
    assert (done.status, done.completed_jobs, done.failed_jobs, done.cancelled_jobs) == (BatchStatus.FAILED, 1, 1, 1)
    assert jobs[bare].status == RunStatus.CANCELLED and "Ignore" in jobs[bare].error
    assert jobs[succeeded].status == RunStatus.COMPLETED and jobs[failed].status == RunStatus.FAILED
    assert count(proj, key) == 3


def test_reject_without_requeue_fails_the_run_and_with_requeue_runs_it_again(proj, worker):
    """Reject(requeue=False): Celery will not run it again, so the run FAILS at once. Reject(requeue=True):
    the message goes back to the broker and its next delivery runs it, the first delivery's claim
    notwithstanding."""
    dropped, again = tag("dropped"), tag("again")
    with proj.batches.batch("reject") as b:
        lost = b.enqueue(proj.rejects, dropped)
        requeued = b.enqueue(proj.rejects, again, 2)
    done, jobs = finished(proj, b.id, PROMPT)
    assert jobs[lost].status == RunStatus.FAILED and "rejected" in jobs[lost].error
    assert jobs[requeued].status == RunStatus.COMPLETED and count(proj, again) == 3
    assert (done.status, done.completed_jobs, done.failed_jobs) == (BatchStatus.FAILED, 1, 1)


def test_a_batches_task_continuation_that_retries_runs_to_its_end(proj, worker):
    """A @batches.task continuation that raises self.retry() runs again (the first delivery's claim
    does not skip the retry's) and ends DISPATCHED."""
    key = tag("retrying")
    with proj.batches.batch("continuation-retries") as b:
        b.enqueue(proj.noop)
        b.on_success(proj.retrying_continuation, key)
    fired_once(proj, key, timeout=PROMPT)
    assert count(proj, f"{key}:attempts") == 2
    [cont] = proj.batches.get_continuations(b.id)
    assert cont.status == ContinuationStatus.DISPATCHED


def test_a_member_no_worker_knows_or_whose_message_is_refused_fails_at_once(proj, worker):
    """Celery discards the message of a member whose task no worker has, or that the worker refuses
    (content it does not accept): its run FAILS at once, saying why."""
    with proj.batches.batch("unknown-and-refused") as b:
        unknown = b.enqueue("tests.proj.no_such_task", 1)
        refused = b.enqueue(proj.noop.s().set(serializer="pickle"))
        ok = b.enqueue(proj.noop)
    done, jobs = finished(proj, b.id, PROMPT)
    assert jobs[ok].status == RunStatus.COMPLETED
    assert jobs[unknown].status == RunStatus.FAILED and "tests.proj.no_such_task" in jobs[unknown].error
    assert jobs[refused].status == RunStatus.FAILED and "ContentDisallowed" in jobs[refused].error
    assert (done.status, done.failed_jobs) == (BatchStatus.FAILED, 2)


def test_a_continuation_no_worker_knows_is_failed_not_published_again(proj, worker):
    with proj.batches.batch("unknown-continuation") as b:
        b.enqueue(proj.noop)
        b.on_complete("tests.proj.no_such_continuation")
    proj.batches.wait(b.id, timeout=WAIT)
    c = proj.batches.transitions.tables.continuations

    def failed():
        with proj.batches.engine.connect() as conn:
            return conn.execute(sa.select(c.c.status, c.c.error).where(c.c.batch_id == b.id)).one()

    row = eventually(lambda: (found := failed()).status == int(ContinuationStatus.FAILED) and found,
                     "the continuation to be failed", PROMPT)
    assert "tests.proj.no_such_continuation" in row.error
