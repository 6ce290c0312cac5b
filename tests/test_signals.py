"""``celery_batches.signals``: ``batch_created`` in the producer after the commit that created each
batch, ``batch_finished`` once per batch in the process whose transaction finished it, and their INFO
lines. The worker's signals are seen through ``tests.proj``'s receiver, which writes each one into a
Redis list per batch with its pid (the test process imports ``tests.proj`` too, so the producer's own
are in the same lists); the producer's are also caught in this process by receivers of the test's own.
"""

from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from kombu import Queue
from sqlalchemy.orm import Session

from celery_batches import BatchStatus
from celery_batches.signals import batch_created, batch_finished
from tests.helpers import WAIT, drain, eventually, fired_once, needs, nowhere_signature, tag, \
    unique_name

pytestmark = needs("postgres", "redis")
LOGGER = "celery_batches.signals"


@contextmanager
def caught(signal: Any, *, raises: bool = False) -> Iterator[list[dict]]:
    """What ``signal`` sends in this process while the block runs (``raises``: the receiver raises
    after noting it, as a broken receiver of a user would)."""
    seen: list[dict] = []

    def receiver(sender: Any = None, **named: Any) -> None:
        named.pop("signal", None)
        seen.append(dict(named, sender=sender))
        if raises:
            raise RuntimeError("a receiver of this test raises on purpose")

    uid = f"test-{uuid.uuid4().hex}"
    signal.connect(receiver, weak=False, dispatch_uid=uid)
    try:
        yield seen
    finally:
        signal.disconnect(receiver, dispatch_uid=uid)


def finished(proj: Any, batch_id: str) -> list[tuple[str, int]]:
    """The ``batch_finished`` signals any process of ``tests.proj`` sent for the batch: (status, pid)."""
    return [(status, int(pid)) for status, pid in
            (item.decode().split() for item in proj.r.lrange(proj.finished_key(batch_id), 0, -1))]


def finished_once(proj: Any, batch_id: str, status: BatchStatus, *, here: bool = False) -> None:
    """Exactly one ``batch_finished(status)`` for the batch (once the queue drained, so a second one
    would show), sent in a worker's process, or in this one (``here``)."""
    eventually(lambda: finished(proj, batch_id), f"batch_finished of {batch_id}", WAIT)
    drain(proj)
    found = finished(proj, batch_id)
    assert [s for s, _ in found] == [status.name], found
    assert (found[0][1] == os.getpid()) == here, found


def created_names(seen: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in seen:
        out.setdefault(item["batch_id"], []).append(item["name"])
    return out


@needs("worker")
def test_every_batch_of_a_tree_is_created_once_here_and_finished_once_in_the_worker(proj, worker, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    failed = tag("fails")
    with caught(batch_created) as created:
        with proj.batches.batch("sig-tree") as b:
            b.enqueue(proj.add, 1, 2)
            with b.batch("sig-child") as child:
                child.enqueue(proj.add, 3, 4)
                with child.batch("sig-grandchild") as grandchild:
                    grandchild.enqueue(proj.add, 5, 6)
            with b.batch("sig-failing") as failing:
                failing.enqueue(proj.fail, failed)
                failing.enqueue(proj.add, 7, 8)
    assert created_names(created) == {b.id: ["sig-tree"], child.id: ["sig-child"],
                                      grandchild.id: ["sig-grandchild"], failing.id: ["sig-failing"]}
    assert {item["sender"] for item in created} == {proj.app}
    assert f"celery_batches: batch {b.id} sig-tree created (3 jobs)" in caplog.messages
    assert f"celery_batches: batch {failing.id} sig-failing created (2 jobs)" in caplog.messages
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.FAILED
    for batch_id, status in ((grandchild.id, BatchStatus.COMPLETED), (child.id, BatchStatus.COMPLETED),
                             (failing.id, BatchStatus.FAILED), (b.id, BatchStatus.FAILED)):
        finished_once(proj, batch_id, status)


@needs("worker")
def test_a_stage_is_created_here_and_finished_once_and_a_stage_that_does_not_match_is_cancelled_once(proj, worker):
    flag = tag("flag")
    with caught(batch_created) as created:
        with proj.batches.batch("sig-antecedent") as b:
            b.enqueue(proj.gate, flag, 1)  # open until both stages wait on it
        on_success = proj.batches.continue_batch_with(b.id, "sig-on-success", lambda s: s.enqueue(proj.add, 2, 2))
        on_failure = proj.batches.continue_batch_with(b.id, "sig-on-failure", lambda s: s.enqueue(proj.add, 3, 3),
                                                      when="failure")
        proj.r.set(flag, 1)
    assert created_names(created) == {b.id: ["sig-antecedent"], on_success: ["sig-on-success"],
                                      on_failure: ["sig-on-failure"]}
    assert proj.batches.wait(on_success, timeout=WAIT).status == BatchStatus.COMPLETED
    finished_once(proj, b.id, BatchStatus.COMPLETED)
    finished_once(proj, on_success, BatchStatus.COMPLETED)
    finished_once(proj, on_failure, BatchStatus.CANCELLED)  # by the antecedent's finish, in the worker


def test_a_cancel_finishes_the_subtree_here_once_with_its_log_lines(proj, nowhere, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    name = unique_name("sig-cancel")
    with proj.batches.batch(name) as b:
        b.enqueue(proj.noop.s("never").set(queue=nowhere))
        with b.batch("sig-cancel-child") as child:
            child.enqueue(proj.noop.s("never").set(queue=nowhere))
    with caught(batch_finished) as seen:
        assert proj.batches.cancel_batch(b.id) == 2
        assert proj.batches.cancel_batch(b.id) == 0  # cancelling again finishes nothing
    assert sorted((s["batch_id"], s["name"], s["status"]) for s in seen) == sorted(
        [(b.id, name, BatchStatus.CANCELLED), (child.id, "sig-cancel-child", BatchStatus.CANCELLED)])
    assert {s["sender"] for s in seen} == {proj.app}
    assert [m for m in caplog.messages if m.startswith(f"celery_batches: batch {b.id} {name} finished CANCELLED (2 jobs, ")
            and m.endswith("s)")], caplog.messages
    finished_once(proj, b.id, BatchStatus.CANCELLED, here=True)
    finished_once(proj, child.id, BatchStatus.CANCELLED, here=True)


def test_an_empty_batch_is_created_then_finished_here_in_that_order(proj):
    order: list[tuple[str, str]] = []
    with caught(batch_created) as created, caught(batch_finished) as done:
        batch_created.connect(lambda sender=None, batch_id=None, **_: order.append(("created", batch_id)),
                              weak=False, dispatch_uid="test-order-created")
        batch_finished.connect(lambda sender=None, batch_id=None, **_: order.append(("finished", batch_id)),
                               weak=False, dispatch_uid="test-order-finished")
        try:
            with proj.batches.batch("sig-empty") as b:
                pass
        finally:
            batch_created.disconnect(dispatch_uid="test-order-created")
            batch_finished.disconnect(dispatch_uid="test-order-finished")
    assert [c["batch_id"] for c in created] == [b.id]
    assert [(d["batch_id"], d["status"]) for d in done] == [(b.id, BatchStatus.COMPLETED)]
    assert order == [("created", b.id), ("finished", b.id)]


@needs("worker")
def test_nothing_is_sent_on_rollback_and_once_after_the_commit_of_the_callers_session(proj, worker):
    with caught(batch_created) as created:
        with Session(proj.batches.engine) as session:
            with proj.batches.batch("sig-rolled-back", connection=session) as gone:
                gone.enqueue(proj.add, 1, 1)
            assert created == [], "sent before the caller's commit"
            session.rollback()
        assert created == []
        assert proj.batches.get_batch(gone.id) is None
        with Session(proj.batches.engine) as session:
            with proj.batches.batch("sig-committed", connection=session) as kept:
                kept.enqueue(proj.add, 1, 1)
            assert created == [], "sent before the caller's commit"
            session.commit()
        assert created_names(created) == {kept.id: ["sig-committed"]}
    assert proj.batches.wait(kept.id, timeout=WAIT).status == BatchStatus.COMPLETED
    finished_once(proj, kept.id, BatchStatus.COMPLETED)
    assert finished(proj, gone.id) == []


@needs("worker")
def test_receivers_that_raise_stop_no_job_and_no_continuation(proj, worker):
    key = tag("continuation")
    with caught(batch_created, raises=True) as created:
        with proj.batches.batch(unique_name(proj.RAISING)) as b:  # tests.proj raises on its finish
            b.enqueue(proj.add, 1, 1)
            b.enqueue(proj.add, 2, 2)
            b.on_success(proj.record, key)
    assert [c["batch_id"] for c in created] == [b.id]
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.COMPLETED
    fired_once(proj, key)
    finished_once(proj, b.id, BatchStatus.COMPLETED)  # the receiver connected after the raising one still ran


def test_a_run_the_broker_refuses_finishes_its_batch_in_the_publishing_process(pg_registry):
    pg_registry.app.conf.update(task_create_missing_queues=False, task_queues=[Queue(pg_registry.queue)])
    with caught(batch_finished) as seen:
        with pg_registry.batch("sig-refused") as b:
            b.enqueue(nowhere_signature(pg_registry).set(queue="a-queue-celery-does-not-know"))
    assert [(s["batch_id"], s["status"], s["sender"]) for s in seen] == [(b.id, BatchStatus.FAILED, pg_registry.app)]
    assert pg_registry.get_batch(b.id).status == BatchStatus.FAILED


def test_a_publication_is_announced_once_however_often_it_is_handed_on(pg_registry):
    """The relay's publications (read back from the outbox) carry nothing to announce, and one
    publication published twice announces once."""
    from celery_batches.builder import BatchBuilder
    from celery_batches.store import utcnow

    builder = BatchBuilder(pg_registry.app, "sig-twice")
    builder.enqueue(nowhere_signature(pg_registry))
    with pg_registry.engine.begin() as conn:
        publication = pg_registry.trees.insert_tree(conn, builder.seal(), utcnow())
    with caught(batch_created) as created:
        pg_registry.publisher.publish(publication)
        pg_registry.publisher.publish(publication)
    assert [c["batch_id"] for c in created] == [builder.id]


def test_merged_publications_carry_what_they_created_and_finished():
    from celery_batches.models import BatchStatus as S
    from celery_batches.store.rows import Created, Finished, Publication

    a, b = Publication(created=[Created("a", "a", 1)]), Publication(finished=[Finished("b", "b", S.FAILED, 2, 0.5)])
    a.extend(b)
    assert (a.created, a.finished) == ([Created("a", "a", 1)], [Finished("b", "b", S.FAILED, 2, 0.5)])
