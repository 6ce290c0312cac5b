"""Every write API joins the caller's transaction with ``connection=``: what it writes exists only if
the caller commits, and what it publishes goes out only after that commit. Real PostgreSQL and Redis;
no worker consumes the private queue, so the messages can be counted."""

from __future__ import annotations

import sqlalchemy as sa

from celery_batches import BatchStatus
from tests.helpers import eventually


def queued(registry) -> int:
    return registry.app.connection_for_write().default_channel.client.llen(registry.queue)


def job(registry):
    return registry.app.signature("tests.proj.noop").set(queue=registry.queue)


def started(registry) -> str:
    with registry.batch("open") as b:
        b.enqueue(job(registry))
    eventually(lambda: queued(registry) == 1, "the first job to be published", 10)
    return b.id


def test_jobs_added_in_a_rolled_back_transaction_never_exist_nor_run(registry):
    batch_id = started(registry)
    with registry.engine.connect() as conn:
        with conn.begin() as tx:
            added = registry.add_jobs_to_batch(batch_id, lambda b: b.enqueue(job(registry)), connection=conn)
            assert queued(registry) == 1, "published before the caller's commit"
            tx.rollback()
    assert [j.id for j in registry.get_batch_jobs(batch_id)] != added and registry.get_batch(batch_id).total_jobs == 1
    assert queued(registry) == 1


def test_jobs_added_in_a_committed_transaction_are_published_after_the_commit(registry):
    batch_id = started(registry)
    with registry.engine.connect() as conn:
        with conn.begin():
            with registry.reopen(batch_id, connection=conn) as b:
                b.enqueue(job(registry))
            assert queued(registry) == 1, "published before the caller's commit"
    eventually(lambda: queued(registry) == 2, "the added job to be published after the commit", 10)
    assert registry.get_batch(batch_id).total_jobs == 2


def test_a_batch_and_its_additions_in_one_uncommitted_transaction(registry):
    """reopen reads the batch in the caller's transaction, so a batch made in it can be added to."""
    with registry.engine.connect() as conn:
        with conn.begin():
            with registry.batch("same-transaction", connection=conn) as b:
                b.enqueue(job(registry))
            registry.add_jobs_to_batch(b.id, lambda more: more.enqueue(job(registry)), connection=conn)
    eventually(lambda: queued(registry) == 2, "both jobs to be published after the commit", 10)
    assert registry.get_batch(b.id).total_jobs == 2


def test_a_continue_with_stage_in_the_callers_transaction(registry):
    batch_id = started(registry)
    with registry.engine.connect() as conn:
        with conn.begin() as tx:
            gone = registry.continue_batch_with(batch_id, "stage", lambda s: s.enqueue(job(registry)), connection=conn)
            tx.rollback()
        with conn.begin():
            kept = registry.continue_batch_with(batch_id, "stage", lambda s: s.enqueue(job(registry)), connection=conn)
    assert registry.get_batch(gone) is None
    assert registry.get_batch(kept).status == BatchStatus.CREATED
    assert queued(registry) == 1  # a waiting stage publishes nothing


def test_a_cancel_in_the_callers_transaction_takes_effect_with_its_commit(registry):
    batch_id = started(registry)
    revoked = []
    registry.app.control.revoke = lambda ids, **_: revoked.extend(ids)  # the broadcast, observed
    with registry.engine.connect() as conn:
        with conn.begin() as tx:
            assert registry.cancel_batch(batch_id, connection=conn) == 1
            tx.rollback()
    assert registry.get_batch(batch_id).status == BatchStatus.STARTED and revoked == []
    with registry.engine.connect() as conn:
        with conn.begin():
            assert registry.cancel_batch(batch_id, connection=conn) == 1
            assert revoked == [], "revoked before the caller's commit"
    eventually(lambda: len(revoked) == 1, "the revoke to be broadcast after the commit", 10)
    assert registry.get_batch(batch_id).status == BatchStatus.CANCELLED


def test_every_write_refuses_a_connection_outside_a_transaction(registry):
    batch_id = started(registry)
    with registry.engine.connect() as conn:
        for write in (lambda: registry.add_jobs_to_batch(batch_id, lambda b: b.enqueue(job(registry)), connection=conn),
                      lambda: registry.continue_batch_with(batch_id, "x", lambda s: None, connection=conn),
                      lambda: registry.cancel_batch(batch_id, connection=conn)):
            try:
                write()
            except TypeError as exc:
                assert "inside a transaction" in str(exc)
            else:
                raise AssertionError("a write outside a transaction was accepted")
    r = registry.transitions.tables.runs
    with registry.engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(r)) == 1  # nothing half-made
