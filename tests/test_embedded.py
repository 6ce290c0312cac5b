"""The embedded path: a SQLite registry file, the in-memory broker and an in-process solo worker;
and the scenarios both backends must pass, run once on each (``backend``).

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
from typing import Any, Callable

import pytest
from celery import Celery, current_app
from celery.canvas import Signature
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
from tests.helpers import (EMBEDDED_WAIT, TABLES, WAIT, continuation_states, continuations_become, count, counters,
    drain, eventually, fired_once, memory_app, needs, never_fired, row_counts, tag, with_continuations)

pytestmark = pytest.mark.timeout(120)

DISPATCHED, SKIPPED = ContinuationStatus.DISPATCHED, ContinuationStatus.SKIPPED
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

    def drain(self) -> None:
        """Send a sentinel through the (FIFO, solo) worker and wait for it: what was published before has run."""
        token = uuid.uuid4().hex
        self.app.send_task("t.sentinel", [token])
        eventually(lambda: ("sentinel", token) in records(self.key), "the sentinel task")

    def count(self, tag_: str) -> int:
        """How often a task given ``tag_`` as its first argument ran."""
        return sum(r[1] == tag_ for r in records(self.key))

    def seen(self, key: str) -> str | None:
        """The batch id ``t.whoami(key)`` saw (the last one, as a Redis SET keeps it)."""
        return next((r[2] for r in reversed(records(self.key, "whoami")) if r[1] == key), None)

    def fired_once(self, key: str) -> None:
        eventually(lambda: self.count(key) >= 1, f"continuation {key}", EMBEDDED_WAIT)
        self.drain()
        assert self.count(key) == 1

    def never_fired(self, *keys: str) -> None:
        self.drain()
        assert [self.count(k) for k in keys] == [0] * len(keys)


@pytest.fixture
def env(tmp_path):
    app = memory_app("emb", worker_enable_remote_control=False, broker_transport_options={"polling_interval": 0.05})
    batches = Batches(app, database_url=f"sqlite:///{tmp_path}/reg.sqlite3", relay_interval=0,
                      flush_interval=0.01, wait_interval=0.05)
    batches.migrate()
    key = app.main

    class T:
        @batches.task(name="t.ok", shared=False)
        def ok(tag, seconds=0):
            time.sleep(seconds)
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

        @batches.task(name="t.whoami", shared=False)
        def whoami(tag):
            record(key, "whoami", tag, current_batch_id())

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
def embedded_worker(env):
    with running_worker(env) as w:
        yield w


# -- both backends ---------------------------------------------------------------------------------
@dataclass
class Backend:
    """One backend as the scenarios both must pass see it. Every task counts its runs under the tag
    or key it is given first (``count``); ``drain`` returns once everything published so far ran."""
    batches: Batches
    wait: float
    ok: Callable[..., Signature]  # ok(tag, seconds=0): a member that sleeps, then succeeds
    fail: Callable[[str], Signature]  # fail(tag): a member raising ValueError(f"{tag} fails on purpose")
    flaky: Callable[[str, int], Signature]  # flaky(tag, n): retries n times, then succeeds
    broken: Callable[[str], Signature]  # broken(tag): retries until its max_retries run out ("still broken")
    broken_retries: int  # broken's max_retries
    record: Any  # a continuation task: record(key, *values)
    whoami: Any  # whoami(key): stores the batch id it sees (current_batch_id()), read back by seen(key)
    count: Callable[[str], int]
    seen: Callable[[str], str | None]
    drain: Callable[[], None]
    fired_once: Callable[[str], None]  # ran, and (once drained) exactly once
    never_fired: Callable[..., None]  # once drained: none of these ran


@pytest.fixture(params=["embedded", pytest.param("redis+postgresql", marks=[*needs("postgres", "redis", "worker"),
                                                                             pytest.mark.timeout(180)])])
def backend(request) -> Backend:
    """SQLite, the memory transport and an in-process solo worker; or the session's PostgreSQL
    registry, Redis and its real prefork worker."""
    if request.param == "embedded":
        env = request.getfixturevalue("env")
        t = env.t
        with running_worker(env):
            yield Backend(env.batches, EMBEDDED_WAIT, ok=lambda tag_, seconds=0: t.ok.s(tag_, seconds), fail=t.fail.s,
                          flaky=t.flaky.s, broken=t.broken.s, broken_retries=t.broken.max_retries,
                          record=t.cont, whoami=t.whoami, count=env.count, seen=env.seen, drain=env.drain,
                          fired_once=env.fired_once, never_fired=env.never_fired)
        return
    proj = request.getfixturevalue("proj")
    request.getfixturevalue("worker")  # the session's
    yield Backend(proj.batches, WAIT, ok=lambda tag_, seconds=0: proj.sleep_then.s(seconds, tag_),
                  fail=lambda tag_: proj.fail.s(tag_, f"{tag_} fails on purpose"), record=proj.record,
                  flaky=proj.flaky.s, broken=proj.always_retry.s, broken_retries=proj.always_retry.max_retries,
                  whoami=proj.whoami, count=lambda key: count(proj, key),
                  seen=lambda key: (proj.r.get(key) or b"").decode() or None, drain=lambda: drain(proj),
                  fired_once=lambda key: fired_once(proj, key), never_fired=lambda *keys: never_fired(proj, *keys))


def test_failing_member_fails_the_batch(backend):
    be = backend
    ok, bad_tag = tag("ok"), tag("bad")
    with be.batches.batch("with-a-failure") as b:
        b.enqueue(be.ok(ok))
        bad = b.enqueue(be.fail(bad_tag))
        b.enqueue(be.ok(ok))
        keys = with_continuations(b, be)

    done = be.batches.wait(b.id, timeout=be.wait)
    assert counters(done) == (BatchStatus.FAILED, 3, 2, 1, 0)
    assert done.completed_at is not None
    runs = {j.id: j for j in be.batches.get_batch_jobs(b.id)}
    assert runs[bad].status == RunStatus.FAILED
    assert "ValueError" in runs[bad].error and f"{bad_tag} fails on purpose" in runs[bad].error
    assert sum(j.status == RunStatus.COMPLETED for j in runs.values()) == 2

    continuations_become(be.batches, b.id, [("complete", DISPATCHED), ("failure", DISPATCHED), ("success", SKIPPED)],
                         be.wait)
    be.fired_once(keys["failure"])
    be.fired_once(keys["complete"])
    be.never_fired(keys["success"])
    assert be.count(bad_tag) == 1  # a failure is not retried or run again
    assert be.count(ok) == 2


def test_nested_failure_propagates_to_every_ancestor(backend):
    be = backend
    ran, bad = tag("ran"), tag("bad")
    keys = {}
    with be.batches.batch("root") as root:
        root.enqueue(be.ok(ran))
        with root.batch("child") as child:
            child.enqueue(be.ok(ran))
            with child.batch("grandchild") as grandchild:
                grandchild.enqueue(be.fail(bad))
                keys[grandchild.id] = with_continuations(grandchild, be)
            keys[child.id] = with_continuations(child, be)
        keys[root.id] = with_continuations(root, be)

    final = be.batches.wait(root.id, timeout=be.wait)
    assert counters(final) == (BatchStatus.FAILED, 2, 1, 1, 0)  # the child is one failed unit
    mid, low = be.batches.get_batch(child.id), be.batches.get_batch(grandchild.id)
    assert counters(mid) == (BatchStatus.FAILED, 2, 1, 1, 0)
    assert counters(low) == (BatchStatus.FAILED, 1, 0, 1, 0)
    assert mid.completed_at is not None and low.completed_at is not None

    for batch_id in (root.id, child.id, grandchild.id):
        continuations_become(be.batches, batch_id,
                             [("complete", DISPATCHED), ("failure", DISPATCHED), ("success", SKIPPED)], be.wait)
        be.fired_once(keys[batch_id]["failure"])
        be.fired_once(keys[batch_id]["complete"])
        be.never_fired(keys[batch_id]["success"])
    assert be.count(ran) == 2 and be.count(bad) == 1


def test_empty_batch_is_completed_at_once(backend):
    be = backend
    seen = tag("seen")
    with be.batches.batch("nothing-to-do") as b:
        keys = with_continuations(b, be)
        b.on_success(be.whoami, seen)
    empty = be.batches.get_batch(b.id)  # no waiting: finished by the creating transaction
    assert counters(empty) == (BatchStatus.COMPLETED, 0, 0, 0, 0)
    assert empty.progress == 1.0 and empty.completed_at is not None and empty.expires_at is not None
    assert continuation_states(be.batches, b.id) == [("complete", DISPATCHED), ("failure", SKIPPED),
                                                     ("success", DISPATCHED), ("success", DISPATCHED)]
    be.fired_once(keys["success"])
    be.fired_once(keys["complete"])
    be.never_fired(keys["failure"])
    assert be.seen(seen) == b.id  # a continuation sees the batch whose finish fired it

    # an empty nested batch is one completed unit of its parent, also at once
    ran = tag("ran")
    with be.batches.batch("parent") as parent:
        parent.enqueue(be.ok(ran, 1.0))  # still running when the parent's counters are read
        with parent.batch("empty-child") as empty_child:
            pass
    assert be.batches.get_batch(empty_child.id).status == BatchStatus.COMPLETED
    assert be.batches.get_batch(parent.id).completed_jobs == 1
    final = be.batches.wait(parent.id, timeout=be.wait)
    assert final.status == BatchStatus.COMPLETED and (final.total_jobs, final.completed_jobs) == (2, 2)
    assert be.count(ran) == 1


@pytest.mark.parametrize("failure", ["exception in the block", "bad 5th job", "bad job in create_batch"])
def test_nothing_is_written_or_run_when_creation_fails(backend, failure):
    be = backend
    doomed, keys = tag("doomed"), {}

    def configure(b, bad_job: bool) -> None:
        for _ in range(4):
            b.enqueue(be.ok(doomed))
        with b.batch("doomed-child") as child:
            child.enqueue(be.ok(doomed))
        keys.update(with_continuations(b, be))
        if bad_job:
            b.enqueue(be.ok(doomed), object())  # cannot be serialised

    before = row_counts(be.batches)
    if failure == "exception in the block":
        with pytest.raises(RuntimeError, match="changed my mind"):
            with be.batches.batch("doomed") as b:
                configure(b, bad_job=False)
                raise RuntimeError("changed my mind")
    elif failure == "bad 5th job":
        with pytest.raises(InvalidBatchError, match=r"job #5 of batch 'doomed'"):
            with be.batches.batch("doomed") as b:
                configure(b, bad_job=True)
    else:
        with pytest.raises(InvalidBatchError):
            be.batches.create_batch("doomed", lambda b: [b.enqueue(be.ok(doomed)), b.enqueue(42)])
    assert row_counts(be.batches) == before

    # a batch created afterwards runs; nothing of the doomed one ever does
    after = tag("after")
    with be.batches.batch("after") as b:
        b.enqueue(be.ok(after))
    assert be.batches.wait(b.id, timeout=be.wait).status == BatchStatus.COMPLETED
    be.never_fired(doomed, *keys.values())
    assert be.count(after) == 1
    assert row_counts(be.batches) == {table: before[table] + added for table, added in zip(TABLES, (1, 1, 1, 0))}


# -- the embedded path only --------------------------------------------------------------------------------
def test_batch_with_nested_batch_completes_and_fires_success_once(env, embedded_worker):
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

    final = b.wait(bb.id, timeout=EMBEDDED_WAIT)
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

    continuations_become(b, bb.id, [("complete", DISPATCHED), ("failure", SKIPPED), ("success", DISPATCHED)],
                         EMBEDDED_WAIT)
    env.drain()
    # a continuation sees the batch whose finish fired it
    assert sorted(records(env.key, "cont")) == [("cont", "complete", (), bb.id),
                                                ("cont", "success", (bb.id,), bb.id)]
    # every member ran once and saw its own batch id
    members = sorted((r[1], r[2]) for r in records(env.key) if r[0] in ("ok", "plain"))
    assert members == [("a", bb.id), ("b", bb.id), ("c", bb.id), ("p1", payment.id), ("p2", payment.id)]


def test_retries_count_once_and_exhausted_retries_one_failure(backend):
    be = backend
    tags = {n: tag(f"flaky{n}") for n in (2, 1, 0)}
    with be.batches.batch("flaky") as b:
        ids = {n: b.enqueue(be.flaky(tags[n], n)) for n in tags}
        keys = with_continuations(b, be)
    done = be.batches.wait(b.id, timeout=be.wait)
    assert counters(done) == (BatchStatus.COMPLETED, 3, 3, 0, 0)
    runs = {j.id: j for j in be.batches.get_batch_jobs(b.id)}
    assert {n: (runs[ids[n]].status, runs[ids[n]].retries) for n in tags} == {n: (RunStatus.COMPLETED, n) for n in tags}
    be.fired_once(keys["success"])
    assert {n: be.count(tags[n]) for n in tags} == {n: n + 1 for n in tags}  # each attempt ran once

    broken_tag = tag("broken")
    with be.batches.batch("broken") as broken:
        run_id = broken.enqueue(be.broken(broken_tag))
        keys = with_continuations(broken, be)
    done = be.batches.wait(broken.id, timeout=be.wait)
    assert counters(done) == (BatchStatus.FAILED, 1, 0, 1, 0)  # retries exhausted: one failure, counted once
    (job,) = be.batches.get_batch_jobs(broken.id)
    assert (job.id, job.status, job.retries) == (run_id, RunStatus.FAILED, be.broken_retries)
    assert "still broken" in job.error
    be.fired_once(keys["failure"])
    assert be.count(broken_tag) == be.broken_retries + 1


# -- creation and reads (no worker) --------------------------------------------------------------
def test_results_reach_the_continuation_in_unit_order(env, embedded_worker):
    """``results=True`` on SQLite (row-at-a-time writes): values, a failed job's None, a nested
    batch's own list, in the order the units were added."""
    with env.batches.batch("results", results=True) as b:
        b.enqueue(env.t.ok, "a")
        with b.batch("inner") as inner:
            inner.enqueue(env.t.ok, "b")
            inner.enqueue(env.t.fail, "c")
        b.enqueue(env.t.ok, "d")
        b.on_complete(env.t.cont, "complete")
    assert env.batches.wait(b.id, timeout=EMBEDDED_WAIT).status == BatchStatus.FAILED
    eventually(lambda: records(env.key, "cont"), "the continuation", EMBEDDED_WAIT)
    env.drain()
    assert records(env.key, "cont") == [("cont", ["a", ["b", None], "d"], ("complete",), b.id)]
    results = env.batches.get_results(b.id)
    assert [r.status for r in results] == [RunStatus.COMPLETED, BatchStatus.FAILED, RunStatus.COMPLETED]
    assert [(r.status, r.value) for r in results[1].value] == [(RunStatus.COMPLETED, "b"), (RunStatus.FAILED, None)]
    assert "c fails on purpose" in results[1].value[1].error


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
    assert row_counts(b) == {"batches": 1, "runs": 1, "batch_jobs": 1, "continuations": 0}


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
    b.transitions.apply_events(events)
    b.transitions.apply_events([RunEvent(r1, RunStatus.COMPLETED), RunEvent(r2, RunStatus.FAILED)])  # redelivered
    batch = b.get_batch(bb.id)
    assert (batch.completed_jobs, batch.failed_jobs, batch.status) == (1, 1, BatchStatus.STARTED)
    runs = {j.id: j for j in b.get_batch_jobs(bb.id)}
    assert (runs[r3].status, runs[r3].retries) == (RunStatus.RUNNING, 1)
    assert runs[r2].error == "ValueError: x"
    b.transitions.apply_events([RunEvent(r3, RunStatus.COMPLETED, 1)])
    final = b.get_batch(bb.id)
    assert final.status == BatchStatus.FAILED and (final.completed_jobs, final.failed_jobs) == (2, 1)
