"""``cancel_on_failure``: the first failed unit cancels every unfinished run of the batch's subtree in
the transaction that counts it; the batch finishes FAILED and fires ``on_failure`` and
``on_complete`` once. On the session's real worker; jobs meant to stay pending go to a queue no
worker consumes.
"""

from __future__ import annotations

import pytest

from celery_batches import BatchClosedError, BatchStatus, InvalidBatchError, RunStatus
from celery_batches.dashboard import create_app
from tests.helpers import WAIT, Local, count, counters, drain, eventually, needs, tag, with_continuations

pytestmark = needs("postgres", "redis")


@needs("worker")
def test_the_first_failure_cancels_the_rest_of_the_subtree(proj, worker, nowhere):
    with proj.batches.batch("fail-fast", cancel_on_failure=True) as b:
        for i in range(30):
            b.enqueue(proj.noop.s(f"never-{i}").set(queue=nowhere))
        with b.batch("child") as child:
            for i in range(5):
                child.enqueue(proj.noop.s(f"never-child-{i}").set(queue=nowhere))
        b.enqueue(proj.fail)
        keys = with_continuations(b, proj)
    done = proj.batches.wait(b.id, timeout=WAIT)
    # 30 cancelled jobs, the failed one, and the child: all its runs cancelled, so it FAILED
    assert counters(done) == (BatchStatus.FAILED, 32, 0, 2, 30)
    assert counters(proj.batches.get_batch(child.id)) == (BatchStatus.FAILED, 5, 0, 0, 5)
    jobs = proj.batches.get_batch_jobs(b.id)
    assert sorted(j.status.name for j in jobs) == ["CANCELLED"] * 30 + ["FAILED"]
    assert all("cancel_on_failure" in j.error for j in jobs if j.status == RunStatus.CANCELLED)
    drain(proj)
    assert [count(proj, keys[k]) for k in ("success", "failure", "complete")] == [0, 1, 1]

    with pytest.raises(BatchClosedError):  # finished: closed like any finished batch
        proj.batches.add_jobs_to_batch(b.id, lambda more: more.enqueue(proj.noop))
    assert proj.batches.get_batch(b.id).cancel_on_failure and not proj.batches.get_batch(child.id).cancel_on_failure
    page = Local(create_app(proj.batches)).get(f"/batches/{b.id}").get_data(as_text=True)
    assert "<dt>fails fast</dt>" in page


@needs("worker")
def test_a_failure_racing_the_last_success_finishes_failed_once(proj, worker):
    created = []
    for _ in range(10):
        key = tag("race")
        with proj.batches.batch("race", cancel_on_failure=True) as b:
            b.enqueue(proj.barrier_fail, key, 2)
            b.enqueue(proj.barrier, key, 2)
            keys = with_continuations(b, proj)
        created.append((b.id, keys))
    for batch_id, _ in created:
        assert counters(proj.batches.wait(batch_id, timeout=WAIT)) == (BatchStatus.FAILED, 2, 1, 1, 0)
    drain(proj)
    for batch_id, keys in created:
        assert [count(proj, keys[k]) for k in ("success", "failure", "complete")] == [0, 1, 1], batch_id


@needs("worker")
def test_nothing_is_added_under_a_batch_failing_fast(proj, worker, nowhere):
    """While its running jobs finish, a failing batch's subtree takes no new jobs (they would escape the cancel)."""
    with proj.batches.batch("failing", cancel_on_failure=True) as b:
        b.enqueue(proj.fail)
        b.enqueue(proj.sleep_then, 8)  # running when the failure is counted: keeps the batch open
        with b.batch("child") as child:
            child.enqueue(proj.sleep_then, 8)
    eventually(lambda: proj.batches.get_batch(b.id).failed_jobs == 1, "the failure to be counted")
    for target in (b.id, child.id):
        with pytest.raises(BatchClosedError, match="cancel_on_failure"):
            proj.batches.add_jobs_to_batch(target, lambda more: more.enqueue(proj.noop.s("x").set(queue=nowhere)))
    proj.batches.cancel_batch(b.id)


def test_cancel_on_failure_must_be_a_bool(proj):
    with pytest.raises(InvalidBatchError, match="cancel_on_failure"):
        with proj.batches.batch("bad", cancel_on_failure="yes"):
            pass
