"""Every write API joins the caller's transaction with ``connection=``: what it writes exists only if
the caller commits, and what it publishes goes out only after that commit. Real PostgreSQL and Redis;
no worker consumes the private queue, so the messages can be counted."""

from __future__ import annotations

import sqlalchemy as sa

from celery_batches import BatchStatus
from tests.helpers import eventually, needs

pytestmark = needs("postgres", "redis")


def queued(batches) -> int:
    return batches.app.connection_for_write().default_channel.client.llen(batches.queue)


def job(batches):
    return batches.app.signature("tests.proj.noop").set(queue=batches.queue)


def started(batches) -> str:
    with batches.batch("open") as b:
        b.enqueue(job(batches))
    eventually(lambda: queued(batches) == 1, "the first job to be published", 10)
    return b.id


def test_jobs_added_in_a_rolled_back_transaction_never_exist_nor_run(pg_registry):
    batch_id = started(pg_registry)
    with pg_registry.engine.connect() as conn:
        with conn.begin() as tx:
            added = pg_registry.add_jobs_to_batch(batch_id, lambda b: b.enqueue(job(pg_registry)), connection=conn)
            assert queued(pg_registry) == 1, "published before the caller's commit"
            tx.rollback()
    assert [j.id for j in pg_registry.get_batch_jobs(batch_id)] != added
    assert pg_registry.get_batch(batch_id).total_jobs == 1
    assert queued(pg_registry) == 1


def test_jobs_added_in_a_committed_transaction_are_published_after_the_commit(pg_registry):
    batch_id = started(pg_registry)
    with pg_registry.engine.connect() as conn:
        with conn.begin():
            with pg_registry.reopen(batch_id, connection=conn) as b:
                b.enqueue(job(pg_registry))
            assert queued(pg_registry) == 1, "published before the caller's commit"
    eventually(lambda: queued(pg_registry) == 2, "the added job to be published after the commit", 10)
    assert pg_registry.get_batch(batch_id).total_jobs == 2


def test_a_batch_and_its_additions_in_one_uncommitted_transaction(pg_registry):
    """reopen reads the batch in the caller's transaction, so a batch made in it can be added to."""
    with pg_registry.engine.connect() as conn:
        with conn.begin():
            with pg_registry.batch("same-transaction", connection=conn) as b:
                b.enqueue(job(pg_registry))
            pg_registry.add_jobs_to_batch(b.id, lambda more: more.enqueue(job(pg_registry)), connection=conn)
    eventually(lambda: queued(pg_registry) == 2, "both jobs to be published after the commit", 10)
    assert pg_registry.get_batch(b.id).total_jobs == 2


def test_a_continue_with_stage_in_the_callers_transaction(pg_registry):
    batch_id = started(pg_registry)
    with pg_registry.engine.connect() as conn:
        with conn.begin() as tx:
            gone = pg_registry.continue_batch_with(batch_id, "stage", lambda s: s.enqueue(job(pg_registry)),
                                                   connection=conn)
            tx.rollback()
        with conn.begin():
            kept = pg_registry.continue_batch_with(batch_id, "stage", lambda s: s.enqueue(job(pg_registry)),
                                                   connection=conn)
    assert pg_registry.get_batch(gone) is None
    assert pg_registry.get_batch(kept).status == BatchStatus.CREATED
    assert queued(pg_registry) == 1  # a waiting stage publishes nothing


def test_a_cancel_in_the_callers_transaction_takes_effect_with_its_commit(pg_registry):
    batch_id = started(pg_registry)
    revoked = []
    pg_registry.app.control.revoke = lambda ids, **_: revoked.extend(ids)  # the broadcast, observed
    with pg_registry.engine.connect() as conn:
        with conn.begin() as tx:
            assert pg_registry.cancel_batch(batch_id, connection=conn) == 1
            tx.rollback()
    assert pg_registry.get_batch(batch_id).status == BatchStatus.STARTED and revoked == []
    with pg_registry.engine.connect() as conn:
        with conn.begin():
            assert pg_registry.cancel_batch(batch_id, connection=conn) == 1
            assert revoked == [], "revoked before the caller's commit"
    eventually(lambda: len(revoked) == 1, "the revoke to be broadcast after the commit", 10)
    assert pg_registry.get_batch(batch_id).status == BatchStatus.CANCELLED


def test_every_write_refuses_a_connection_outside_a_transaction(pg_registry):
    batch_id = started(pg_registry)
    with pg_registry.engine.connect() as conn:
        for write in (lambda: pg_registry.add_jobs_to_batch(batch_id, lambda b: b.enqueue(job(pg_registry)),
                                                            connection=conn),
                      lambda: pg_registry.continue_batch_with(batch_id, "x", lambda s: None, connection=conn),
                      lambda: pg_registry.cancel_batch(batch_id, connection=conn)):
            try:
                write()
            except TypeError as exc:
                assert "inside a transaction" in str(exc)
            else:
                raise AssertionError("a write outside a transaction was accepted")
    r = pg_registry.transitions.tables.runs
    with pg_registry.engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(r)) == 1  # nothing half-made
