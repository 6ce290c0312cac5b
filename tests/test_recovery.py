"""Recovery with Celery's default settings: no acks_late, no result backend read, Redis's one-hour
visibility timeout. Real prefork workers are SIGKILLed; every batch must still finish, every run
must end in a final state saying why, and no job may run twice unless Celery itself would run it
twice. The test app's recovery timings are short (heartbeat 1 s, node timeout 10 s, lost after 10 s).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from celery_batches import BatchStatus, RunStatus, metrics
from celery_batches.models import ContinuationStatus
from celery_batches.store import RunEvent, utcnow
from tests.helpers import (RECOVERY, Worker, eventually, fired_once, free_port, needs, nowhere_signature,
                           private_registry, start_redis, tag)

pytestmark = needs("postgres", "redis")


def starts(proj, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in proj.r.hgetall(key).items()}


def settled(proj, batch_id: str, batches=None):
    batches = batches or proj.batches
    done = batches.wait(batch_id, timeout=RECOVERY)
    jobs = batches.get_batch_jobs(batch_id)
    assert all(j.status.is_final for j in jobs), [j.status for j in jobs]
    assert (done.completed_jobs, done.failed_jobs, done.cancelled_jobs) == (
        sum(j.status == RunStatus.COMPLETED for j in jobs), sum(j.status == RunStatus.FAILED for j in jobs),
        sum(j.status == RunStatus.CANCELLED for j in jobs))
    return done, jobs


@pytest.mark.slow
@needs("worker")
def test_a_whole_worker_killed_with_celery_defaults_leaves_nothing_open(proj, start_worker):
    """A worker SIGKILLed under Celery's defaults: the runs it was running end FAILED "worker lost"
    (Celery acknowledged them: it would not run them again), the ones it had prefetched are handed
    back to the queue and run on a new node, and the batch finishes; nothing runs twice."""
    w = start_worker()
    key = tag("starts")
    recovered = metrics.snapshot(proj.batches).recovered
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
    # the recovery counter (the metric celery_batches_runs_recovered_total), in the registry: every process
    # reads the same; the pass adds its count after it resolved them
    counted = lambda: metrics.snapshot(proj.batches).recovered["worker_lost"] - recovered["worker_lost"]  # noqa: E731
    eventually(lambda: counted() >= len(lost), "the recovery counter to count the runs lost with the worker", RECOVERY)
    assert done.completed_jobs == 20 - len(lost) and set(ids) == {j.id for j in jobs}


@pytest.mark.slow
@needs("worker")
def test_pool_processes_killed_like_an_oom_killer(proj, start_worker):
    """Pool processes SIGKILLed one a second (with outcomes buffered in them): each run they held ends
    FAILED (Celery's WorkerLostError, or recovery's "worker lost"), the batch finishes, nothing runs twice."""
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
@needs("worker")
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
@needs("worker")
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
@needs("worker")
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
@needs("worker")
def test_runs_a_live_worker_held_when_the_broker_lost_them_run(proj, start_worker):
    """A broker restart loses the queue and the messages a live worker had prefetched; the worker
    reconnects and holds them no more. Its next heartbeat drops their marks (each beat marks exactly
    what the node holds), so the lost-message search finds them and publishes them again: each runs once."""
    w = start_worker()
    key = tag("starts")
    with proj.batches.batch("held-then-lost") as b:
        for _ in range(12):
            b.enqueue(proj.track.s(key, 1.5).set(queue=w.queue))
    r = proj.batches.transitions.tables.runs

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
def _recovery(batches, **settings):
    from dataclasses import replace

    from celery_batches.worker.recovery import Recovery

    batches.settings = replace(batches.settings, **settings)
    return Recovery(batches.settings, batches.app, batches.liveness, batches.probe, batches.node.write_events,
                    batches.node.name)


def _claimed(batches, node: str, n: int = 2, task: str = "tests.proj.noop"):
    with batches.batch("claimed") as b:
        ids = [b.enqueue(batches.app.signature(task).set(queue=batches.queue)) for _ in range(n)]
    for run_id in ids:
        assert batches.liveness.claim(run_id, 0, node, utcnow()).claimed
    return b.id, ids


def test_a_node_is_gone_only_after_its_heartbeat_stood_still_for_the_timeout_on_the_observers_clock(pg_registry):
    pg_registry.liveness.beat("dead", [100], [])
    batch_id, ids = _claimed(pg_registry, "dead/100")
    recovery = _recovery(pg_registry, node_timeout=0.5, heartbeat_interval=0.1)
    assert recovery.run_once()["runs_worker_lost"] == 0  # first sight: however old the heartbeat, not gone yet
    time.sleep(0.6)
    assert recovery.run_once()["runs_worker_lost"] == 2
    jobs = pg_registry.get_batch_jobs(batch_id)
    assert {j.status for j in jobs} == {RunStatus.FAILED} and all("worker lost" in j.error for j in jobs)
    assert pg_registry.get_batch(batch_id).status == BatchStatus.FAILED
    assert "dead" not in pg_registry.liveness.nodes()  # forgotten once nothing of it is open


def test_a_node_that_keeps_beating_is_never_gone(pg_registry):
    pg_registry.liveness.beat("alive", [100], [])
    _, ids = _claimed(pg_registry, "alive/100")
    recovery = _recovery(pg_registry, node_timeout=0.5, heartbeat_interval=0.1)
    for _ in range(3):
        pg_registry.liveness.beat("alive", [100], [])
        assert recovery.run_once()["runs_worker_lost"] == 0
        time.sleep(0.3)
    assert "alive" in pg_registry.liveness.nodes()


def test_runs_of_a_dead_pool_process_of_a_live_node_are_failed(pg_registry):
    _, (dead_run,) = _claimed(pg_registry, "node/100", 1)
    _, (live_run,) = _claimed(pg_registry, "node/200", 1)
    time.sleep(1.1)  # claimed before the heartbeat below (by more than its one-second margin)
    pg_registry.liveness.beat("node", [1, 200], [])
    assert _recovery(pg_registry).run_once()["runs_worker_lost"] == 1
    assert _status(pg_registry, dead_run) == RunStatus.FAILED
    assert _status(pg_registry, live_run) == RunStatus.RUNNING


def test_an_acks_late_run_of_a_gone_node_is_released_not_failed(pg_registry):
    def late() -> None:
        """acks_late: Celery would deliver it again after its worker died."""

    pg_registry.app.task(name="tests.recovery.late", acks_late=True, shared=False)(late)
    pg_registry.liveness.beat("dead", [100], [])
    _, (run,) = _claimed(pg_registry, "dead/100", 1, task="tests.recovery.late")
    recovery = _recovery(pg_registry, node_timeout=0.2, heartbeat_interval=0.05)
    recovery.run_once()
    time.sleep(0.3)
    assert recovery.run_once()["runs_handed_back"] == 1
    assert _status(pg_registry, run) == RunStatus.PENDING


def test_a_heartbeat_marks_exactly_the_runs_the_node_holds(pg_registry):
    """A run the node no longer holds loses its mark (the lost-message search skips marked runs);
    a run it claimed keeps its claim; an unreadable worker state leaves the marks alone."""
    with pg_registry.batch("marks") as b:
        a, c, d = (b.enqueue(nowhere_signature(pg_registry)) for _ in range(3))
    pg_registry.liveness.beat("node", [1], [a, c, d])
    assert pg_registry.liveness.claim(d, 0, "node/1/x", utcnow()).claimed
    pg_registry.liveness.beat("node", [1], [a])
    assert [_node(pg_registry, run) for run in (a, c, d)] == ["node", None, "node/1/x"]
    pg_registry.liveness.beat("node", [1], None)
    assert _node(pg_registry, a) == "node"
    pg_registry.liveness.beat("node", [1], [])
    assert _node(pg_registry, a) is None


def _node(batches, run_id):
    r = batches.transitions.tables.runs
    with batches.engine.connect() as conn:
        return conn.scalar(sa.select(r.c.node).where(r.c.id == run_id))


def test_a_run_handed_back_after_its_batch_was_cancelled_ends_cancelled(pg_registry):
    """A run RUNNING when its batch was cancelled (a cancel leaves it alone), then handed back to
    waiting (its acks_late worker died): nothing publishes a run of a cancelled batch, so recovery
    ends it CANCELLED and counts it."""
    batch_id, (running, waiting) = _claimed(pg_registry, "dead/100")
    pg_registry.liveness.hand_back_runs([waiting], left_by="dead")  # back to waiting before the cancel: cancelled by it
    assert pg_registry.cancel_batch(batch_id) == 1
    # what recovery does for an acks_late run
    assert pg_registry.liveness.hand_back_runs([running], left_by="dead") == 1
    assert _status(pg_registry, running) == RunStatus.PENDING
    assert _recovery(pg_registry).run_once()["runs_cancelled"] == 1
    assert _status(pg_registry, running) == RunStatus.CANCELLED
    batch = pg_registry.get_batch(batch_id)
    assert (batch.status, batch.cancelled_jobs, batch.pending_jobs) == (BatchStatus.CANCELLED, 2, 0)


def _status(batches, run_id):
    r = batches.transitions.tables.runs
    with batches.engine.connect() as conn:
        return RunStatus(conn.scalar(sa.select(r.c.status).where(r.c.id == run_id)))


@needs("worker")
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


def test_a_claim_is_one_deliverys_own(pg_registry):
    """A second delivery of a RUNNING run is not claimed, even in the process that runs the first
    (its outcome may still be buffered there); the same delivery repeating its claim is."""
    _, (run,) = _claimed(pg_registry, "n/1/first", 1)
    assert not pg_registry.liveness.claim(run, 0, "n/1/second", utcnow()).claimed
    assert not pg_registry.liveness.claim(run, 0, "n/2/third", utcnow()).claimed
    assert pg_registry.liveness.claim(run, 0, "n/1/first", utcnow()).claimed  # its commit went unanswered
    assert pg_registry.liveness.claim(run, 1, "n/2/retry", utcnow()).claimed  # the next attempt


class _Broker:
    """A probe whose every look finds the given run held unacknowledged under ``tag`` (the message of
    its current attempt), and which records what recovery restores."""

    knows = True

    def __init__(self, run_id: str) -> None:
        from celery_batches.publishing.probe import Snapshot

        self.run_id, self.tag, self.restored, self.Snapshot = run_id, "tag-0", [], Snapshot

    def look(self, queues):
        return self.Snapshot(unacked={self.run_id: self.tag})

    def restore(self, tags):
        self.restored += list(tags)
        return len(tags)


def test_messages_of_successive_attempts_unacknowledged_in_turn_are_not_one_orphan(pg_registry):
    """A retrying run whose attempts' messages are each seen unacknowledged by nobody at one look (before
    a heartbeat marked them) has no orphan: the moments of different attempts do not add up, and only
    the same message seen held at two looks, the confirm time apart, is restored."""
    import time

    recovery = _recovery(pg_registry, lost_after=0.001, relay_interval=0.01, heartbeat_interval=0.01)
    with pg_registry.batch("retrying") as b:
        run = b.enqueue(nowhere_signature(pg_registry))
    recovery.probe = broker = _Broker(run)
    confirm = recovery._confirm()
    for attempt in range(3):  # each look finds the next attempt's message, after more than confirm
        broker.tag = f"tag-{attempt}"
        assert recovery.run_once()["messages_restored"] == 0, f"attempt {attempt}'s message restored"
        time.sleep(confirm + 0.1)
    assert recovery.run_once()["messages_restored"] == 1  # the same message at two looks: orphaned
    assert broker.restored == ["tag-2"]


def test_a_heartbeat_marks_more_runs_than_a_statement_has_parameters(pg_registry):
    """A heartbeat marks more held runs than a statement has bind parameters (65,535: a big batch with
    a countdown), and ignores the ids that are no run's."""
    from celery_batches.builder import BatchBuilder

    builder = BatchBuilder(pg_registry.app, "held-by-one-node")
    ids = [builder.enqueue(nowhere_signature(pg_registry, countdown=60)) for _ in range(70_000)]
    with pg_registry.engine.begin() as conn:
        pg_registry.trees.insert_tree(conn, builder.seal(), utcnow())
    r = pg_registry.transitions.tables.runs

    def marked() -> int:
        with pg_registry.engine.connect() as conn:
            return conn.scalar(sa.select(sa.func.count()).where(r.c.node == "big"))

    pg_registry.liveness.beat("big", [1], ids)
    assert marked() == 70_000
    pg_registry.liveness.beat("big", [1], ids[:100] + ["a-task-id-of-my-own", "celery-beat-task"])
    assert marked() == 100, "ids that are no run's are ignored, not an error"
    pg_registry.liveness.beat("big", [1], [])
    assert marked() == 0


def test_one_unreadable_outcome_in_the_result_backend_stops_nothing_else(pg_registry, monkeypatch):
    """A result-backend error on one run leaves that run for the next reconciler pass; the others are resolved."""
    pg_registry.app.conf.result_backend = os.environ["TEST_BACKEND_URL"]
    _, (broken, fine) = _claimed(pg_registry, "n/1/x")
    pg_registry.app.backend.store_result(fine, "done", "SUCCESS")
    real = pg_registry.app.backend.get_task_meta

    def get_task_meta(task_id, *args, **kwargs):
        if task_id == broken:
            raise ConnectionError("the backend hiccuped")
        return real(task_id, *args, **kwargs)

    monkeypatch.setattr(pg_registry.app.backend, "get_task_meta", get_task_meta)
    assert pg_registry.relay.reconciler.run_once(utcnow() + timedelta(hours=1)) == 1
    assert (_status(pg_registry, broken), _status(pg_registry, fine)) == (RunStatus.RUNNING, RunStatus.COMPLETED)


def test_a_value_recovered_from_the_result_backend_is_kept_as_the_worker_would_keep_it(pg_registry):
    """A ``results=True`` run completed from the result backend keeps its value as the worker would:
    a value over ``result_max_bytes`` fails the run."""
    pg_registry.app.conf.result_backend = os.environ["TEST_BACKEND_URL"]
    with pg_registry.batch("recovered-values", results=True) as b:
        small, big = (b.enqueue(nowhere_signature(pg_registry)) for _ in "ab")
    for run_id in (small, big):
        assert pg_registry.liveness.claim(run_id, 0, "n/1/x", utcnow()).claimed
    pg_registry.app.backend.store_result(small, [1, 2], "SUCCESS")
    pg_registry.app.backend.store_result(big, "x" * (pg_registry.settings.result_max_bytes + 1), "SUCCESS")
    assert pg_registry.relay.reconciler.run_once(utcnow() + timedelta(hours=1)) == 2
    results = {r.run_id: r for r in pg_registry.get_results(b.id)}
    assert (results[small].status, results[small].value) == (RunStatus.COMPLETED, [1, 2])
    assert results[big].status == RunStatus.FAILED and "result_max_bytes" in results[big].error


def test_a_run_celery_requeues_when_its_pool_process_dies_is_handed_back(pg_registry):
    """``task_reject_on_worker_lost`` (with acks_late): Celery requeues the message of a task whose pool
    process died, so recovery hands that run back; a plain task's run it fails "worker lost"."""
    def requeued() -> None:
        """acks_late + reject_on_worker_lost."""

    pg_registry.app.task(name="tests.recovery.requeued", acks_late=True, reject_on_worker_lost=True,
                      shared=False)(requeued)
    _, (again,) = _claimed(pg_registry, "node/100/a", 1, task="tests.recovery.requeued")
    _, (lost,) = _claimed(pg_registry, "node/100/b", 1)
    time.sleep(1.1)  # claimed before the heartbeat below (by more than its one-second margin)
    pg_registry.liveness.beat("node", [1, 200], [])
    done = _recovery(pg_registry).run_once()
    assert (done["runs_handed_back"], done["runs_worker_lost"]) == (1, 1)
    assert (_status(pg_registry, again), _status(pg_registry, lost)) == (RunStatus.PENDING, RunStatus.FAILED)


def test_a_delivery_skipped_while_its_run_ran_elsewhere_is_published_again_if_the_run_comes_back(pg_registry):
    """A delivery skipped because its run is RUNNING under another node (RabbitMQ redelivers a dead
    consumer's acks_late message at once) notes that no message of the run is left: once recovery
    hands the run back, the relay publishes it again."""
    _, (run,) = _claimed(pg_registry, "dead/1/x", 1)
    assert pg_registry.node.verdict(run, None, pg_registry.liveness.claim(run, 0, "alive/2/y", utcnow())) == "skip"
    assert pg_registry.liveness.hand_back_runs([run], left_by="dead") == 1
    lease, runs, _ = pg_registry.publisher.outbox.take_lapsed(100)
    assert [m.id for m in runs] == [run]


def test_a_plain_tasks_claim_takes_the_run_over(pg_registry):
    """A plain @app.task runs whatever the registry says: its claim names the process that runs it,
    so recovery never fails (or hands back) a run that a live process is running."""
    _, (run,) = _claimed(pg_registry, "dead/1/x", 1)
    assert not pg_registry.liveness.claim(run, 0, "alive/2/y", utcnow()).claimed
    assert pg_registry.liveness.claim(run, 0, "alive/2/y", utcnow(), force=True).claimed
    assert _node(pg_registry, run) == "alive/2/y"


# -- the configurations people deploy: RabbitMQ, several nodes, Celery's requeue settings ----------------
@pytest.mark.slow
@needs("worker")
def test_acks_late_runs_of_a_worker_killed_and_restarted_at_once_finish(proj, broker_url, registry_on, start_worker):
    """20 acks_late jobs, their worker SIGKILLed and a new one started at once: RabbitMQ redelivers
    the running ones at once, while their runs are still RUNNING under the dead node; Redis returns
    them from its unacked set. On either broker every job ends, as acks_late promises."""
    producer, key = registry_on(broker_url), tag("starts")
    w = start_worker(**producer.worker_env)
    with producer.batch("acks-late-restarted") as b:
        for _ in range(20):
            b.enqueue(producer.app.signature("tests.proj.track_late", (key, 0.5), queue=w.queue))
    eventually(lambda: len(starts(proj, key)) >= 2, "two members to start", 30)
    w.kill()
    with Worker(proj, w.queue, **producer.worker_env):  # a new node at once, on the same queue
        done, jobs = settled(proj, b.id, producer)
    assert (done.status, done.completed_jobs) == (BatchStatus.COMPLETED, 20)
    assert len(starts(proj, key)) == 20


@pytest.mark.slow
@needs("worker")
def test_a_node_lost_for_good_while_another_runs_on(proj, broker_url, registry_on, start_worker):
    """Two worker nodes on one queue (``-n``); one is SIGKILLed for good while the other runs on.
    Within the recovery bound, what the lost node was running ends FAILED "worker lost" where Celery
    acknowledged it (the default) and runs again on the other node where Celery redelivers it
    (acks_late); what it held runs on the other node; nothing runs twice that Celery would not run twice."""
    queue, producer, key = f"cbt-two-{uuid.uuid4().hex[:6]}", registry_on(broker_url), tag("starts")
    lost = start_worker(queue=queue, name=f"{queue}-a", **producer.worker_env)
    start_worker(queue=queue, name=f"{queue}-b", **producer.worker_env)
    with producer.batch("two-nodes") as b:
        default, late = [], []
        for _ in range(50):  # in turn, so the lost node is running some of each kind
            default.append(b.enqueue(producer.app.signature("tests.proj.track", (key, 0.2), queue=queue)))
            late.append(b.enqueue(producer.app.signature("tests.proj.track_late", (key, 0.2), queue=queue)))
    eventually(lambda: len(starts(proj, key)) >= 10, "members to start on both nodes", 30)
    lost.kill()
    done, jobs = settled(proj, b.id, producer)
    ran, status = starts(proj, key), {j.id: j for j in jobs}
    assert all(ran.get(i, 0) <= 1 for i in default), "a job Celery acknowledged ran twice"
    assert all(status[i].status == RunStatus.COMPLETED for i in late), "acks_late jobs all run to their end"
    failed = [status[i] for i in default if status[i].status == RunStatus.FAILED]
    assert all("worker lost" in j.error for j in failed) and {j.id for j in failed} <= set(ran)
    assert done.completed_jobs + len(failed) == 100


@pytest.mark.slow
@needs("worker")
def test_a_task_celery_requeues_when_its_pool_process_dies_runs_again(proj, start_worker):
    """``task_reject_on_worker_lost`` (with acks_late): Celery requeues the message of a task whose pool
    process died; the redelivery runs it again, the dead process's claim notwithstanding, and the run
    completes, as Celery promises."""
    w = start_worker()
    key = tag("starts")
    with proj.batches.batch("requeued-if-lost") as b:
        for _ in range(2):
            b.enqueue(proj.requeued_if_lost.s(key, 2.0).set(queue=w.queue))
    eventually(lambda: len(starts(proj, key)) == 2, "both members to start", 30)
    w.kill_children()
    done, jobs = settled(proj, b.id)
    assert (done.status, done.completed_jobs) == (BatchStatus.COMPLETED, 2)
    assert sorted(starts(proj, key).values()) == [2, 2]


@pytest.mark.slow
@needs("worker")
def test_retry_failed_next_to_a_result_backend_ends_with_the_new_attempt(proj, start_worker):
    """A job retried with retry_failed (the same task id), its second attempt slow: the reconciler
    never reads the first attempt's FAILURE in the result backend as the second's outcome, and the
    batch ends with the second attempt."""
    w = start_worker(TEST_RECONCILE_GRACE="1")  # its reconciler looks at any run open for a second
    flag = tag("flag")
    with proj.batches.batch("retry-with-a-backend") as b:
        run = b.enqueue(proj.fail_then_sleep.s(flag, 6.0).set(queue=w.queue))
    assert proj.batches.wait(b.id, timeout=RECOVERY).status == BatchStatus.FAILED
    proj.r.set(flag, 1)
    assert proj.batches.retry_failed(b.id) == 1
    done = proj.batches.wait(b.id, timeout=RECOVERY)
    [job] = proj.batches.get_batch_jobs(b.id)
    assert (done.status, job.id, job.status, job.error) == (BatchStatus.COMPLETED, run, RunStatus.COMPLETED, None)


@pytest.fixture
def sentinel(tmp_path):
    """A private Redis watched by a private Sentinel (``redis-server --sentinel``): the broker URL a
    Sentinel deployment gives Celery, and its master's client."""
    import subprocess

    import redis

    port, sentinel_port = free_port(), free_port()
    server = start_redis(port)
    config = tmp_path / "sentinel.conf"
    config.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor cbt 127.0.0.1 {port} 1\n")
    watcher = subprocess.Popen(["redis-server", str(config), "--sentinel"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=sentinel_port, socket_connect_timeout=0.5)

    def knows_the_master() -> bool:
        try:
            return client.execute_command("SENTINEL", "get-master-addr-by-name", "cbt") is not None
        except redis.RedisError:
            return False

    eventually(knows_the_master, "the sentinel to answer", 20)
    try:
        yield f"sentinel://127.0.0.1:{sentinel_port}", redis.Redis(port=port)
    finally:
        watcher.kill()
        server.kill()
        watcher.wait(10)
        server.wait(10)


def test_a_message_lost_behind_a_redis_sentinel_is_found_and_published_again(sentinel):
    """A Sentinel broker (``sentinel://``) gets the Redis lost-message probe: a message lost in a
    failover is found missing at two looks and published again."""
    from celery import Celery

    from celery_batches.publishing.probe import RedisProbe

    url, master = sentinel
    app = Celery(f"sentinel_{uuid.uuid4().hex[:6]}", broker=url, set_as_current=False)
    app.conf.broker_transport_options = {"master_name": "cbt"}
    with private_registry(app, "cbt_sn") as batches:
        assert isinstance(batches.probe, RedisProbe)
        batches.queue = "cbt-behind-a-sentinel"
        with batches.batch("behind-a-sentinel") as b:
            ids = [b.enqueue(app.signature("tests.proj.noop").set(queue=batches.queue)) for _ in range(3)]
        assert master.llen(batches.queue) == 3
        master.delete(batches.queue)  # what a failover to a replica that had not got them yet does
        recovery = _recovery(batches, lost_after=0.001, relay_interval=0.01, heartbeat_interval=0.01)
        confirm = recovery._confirm()
        assert recovery.run_once()["runs_republished"] == 0  # one look proves nothing
        time.sleep(confirm + 0.1)
        assert recovery.run_once()["runs_republished"] == 3
        assert batches.publisher.relay(100).runs == 3
        assert master.llen(batches.queue) == 3
        assert {j.status for j in batches.get_batch_jobs(b.id)} == {RunStatus.PENDING} and len(ids) == 3


def test_a_run_handed_to_its_replacement_is_claimed_by_the_replacement_only(pg_registry):
    """A run a member handed to its replacement (``Task.replace``) is claimed only by a delivery that
    presents the replaced claim, never by another copy of the member's message; a run with no
    hand-over (the registry was unreachable then) is claimed by the replacement all the same."""
    _, (handed, kept) = _claimed(pg_registry, "n/1/original")
    assert pg_registry.liveness.hand_back(handed, "n/1/original", replaced_by="message") == 1
    assert not pg_registry.liveness.claim(handed, 0, "n/2/duplicate", utcnow()).claimed
    assert pg_registry.liveness.claim(handed, 0, "n/3/replacement", utcnow(), replaces="n/1/original").claimed
    assert pg_registry.liveness.claim(kept, 0, "n/3/other", utcnow(), replaces="n/1/original").claimed


def test_a_copy_of_the_attempt_that_raised_the_retry_is_not_run_again(pg_registry):
    """A RETRYING run is claimed only by its next attempt: another copy of the attempt that raised the
    retry (one message delivered to two workers) is not run again."""
    _, (run,) = _claimed(pg_registry, "n/1/first", 1)
    pg_registry.transitions.apply_events([RunEvent(run, RunStatus.RETRYING, 0)])
    assert not pg_registry.liveness.claim(run, 0, "n/2/copy", utcnow()).claimed
    assert pg_registry.liveness.claim(run, 1, "n/2/retry", utcnow()).claimed


def test_a_replacement_whose_message_the_broker_lost_fails_its_run(pg_registry):
    """A run whose replacement's message the broker lost (found missing at two looks) FAILS, saying so:
    that message was Celery's, not the registry's to publish again, and the member's own would run
    the replaced body twice."""
    _, (run,) = _claimed(pg_registry, "n/1/original", 1)
    pg_registry.liveness.hand_back(run, "n/1/original", replaced_by="message")
    recovery = _recovery(pg_registry, lost_after=0.001, relay_interval=0.01, heartbeat_interval=0.01)
    recovery.probe = _Empty()
    assert recovery.run_once()["runs_replacement_lost"] == 0  # one look proves nothing
    time.sleep(recovery._confirm() + 0.1)
    done = recovery.run_once()
    assert (done["runs_replacement_lost"], done["runs_republished"]) == (1, 0)
    [job] = pg_registry.get_batch_jobs(_batch_of(pg_registry, run))
    assert job.status == RunStatus.FAILED and "replacement" in job.error


class _Empty:
    """A probe that finds every queue empty."""

    knows = True

    def look(self, queues):
        from celery_batches.publishing.probe import Snapshot

        return Snapshot()

    def restore(self, tags):
        return 0


def _batch_of(batches, run_id):
    r = batches.transitions.tables.runs
    with batches.engine.connect() as conn:
        return str(conn.scalar(sa.select(r.c.batch_id).where(r.c.id == run_id)))


def test_a_run_is_handed_to_its_replacement_however_long_the_registry_is_away(pg_registry, monkeypatch):
    """``Task.replace()`` hands the run over before the replacement is sent, and waits for the registry
    to do it (as a claim does): a run left RUNNING on a live process whose delivery ended would never
    be recovered, and if its replacement were lost it would never finish."""
    import sqlalchemy.exc

    batch_id, (handed, _kept) = _claimed(pg_registry, "n/1/original")
    liveness, refusals = pg_registry.liveness, iter(range(8))  # more refusals than a read retries
    real = type(liveness).hand_back

    def hand_back(self, *args, **kwargs):
        if next(refusals, None) is not None:
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, ConnectionRefusedError("the registry is away"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(liveness), "hand_back", hand_back)
    pg_registry.node.hand_back(handed, "n/1/original", replaced_by="message")
    assert next(refusals, None) is None  # every refusal was met with another try
    [job] = [j for j in pg_registry.get_batch_jobs(batch_id) if j.id == handed]
    assert job.status == RunStatus.PENDING
