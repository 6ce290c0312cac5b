"""Add, cancel, continue-with, purge and the caller's transaction, against the real worker."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_batches import BatchClosedError, BatchNotFoundError, BatchStatus, InvalidBatchError, RunStatus
from celery_batches.builder import Message
from celery_batches.models import ContinuationStatus
from celery_batches.publish import publish
from celery_batches.store import utcnow
from tests.conftest import eventually
from tests.test_integration import count, drain, fired_once, tag, with_continuations

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
WAIT = 60.0


def nowhere() -> str:
    """A queue no worker consumes: its runs stay pending for as long as the test needs."""
    return f"nobody-{uuid.uuid4().hex}"


# -- add ---------------------------------------------------------------------------------------------
def test_add_jobs_nested_batches_and_continuations_to_a_running_batch(proj, worker):
    ran = tag("ran")
    with proj.batches.batch("grows") as b:
        first = b.enqueue(proj.sleep_then, 1.0, ran)
    ids = proj.batches.add_jobs_to_batch(b.id, lambda x: (x.enqueue(proj.noop, ran), x.enqueue(proj.noop, ran)))
    with proj.batches.reopen(b.id) as more:
        with more.batch("added-child") as child:
            child.enqueue(proj.noop, ran)
        key = tag("added-continuation")
        more.on_complete(proj.record, key)
    assert proj.batches.get_batch(b.id).total_jobs == 4  # 1 + 2 jobs + 1 nested batch
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert (done.status, done.total_jobs, done.completed_jobs) == (BatchStatus.COMPLETED, 4, 4)
    assert [j.id for j in proj.batches.get_batch_jobs(b.id)] == [first, *ids]
    assert [j.order for j in proj.batches.get_batch_jobs(b.id)] == [0, 1, 2]
    assert proj.batches.get_batch(child.id).status == BatchStatus.COMPLETED
    fired_once(proj, key)
    assert count(proj, ran) == 4


def test_adding_to_closed_unknown_or_malformed_batches_is_refused(proj, worker):
    with proj.batches.batch("done") as done:
        done.enqueue(proj.add, 1, 1)
    proj.batches.wait(done.id, timeout=WAIT)
    with pytest.raises(BatchClosedError):
        proj.batches.add_jobs_to_batch(done.id, lambda b: b.enqueue(proj.add, 1, 1))
    with proj.batches.batch("cancelled") as c:
        c.enqueue(proj.noop.s().set(queue=nowhere()))
    proj.batches.cancel_batch(c.id)
    with pytest.raises(BatchClosedError):
        with proj.batches.reopen(c.id) as b:
            b.enqueue(proj.add, 1, 1)
    with pytest.raises(BatchNotFoundError):
        proj.batches.add_jobs_to_batch(str(uuid.uuid4()), lambda b: None)
    with pytest.raises(InvalidBatchError):
        proj.batches.add_jobs_to_batch("nope", lambda b: None)
    with proj.batches.batch("open") as o:
        o.enqueue(proj.noop.s().set(queue=nowhere()))
    with pytest.raises(InvalidBatchError):
        proj.batches.add_jobs_to_batch(o.id, lambda b: (b.enqueue(proj.add, 1, 1), b.enqueue(proj.add, object())))
    assert proj.batches.get_batch(o.id).total_jobs == 1
    proj.batches.cancel_batch(o.id)


def test_a_member_adding_to_its_own_batch_until_a_limit(proj, worker):
    key, done_key = tag("crawl"), tag("complete")
    with proj.batches.batch("crawler") as b:
        b.enqueue(proj.crawl, key, 12)
        b.on_complete(proj.record, done_key)
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert (done.status, done.total_jobs, done.completed_jobs) == (BatchStatus.COMPLETED, 12, 12)
    assert count(proj, key) == 12
    fired_once(proj, done_key)


# -- cancel ------------------------------------------------------------------------------------------
def test_cancel_a_running_batch(proj, worker):
    started, pending = tag("started"), tag("pending")
    with proj.batches.batch("to-cancel") as b:
        b.enqueue(proj.sleep_then, 1.5, started)
        b.enqueue(proj.sleep_then, 1.5, started)
        for _ in range(20):
            b.enqueue(proj.sleep_then, 0, pending)
        with b.batch("child") as child:
            for _ in range(3):
                child.enqueue(proj.sleep_then, 0, pending)
            child_keys = with_continuations(child, proj)
        keys = with_continuations(b, proj)
    eventually(lambda: sum(j.status == RunStatus.RUNNING for j in proj.batches.get_batch_jobs(b.id)) == 2,
               "two members running", WAIT)
    cancelled = proj.batches.cancel_batch(b.id)
    now = proj.batches.get_batch(b.id)
    assert now.status == BatchStatus.CANCELLED and proj.batches.get_batch(child.id).status == BatchStatus.CANCELLED
    jobs = proj.batches.get_batch_jobs(b.id) + proj.batches.get_batch_jobs(child.id)
    assert cancelled == sum(j.status == RunStatus.CANCELLED for j in jobs) >= 20
    final = eventually(lambda: (x := proj.batches.get_batch(b.id)).pending_jobs == 0 and x, "running members", WAIT)
    assert final.status == BatchStatus.CANCELLED
    assert final.completed_jobs + final.cancelled_jobs == final.total_jobs == 23
    assert final.completed_jobs == 2 + (20 - (cancelled - 3))  # members that ran before the cancel
    drain(proj)
    assert count(proj, started) == 2
    assert count(proj, pending) == final.completed_jobs - 2 + proj.batches.get_batch(child.id).completed_jobs
    for k in (*keys.values(), *child_keys.values()):
        assert count(proj, k) == 0
    assert set(c.status for c in proj.batches.get_continuations(b.id)) == {ContinuationStatus.SKIPPED}
    assert proj.batches.cancel_batch(b.id) == 0  # already finished


def test_cancelling_a_nested_batch_counts_it_in_the_parent(proj, worker):
    with proj.batches.batch("parent") as b:
        with b.batch("stuck") as stuck:
            stuck.enqueue(proj.noop.s().set(queue=nowhere()))
        keys = with_continuations(b, proj)
    assert proj.batches.cancel_batch(stuck.id) == 1
    parent = proj.batches.get_batch(b.id)
    assert (parent.status, parent.cancelled_jobs) == (BatchStatus.FAILED, 1)
    fired_once(proj, keys["failure"])
    fired_once(proj, keys["complete"])
    assert count(proj, keys["success"]) == 0
    with pytest.raises(BatchNotFoundError):
        proj.batches.cancel_batch(str(uuid.uuid4()))


def test_a_cancelled_run_that_reaches_a_worker_is_skipped(proj, worker):
    ran = tag("ran")
    with proj.batches.batch("skip") as b:
        run_id = b.enqueue(proj.noop.s(ran).set(queue=nowhere()))
    assert proj.batches.cancel_batch(b.id) == 1
    # the message reaches a worker anyway (it missed the revoke broadcast): BatchTask skips it
    publish(proj.app, [Message(run_id, "tests.proj.noop", f'["{ran}"]', "{}", None, b.id)])
    drain(proj)
    assert count(proj, ran) == 0
    assert proj.app.AsyncResult(run_id).state == "REVOKED"
    assert proj.batches.get_batch(b.id).cancelled_jobs == 1


# -- continue-with -----------------------------------------------------------------------------------
def test_a_chain_of_stages(proj, worker):
    ran = tag("ran")
    with proj.batches.batch("stage-a") as a:
        a.enqueue(proj.sleep_then, 0.5, ran)
    b_id = proj.batches.continue_batch_with(a.id, "stage-b", lambda s: s.enqueue(proj.noop, ran))
    c_id = proj.batches.continue_batch_with(b_id, "stage-c", lambda s: s.enqueue(proj.noop, ran), when="success")
    assert proj.batches.get_batch(b_id).status == proj.batches.get_batch(c_id).status == BatchStatus.CREATED
    assert count(proj, ran) == 0
    for batch_id in (a.id, b_id, c_id):
        assert proj.batches.wait(batch_id, timeout=WAIT).status == BatchStatus.COMPLETED
    assert count(proj, ran) == 3
    a_done, b_done = proj.batches.get_batch(a.id), proj.batches.get_batch(b_id)
    assert a_done.completed_at <= min(j.started_at for j in proj.batches.get_batch_jobs(b_id))
    assert b_done.completed_at <= min(j.started_at for j in proj.batches.get_batch_jobs(c_id))


def test_stages_whose_condition_does_not_match_are_cancelled(proj, worker):
    ran = tag("ran")
    with proj.batches.batch("ok") as ok:
        ok.enqueue(proj.add, 1, 1)
    on_failure = proj.batches.continue_batch_with(ok.id, "if-failed", lambda s: s.enqueue(proj.noop, ran),
                                                  when="failure")
    with proj.batches.batch("bad") as bad:
        bad.enqueue(proj.fail)
    on_complete = proj.batches.continue_batch_with(bad.id, "always", lambda s: s.enqueue(proj.add, 2, 2),
                                                   when="complete")
    assert proj.batches.wait(on_failure, timeout=WAIT).status == BatchStatus.CANCELLED
    assert proj.batches.wait(on_complete, timeout=WAIT).status == BatchStatus.COMPLETED
    # an antecedent that already finished decides at once
    late = proj.batches.continue_batch_with(ok.id, "late", lambda s: s.enqueue(proj.add, 3, 3), when="success")
    assert proj.batches.get_batch(late).status == BatchStatus.STARTED
    assert proj.batches.wait(late, timeout=WAIT).status == BatchStatus.COMPLETED
    drain(proj)
    assert count(proj, ran) == 0
    with pytest.raises(InvalidBatchError):
        proj.batches.continue_batch_with(ok.id, "x", lambda s: None, when="sometimes")
    with pytest.raises(BatchNotFoundError):
        proj.batches.continue_batch_with(str(uuid.uuid4()), "x", lambda s: None)


def test_cancelling_an_antecedent_cancels_the_stages_waiting_on_it(proj, worker):
    ran = tag("ran")
    with proj.batches.batch("first") as a:
        a.enqueue(proj.noop.s().set(queue=nowhere()))
    b_id = proj.batches.continue_batch_with(a.id, "second", lambda s: s.enqueue(proj.noop, ran))
    c_id = proj.batches.continue_batch_with(b_id, "third", lambda s: s.enqueue(proj.noop, ran), when="complete")
    proj.batches.cancel_batch(a.id)
    assert [proj.batches.get_batch(i).status for i in (a.id, b_id, c_id)] == [BatchStatus.CANCELLED] * 3
    drain(proj)
    assert count(proj, ran) == 0


# -- expiry ------------------------------------------------------------------------------------------
def test_purge_deletes_expired_trees_only(proj, worker):
    with proj.batches.batch("old") as old:
        old.enqueue(proj.add, 1, 1)
        with old.batch("old-child") as old_child:
            old_child.enqueue(proj.add, 2, 2)
        old.on_success(proj.record, tag("purged"))
    with proj.batches.batch("open") as still_open:
        still_open.enqueue(proj.noop.s().set(queue=nowhere()))
    proj.batches.wait(old.id, timeout=WAIT)
    proj.batches.purge_expired()
    assert proj.batches.get_batch(old.id) is not None  # finished, but not expired yet
    b = proj.batches.store.t.batches
    with proj.batches.engine.begin() as conn:  # age them: as if expires_at had passed
        conn.execute(sa.update(b).where(b.c.id.in_([old.id, still_open.id]))
                     .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert proj.batches.purge_expired() == 2  # the root and its child; the open batch stays
    assert proj.batches.get_batch(old.id) is None and proj.batches.get_batch(old_child.id) is None
    assert proj.batches.get_batch_jobs(old.id) == [] and proj.batches.get_continuations(old.id) == []
    assert proj.batches.get_batch(still_open.id) is not None  # unfinished: never purged
    assert "celery_batches.purge_expired" in proj.app.tasks
    proj.batches.cancel_batch(still_open.id)


# -- the caller's transaction ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["connection", "session"])
def test_batch_in_the_callers_transaction(proj, worker, kind):
    ran, key = tag("ran"), tag("complete")

    def create(handle):
        with proj.batches.batch(f"tx-{kind}", connection=handle) as b:
            b.enqueue(proj.noop, ran)
            b.on_complete(proj.record, key)
        return b.id

    # committed: the batch exists and runs
    if kind == "connection":
        with proj.batches.engine.begin() as conn:
            committed = create(conn)
    else:
        with Session(proj.batches.engine) as session:
            committed = create(session)
            session.commit()
    assert proj.batches.wait(committed, timeout=WAIT).status == BatchStatus.COMPLETED
    fired_once(proj, key)

    # rolled back: nothing exists, nothing ever runs
    rolled_back = None
    if kind == "connection":
        with pytest.raises(RuntimeError):
            with proj.batches.engine.begin() as conn:
                rolled_back = create(conn)
                raise RuntimeError("the request failed")
    else:
        with Session(proj.batches.engine) as session:
            rolled_back = create(session)
            session.rollback()
    assert proj.batches.get_batch(rolled_back) is None
    drain(proj)
    assert count(proj, ran) == 1 and count(proj, key) == 1


def test_the_callers_connection_must_be_in_a_transaction(proj):
    with proj.batches.engine.connect() as conn:
        with pytest.raises(TypeError):
            with proj.batches.batch("x", connection=conn) as b:
                b.enqueue(proj.add, 1, 1)
    with pytest.raises(TypeError):
        with proj.batches.batch("x", connection=object()) as b:
            b.enqueue(proj.add, 1, 1)
