"""The embedded path: a SQLite registry file, the in-memory broker and an in-process solo worker.

Each test builds its own Celery app (a unique name and queue): the signal handlers of a
``Batches`` only act on tasks of their own app, and the memory transport's queues are shared by
every app in the process. Tasks record what they did into ``RECORDS[<app name>]``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery, current_app
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state

from celery_batches import (
    Batches,
    BatchNotFoundError,
    BatchStatus,
    InvalidBatchError,
    RunStatus,
    current_batch_id,
)
from celery_batches.models import ContinuationStatus
from celery_batches.store import RunEvent
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(120)

WAIT = 20.0  # the memory transport polls; generous, but every wait is a deadline, not a sleep
_lock = threading.Lock()
RECORDS: dict[str, list[tuple]] = defaultdict(list)


def record(key: str, *item: Any) -> None:
    with _lock:
        RECORDS[key].append(item)


def records(key: str, kind: str | None = None) -> list[tuple]:
    with _lock:
        return [r for r in RECORDS[key] if kind is None or r[0] == kind]


@dataclass
class Env:
    app: Celery
    batches: Batches
    key: str
    t: Any  # the tasks

    def rows(self) -> dict[str, int]:
        t = self.batches.store.t
        with self.batches.engine.connect() as conn:
            return {name: conn.scalar(sa.select(sa.func.count()).select_from(table))
                    for name, table in (("batches", t.batches), ("runs", t.runs),
                                        ("batch_jobs", t.batch_jobs), ("continuations", t.continuations))}

    def continuations(self, batch_id: str) -> list[tuple[str, ContinuationStatus]]:
        return sorted((c.kind.value, c.status) for c in self.batches.get_continuations(batch_id))

    def drain(self) -> None:
        """Send a sentinel through the (FIFO, solo) worker and wait for it: what was published before has run."""
        token = uuid.uuid4().hex
        self.app.send_task("t.sentinel", [token])
        eventually(lambda: ("sentinel", token) in records(self.key), "the sentinel task")

    def wait_dispatched(self, batch_id: str, expected: list[tuple[str, ContinuationStatus]]) -> None:
        """Continuations are published right after the finishing commit: wait until they are marked."""
        eventually(lambda: self.continuations(batch_id) == sorted(expected),
                   f"continuation statuses {expected} (have {self.continuations(batch_id)})")


@pytest.fixture
def env(tmp_path):
    name = f"emb_{uuid.uuid4().hex[:10]}"
    app = Celery(name, broker="memory://", set_as_current=False)
    app.conf.update(
        task_default_queue=f"q_{name}",
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,
        broker_transport_options={"polling_interval": 0.05},
    )
    batches = Batches(app, database_url=f"sqlite:///{tmp_path}/reg.sqlite3", relay_interval=0,
                      flush_interval=0.01, wait_interval=0.05)
    batches.migrate()
    key = name

    class T:
        @batches.task(name="t.ok", shared=False)
        def ok(tag):
            record(key, "ok", tag, current_batch_id())
            return tag

        @batches.task(name="t.fail", shared=False)
        def fail(tag):
            record(key, "fail", tag, current_batch_id())
            raise ValueError(f"{tag} fails on purpose")

        @batches.task(name="t.flaky", shared=False, bind=True, max_retries=5)
        def flaky(self, tag, failures):
            record(key, "flaky", tag, self.request.retries)
            if self.request.retries < failures:
                raise self.retry(countdown=0)
            return tag

        @batches.task(name="t.broken", shared=False, bind=True, max_retries=1)
        def broken(self, tag):
            record(key, "broken", tag, self.request.retries)
            raise self.retry(countdown=0, exc=RuntimeError(f"{tag} still broken"))

        @app.task(name="t.plain", shared=False)
        def plain(tag):  # a plain @app.task member
            record(key, "plain", tag, current_batch_id())

        @app.task(name="t.cont", shared=False)
        def cont(kind, *values):  # a continuation
            record(key, "cont", kind, values, current_batch_id())

        @app.task(name="t.sentinel", shared=False)
        def sentinel(token):
            record(key, "sentinel", token)

        @app.task(name="t.wake", shared=False)
        def wake():
            pass

    yield Env(app, batches, key, T)
    batches.engine.dispose()
    app.close()
    with _lock:
        RECORDS.pop(key, None)


@contextmanager
def running_worker(env: Env):
    previous = current_app._get_current_object()  # start_worker makes the test app current and default
    with start_worker(env.app, pool="solo", concurrency=1, loglevel="WARNING", perform_ping_check=False,
                      shutdown_timeout=10) as worker:
        try:
            yield worker
        finally:
            # start_worker sets this flag too, but the solo consumer notices it only between two
            # drain_events(timeout=2.0) and then still runs one more cycle (synloop's try/finally):
            # two wake-up messages end both waits at once instead of after up to 4 s
            worker_state.should_terminate = 0
            env.app.send_task("t.wake")
            env.app.send_task("t.wake")
    previous.set_current()
    previous.set_default()


@pytest.fixture
def worker(env):
    with running_worker(env) as w:
        yield w


# -- the happy path --------------------------------------------------------------------------------
def test_batch_with_nested_batch_completes_and_fires_success_once(env, worker):
    b, t = env.batches, env.t
    with b.batch("process-order-123", created_by="checkout") as bb:
        bb.enqueue(t.ok, "a")
        bb.enqueue("t.ok", "b")
        bb.enqueue(t.plain.s("c"))
        with bb.batch("payment-processing") as payment:
            payment.enqueue(t.ok, "p1")
            payment.enqueue(t.ok, "p2")
        bb.on_success(t.cont, "success", bb.id)
        bb.on_failure(t.cont.s("failure"))
        bb.on_complete("t.cont", "complete")
    assert current_batch_id() is None  # outside a member

    final = b.wait(bb.id, timeout=WAIT)
    assert final.status == BatchStatus.COMPLETED
    assert (final.total_jobs, final.completed_jobs, final.failed_jobs, final.cancelled_jobs) == (4, 4, 0, 0)
    assert final.pending_jobs == 0 and final.progress == 1.0 and final.is_finished
    assert final.created_by == "checkout" and final.parent_id is None
    assert final.completed_at is not None and final.completed_at >= final.created_at
    assert final.expires_at == final.completed_at + timedelta(days=7)

    child = b.get_batch(payment.id)
    assert child.parent_id == bb.id and child.status == BatchStatus.COMPLETED
    assert (child.total_jobs, child.completed_jobs, child.failed_jobs) == (2, 2, 0)
    assert [c.id for c in b.list_batches(parent_id=bb.id)] == [payment.id]

    jobs = b.get_batch_jobs(bb.id)
    assert [j.args for j in jobs] == [["a"], ["b"], ["c"]]
    for job in jobs + b.get_batch_jobs(payment.id):
        assert job.status == RunStatus.COMPLETED and job.retries == 0 and job.error is None
        assert job.started_at is not None and job.finished_at is not None

    env.wait_dispatched(bb.id, [("complete", ContinuationStatus.DISPATCHED),
                                ("failure", ContinuationStatus.SKIPPED),
                                ("success", ContinuationStatus.DISPATCHED)])
    env.drain()
    # a continuation sees the batch whose finish fired it
    assert sorted(records(env.key, "cont")) == [("cont", "complete", (), bb.id),
                                                ("cont", "success", (bb.id,), bb.id)]
    # every member ran once and saw its own batch id
    members = sorted((r[1], r[2]) for r in records(env.key) if r[0] in ("ok", "plain"))
    assert members == [("a", bb.id), ("b", bb.id), ("c", bb.id), ("p1", payment.id), ("p2", payment.id)]


# -- failures --------------------------------------------------------------------------------------
def test_failing_member_fails_the_batch(env, worker):
    b, t = env.batches, env.t
    with b.batch("with-a-failure") as bb:
        bb.enqueue(t.ok, "a")
        bad = bb.enqueue(t.fail, "b")
        bb.enqueue(t.ok, "c")
        bb.on_success("t.cont", "success")
        bb.on_failure("t.cont", "failure")
        bb.on_complete("t.cont", "complete")

    final = b.wait(bb.id, timeout=WAIT)
    assert final.status == BatchStatus.FAILED
    assert (final.total_jobs, final.completed_jobs, final.failed_jobs, final.cancelled_jobs) == (3, 2, 1, 0)
    assert final.completed_at is not None
    runs = {j.id: j for j in b.get_batch_jobs(bb.id)}
    assert runs[bad].status == RunStatus.FAILED
    assert "ValueError" in runs[bad].error and "b fails on purpose" in runs[bad].error
    assert sum(j.status == RunStatus.COMPLETED for j in runs.values()) == 2

    env.wait_dispatched(bb.id, [("complete", ContinuationStatus.DISPATCHED),
                                ("failure", ContinuationStatus.DISPATCHED),
                                ("success", ContinuationStatus.SKIPPED)])
    env.drain()
    assert sorted(r[1] for r in records(env.key, "cont")) == ["complete", "failure"]
    assert len(records(env.key, "fail")) == 1  # a failure is not retried or run again


def test_nested_failure_propagates_to_every_ancestor(env, worker):
    b, t = env.batches, env.t
    with b.batch("root") as root:
        root.enqueue(t.ok, "r")
        with root.batch("child") as child:
            child.enqueue(t.ok, "c")
            with child.batch("grandchild") as grandchild:
                grandchild.enqueue(t.fail, "g")
                grandchild.on_failure("t.cont", "failure", "grandchild")
            child.on_failure("t.cont", "failure", "child")
            child.on_success("t.cont", "success", "child")
        root.on_failure("t.cont", "failure", "root")
        root.on_success("t.cont", "success", "root")
        root.on_complete("t.cont", "complete", "root")

    final = b.wait(root.id, timeout=WAIT)
    assert final.status == BatchStatus.FAILED
    assert (final.total_jobs, final.completed_jobs, final.failed_jobs) == (2, 1, 1)  # the child is one failed unit
    mid = b.get_batch(child.id)
    assert mid.status == BatchStatus.FAILED and (mid.total_jobs, mid.completed_jobs, mid.failed_jobs) == (2, 1, 1)
    low = b.get_batch(grandchild.id)
    assert low.status == BatchStatus.FAILED and (low.total_jobs, low.completed_jobs, low.failed_jobs) == (1, 0, 1)
    assert mid.completed_at is not None and low.completed_at is not None

    env.wait_dispatched(root.id, [("complete", ContinuationStatus.DISPATCHED),
                                  ("failure", ContinuationStatus.DISPATCHED),
                                  ("success", ContinuationStatus.SKIPPED)])
    env.wait_dispatched(child.id, [("failure", ContinuationStatus.DISPATCHED),
                                   ("success", ContinuationStatus.SKIPPED)])
    env.wait_dispatched(grandchild.id, [("failure", ContinuationStatus.DISPATCHED)])
    env.drain()
    assert sorted((r[1], r[2]) for r in records(env.key, "cont")) == [
        ("complete", ("root",)), ("failure", ("child",)), ("failure", ("grandchild",)), ("failure", ("root",))]


# -- empty batches ---------------------------------------------------------------------------------
def test_empty_batch_is_completed_at_once(env, worker):
    b, t = env.batches, env.t
    with b.batch("nothing-to-do") as bb:
        bb.on_success("t.cont", "success", "empty")
        bb.on_failure("t.cont", "failure", "empty")
    empty = b.get_batch(bb.id)  # no waiting: finished by the creating transaction
    assert empty.status == BatchStatus.COMPLETED and empty.total_jobs == 0
    assert empty.progress == 1.0 and empty.completed_at is not None and empty.expires_at is not None
    assert env.continuations(bb.id) == [("failure", ContinuationStatus.SKIPPED),
                                        ("success", ContinuationStatus.DISPATCHED)]

    # an empty nested batch is one completed unit of its parent, also at once
    with b.batch("parent") as parent:
        parent.enqueue(t.ok, "x")
        with parent.batch("empty-child") as empty_child:
            pass
    assert b.get_batch(empty_child.id).status == BatchStatus.COMPLETED
    assert b.get_batch(parent.id).completed_jobs == 1
    final = b.wait(parent.id, timeout=WAIT)
    assert final.status == BatchStatus.COMPLETED and (final.total_jobs, final.completed_jobs) == (2, 2)

    env.drain()
    assert records(env.key, "cont") == [("cont", "success", ("empty",), bb.id)]


# -- retries ---------------------------------------------------------------------------------------
def test_retries_count_once_and_are_recorded(env, worker):
    b, t = env.batches, env.t
    with b.batch("flaky") as bb:
        twice = bb.enqueue(t.flaky, "twice", 2)
        once = bb.enqueue(t.flaky, "once", 1)
        never = bb.enqueue(t.flaky, "never", 0)
    final = b.wait(bb.id, timeout=WAIT)
    assert final.status == BatchStatus.COMPLETED
    assert (final.total_jobs, final.completed_jobs, final.failed_jobs) == (3, 3, 0)
    runs = {j.id: j for j in b.get_batch_jobs(bb.id)}
    assert {run_id: (runs[run_id].status, runs[run_id].retries) for run_id in (twice, once, never)} == {
        twice: (RunStatus.COMPLETED, 2), once: (RunStatus.COMPLETED, 1), never: (RunStatus.COMPLETED, 0)}
    assert sorted(r[1:] for r in records(env.key, "flaky")) == [
        ("never", 0), ("once", 0), ("once", 1), ("twice", 0), ("twice", 1), ("twice", 2)]

    # retries exhausted: one failure, counted once
    with b.batch("broken") as broken:
        run_id = broken.enqueue(t.broken, "z")
    final = b.wait(broken.id, timeout=WAIT)
    assert final.status == BatchStatus.FAILED and (final.completed_jobs, final.failed_jobs) == (0, 1)
    (job,) = b.get_batch_jobs(broken.id)
    assert job.id == run_id and job.status == RunStatus.FAILED and job.retries == 1
    assert "z still broken" in job.error


# -- atomicity -------------------------------------------------------------------------------------
def test_nothing_is_written_or_run_when_creation_fails(env, worker):
    b, t = env.batches, env.t
    with pytest.raises(RuntimeError, match="changed my mind"):
        with b.batch("doomed-1") as bb:
            for i in range(4):
                bb.enqueue(t.ok, f"doomed-1-{i}")
            with bb.batch("doomed-child") as child:
                child.enqueue(t.ok, "doomed-1-child")
            bb.on_complete("t.cont", "complete", "doomed-1")
            raise RuntimeError("changed my mind")
    with pytest.raises(InvalidBatchError, match=r"job #5 of batch 'doomed-2'"):
        with b.batch("doomed-2") as bb:
            for i in range(4):
                bb.enqueue(t.ok, f"doomed-2-{i}")
            bb.on_success("t.cont", "success", "doomed-2")
            bb.enqueue(t.ok, object())
    with pytest.raises(InvalidBatchError):
        b.create_batch("doomed-3", lambda bb: [bb.enqueue(t.ok, "doomed-3-0"), bb.enqueue(42)])
    assert env.rows() == {"batches": 0, "runs": 0, "batch_jobs": 0, "continuations": 0}

    # a batch created afterwards runs; nothing of the doomed ones ever does
    with b.batch("after") as after:
        after.enqueue(t.ok, "after")
    assert b.wait(after.id, timeout=WAIT).status == BatchStatus.COMPLETED
    env.drain()
    assert [r[1] for r in records(env.key) if r[0] != "sentinel"] == ["after"]
    assert env.rows() == {"batches": 1, "runs": 1, "batch_jobs": 1, "continuations": 0}


# -- creation and reads (no worker) --------------------------------------------------------------
def test_create_batch_returns_the_id(env):
    b, t = env.batches, env.t
    child_ids = []

    def configure(bb):
        bb.enqueue(t.ok, 1)
        bb.enqueue("t.plain", 2)
        child_ids.append(bb.add_batch("child", lambda c: c.enqueue(t.ok, 3)))
        bb.on_success("t.cont", "success")

    batch_id = b.create_batch("seed-shape", configure, created_by="seed")
    batch = b.get_batch(batch_id)
    assert batch.id == batch_id and batch.name == "seed-shape" and batch.created_by == "seed"
    assert batch.status == BatchStatus.STARTED and batch.total_jobs == 3 and batch.pending_jobs == 3
    assert [c.id for c in b.list_batches(parent_id=batch_id)] == child_ids
    assert [j.args for j in b.get_batch_jobs(batch_id)] == [[1], [2]]


def test_list_batches(env):
    b, t = env.batches, env.t
    ids = {}
    for name in ("alpha-1", "beta_2", "gamma%3", "delta"):
        with b.batch(name) as bb:
            bb.enqueue(t.ok, name)
            if name == "delta":
                with bb.batch("delta-child") as child:
                    child.enqueue(t.ok, "dc")
        ids[name] = bb.id
    with b.batch("empty_4") as bb:
        pass
    ids["empty_4"] = bb.id

    newest_first = ["empty_4", "delta", "gamma%3", "beta_2", "alpha-1"]
    assert [x.name for x in b.list_batches()] == newest_first  # top level only
    assert [x.name for x in b.list_batches(limit=2)] == newest_first[:2]
    assert [x.name for x in b.list_batches(limit=2, offset=2)] == newest_first[2:4]
    assert [x.id for x in b.list_batches(status=BatchStatus.COMPLETED)] == [ids["empty_4"]]
    assert [x.name for x in b.list_batches(status=BatchStatus.STARTED)] == newest_first[1:]
    assert b.list_batches(status=BatchStatus.FAILED) == []
    assert [x.name for x in b.list_batches(name="eta")] == ["beta_2"]
    # % and _ are literal characters, not LIKE wildcards
    assert [x.name for x in b.list_batches(name="%")] == ["gamma%3"]
    assert [x.name for x in b.list_batches(name="a%3")] == ["gamma%3"]
    assert [x.name for x in b.list_batches(name="_")] == ["empty_4", "beta_2"]
    assert [x.name for x in b.list_batches(name="a_2")] == ["beta_2"]
    assert b.list_batches(name="a_1") == []
    assert b.list_batches(name="no-such-batch") == []
    children = b.list_batches(parent_id=ids["delta"])
    assert [(x.name, x.parent_id) for x in children] == [("delta-child", ids["delta"])]
    assert b.list_batches(parent_id=ids["alpha-1"]) == []


def test_unknown_batch(env):
    unknown = str(uuid.uuid4())
    assert env.batches.get_batch(unknown) is None
    with pytest.raises(BatchNotFoundError) as info:
        env.batches.wait(unknown, timeout=1)
    assert unknown in str(info.value)


def test_wait_times_out_when_the_batch_cannot_finish(env):
    b = env.batches
    with b.batch("no-worker") as bb:
        bb.enqueue(env.t.ok, 1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        b.wait(bb.id, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert b.get_batch(bb.id).status == BatchStatus.STARTED


def test_current_batch_id_is_none_outside_a_member(env):
    assert current_batch_id() is None


def test_migrate_is_idempotent(env):
    b = env.batches
    with b.batch("kept") as bb:
        bb.enqueue(env.t.ok, 1)
    b.migrate()
    b.migrate()
    assert b.get_batch(bb.id).total_jobs == 1
    assert env.rows() == {"batches": 1, "runs": 1, "batch_jobs": 1, "continuations": 0}


# -- the group commit's store transaction (no worker) ---------------------------------------------
def test_one_group_commit_applies_transitions_of_several_runs(env):
    """What a busy worker hands to the group commit: several runs' events in one transaction."""
    b, t = env.batches, env.t
    with b.batch("group") as bb:
        r1, r2, r3 = (bb.enqueue(t.ok, i) for i in range(3))
    events = [RunEvent(r1, RunStatus.RUNNING), RunEvent(r2, RunStatus.RUNNING), RunEvent(r3, RunStatus.RUNNING),
              RunEvent(r3, RunStatus.RETRYING, 0, "retry"), RunEvent(r3, RunStatus.RUNNING, 1),
              RunEvent(r1, RunStatus.COMPLETED), RunEvent(r1, RunStatus.COMPLETED),  # a duplicate signal
              RunEvent(r2, RunStatus.FAILED, 0, "ValueError: x")]
    b.store.apply_events(events)
    b.store.apply_events([RunEvent(r1, RunStatus.COMPLETED), RunEvent(r2, RunStatus.FAILED)])  # redelivered
    batch = b.get_batch(bb.id)
    assert (batch.completed_jobs, batch.failed_jobs, batch.status) == (1, 1, BatchStatus.STARTED)
    runs = {j.id: j for j in b.get_batch_jobs(bb.id)}
    assert (runs[r3].status, runs[r3].retries) == (RunStatus.RUNNING, 1)
    assert runs[r2].error == "ValueError: x"
    b.store.apply_events([RunEvent(r3, RunStatus.COMPLETED, 1)])
    final = b.get_batch(bb.id)
    assert final.status == BatchStatus.FAILED and (final.completed_jobs, final.failed_jobs) == (2, 1)
