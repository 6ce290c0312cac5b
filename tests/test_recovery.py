"""Recovery with Celery's default settings: no acks_late, no result backend read, Redis's one-hour
visibility timeout. Real prefork workers are SIGKILLed; every batch must still finish, every run
must end in a final state saying why, and no job may run twice unless Celery itself would run it
twice. The test app's recovery timings are short (heartbeat 1 s, node timeout 10 s, lost after 10 s).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import sqlalchemy as sa

from celery_batches import BatchStatus, RunStatus
from celery_batches.models import ContinuationStatus
from celery_batches.store import utcnow
from tests.conftest import Worker
from tests.helpers import RECOVERY, eventually, fired_once, tag


def starts(proj, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in proj.r.hgetall(key).items()}


def settled(proj, batch_id: str):
    done = proj.batches.wait(batch_id, timeout=RECOVERY)
    jobs = proj.batches.get_batch_jobs(batch_id)
    assert all(j.status.is_final for j in jobs), [j.status for j in jobs]
    assert (done.completed_jobs, done.failed_jobs, done.cancelled_jobs) == (
        sum(j.status == RunStatus.COMPLETED for j in jobs), sum(j.status == RunStatus.FAILED for j in jobs),
        sum(j.status == RunStatus.CANCELLED for j in jobs))
    return done, jobs


@pytest.mark.slow
def test_a_whole_worker_killed_with_celery_defaults_leaves_nothing_open(proj, start_worker):
    """Issue 8 #5: with defaults the messages the killed worker had prefetched sat in Redis's unacked
    hash for an hour and the runs it was executing stayed open forever. Now the runs it was running
    are FAILED "worker lost" (Celery acknowledged them: it would not run them again), the ones it
    held are handed back to the queue, and the batch finishes; nothing runs twice."""
    w = start_worker()
    key = tag("starts")
    with proj.batches.batch("worker-killed") as b:
        ids = [b.enqueue(proj.track.s(key, 1.0).set(queue=w.queue)) for _ in range(20)]
    eventually(lambda: len(starts(proj, key)) >= 2, "two members to start", 30)
    w.kill()
    with Worker(proj, w.queue):  # a new node on the same queue (the killed one is gone for good)
        done, jobs = settled(proj, b.id)
    ran = starts(proj, key)
    assert max(ran.values()) == 1, "a job ran twice"
    lost = [j for j in jobs if j.status == RunStatus.FAILED]
    assert lost and all("worker lost" in j.error for j in lost)
    assert {j.id for j in lost} <= set(ran), "only runs that had started may be lost"
    assert done.completed_jobs == 20 - len(lost) and set(ids) == {j.id for j in jobs}


@pytest.mark.slow
def test_pool_processes_killed_like_an_oom_killer(proj, start_worker):
    """Issue 8 #5: pool processes SIGKILLed one a second left runs open for good (their outcome and
    their RUNNING were buffered in the dead process). Now each such run ends FAILED "worker lost"."""
    w = start_worker()
    key = tag("starts")
    with proj.batches.batch("oom-killed") as b:
        for _ in range(120):
            b.enqueue(proj.track.s(key, 0.05).set(queue=w.queue))
    killed = 0
    for _ in range(6):
        time.sleep(1)
        for pid in w.children()[:1]:
            os.kill(pid, signal.SIGKILL)
            killed += 1
    assert killed, "no pool process was killed; nothing was tested"
    done, jobs = settled(proj, b.id)
    ran = starts(proj, key)
    assert max(ran.values()) == 1, "a job ran twice"
    # Celery's own report of the process it saw die, or recovery's for what that report missed
    assert all("worker lost" in j.error or "WorkerLostError" in j.error for j in jobs if j.status == RunStatus.FAILED)
    assert done.completed_jobs + done.failed_jobs == 120


@pytest.mark.slow
def test_a_message_the_broker_lost_is_published_again(proj, start_worker, nowhere):
    """A Redis restart without persistence loses queued messages: runs published, in no queue, held
    by no worker, are found by the lost-message search and published again, once."""
    key = tag("starts")
    with proj.batches.batch("broker-lost") as b:
        for _ in range(5):
            b.enqueue(proj.track.s(key).set(queue=nowhere))
    eventually(lambda: proj.r.llen(nowhere) == 5, "the messages to be queued", 10)
    proj.r.delete(nowhere)  # what a broker restart without persistence does
    with Worker(proj, nowhere):
        done, jobs = settled(proj, b.id)
    assert done.status == BatchStatus.COMPLETED and done.completed_jobs == 5
    assert sorted(starts(proj, key).values()) == [1] * 5


@pytest.mark.slow
def test_a_continuation_whose_message_the_broker_lost_is_published_again(proj, worker, nowhere):
    """A plain @app.task continuation claims its row as it starts; one published long ago, never
    started and in no queue is published again, and runs once."""
    key = tag("cont")
    with proj.batches.batch("continuation-lost") as b:
        b.enqueue(proj.noop)
        b.on_complete(proj.record.s(key).set(queue=nowhere))
    eventually(lambda: proj.r.llen(nowhere) == 1, "the continuation to be queued", 30)
    proj.r.delete(nowhere)  # lost by the broker
    with Worker(proj, nowhere):
        fired_once(proj, key, nowhere, RECOVERY)
    [cont] = proj.batches.get_continuations(b.id)
    assert cont.status == ContinuationStatus.DISPATCHED


@pytest.mark.slow
def test_an_acks_late_run_of_a_killed_worker_runs_again_as_celery_would(proj, start_worker):
    """acks_late: Celery delivers the message again after its worker died (Redis: after the
    visibility timeout, an hour by default). Recovery hands it back at once; it runs again and
    completes: exactly what Celery promises for acks_late, sooner."""
    w = start_worker()
    key = tag("starts")
    with proj.batches.batch("acks-late-killed") as b:
        for _ in range(4):
            b.enqueue(proj.track_late.s(key, 3.0).set(queue=w.queue))
    eventually(lambda: len(starts(proj, key)) >= 2, "two members to start", 30)
    w.kill()
    with Worker(proj, w.queue):
        done, jobs = settled(proj, b.id)
    assert done.status == BatchStatus.COMPLETED and done.completed_jobs == 4
    ran = starts(proj, key)
    assert len(ran) == 4 and sorted(ran.values()) == [1, 1, 2, 2]  # the two killed ones ran again


@pytest.mark.slow
def test_runs_a_live_worker_held_when_the_broker_lost_them_run(proj, start_worker):
    """A broker restart loses the queue and the messages a live worker had prefetched; the worker
    reconnects and drops what it held. Its heartbeat had marked those runs as held, and the marks
    stayed: the lost-message search never looked at them and the batch stayed STARTED. Now each
    beat marks exactly what the node holds, so they are found and published again, and run once."""
    w = start_worker()
    key = tag("starts")
    with proj.batches.batch("held-then-lost") as b:
        for _ in range(12):
            b.enqueue(proj.track.s(key, 1.5).set(queue=w.queue))
    r = proj.batches.store.tables.runs

    def marked() -> int:  # runs the worker holds unstarted, as its heartbeat marked them
        with proj.batches.engine.connect() as conn:
            return conn.scalar(sa.select(sa.func.count()).where(
                r.c.batch_id == b.id, r.c.status == int(RunStatus.PENDING), r.c.node.is_not(None)))

    eventually(lambda: marked() >= 2, "the worker to mark the runs it prefetched", 30)
    lost = _forget_queue(proj, w.queue)  # the restarted broker has neither the queue nor the unacked messages
    assert w.drop_broker_connections(), "no broker connection of the worker was found to close"
    assert lost, "the broker held no message of the batch; nothing was lost"
    done, jobs = settled(proj, b.id)
    assert done.status == BatchStatus.COMPLETED and done.completed_jobs == 12
    assert sorted(starts(proj, key).values()) == [1] * 12


def _forget_queue(proj, queue: str) -> int:
    """Delete a queue's messages from Redis, queued and unacknowledged alike; how many there were."""
    import json

    lost = proj.r.llen(queue)
    proj.r.delete(queue)
    for tag_, payload in proj.r.hgetall("unacked").items():
        if json.loads(payload)[2] == queue:  # [message, exchange, routing key]
            lost += proj.r.hdel("unacked", tag_)
            proj.r.zrem("unacked_index", tag_)
    return lost


# -- the decisions, one pass at a time, on a private registry ----------------------------------------------
def _recovery(registry, **settings):
    from dataclasses import replace

    from celery_batches.worker.node import Node
    from celery_batches.worker.recovery import Recovery

    registry.settings = replace(registry.settings, **settings)
    return Recovery(Node(registry.app, registry.settings, registry.store, registry.liveness, registry.probe,
                         registry.outbox))


def _claimed(registry, node: str, n: int = 2, task: str = "tests.proj.noop"):
    with registry.batch("claimed") as b:
        ids = [b.enqueue(registry.app.signature(task).set(queue=registry.queue)) for _ in range(n)]
    for run_id in ids:
        assert registry.liveness.claim(run_id, 0, node, utcnow()).claimed
    return b.id, ids


def test_a_node_is_gone_only_after_its_heartbeat_stood_still_for_the_timeout_on_the_observers_clock(registry):
    registry.liveness.beat("dead", [100], [])
    batch_id, ids = _claimed(registry, "dead/100")
    recovery = _recovery(registry, node_timeout=0.5, heartbeat_interval=0.1)
    assert recovery.run_once()["runs_worker_lost"] == 0  # first sight: however old the heartbeat, not gone yet
    time.sleep(0.6)
    assert recovery.run_once()["runs_worker_lost"] == 2
    jobs = registry.get_batch_jobs(batch_id)
    assert {j.status for j in jobs} == {RunStatus.FAILED} and all("worker lost" in j.error for j in jobs)
    assert registry.get_batch(batch_id).status == BatchStatus.FAILED
    assert "dead" not in registry.liveness.nodes()  # forgotten once nothing of it is open


def test_a_node_that_keeps_beating_is_never_gone(registry):
    registry.liveness.beat("alive", [100], [])
    _, ids = _claimed(registry, "alive/100")
    recovery = _recovery(registry, node_timeout=0.5, heartbeat_interval=0.1)
    for _ in range(3):
        registry.liveness.beat("alive", [100], [])
        assert recovery.run_once()["runs_worker_lost"] == 0
        time.sleep(0.3)
    assert "alive" in registry.liveness.nodes()


def test_runs_of_a_dead_pool_process_of_a_live_node_are_failed(registry):
    _, (dead_run,) = _claimed(registry, "node/100", 1)
    _, (live_run,) = _claimed(registry, "node/200", 1)
    time.sleep(1.1)  # claimed before the heartbeat below (by more than its one-second margin)
    registry.liveness.beat("node", [1, 200], [])
    assert _recovery(registry).run_once()["runs_worker_lost"] == 1
    assert _status(registry, dead_run) == RunStatus.FAILED
    assert _status(registry, live_run) == RunStatus.RUNNING


def test_an_acks_late_run_of_a_gone_node_is_released_not_failed(registry):
    def late() -> None:
        """acks_late: Celery would deliver it again after its worker died."""

    registry.app.task(name="tests.recovery.late", acks_late=True, shared=False)(late)
    registry.liveness.beat("dead", [100], [])
    _, (run,) = _claimed(registry, "dead/100", 1, task="tests.recovery.late")
    recovery = _recovery(registry, node_timeout=0.2, heartbeat_interval=0.05)
    recovery.run_once()
    time.sleep(0.3)
    assert recovery.run_once()["runs_released"] == 1
    assert _status(registry, run) == RunStatus.PENDING


def test_a_heartbeat_marks_exactly_the_runs_the_node_holds(registry):
    """A run the node no longer holds loses its mark (the lost-message search skips marked runs);
    a run it claimed keeps its claim; an unreadable worker state leaves the marks alone."""
    with registry.batch("marks") as b:
        a, c, d = (b.enqueue(registry.app.signature("tests.proj.noop").set(queue=registry.queue)) for _ in range(3))
    registry.liveness.beat("node", [1], [a, c, d])
    assert registry.liveness.claim(d, 0, "node/1/x", utcnow()).claimed
    registry.liveness.beat("node", [1], [a])
    assert [_node(registry, run) for run in (a, c, d)] == ["node", None, "node/1/x"]
    registry.liveness.beat("node", [1], None)
    assert _node(registry, a) == "node"
    registry.liveness.beat("node", [1], [])
    assert _node(registry, a) is None


def _node(registry, run_id):
    r = registry.store.tables.runs
    with registry.engine.connect() as conn:
        return conn.scalar(sa.select(r.c.node).where(r.c.id == run_id))


def test_a_run_handed_back_after_its_batch_was_cancelled_ends_cancelled(registry):
    """Chaos soak, 10 minutes: a run RUNNING when its batch was cancelled (a cancel leaves it alone),
    whose worker then died (acks_late: handed back to waiting), stayed PENDING for good: nothing
    publishes a run of a cancelled batch. Now recovery ends it CANCELLED and counts it."""
    batch_id, (running, waiting) = _claimed(registry, "dead/100")
    registry.liveness.release([waiting], held_by="dead")  # back to waiting before the cancel: cancelled by it
    assert registry.cancel_batch(batch_id) == 1
    assert registry.liveness.release([running], held_by="dead") == 1  # what recovery does for an acks_late run
    assert _status(registry, running) == RunStatus.PENDING
    assert _recovery(registry).run_once()["runs_cancelled"] == 1
    assert _status(registry, running) == RunStatus.CANCELLED
    batch = registry.get_batch(batch_id)
    assert (batch.status, batch.cancelled_jobs, batch.pending_jobs) == (BatchStatus.CANCELLED, 2, 0)


def _status(registry, run_id):
    r = registry.store.tables.runs
    with registry.engine.connect() as conn:
        return RunStatus(conn.scalar(sa.select(r.c.status).where(r.c.id == run_id)))


def test_a_worker_heartbeats_with_its_pool_processes(proj, start_worker):
    """The heartbeat lists the main process and every live pool process: recovery fails the runs of
    a pool process missing from it, so a wrong list would fail healthy runs."""
    w = start_worker()

    def row():
        return next((pids for name, (_, pids) in proj.batches.liveness.nodes().items()
                     if name.split(":")[1] == str(w.proc.pid)), None)

    eventually(lambda: row() == {w.proc.pid, *w.children()}, "the node's row with its pool pids", 30)
    dead = w.kill_children()
    eventually(lambda: row() is not None and not row() & set(dead) and len(row()) == 3,
               "the heartbeat to list the replacement processes instead", 30)


def test_a_claim_is_one_deliverys_own(registry):
    """A second delivery of a RUNNING run is not claimed, even in the process that runs the first
    (its outcome may still be buffered there); the same delivery repeating its claim is."""
    _, (run,) = _claimed(registry, "n/1/first", 1)
    assert not registry.liveness.claim(run, 0, "n/1/second", utcnow()).claimed
    assert not registry.liveness.claim(run, 0, "n/2/third", utcnow()).claimed
    assert registry.liveness.claim(run, 0, "n/1/first", utcnow()).claimed  # its commit went unanswered
    assert registry.liveness.claim(run, 1, "n/2/retry", utcnow()).claimed  # the next attempt


class _Broker:
    """A probe whose every look finds the given run held unacknowledged under ``tag`` (the message of
    its current attempt), and which records what recovery restores."""

    knows = True

    def __init__(self, run_id: str) -> None:
        from celery_batches.broker import Snapshot

        self.run_id, self.tag, self.restored, self.Snapshot = run_id, "tag-0", [], Snapshot

    def look(self, queues):
        return self.Snapshot(held={self.run_id: self.tag})

    def restore(self, tags):
        self.restored += list(tags)
        return len(tags)


def test_messages_of_successive_attempts_held_in_turn_are_not_one_orphan(registry):
    """Chaos soak, 2026-12-02: a plain task retrying with a short countdown had each attempt's message
    held unacknowledged for a moment before its worker's heartbeat marked it; the lost-message search
    counted those moments as one message held by nobody for longer than the confirm time, restored the
    third attempt's message while its worker held it, and that attempt ran twice. Only the same message
    seen held at both looks is an orphan."""
    import time

    recovery = _recovery(registry, lost_after=0.001, relay_interval=0.01, heartbeat_interval=0.01)
    with registry.batch("retrying") as b:
        run = b.enqueue(registry.app.signature("tests.proj.noop").set(queue=registry.queue))
    recovery.probe = broker = _Broker(run)
    confirm = recovery._confirm()
    for attempt in range(3):  # each look finds the next attempt's message, after more than confirm
        broker.tag = f"tag-{attempt}"
        assert recovery.run_once()["messages_restored"] == 0, f"attempt {attempt}'s message restored"
        time.sleep(confirm + 0.1)
    assert recovery.run_once()["messages_restored"] == 1  # the same message at two looks: orphaned
    assert broker.restored == ["tag-2"]
