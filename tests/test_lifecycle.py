"""The batch lifecycle against the real session worker (prefork -c 2 on the session queue).

Add to a running batch (from outside and from a member), cancel (running members, pending members,
nested batches, a cancelled run that still reaches a worker), continue-with chains, expiry and the
caller's transaction. Every test asserts exact final counters, and that each continuation fires
exactly once or never.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.orm import Session

from celery_batches import (
    BatchClosedError,
    Batches,
    BatchNotFoundError,
    BatchStatus,
    InvalidBatchError,
    RunStatus,
)
from celery_batches.models import ContinuationStatus
from celery_batches.store import RunEvent, utcnow
from tests.helpers import (TABLES, WAIT, continuation_states, continuations_become, count, counters, drain,
                           eventually, fired_once, memory_app, needs, never_fired, private_registry, publish,
                           row_counts, stored_message, tag, with_continuations)

pytestmark = [*needs("postgres", "redis"), pytest.mark.timeout(180)]


# -- helpers -------------------------------------------------------------------------------------------
def jobs(proj, batch_id: str) -> list:
    return proj.batches.get_batch_jobs(batch_id)


def statuses(proj, batch_id: str) -> list[RunStatus]:
    return [j.status for j in jobs(proj, batch_id)]


# -- 1. add to a running batch ----------------------------------------------------------------------------
@needs("worker")
def test_add_jobs_a_nested_batch_and_a_continuation_to_a_running_batch(proj, worker):
    ran, slow = tag("ran"), tag("slow")
    with proj.batches.batch("grows") as b:
        first = b.enqueue(proj.sleep_then, 1.0, slow)  # keeps the batch open
        second = b.enqueue(proj.noop, ran)
        keys = with_continuations(b, proj)
    assert proj.batches.get_batch(b.id).total_jobs == 2

    added = proj.batches.add_jobs_to_batch(b.id, lambda x: [x.enqueue(proj.noop, ran) for _ in range(3)])
    assert proj.batches.get_batch(b.id).total_jobs == 5
    with proj.batches.reopen(b.id) as more:
        last = more.enqueue("tests.proj.noop", tag=ran)
        with more.batch("added-child") as child:
            child.enqueue(proj.noop, ran)
            child.enqueue(proj.add, 1, 2)
            child_keys = with_continuations(child, proj)
        with more.batch("added-empty-child") as empty:  # finishes at once: counted as completed
            pass
        extra = tag("added-complete")
        more.on_complete(proj.record, extra)
        more.on_success(proj.record.s(extra_success := tag("added-success")))
    grown = proj.batches.get_batch(b.id)
    assert grown.total_jobs == 5 + 1 + 2  # one job and two nested batches
    assert not grown.is_finished  # the sleeper is still running
    assert proj.batches.get_batch(empty.id).status == BatchStatus.COMPLETED

    done = proj.batches.wait(b.id, timeout=WAIT)
    assert counters(done) == (BatchStatus.COMPLETED, 8, 8, 0, 0)
    assert counters(proj.batches.get_batch(child.id)) == (BatchStatus.COMPLETED, 2, 2, 0, 0)
    # run ids are the new jobs in enqueue order; positions continue after the existing ones
    assert len(added) == 3 and len(set(added)) == 3
    direct = jobs(proj, b.id)
    assert [j.id for j in direct] == [first, second, *added, last]
    assert [j.order for j in direct] == [0, 1, 2, 3, 4, 5]
    assert all(s == RunStatus.COMPLETED for s in statuses(proj, b.id))
    assert [j.order for j in jobs(proj, child.id)] == [0, 1]
    assert {j.parent_id for j in proj.batches.list_batches(parent_id=b.id)} == {b.id}
    for key in (keys["success"], keys["complete"], extra, extra_success,
                child_keys["success"], child_keys["complete"]):
        fired_once(proj, key)
    never_fired(proj, keys["failure"], child_keys["failure"])
    assert count(proj, ran) == 3 + 1 + 1 + 1 and count(proj, slow) == 1
    # two of success and of complete: the batch's own and the ones added by reopen
    continuations_become(proj.batches, b.id, [("complete", ContinuationStatus.DISPATCHED)] * 2
                         + [("failure", ContinuationStatus.SKIPPED)] + [("success", ContinuationStatus.DISPATCHED)] * 2)


@needs("worker")
def test_adding_to_a_nested_batch_grows_only_that_batch(proj, worker):
    slow = tag("slow")
    with proj.batches.batch("outer") as b:
        b.enqueue(proj.add, 1, 1)
        with b.batch("inner") as inner:
            inner.enqueue(proj.sleep_then, 0.8, slow)
        keys = with_continuations(b, proj)
    [new] = proj.batches.add_jobs_to_batch(inner.id, lambda x: x.enqueue(proj.add, 2, 2))
    assert proj.batches.get_batch(b.id).total_jobs == 2
    assert proj.batches.get_batch(inner.id).total_jobs == 2
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.COMPLETED, 2, 2, 0, 0)
    assert counters(proj.batches.get_batch(inner.id)) == (BatchStatus.COMPLETED, 2, 2, 0, 0)
    assert [j.id for j in jobs(proj, inner.id)][1] == new
    fired_once(proj, keys["success"])
    never_fired(proj, keys["failure"])


# -- 2. refused additions ---------------------------------------------------------------------------------
@needs("worker")
def test_adding_to_finished_cancelled_unknown_or_malformed_batches_is_refused(proj, worker, nowhere):
    ran = tag("ran")
    with proj.batches.batch("finished") as done:
        done.enqueue(proj.add, 1, 1)
    assert proj.batches.wait(done.id, timeout=WAIT).status == BatchStatus.COMPLETED
    with pytest.raises(BatchClosedError):
        proj.batches.add_jobs_to_batch(done.id, lambda b: b.enqueue(proj.noop, ran))
    with pytest.raises(BatchClosedError):
        with proj.batches.reopen(done.id) as b:
            b.enqueue(proj.noop, ran)
    assert counters(proj.batches.get_batch(done.id)) == (BatchStatus.COMPLETED, 1, 1, 0, 0)

    with proj.batches.batch("cancelled") as cancelled:
        cancelled.enqueue(proj.noop.s(ran).set(queue=nowhere))
    assert proj.batches.cancel_batch(cancelled.id) == 1
    with pytest.raises(BatchClosedError):
        proj.batches.add_jobs_to_batch(cancelled.id, lambda b: b.enqueue(proj.noop, ran))
    assert counters(proj.batches.get_batch(cancelled.id)) == (BatchStatus.CANCELLED, 1, 0, 0, 1)

    with pytest.raises(BatchNotFoundError):
        proj.batches.add_jobs_to_batch(str(uuid.uuid4()), lambda b: b.enqueue(proj.noop, ran))
    with pytest.raises(BatchNotFoundError):
        with proj.batches.reopen(str(uuid.uuid4())):
            pass
    for malformed in ("nope", "", "1234", None):
        with pytest.raises(InvalidBatchError):
            proj.batches.add_jobs_to_batch(malformed, lambda b: b.enqueue(proj.noop, ran))

    with proj.batches.batch("open") as still_open:
        still_open.enqueue(proj.noop.s(ran).set(queue=nowhere))
    # a bad job (after good ones) inside reopen: InvalidBatchError, nothing added or published
    with pytest.raises(InvalidBatchError) as info:
        with proj.batches.reopen(still_open.id) as b:
            b.enqueue(proj.noop, ran)
            with b.batch("nested") as nested:
                nested.enqueue(proj.noop, ran)
            b.enqueue(proj.noop, object())
    assert "job #2" in str(info.value)
    with pytest.raises(InvalidBatchError):
        proj.batches.add_jobs_to_batch(still_open.id, lambda b: (b.enqueue(proj.noop, ran),
                                                                 b.add_batch("", lambda c: None)))
    with pytest.raises(RuntimeError):  # any error in the block: nothing added
        with proj.batches.reopen(still_open.id) as b:
            b.enqueue(proj.noop, ran)
            raise RuntimeError("the caller's code failed")
    now = proj.batches.get_batch(still_open.id)
    assert counters(now) == (BatchStatus.STARTED, 1, 0, 0, 0)
    assert len(jobs(proj, still_open.id)) == 1 and proj.batches.list_batches(parent_id=still_open.id) == []

    # the batch is cancelled while a reopen block is open: refused at exit (under the row lock)
    with pytest.raises(BatchClosedError):
        with proj.batches.reopen(still_open.id) as b:
            b.enqueue(proj.noop, ran)
            assert proj.batches.cancel_batch(still_open.id) == 1
    assert counters(proj.batches.get_batch(still_open.id)) == (BatchStatus.CANCELLED, 1, 0, 0, 1)
    assert len(jobs(proj, still_open.id)) == 1
    never_fired(proj, ran)


# -- 3. a member adding to its own batch ------------------------------------------------------------------
@needs("worker")
def test_a_member_adding_to_its_own_batch_until_a_limit(proj, worker):
    limit = 10
    key, done_key, success_key = tag("crawl"), tag("complete"), tag("success")
    with proj.batches.batch("crawler") as b:
        b.enqueue(proj.crawl, key, limit)
        b.on_complete(proj.record, done_key)
        b.on_success(proj.record, success_key)
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert counters(done) == (BatchStatus.COMPLETED, limit, limit, 0, 0)
    crawled = jobs(proj, b.id)
    assert [j.order for j in crawled] == list(range(limit))
    assert all(j.status == RunStatus.COMPLETED and j.task_name == "tests.proj.crawl" for j in crawled)
    assert count(proj, key) == limit
    fired_once(proj, done_key)
    fired_once(proj, success_key)
    # only after all of them: every member finished before the batch did, and the batch before its continuations
    assert max(j.finished_at for j in crawled) <= done.completed_at
    def flagged() -> list:
        cs = proj.batches.get_continuations(b.id)
        return cs if all(c.dispatched_at for c in cs) else []
    dispatched = eventually(flagged, "the continuations to be flagged dispatched", WAIT)
    assert len(dispatched) == 2 and all(c.dispatched_at >= done.completed_at for c in dispatched)


# -- 4. cancel --------------------------------------------------------------------------------------------
@needs("worker")
def test_cancel_a_batch_with_running_and_pending_members(proj, worker):
    started, pending = tag("started"), tag("pending")
    with proj.batches.batch("to-cancel") as b:
        running = [b.enqueue(proj.sleep_then, 1.5, started) for _ in range(2)]  # both pool processes
        for _ in range(20):
            b.enqueue(proj.sleep_then, 0, pending)
        with b.batch("child") as child:
            for _ in range(3):
                child.enqueue(proj.sleep_then, 0, pending)
            child_keys = with_continuations(child, proj)
        keys = with_continuations(b, proj)
    eventually(lambda: statuses(proj, b.id)[:2] == [RunStatus.RUNNING] * 2, "both sleepers to run", WAIT)
    assert set(statuses(proj, b.id)[2:]) == {RunStatus.PENDING}  # the pool is busy: nothing else started

    cancelled = proj.batches.cancel_batch(b.id)
    # at once: both batches CANCELLED, every pending run CANCELLED and counted
    root, kid = proj.batches.get_batch(b.id), proj.batches.get_batch(child.id)
    assert cancelled == 23
    assert cancelled == sum(s == RunStatus.CANCELLED for s in statuses(proj, b.id) + statuses(proj, child.id))
    assert counters(root) == (BatchStatus.CANCELLED, 23, 0, 0, 21) and root.pending_jobs == 2
    assert counters(kid) == (BatchStatus.CANCELLED, 3, 0, 0, 3)
    assert root.completed_at is not None and kid.completed_at is not None
    assert proj.batches.wait(b.id, timeout=1).status == BatchStatus.CANCELLED

    # the running members finish and are recorded; the batch stays CANCELLED and fires nothing
    final = eventually(lambda: (x := proj.batches.get_batch(b.id)).completed_jobs == 2 and x,
                       "the running members to finish", WAIT)
    assert counters(final) == (BatchStatus.CANCELLED, 23, 2, 0, 21)
    assert final.total_jobs == final.completed_jobs + final.failed_jobs + final.cancelled_jobs
    assert [j.status for j in jobs(proj, b.id) if j.id in running] == [RunStatus.COMPLETED] * 2
    never_fired(proj, *keys.values(), *child_keys.values())
    assert count(proj, started) == 2 and count(proj, pending) == 0  # pending members never executed
    assert counters(proj.batches.get_batch(b.id)) == (BatchStatus.CANCELLED, 23, 2, 0, 21)
    assert counters(proj.batches.get_batch(child.id)) == (BatchStatus.CANCELLED, 3, 0, 0, 3)
    assert continuation_states(proj.batches, b.id) == continuation_states(proj.batches, child.id) == [
        (kind, ContinuationStatus.SKIPPED) for kind in ("complete", "failure", "success")]
    # cancelling again, or cancelling a finished batch, cancels nothing
    assert proj.batches.cancel_batch(b.id) == 0
    with proj.batches.batch("finished") as f:
        f.enqueue(proj.add, 1, 1)
    proj.batches.wait(f.id, timeout=WAIT)
    assert proj.batches.cancel_batch(f.id) == 0
    assert counters(proj.batches.get_batch(f.id)) == (BatchStatus.COMPLETED, 1, 1, 0, 0)
    with pytest.raises(BatchNotFoundError):
        proj.batches.cancel_batch(str(uuid.uuid4()))
    with pytest.raises(InvalidBatchError):
        proj.batches.cancel_batch("not-a-batch")


@needs("worker")
def test_cancelling_a_nested_batch_counts_one_cancelled_unit_in_the_parent(proj, worker, nowhere):
    ran = tag("ran")
    # the child is the parent's last unit: the parent finishes FAILED at once
    with proj.batches.batch("parent") as p:
        p.enqueue(proj.add, 1, 1)
        with p.batch("stuck") as stuck:
            stuck.enqueue(proj.noop.s(ran).set(queue=nowhere))
            stuck.enqueue(proj.noop.s(ran).set(queue=nowhere))
            stuck_keys = with_continuations(stuck, proj)
        keys = with_continuations(p, proj)
    eventually(lambda: proj.batches.get_batch(p.id).completed_jobs == 1, "the quick member", WAIT)
    assert proj.batches.cancel_batch(stuck.id) == 2
    assert counters(proj.batches.get_batch(stuck.id)) == (BatchStatus.CANCELLED, 2, 0, 0, 2)
    assert counters(proj.batches.get_batch(p.id)) == (BatchStatus.FAILED, 2, 1, 0, 1)
    fired_once(proj, keys["failure"])
    fired_once(proj, keys["complete"])
    never_fired(proj, keys["success"], *stuck_keys.values(), ran)

    # the child is not the last unit: the parent goes on, then finishes FAILED
    slow = tag("slow")
    with proj.batches.batch("parent-2") as p2:
        p2.enqueue(proj.sleep_then, 0.8, slow)
        with p2.batch("stuck-2") as stuck2:
            stuck2.enqueue(proj.noop.s(ran).set(queue=nowhere))
        keys2 = with_continuations(p2, proj)
    assert proj.batches.cancel_batch(stuck2.id) == 1
    assert counters(proj.batches.get_batch(p2.id)) == (BatchStatus.STARTED, 2, 0, 0, 1)
    assert counters(proj.batches.wait(p2.id, timeout=WAIT)) == (BatchStatus.FAILED, 2, 1, 0, 1)
    fired_once(proj, keys2["failure"])
    fired_once(proj, keys2["complete"])
    never_fired(proj, keys2["success"], ran)
    assert count(proj, slow) == 1
    # cancelling the parent now changes nothing (finished), nor does cancelling the child again
    assert proj.batches.cancel_batch(p2.id) == 0 and proj.batches.cancel_batch(stuck2.id) == 0
    assert counters(proj.batches.get_batch(p2.id)) == (BatchStatus.FAILED, 2, 1, 0, 1)


# -- 5. a cancelled run that still reaches a worker -------------------------------------------------------
@needs("worker")
def test_a_cancelled_run_that_reaches_a_worker_is_not_executed(proj, worker, nowhere):
    """Revoke broadcast received: the worker's revoked set discards the message."""
    ran = tag("ran")
    with proj.batches.batch("skip") as b:
        run_ids = [b.enqueue(proj.noop.s(ran).set(queue=nowhere)) for _ in range(3)]
        keys = with_continuations(b, proj)
    assert proj.batches.cancel_batch(b.id) == 3
    assert publish(proj.app, [stored_message(proj, run_ids[0], b.id)]) == [run_ids[0]]
    never_fired(proj, ran, *keys.values())
    assert proj.app.AsyncResult(run_ids[0]).state == "REVOKED"
    assert counters(proj.batches.get_batch(b.id)) == (BatchStatus.CANCELLED, 3, 0, 0, 3)
    assert statuses(proj, b.id) == [RunStatus.CANCELLED] * 3


@needs("worker")
def test_a_cancelled_run_that_missed_the_revoke_is_skipped_by_batch_task(proj, worker, nowhere, monkeypatch):
    """Revoke broadcast missed (muted here): BatchTask.before_start reads the registry and skips it."""
    ran = tag("ran")
    with proj.batches.batch("skip-no-revoke") as b:
        run_ids = [b.enqueue(proj.noop.s(ran).set(queue=nowhere)) for _ in range(3)]
        keys = with_continuations(b, proj)
    revoked: list = []
    monkeypatch.setattr(proj.app.control, "revoke", lambda ids, **kw: revoked.append(ids))
    assert proj.batches.cancel_batch(b.id) == 3
    assert sorted(revoked[0]) == sorted(run_ids)  # what would have been broadcast
    sent = publish(proj.app, [stored_message(proj, run_id, b.id) for run_id in run_ids[:2]])
    assert sent == run_ids[:2]
    eventually(lambda: all(proj.app.AsyncResult(i).state == "REVOKED" for i in sent), "the skips", WAIT)
    never_fired(proj, ran, *keys.values())
    assert counters(proj.batches.get_batch(b.id)) == (BatchStatus.CANCELLED, 3, 0, 0, 3)
    assert statuses(proj, b.id) == [RunStatus.CANCELLED] * 3


def test_the_delivery_check_survives_a_registry_connection_killed_under_it(proj, nowhere):
    """The pool hands BatchTask's delivery check a connection whose backend is gone (killed after the
    pool's pre-ping): the read is repeated on a fresh connection instead of failing the member."""
    with proj.batches.batch("cancel-check-killed") as b:
        b.enqueue(proj.noop.s(tag("ran")).set(queue=nowhere))
    assert proj.batches.cancel_batch(b.id) == 1
    [run] = jobs(proj, b.id)
    killed: list[int] = []
    other = sa.create_engine(proj.batches.engine.url, poolclass=sa.pool.NullPool)

    def kill_once(dbapi_conn, _record, _proxy) -> None:
        if killed:
            return
        killed.append(dbapi_conn.info.backend_pid)
        with other.begin() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": killed[0]})

        def gone() -> bool:  # a fresh transaction each time: pg_stat_activity is a per-transaction snapshot
            with other.connect() as conn:
                return not conn.scalar(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"),
                                       {"p": killed[0]})
        eventually(gone, "the backend to exit", WAIT)

    claims = proj.batches.liveness.claim_engine  # the check is the run's claim, on the claim connections
    sa.event.listen(claims, "checkout", kill_once)
    try:
        assert proj.batches.node.verdict(run.id, None) == "cancel"
    finally:
        sa.event.remove(claims, "checkout", kill_once)
        other.dispose()
    assert killed, "no connection was killed; nothing was tested"


def test_a_claim_waits_for_an_unreachable_registry_instead_of_running_unrecorded(pgbouncer, caplog):
    """A member's claim waits for an unreachable registry (its PgBouncer stopped): the member starts,
    its claim written, only once the registry answers again."""
    bouncer = pgbouncer(pool_size=2)
    app = memory_app("waits")
    with private_registry(app, "cbt_wait") as direct:
        through = Batches(app, database_url=bouncer.url(os.environ["TEST_DATABASE_URL"]),
                          table_prefix=direct.settings.table_prefix, relay_interval=0)
        try:
            with direct.batch("claim-waits") as b:
                run = b.enqueue(app.signature("tests.proj.noop"))
            bouncer.stop()  # the registry is unreachable for this worker
            verdicts: list[str] = []
            starting = threading.Thread(target=lambda: verdicts.append(through.node.verdict(run, None)))
            starting.start()
            starting.join(1.5)
            assert starting.is_alive() and not verdicts, "the member started with no claim written"
            bouncer.start()  # back, on the same address
            starting.join(30)
            assert verdicts == ["run"]
            assert direct.get_batch_jobs(b.id)[0].status == RunStatus.RUNNING
        finally:
            through.engine.dispose()
    assert "claim failed" in caplog.text


@needs("worker")
def test_a_running_member_whose_next_attempt_is_skipped_is_counted_cancelled(proj, worker, nowhere):
    ran = tag("ran")
    with proj.batches.batch("attempt-after-cancel") as b:
        running = b.enqueue(proj.noop.s(ran).set(queue=nowhere))
        b.enqueue(proj.noop.s(ran).set(queue=nowhere))
    # the first attempt is running on a worker: what its task_prerun signal records
    proj.batches.node.write_events([RunEvent(running, RunStatus.RUNNING)])
    assert proj.batches.cancel_batch(b.id) == 1  # the pending one; the running one goes on
    # the attempt ends in self.retry() (or its node dies, acks_late): the same message comes again
    publish(proj.app, [stored_message(proj, running, b.id)])
    eventually(lambda: proj.app.AsyncResult(running).state == "REVOKED", "the skip", WAIT)
    drain(proj)
    assert count(proj, ran) == 0  # skipped, as it must be
    eventually(lambda: statuses(proj, b.id)[0].is_final, "the skipped run to be recorded final", 3)
    assert statuses(proj, b.id) == [RunStatus.CANCELLED] * 2
    assert counters(proj.batches.get_batch(b.id)) == (BatchStatus.CANCELLED, 2, 0, 0, 2)


# -- 6. continue-with -------------------------------------------------------------------------------------
@needs("worker")
def test_a_chain_of_three_stages_starts_in_order(proj, worker):
    a_ran, b_ran, c_ran, added = tag("a"), tag("b"), tag("c"), tag("added")
    with proj.batches.batch("stage-a") as a:
        a.enqueue(proj.sleep_then, 1.2, a_ran)
        a.enqueue(proj.add, 1, 1)
    b_id = proj.batches.continue_batch_with(a.id, "stage-b",
                                            lambda s: [s.enqueue(proj.noop, b_ran) for _ in range(3)])

    def stage_c(s) -> None:
        s.enqueue(proj.noop, c_ran)
        s.add_batch("c-inner", lambda inner: inner.enqueue(proj.noop, c_ran))
        with_continuations(s, proj)

    c_id = proj.batches.continue_batch_with(b_id, "stage-c", stage_c, when="success")
    c_keys = {c.kind.value: c.args[0] for c in proj.batches.get_continuations(c_id)}
    # B and C wait, CREATED, their runs unpublished; stages can be added to while waiting
    [late] = proj.batches.add_jobs_to_batch(b_id, lambda s: s.enqueue(proj.noop, added))
    for stage, total in ((b_id, 4), (c_id, 2)):
        assert counters(proj.batches.get_batch(stage)) == (BatchStatus.CREATED, total, 0, 0, 0)
    assert set(statuses(proj, b_id)) == set(statuses(proj, c_id)) == {RunStatus.PENDING}
    [c_inner] = proj.batches.list_batches(parent_id=c_id)
    assert c_inner.status == BatchStatus.CREATED
    drain(proj)  # one pool process is free: anything of B or C published would have run by now
    assert not proj.batches.get_batch(a.id).is_finished, "stage A finished too early for this test"
    assert count(proj, b_ran) == count(proj, c_ran) == count(proj, added) == 0

    done = {i: proj.batches.wait(i, timeout=WAIT) for i in (a.id, b_id, c_id)}
    assert counters(done[a.id]) == (BatchStatus.COMPLETED, 2, 2, 0, 0)
    assert counters(done[b_id]) == (BatchStatus.COMPLETED, 4, 4, 0, 0)
    assert counters(done[c_id]) == (BatchStatus.COMPLETED, 2, 2, 0, 0)
    assert counters(proj.batches.get_batch(c_inner.id)) == (BatchStatus.COMPLETED, 1, 1, 0, 0)
    assert jobs(proj, b_id)[-1].id == late
    # in order: each stage's jobs started only after its antecedent finished
    assert done[a.id].completed_at <= min(j.started_at for j in jobs(proj, b_id))
    assert done[b_id].completed_at <= min(j.started_at for j in jobs(proj, c_id))
    assert done[a.id].completed_at <= done[b_id].completed_at <= done[c_id].completed_at
    fired_once(proj, c_keys["success"])
    fired_once(proj, c_keys["complete"])
    never_fired(proj, c_keys["failure"])
    assert (count(proj, a_ran), count(proj, b_ran), count(proj, added), count(proj, c_ran)) == (1, 3, 1, 2)


@needs("worker")
def test_stages_start_or_are_cancelled_by_the_antecedents_outcome(proj, worker, nowhere):
    never, ok_ran = tag("never"), tag("ok")
    with proj.batches.batch("will-complete") as ok:
        ok.enqueue(proj.sleep_then, 0.5)
    with proj.batches.batch("will-fail") as bad:
        bad.enqueue(proj.sleep_then, 0.5)
        bad.enqueue(proj.fail)
    if_failed = proj.batches.continue_batch_with(ok.id, "if-failed", lambda s: s.enqueue(proj.noop, never),
                                                 when="failure")
    after_if_failed = proj.batches.continue_batch_with(if_failed, "after", lambda s: s.enqueue(proj.noop, never),
                                                       when="complete")
    if_ok = proj.batches.continue_batch_with(bad.id, "if-ok", lambda s: s.enqueue(proj.noop, never))
    always = proj.batches.continue_batch_with(bad.id, "always", lambda s: s.enqueue(proj.noop, ok_ran),
                                              when="complete")
    assert {proj.batches.get_batch(i).status for i in (if_failed, after_if_failed, if_ok, always)} == {
        BatchStatus.CREATED}
    assert counters(proj.batches.wait(if_failed, timeout=WAIT)) == (BatchStatus.CANCELLED, 1, 0, 0, 1)
    assert statuses(proj, if_failed) == [RunStatus.CANCELLED]
    # a stage waiting on a cancelled stage is cancelled with it
    assert counters(proj.batches.get_batch(after_if_failed)) == (BatchStatus.CANCELLED, 1, 0, 0, 1)
    assert counters(proj.batches.wait(if_ok, timeout=WAIT)) == (BatchStatus.CANCELLED, 1, 0, 0, 1)
    assert counters(proj.batches.wait(always, timeout=WAIT)) == (BatchStatus.COMPLETED, 1, 1, 0, 0)
    assert proj.batches.get_batch(bad.id).status == BatchStatus.FAILED

    # an antecedent that already finished decides at once
    late_ok = proj.batches.continue_batch_with(ok.id, "late-ok", lambda s: s.enqueue(proj.noop, ok_ran))
    assert proj.batches.get_batch(late_ok).status in (BatchStatus.STARTED, BatchStatus.COMPLETED)
    late_no = proj.batches.continue_batch_with(ok.id, "late-no", lambda s: s.enqueue(proj.noop, never),
                                               when="failure")
    assert counters(proj.batches.get_batch(late_no)) == (BatchStatus.CANCELLED, 1, 0, 0, 1)
    late_fail = proj.batches.continue_batch_with(bad.id, "late-fail", lambda s: s.enqueue(proj.noop, ok_ran),
                                                 when="failure")
    assert proj.batches.get_batch(late_fail).status in (BatchStatus.STARTED, BatchStatus.COMPLETED)
    late_empty = proj.batches.continue_batch_with(ok.id, "late-empty", lambda s: None, when="complete")
    assert counters(proj.batches.get_batch(late_empty)) == (BatchStatus.COMPLETED, 0, 0, 0, 0)
    # a cancelled antecedent matches no `when`
    with proj.batches.batch("cancelled") as gone:
        gone.enqueue(proj.noop.s(never).set(queue=nowhere))
    proj.batches.cancel_batch(gone.id)
    for when in ("success", "failure", "complete"):
        stage = proj.batches.continue_batch_with(gone.id, f"after-cancel-{when}",
                                                 lambda s: s.enqueue(proj.noop, never), when=when)
        assert counters(proj.batches.get_batch(stage)) == (BatchStatus.CANCELLED, 1, 0, 0, 1)
    for stage in (late_ok, late_fail):
        assert counters(proj.batches.wait(stage, timeout=WAIT)) == (BatchStatus.COMPLETED, 1, 1, 0, 0)
    never_fired(proj, never)
    assert count(proj, ok_ran) == 3


@needs("worker")
def test_cancelling_the_antecedent_cancels_the_waiting_stages(proj, worker):
    slow, never = tag("slow"), tag("never")
    with proj.batches.batch("first") as a:
        a.enqueue(proj.sleep_then, 0.8, slow)
        a.enqueue(proj.sleep_then, 0.8, slow)
        a.enqueue(proj.noop, never)  # pending behind the two sleepers
    b_id = proj.batches.continue_batch_with(a.id, "second", lambda s: [s.enqueue(proj.noop, never) for _ in range(2)])
    c_id = proj.batches.continue_batch_with(
        b_id, "third", lambda s: (s.enqueue(proj.noop, never), with_continuations(s, proj)), when="complete")
    c_keys = [c.args[0] for c in proj.batches.get_continuations(c_id)]
    eventually(lambda: statuses(proj, a.id)[:2] == [RunStatus.RUNNING] * 2, "the sleepers", WAIT)
    assert proj.batches.cancel_batch(a.id) == 1 + 2 + 1  # A's pending run and every run of B and C
    assert counters(proj.batches.get_batch(a.id)) == (BatchStatus.CANCELLED, 3, 0, 0, 1)
    assert counters(proj.batches.get_batch(b_id)) == (BatchStatus.CANCELLED, 2, 0, 0, 2)
    assert counters(proj.batches.get_batch(c_id)) == (BatchStatus.CANCELLED, 1, 0, 0, 1)
    eventually(lambda: proj.batches.get_batch(a.id).completed_jobs == 2, "the sleepers to finish", WAIT)
    never_fired(proj, never, *c_keys)
    assert counters(proj.batches.get_batch(a.id)) == (BatchStatus.CANCELLED, 3, 2, 0, 1)
    assert counters(proj.batches.get_batch(b_id)) == (BatchStatus.CANCELLED, 2, 0, 0, 2)
    assert count(proj, slow) == 2


@needs("worker")
def test_continue_with_refuses_bad_input_and_writes_nothing(proj, worker):
    with proj.batches.batch("antecedent") as a:
        a.enqueue(proj.add, 1, 1)
    name = f"refused-{uuid.uuid4().hex}"
    with pytest.raises(InvalidBatchError):
        proj.batches.continue_batch_with(a.id, name, lambda s: s.enqueue(proj.add, 1, 1), when="sometimes")
    with pytest.raises(BatchNotFoundError):
        proj.batches.continue_batch_with(str(uuid.uuid4()), name, lambda s: s.enqueue(proj.add, 1, 1))
    with pytest.raises(InvalidBatchError):
        proj.batches.continue_batch_with("not-a-batch", name, lambda s: s.enqueue(proj.add, 1, 1))
    with pytest.raises(InvalidBatchError):
        proj.batches.continue_batch_with(a.id, name, lambda s: s.enqueue(proj.add, object()))
    assert proj.batches.list_batches(name=name) == []
    assert proj.batches.wait(a.id, timeout=WAIT).status == BatchStatus.COMPLETED


# -- 7. expiry --------------------------------------------------------------------------------------------
def _age(proj, *batch_ids: str) -> None:
    """As if ``expires_at`` had passed for these batches (and only these)."""
    b = proj.batches.transitions.tables.batches
    with proj.batches.engine.begin() as conn:
        conn.execute(sa.update(b).where(b.c.id.in_(batch_ids)).values(expires_at=utcnow() - timedelta(seconds=1)))


@needs("worker")
def test_purge_expired_deletes_expired_finished_trees_only(proj, worker, nowhere):
    with proj.batches.batch("old") as old:
        old.enqueue(proj.add, 1, 1)
        with old.batch("old-child") as old_child:
            old_child.enqueue(proj.add, 2, 2)
            with old_child.batch("old-grandchild") as old_grandchild:
                old_grandchild.enqueue(proj.add, 3, 3)
            with_continuations(old_child, proj)
        keys = with_continuations(old, proj)
    stage = proj.batches.continue_batch_with(old.id, "next", lambda s: s.enqueue(proj.add, 4, 4))
    with proj.batches.batch("unfinished") as unfinished:
        unfinished.enqueue(proj.noop.s().set(queue=nowhere))
    for batch_id in (old.id, stage):
        assert proj.batches.wait(batch_id, timeout=WAIT).status == BatchStatus.COMPLETED
    fired_once(proj, keys["success"])
    tree = (old.id, old_child.id, old_grandchild.id)
    run_ids = [j.id for i in tree for j in jobs(proj, i)]
    assert len(run_ids) == 3

    assert proj.batches.purge_expired() == 0  # finished 7 days from expiry: nothing to purge
    _age(proj, old_child.id, old_grandchild.id, unfinished.id)  # only roots are purged, finished ones only
    assert proj.batches.purge_expired() == 0
    assert all(proj.batches.get_batch(i) is not None for i in (*tree, unfinished.id))

    _age(proj, old.id)
    assert proj.batches.purge_expired() == 3  # the root, its child and its grandchild
    for batch_id in tree:
        assert proj.batches.get_batch(batch_id) is None
        assert proj.batches.get_batch_jobs(batch_id) == [] and proj.batches.get_continuations(batch_id) == []
    assert row_counts(proj.batches, batch_ids=tree) == dict.fromkeys(TABLES, 0)  # runs included
    assert proj.batches.list_batches(parent_id=old.id) == []
    # the continue-with stage outlives its purged antecedent; the unfinished batch is untouched
    assert counters(proj.batches.get_batch(stage)) == (BatchStatus.COMPLETED, 1, 1, 0, 0)
    assert len(jobs(proj, stage)) == 1
    assert counters(proj.batches.get_batch(unfinished.id)) == (BatchStatus.STARTED, 1, 0, 0, 0)
    assert proj.batches.purge_expired() == 0

    # the task the app registers for celery beat, run by the worker
    assert "celery_batches.purge_expired" in proj.app.tasks
    _age(proj, stage)
    proj.app.send_task("celery_batches.purge_expired")
    eventually(lambda: proj.batches.get_batch(stage) is None, "the purge task", WAIT)
    assert proj.batches.get_batch(unfinished.id) is not None
    assert proj.batches.cancel_batch(unfinished.id) == 1


@needs("worker")
def test_purge_honours_a_short_expiry(proj, worker):
    """A registry with ``expires=0.5`` on the same tables: what it finishes expires 0.5 s later.

    Built on its own Celery app (same broker and queue), so the session's ``proj.app`` keeps its
    own ``celery_batches`` and purge task.
    """
    app = Celery("purger", broker=proj.app.conf.broker_url, set_as_current=False)
    app.conf.task_default_queue = proj.app.conf.task_default_queue
    short = Batches(app, database_url=proj.batches.engine.url.render_as_string(hide_password=False),
                    table_prefix=proj.batches.settings.table_prefix, expires=0.5, relay_interval=0)
    try:
        success = tag("success")
        with short.batch("short-lived") as b:  # empty: finishes at once, in this process
            with b.batch("short-lived-child"):
                pass
            b.on_success("tests.proj.record", success)
        done = short.get_batch(b.id)
        assert counters(done) == (BatchStatus.COMPLETED, 1, 1, 0, 0)
        assert done.expires_at - done.completed_at == timedelta(seconds=0.5)
        fired_once(proj, success)
        [child] = proj.batches.list_batches(parent_id=b.id)
        deleted = 0

        def purged() -> bool:
            nonlocal deleted
            deleted += short.purge_expired()
            return short.get_batch(b.id) is None

        eventually(purged, "the short expiry to pass", 10, interval=0.1)
        assert deleted == 2
        assert proj.batches.get_batch(b.id) is None and proj.batches.get_batch(child.id) is None
        assert proj.batches.get_continuations(b.id) == []
    finally:
        short.engine.dispose()


# -- 8. the caller's transaction --------------------------------------------------------------------------
def _create(proj, handle, ran: str, key: str) -> str:
    with proj.batches.batch(f"tx-{uuid.uuid4().hex[:8]}", connection=handle) as b:
        b.enqueue(proj.noop, ran)
        with b.batch("tx-child") as child:
            child.enqueue(proj.noop, ran)
        b.on_complete(proj.record, key)
    return b.id


def _ran_once(proj, batch_id: str, ran: str, key: str) -> None:
    assert counters(proj.batches.wait(batch_id, timeout=WAIT)) == (BatchStatus.COMPLETED, 2, 2, 0, 0)
    fired_once(proj, key)
    assert count(proj, ran) == 2


def _never_existed(proj, batch_id: str, ran: str, key: str) -> None:
    assert proj.batches.get_batch(batch_id) is None
    never_fired(proj, ran, key)


@needs("worker")
def test_a_batch_in_the_callers_committed_connection(proj, worker):
    ran, key = tag("ran"), tag("complete")
    with proj.batches.engine.begin() as conn:
        batch_id = _create(proj, conn, ran, key)
        assert proj.batches.get_batch(batch_id) is None  # not visible before the caller commits
    _ran_once(proj, batch_id, ran, key)


@needs("worker")
def test_a_batch_in_the_callers_rolled_back_connection(proj, worker):
    ran, key = tag("ran"), tag("complete")
    batch_id = None
    with pytest.raises(RuntimeError):
        with proj.batches.engine.begin() as conn:
            batch_id = _create(proj, conn, ran, key)
            raise RuntimeError("the request failed after the batch block")
    _never_existed(proj, batch_id, ran, key)


@needs("worker")
def test_a_batch_in_a_rolled_back_savepoint_of_a_committed_connection(proj, worker, monkeypatch):
    # after the outer commit the publisher waits up to publish_lease for the batch to become visible:
    # shortened here so that wait ends (without publishing) inside this test
    monkeypatch.setattr(proj.batches, "settings", replace(proj.batches.settings, publish_lease=1.0))
    ran, key = tag("ran"), tag("complete")
    with proj.batches.engine.begin() as conn:
        savepoint = conn.begin_nested()
        batch_id = _create(proj, conn, ran, key)
        savepoint.rollback()
    for thread in [t for t in threading.enumerate() if t.name == "celery_batches-aftercommit"]:
        thread.join(10)
        assert not thread.is_alive()
    _never_existed(proj, batch_id, ran, key)


def test_the_callers_connection_must_be_in_a_transaction_and_of_a_known_type(proj):
    name = f"wrong-handle-{uuid.uuid4().hex}"
    with proj.batches.engine.connect() as conn:
        with pytest.raises(TypeError):
            with proj.batches.batch(name, connection=conn) as b:
                b.enqueue(proj.add, 1, 1)
    for wrong in (object(), proj.batches.engine, "postgresql://"):
        with pytest.raises(TypeError):
            with proj.batches.batch(name, connection=wrong) as b:
                b.enqueue(proj.add, 1, 1)
    assert proj.batches.list_batches(name=name) == []


@needs("worker")
def test_a_batch_in_the_callers_committed_session(proj, worker):
    ran, key = tag("ran"), tag("complete")
    with Session(proj.batches.engine) as session:
        batch_id = _create(proj, session, ran, key)
        assert proj.batches.get_batch(batch_id) is None
        session.commit()
    _ran_once(proj, batch_id, ran, key)


@needs("worker")
def test_a_batch_in_the_callers_rolled_back_session(proj, worker):
    ran, key = tag("ran"), tag("complete")
    with Session(proj.batches.engine) as session:
        batch_id = _create(proj, session, ran, key)
        session.rollback()
        session.execute(sa.text("SELECT 1"))  # the session goes on and commits other work
        session.commit()
    _never_existed(proj, batch_id, ran, key)


@needs("worker")
def test_a_batch_in_a_closed_session_never_runs_even_if_the_session_is_reused(proj, worker):
    ran, key = tag("ran"), tag("complete")
    session = Session(proj.batches.engine)
    batch_id = _create(proj, session, ran, key)
    session.close()  # discards the uncommitted batch
    session.execute(sa.text("SELECT 1"))  # a Session may be used again after close()
    session.commit()
    session.close()
    _never_existed(proj, batch_id, ran, key)


def _in_a_released_savepoint(proj, *, commit: bool) -> None:
    """A batch written in a savepoint of a Session's transaction, the savepoint released: neither
    published nor visible while the outer transaction is open; then the outer transaction commits
    (the batch runs, each job and its continuation once) or rolls back (it never exists, nothing runs)."""
    ran, key = tag("ran"), tag("complete")
    with Session(proj.batches.engine) as session:
        with session.begin_nested():
            batch_id = _create(proj, session, ran, key)
        never_fired(proj, ran, key)  # the worker drained its queue: anything published so far would have run
        assert proj.batches.get_batch(batch_id) is None
        if commit:
            session.commit()
        else:
            session.rollback()
    (_ran_once if commit else _never_existed)(proj, batch_id, ran, key)


@needs("worker")
def test_a_batch_in_a_session_savepoint_is_published_only_when_the_outer_transaction_commits(proj, worker):
    """Releasing the savepoint publishes nothing and shows nothing; the outer commit publishes the batch."""
    _in_a_released_savepoint(proj, commit=True)


@needs("worker")
def test_a_batch_in_a_released_savepoint_of_a_rolled_back_session_never_runs(proj, worker):
    _in_a_released_savepoint(proj, commit=False)
