"""What a failed publish means: the broker being down, or one message it will never take.

Each test writes a batch with a producer that has not published it (or died), makes one message
unpublishable in the way deployments do, and lets the relay publish: on the real PostgreSQL, the
real Redis and the real RabbitMQ, no worker attached (the queues are consumed by nobody).
"""

from __future__ import annotations

import os
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from celery import Celery
from kombu import Queue

from celery_batches import BatchStatus, RunStatus
from celery_batches.models import ContinuationStatus
from celery_batches.settings import PUBLISH_DEFERRALS
from celery_batches.store import RunEvent
from tests.helpers import lapse, memory_app, needs, nowhere_signature, private_registry, written_unpublished

pytestmark = needs("postgres")


def set_options(batches, run_id: str, options: str) -> None:
    """What a run stored before the deployment changed could hold (the builder checks new ones)."""
    r = batches.transitions.tables.runs
    with batches.engine.begin() as conn:
        conn.execute(sa.update(r).where(r.c.id == run_id).values(options=options))


def jobs(batches, batch_id):
    return {j.id: j for j in batches.get_batch_jobs(batch_id)}


def queued(app, queue: str) -> int:
    with app.connection_for_write() as conn:
        if conn.transport.driver_type == "redis":
            return conn.default_channel.client.llen(queue)
        return conn.default_channel.queue_declare(queue, passive=True).message_count


@pytest.fixture
def amqp_registry():
    """A registry on the real PostgreSQL whose app publishes to the real RabbitMQ (a test using it needs both)."""
    app = Celery(f"amqp_{uuid.uuid4().hex[:6]}", broker=os.environ["TEST_AMQP_URL"], set_as_current=False)
    with private_registry(app, "cbt_pe") as batches:
        batches.queue = f"cbt-nowhere-{uuid.uuid4().hex}"
        yield batches
        with app.connection_for_write() as conn:
            for name in (batches.queue, f"{batches.queue}-prio"):
                try:
                    conn.default_channel.queue_delete(name)
                except Exception:  # noqa: BLE001 (never declared)
                    pass


@needs("redis")
def test_a_queue_celery_does_not_know_fails_that_run_and_the_relay_goes_on(pg_registry):
    """A run whose queue Celery does not know (``task_create_missing_queues`` off) FAILS with the
    reason; Celery's ``QueueNotFound`` is a ``KeyError``, which kombu counts among Redis's connection
    errors, yet it is not taken for a broker that is down: the relay publishes everything behind it."""
    pg_registry.app.conf.update(task_create_missing_queues=False, task_queues=[Queue(pg_registry.queue)])
    batch_id, ids, publication = written_unpublished(pg_registry, 4)
    set_options(pg_registry, ids[1], '{"queue": "a-queue-celery-does-not-know"}')
    lapse(pg_registry, publication.lease)
    report = pg_registry.publisher.relay(1000)
    assert (report.runs, report.refused, report.broker_down) == (3, 1, False)
    found = jobs(pg_registry, batch_id)
    assert found[ids[1]].status == RunStatus.FAILED and "QueueNotFound" in found[ids[1]].error
    assert [found[i].status for i in (ids[0], ids[2], ids[3])] == [RunStatus.PENDING] * 3
    assert queued(pg_registry.app, pg_registry.queue) == 3
    assert pg_registry.publisher.relay(1000).runs == 0, "nothing left behind it"


@needs("rabbitmq")
def test_a_queue_rabbitmq_declared_with_other_arguments_fails_that_run_only(amqp_registry):
    """A run whose queue RabbitMQ declared with other arguments (``x-max-priority``: 406
    PRECONDITION_FAILED at every declare) FAILS with the reason; the others are published."""
    batches = amqp_registry
    other = f"{batches.queue}-prio"
    with batches.app.connection_for_write() as conn:
        conn.default_channel.queue_declare(other, durable=True, auto_delete=False,
                                           arguments={"x-max-priority": 10})
    batch_id, ids, publication = written_unpublished(batches, 4)
    set_options(batches, ids[2], f'{{"queue": "{other}"}}')
    lapse(batches, publication.lease)
    report = batches.publisher.relay(1000)
    assert (report.runs, report.refused, report.broker_down) == (3, 1, False)
    found = jobs(batches, batch_id)
    assert found[ids[2]].status == RunStatus.FAILED and "PreconditionFailed" in found[ids[2]].error
    assert queued(batches.app, batches.queue) == 3 and queued(batches.app, other) == 0
    assert batches.publisher.relay(1000).runs == 0


def test_a_message_failing_partway_through_a_one_at_a_time_transport_is_not_sent_twice(monkeypatch):
    """On a transport that publishes each message at once (SQS, memory, AMQP with publisher
    confirms), an error partway through a chunk counts the messages before it as sent: the relay
    sends each message once."""
    from kombu.transport import memory

    app = memory_app("one_at_a_time")
    queue = app.conf.task_default_queue
    put, failures = memory.Channel._put, {"left": 1}

    def drop_the_third(self, name, message, **kwargs):
        if name == queue and self._size(queue) == 2 and failures["left"]:
            failures["left"] -= 1
            raise ConnectionResetError("the broker dropped the connection")
        return put(self, name, message, **kwargs)

    monkeypatch.setattr(memory.Channel, "_put", drop_the_third)
    with private_registry(app, "cbt_pe") as batches:
        batches.queue = queue
        batch_id, ids, publication = written_unpublished(batches, 5)
        report = batches.publisher.publish(publication)
        lapse(batches, publication.lease)
        batches.publisher.relay(1000)
        assert report.runs == 5 and not report.broker_down
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            sent = [channel._get(queue)["headers"]["id"] for _ in range(channel._size(queue))]
        assert failures["left"] == 0 and sorted(sent) == sorted(ids), "each message sent once"


@needs("redis")
def test_a_connection_error_on_one_message_while_the_broker_answers_waits_then_fails(pg_registry, monkeypatch):
    """A connection error on one message while the broker answers fresh connections: that message
    waits one lease (the others go out, nothing blocks the relay), is tried again, and after
    PUBLISH_DEFERRALS such waits fails its run with the reason."""
    import redis

    batch_id, ids, publication = written_unpublished(pg_registry, 3)
    bad = ids[1]
    original = type(pg_registry.publisher)._send_one

    def flaky(m, session):
        if m.id == bad:
            raise redis.exceptions.ConnectionError("Connection reset by peer (on this message only)")
        original(m, session)

    monkeypatch.setattr(type(pg_registry.publisher), "_send_one", staticmethod(flaky))
    lapse(pg_registry, publication.lease)
    for attempt in range(PUBLISH_DEFERRALS):
        report = pg_registry.publisher.relay(1000)
        assert (report.runs, report.deferred, report.refused, report.broker_down) == (
            2 if attempt == 0 else 0, 1, 0, False)
        assert pg_registry.publisher.relay(1000).runs == 0, "a deferred message waits its lease"
        r = pg_registry.transitions.tables.runs
        with pg_registry.engine.connect() as conn:
            lease = conn.scalar(sa.select(r.c.publication_id).where(r.c.id == bad))
        lapse(pg_registry, lease)
    report = pg_registry.publisher.relay(1000)
    assert (report.runs, report.refused) == (0, 1)
    found = jobs(pg_registry, batch_id)
    assert found[bad].status == RunStatus.FAILED and "ConnectionError" in found[bad].error


def test_a_bulk_path_that_breaks_falls_back_to_kombus_own_publish(broker_url, monkeypatch):
    """The bulk path leans on kombu and py-amqp internals: if it fails where kombu's own publish
    does not (a library upgrade changed them), the messages go out through kombu and the bulk path
    is turned off for the process. Never "broker down", never a failed run."""
    from celery_batches.publishing import wire

    app = Celery(f"fallback_{uuid.uuid4().hex[:6]}", set_as_current=False, broker=broker_url)
    with private_registry(app, "cbt_pe") as batches:
        batches.queue = f"cbt-nowhere-{uuid.uuid4().hex}"
        try:
            def broken(self, *args, **kwargs):
                raise AttributeError("'Producer' object has no attribute '_batch_local'")

            monkeypatch.setattr(wire.Wire, "publish", broken)
            batch_id, ids, publication = written_unpublished(batches, 5)
            report = batches.publisher.publish(publication)
            assert (report.runs, report.refused, report.broker_down) == (5, 0, False)
            assert batches.publisher.sender.bulk is False
            assert queued(app, batches.queue) == 5
            assert all(j.status == RunStatus.PENDING for j in batches.get_batch_jobs(batch_id))
        finally:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(batches.queue)


@needs("redis")
def test_the_bulk_path_runs_only_on_the_versions_it_was_proven_on(pg_registry, monkeypatch):
    """A kombu the wire was not proven on publishes through kombu's own path; so does a registry
    with ``bulk_publish=False``."""
    from celery_batches.publishing import wire

    with pg_registry.app.producer_or_acquire() as producer:
        assert wire.open_wire(producer) is not None  # the versions installed here are proven
        real = wire.version
        monkeypatch.setattr(wire, "version", lambda name: "5.9.0" if name == "kombu" else real(name))
        assert wire.open_wire(producer) is None
    monkeypatch.undo()
    with private_registry(pg_registry.app, "cbt_pe", bulk_publish=False) as plain:
        with pg_registry.app.producer_or_acquire() as producer, plain.publisher.sender.session(producer, 2) as session:
            assert not session.buffered and not plain.publisher.sender.copies_allowed()


@needs("redis")
def test_the_relay_never_republishes_a_continuation_a_delivery_claimed(pg_registry):
    """A continuation its first delivery claimed, whose DISPATCHED flag could not be written, is not
    published again when its lease lapses."""
    with pg_registry.batch("claimed-continuation") as b:
        run = b.enqueue(nowhere_signature(pg_registry))
        b.on_complete(pg_registry.app.signature("tests.proj.record", ("k",)).set(queue=pg_registry.queue))
    c = pg_registry.transitions.tables.continuations
    publication = pg_registry.transitions.apply_events([RunEvent(run, RunStatus.COMPLETED)])  # due, not published yet
    [cont] = publication.continuations
    assert pg_registry.liveness.claim_continuation(cont.id, str(uuid.uuid4())) is True  # its delivery started
    lapse(pg_registry, publication.lease)
    report = pg_registry.publisher.relay(1000)
    assert report.continuations == 0
    with pg_registry.engine.connect() as conn:
        status = conn.scalar(sa.select(c.c.status).where(c.c.id == cont.id))
    assert status == int(ContinuationStatus.DISPATCHED)
    assert pg_registry.get_batch(b.id).status == BatchStatus.COMPLETED


@needs("redis")
def test_flags_are_written_however_long_the_registry_is_away_while_the_lease_holds(pg_registry, monkeypatch):
    """The flags of a chunk that went out are tried again for as long as the registry is away and the
    lease can be renewed, and the lease is dropped once they are written; a lease that can no longer
    be renewed is left to lapse, never dropped over unflagged runs."""
    import time

    import sqlalchemy.exc

    batch_id, ids, publication = written_unpublished(pg_registry, 3)
    outbox, real = pg_registry.publisher.outbox, type(pg_registry.publisher.outbox).mark_published
    away_until = time.monotonic() + 2.5

    def flag(self, run_ids, **kwargs):
        if time.monotonic() < away_until:
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, ConnectionRefusedError("the registry is away"))
        return real(self, run_ids, **kwargs)

    monkeypatch.setattr(type(outbox), "mark_published", flag)
    report = pg_registry.publisher.publish(publication)
    assert (report.runs, report.unflagged) == (3, False)
    assert all(j.id in ids for j in pg_registry.get_batch_jobs(batch_id))
    r, p = pg_registry.transitions.tables.runs, pg_registry.transitions.tables.publications
    with pg_registry.engine.connect() as conn:
        assert conn.execute(sa.select(r.c.published).where(r.c.batch_id == batch_id)).scalars().all() == [True] * 3
        assert conn.scalar(sa.select(sa.func.count()).select_from(p)) == 0  # released once all were flagged

    # the registry away for longer than anyone can hold the lease: the lease is left to lapse
    monkeypatch.setattr(outbox, "lease_time", timedelta(seconds=2))  # (a lease of 2 s: the test waits for it)
    batch_id, ids, publication = written_unpublished(pg_registry, 2)
    away_until = time.monotonic() + 3600
    renewals = iter([True])  # the renewal before the chunk; none after it
    monkeypatch.setattr(type(outbox), "renew", lambda self, lease: next(renewals, False))
    report = pg_registry.publisher.publish(publication)
    assert (report.runs, report.unflagged) == (2, True)
    with pg_registry.engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(p).where(p.c.id == publication.lease)) == 1


@needs("redis")
def test_runs_sent_while_the_registry_was_away_past_the_lease_are_flagged_not_sent_again(pg_registry, monkeypatch):
    """The registry goes away after a publication's messages went out and stays away past its lease
    (for the publisher and the relay alike): when it is back, the publisher writes the flags it owes
    before the relay, which waits a lease after a pass the registry failed, would send the runs
    again. Every message is sent once (a plain @app.task member would run twice otherwise)."""
    import time

    import sqlalchemy.exc

    from tests.helpers import eventually

    outbox = pg_registry.publisher.outbox
    monkeypatch.setattr(outbox, "lease_time", timedelta(seconds=1))
    away = None  # None: there until the first flag is written; then True (away) until the test says

    def unless_away(real):
        def write(self, *args, **kwargs):
            nonlocal away
            if away is None and real is mark_published:  # the registry goes as the first flags are written
                away = True
            if away:
                raise sqlalchemy.exc.OperationalError("UPDATE", {}, ConnectionRefusedError("the registry is away"))
            return real(self, *args, **kwargs)
        return write

    mark_published = type(outbox).mark_published
    for name in ("mark_published", "renew", "elect"):
        monkeypatch.setattr(type(outbox), name, unless_away(getattr(type(outbox), name)))
    batch_id, ids, publication = written_unpublished(pg_registry, 3)
    report = pg_registry.publisher.publish(publication)
    assert (report.runs, report.unflagged) == (3, True)  # sent, and the flags could not be written
    lapse(pg_registry, publication.lease)
    assert pg_registry.relay.run_once() == {}  # the registry fails the relay's pass too
    away = False
    assert pg_registry.relay.run_once().get("runs_published") == 0  # a lease's grace for owed flags
    r = pg_registry.transitions.tables.runs

    def flagged() -> bool:
        with pg_registry.engine.connect() as conn:
            return conn.scalar(sa.select(sa.func.count()).where(r.c.batch_id == batch_id, r.c.published)) == 3

    eventually(flagged, "the owed flags", 10)
    time.sleep(1.1)  # the relay's grace (one 1 s lease) is over: a takeover now would send them again
    assert pg_registry.relay.run_once().get("runs_published") == 0
    assert queued(pg_registry.app, pg_registry.queue) == 3
