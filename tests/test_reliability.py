"""Never stuck, never doubled: each test drives a path that could leave a batch stuck or run a job twice.

Registry-level tests drive the registry (real PostgreSQL) the way a worker or a producer would, so
they can hold a transaction open at exactly the wrong moment; the others use real workers.
"""

from __future__ import annotations

import os
import threading
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_batches import BatchStatus, RunStatus
from celery_batches.builder import BatchBuilder
from celery_batches.store import RunEvent, make_engine, utcnow
from tests.helpers import (WAIT, count, eventually, memory_app, needs, private_registry, tag,
                           works_in_a_child_forked_while_held)

pytestmark = [*needs("postgres", "redis"), pytest.mark.timeout(120)]


def _waiting_for_a_lock(proj) -> bool:
    """Is one of this session's registry connections waiting for a row lock right now?"""
    with proj.batches.engine.connect() as conn:
        return bool(conn.scalar(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE :q"),
            {"q": f"%{proj.batches.settings.table_prefix}%"}))


# -- one bad value never blocks the others ----------------------------------------------------------
def test_a_transition_of_a_task_whose_id_is_not_a_uuid_is_ignored_and_the_rest_are_applied(proj, nowhere):
    """A task of the app with a custom task id that fails in the worker's main process (hard time
    limit, lost worker, revoke) produces an event whose id is no UUID and no run's: it is ignored, and
    the other transitions of its group commit are applied."""
    with proj.batches.batch("custom-id-neighbour") as b:
        run = b.enqueue(proj.noop.s().set(queue=nowhere))
    proj.batches.transitions.apply_events([RunEvent("my-custom-task-id", RunStatus.FAILED, error="TimeLimitExceeded"),
                                     RunEvent(run, RunStatus.COMPLETED)])
    done = proj.batches.get_batch(b.id)
    assert (done.status, done.completed_jobs) == (BatchStatus.COMPLETED, 1)


def test_an_error_text_with_a_lone_surrogate_is_stored_escaped(proj, nowhere):
    """``os.fsdecode`` of a non-UTF-8 path puts a lone surrogate in an exception's text, which no UTF-8
    database takes: it is stored escaped, and the rest of its group commit is applied."""
    with proj.batches.batch("surrogate-error") as b:
        bad = b.enqueue(proj.noop.s().set(queue=nowhere))
        good = b.enqueue(proj.noop.s().set(queue=nowhere))
    proj.batches.transitions.apply_events([RunEvent(bad, RunStatus.FAILED, error="FileNotFoundError: /data/\udcffile"),
                                     RunEvent(good, RunStatus.COMPLETED)])
    done = proj.batches.get_batch(b.id)
    assert (done.status, done.completed_jobs, done.failed_jobs) == (BatchStatus.FAILED, 1, 1)
    failed = next(j for j in proj.batches.get_batch_jobs(b.id) if j.id == bad)
    assert failed.error == "FileNotFoundError: /data/\\udcffile"


@needs("worker")
def test_a_failing_members_lone_surrogate_and_a_custom_id_task_stall_nothing_on_a_real_worker(proj, worker):
    """End to end: a member raising with a lone surrogate in its message, and a non-member task with
    a custom id killed by its hard time limit in the main process, next to batches that must finish."""
    ran = tag("ran")
    proj.overrun.apply_async((tag("custom"),), task_id=f"custom-{uuid.uuid4().hex}")  # not a UUID
    with proj.batches.batch("surrogate-and-custom-id") as b:
        bad = b.enqueue(proj.fail, None, "cannot open /data/\udcffile")
        timed_out = b.enqueue(proj.overrun, ran)  # its FAILED comes from the main process, after the custom id's
        for _ in range(4):
            b.enqueue(proj.noop, ran)
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert (done.status, done.completed_jobs, done.failed_jobs) == (BatchStatus.FAILED, 4, 2)
    jobs = {j.id: j for j in proj.batches.get_batch_jobs(b.id)}
    assert jobs[bad].error == "ValueError: cannot open /data/\\udcffile"
    assert "TimeLimitExceeded" in jobs[timed_out].error
    assert count(proj, ran) == 5


# -- cancel wins over every concurrent add ------------------------------------------------------------
def test_cancel_waits_for_an_add_under_a_descendant_and_cancels_what_it_added(proj, nowhere):
    """A cancel waits for an add under one of its batch's descendants that is not committed yet, and
    cancels what that add wrote: nothing escapes it."""
    with proj.batches.batch("root") as b:
        with b.batch("child") as child:
            child.enqueue(proj.noop.s().set(queue=nowhere))
    adding = BatchBuilder(proj.app, "child", batch_id=child.id)
    with adding.batch("late") as late:
        late_run = late.enqueue(proj.noop.s().set(queue=nowhere))
    plan = adding.seal()
    conn = proj.batches.engine.connect()
    tx = conn.begin()
    proj.batches.trees.add_to_batch(conn, child.id, plan, utcnow())  # not committed yet
    cancelled: list[int] = []
    canceller = threading.Thread(target=lambda: cancelled.append(proj.batches.cancel_batch(b.id)))
    canceller.start()
    eventually(lambda: not canceller.is_alive() or _waiting_for_a_lock(proj), "the cancel to wait or finish", WAIT)
    tx.commit()
    conn.close()
    canceller.join(WAIT)
    assert cancelled == [2]  # the child's job and the late one
    assert proj.batches.get_batch(late.id).status == BatchStatus.CANCELLED
    assert [j.status for j in proj.batches.get_batch_jobs(late.id) if j.id == late_run] == [RunStatus.CANCELLED]
    parent = proj.batches.get_batch(child.id)
    assert (parent.status, parent.total_jobs, parent.cancelled_jobs) == (BatchStatus.CANCELLED, 2, 2)


# -- continue-with ------------------------------------------------------------------------------------
def test_a_waiting_stage_whose_only_child_was_cancelled_finishes_when_it_starts(proj, nowhere):
    """A waiting stage whose only unit (a nested batch) was cancelled finishes as it starts, when its
    antecedent finishes: FAILED, with one cancelled unit."""
    with proj.batches.batch("antecedent") as a:
        run = a.enqueue(proj.noop.s().set(queue=nowhere))

    def configure(stage):
        with stage.batch("only-child") as c:
            c.enqueue(proj.noop.s().set(queue=nowhere))

    stage_id = proj.batches.continue_batch_with(a.id, "stage", configure)
    [child] = proj.batches.list_batches(parent_id=stage_id)
    assert proj.batches.cancel_batch(child.id) == 1
    proj.batches.transitions.apply_events([RunEvent(run, RunStatus.COMPLETED)])  # the antecedent finishes
    assert proj.batches.get_batch(a.id).status == BatchStatus.COMPLETED
    stage = proj.batches.get_batch(stage_id)
    assert (stage.status, stage.total_jobs, stage.cancelled_jobs) == (BatchStatus.FAILED, 1, 1)


# -- the registry ------------------------------------------------------------------------------------
def test_a_mixed_case_table_prefix_writes_to_its_own_tables(proj):
    """Hand-written SQL (COPY, the group commit) quotes the table prefix: a registry whose prefix has
    capitals (which PostgreSQL folds to lower case unquoted) writes into its own tables."""
    with private_registry(memory_app("mixed-case"), "Cbt") as batches:
        prefix = batches.settings.table_prefix
        with batches.batch("mixed") as b:
            run = b.enqueue("tests.proj.noop")
        batches.transitions.apply_events([RunEvent(run, RunStatus.COMPLETED)])
        assert batches.get_batch(b.id).status == BatchStatus.COMPLETED
        with batches.engine.connect() as conn:
            assert conn.scalar(sa.text(f'SELECT count(*) FROM "{prefix}runs"')) == 1


def test_a_forked_child_gets_a_pool_of_its_own(proj):
    """A prefork worker child inherits the parent's connection pool, whose lock a parent thread (the
    relay) may hold at the instant of the fork: the child must start with a fresh pool."""
    engine = make_engine(os.environ["TEST_DATABASE_URL"], {})
    with engine.connect() as conn:
        conn.scalar(sa.text("SELECT 1"))  # a pooled connection the child must not reuse

    def child() -> bool:
        with engine.connect() as conn:
            return conn.scalar(sa.text("SELECT 1")) == 1

    assert works_in_a_child_forked_while_held(engine.pool._pool.mutex, child)
    engine.dispose()


def test_batches_written_through_one_session_leave_no_listener_behind(proj, nowhere):
    """Batches written through one Session leave at most one ``after_transaction_end`` listener on it,
    and each is published after its commit."""
    with Session(proj.batches.engine) as session:
        ids = []
        for _ in range(5):
            with proj.batches.batch("in-session", connection=session) as b:
                b.enqueue(proj.noop.s().set(queue=nowhere))
            session.commit()
            ids.append(b.id)
        assert len(session.dispatch.after_transaction_end) <= 1
    assert all(proj.batches.get_batch(i).status == BatchStatus.STARTED for i in ids)
    eventually(lambda: proj.r.llen(nowhere) == 5, "every batch's job to be published after its commit", WAIT)
