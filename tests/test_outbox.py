"""The outbox: publish leases, the relay's takeover, refused messages, deliveries of finished work.

Registry-level tests use a private table prefix with no worker attached (nothing else publishes
or relays there), on the real PostgreSQL; the end-to-end ones run on the session's real worker.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from celery_batches import Batches, BatchStatus, RunStatus
from celery_batches.models import ContinuationStatus
from celery_batches.store import RunEvent, reads, utcnow
from tests.helpers import (
    WAIT,
    count,
    drain,
    eventually,
    lapse,
    memory_app,
    needs,
    nowhere_signature,
    private_registry,
    publish,
    stored_message,
    tag,
    written_unpublished,
)

HOUR = timedelta(hours=1)


def taken_ids(batches):
    lease, runs, continuations = batches.publisher.outbox.take_lapsed(1000)
    return lease, [m.id for m in runs], [m.id for m in continuations]


@needs("postgres", "redis")
def test_the_relay_takes_only_runs_whose_publish_lease_lapsed(pg_registry):
    """A producer still publishing holds a lease: the relay leaves its runs alone, however old they
    are, and takes them over (once) only when the lease lapsed."""
    batch_id, ids, publication = written_unpublished(pg_registry, now=utcnow() - HOUR)  # created an hour ago
    assert publication.lease and [m.id for m in publication.runs] == ids
    assert taken_ids(pg_registry) == (None, [], [])
    lapse(pg_registry, publication.lease)
    lease, runs, _ = taken_ids(pg_registry)
    assert lease and runs == ids
    assert taken_ids(pg_registry) == (None, [], [])  # now under the relay's own lease


@needs("postgres", "redis")
def test_a_stage_created_long_before_its_antecedent_finishes_is_not_republished(pg_registry):
    """A stage's runs become publishable when its antecedent finishes, under the lease of the group
    commit that starts the stage: the relay does not take them, however old they are."""
    antecedent, [run], _ = written_unpublished(pg_registry, 1)
    stage_id = pg_registry.continue_batch_with(antecedent, "stage", lambda b: [
        b.enqueue(nowhere_signature(pg_registry, f"x{i}")) for i in range(4)])
    r = pg_registry.transitions.tables.runs
    with pg_registry.engine.begin() as conn:  # the stage was created an hour ago
        conn.execute(sa.update(r).where(r.c.batch_id == stage_id).values(created_at=utcnow() - HOUR))
    started = pg_registry.transitions.apply_events([RunEvent(run, RunStatus.COMPLETED)])
    assert len(started.runs) == 4 and started.lease
    assert pg_registry.get_batch(stage_id).status == BatchStatus.STARTED
    lease, runs, _ = taken_ids(pg_registry)
    assert not set(runs) & {m.id for m in started.runs}


@needs("postgres", "redis")
def test_a_run_a_worker_started_before_it_was_flagged_is_seen_by_the_reconciler(pg_registry):
    """A run RUNNING before its published flag was written is among the open runs the reconciler reads."""
    _, [run], _ = written_unpublished(pg_registry, 1)
    pg_registry.transitions.apply_events([RunEvent(run, RunStatus.RUNNING)])
    assert [r[0] for r in reads.open_runs(pg_registry.transitions, utcnow() + HOUR, 10)] == [run]


def flags(batches, ids) -> list[bool]:
    r = batches.transitions.tables.runs
    with batches.engine.connect() as conn:
        published = dict(conn.execute(sa.select(r.c.id, r.c.published).where(r.c.id.in_(ids))).all())
    return [published[i] for i in ids]


@pytest.mark.parametrize("portable", [False, True], ids=["postgresql", "portable"])
@needs("postgres", "redis")
def test_flagging_skips_a_run_a_worker_is_writing_and_returns_it(pg_registry, portable):
    """A run whose row a worker holds locked is not waited for (that could deadlock with its group
    commit): it is returned, and flagged on the next try; a run a worker moved past PENDING needs no flag."""
    _, ids, _ = written_unpublished(pg_registry, 4)
    r = pg_registry.transitions.tables.runs
    with pg_registry.engine.begin() as conn:
        conn.execute(sa.update(r).where(r.c.id == ids[1]).values(status=int(RunStatus.RUNNING)))
    with pg_registry.engine.connect() as worker:
        worker.begin()
        worker.execute(sa.select(r.c.id).where(r.c.id == ids[0]).with_for_update())
        assert pg_registry.publisher.outbox.mark_published(ids, portable=portable) == [ids[0]]
        worker.rollback()
    assert flags(pg_registry, ids) == [False, False, True, True]
    assert pg_registry.publisher.outbox.mark_published([ids[0]], portable=portable) == []
    assert flags(pg_registry, ids) == [True, False, True, True]


@needs("postgres", "redis")
def test_the_reconciler_walks_open_runs_with_a_cursor(pg_registry):
    """Pages of open runs read after a cursor cover each open run once: the oldest do not hide the rest."""
    _, ids, publication = written_unpublished(pg_registry, 5)
    pg_registry.transitions.apply_events([RunEvent(i, RunStatus.RUNNING) for i in ids])
    first = reads.open_runs(pg_registry.transitions, utcnow() + HOUR, 2)
    second = reads.open_runs(pg_registry.transitions, utcnow() + HOUR, 2, after=(first[-1][2], first[-1][0]))
    third = reads.open_runs(pg_registry.transitions, utcnow() + HOUR, 2, after=(second[-1][2], second[-1][0]))
    seen = [r[0] for r in first + second + third]
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 5


@needs("postgres", "redis")
def test_a_message_the_broker_refuses_fails_its_run_and_nothing_else(pg_registry):
    """A stored run whose message Celery refuses (a bad publish option) FAILS with the reason; the
    relay publishes the others, leaves nothing behind it, and the batch finishes."""
    batch_id, ids, publication = written_unpublished(pg_registry, 3)
    r = pg_registry.transitions.tables.runs
    with pg_registry.engine.begin() as conn:  # what an option that passed the builder could hold
        conn.execute(sa.update(r).where(r.c.id == ids[1]).values(
            options=f'{{"queue": "{pg_registry.queue}", "countdown": "soon"}}'))
    lapse(pg_registry, publication.lease)
    report = pg_registry.publisher.relay(1000)
    assert (report.runs, report.refused, report.broker_down) == (2, 1, False)
    jobs = {j.id: j for j in pg_registry.get_batch_jobs(batch_id)}
    assert jobs[ids[1]].status == RunStatus.FAILED and "refused" in jobs[ids[1]].error
    assert "TypeError" in jobs[ids[1]].error
    assert pg_registry.publisher.relay(1000).runs == 0  # nothing left behind it
    pg_registry.transitions.apply_events([RunEvent(i, RunStatus.COMPLETED) for i in (ids[0], ids[2])])
    done = pg_registry.get_batch(batch_id)
    assert (done.status, done.completed_jobs, done.failed_jobs) == (BatchStatus.FAILED, 2, 1)


@needs("postgres", "redis")
def test_a_continuation_the_broker_refuses_is_failed_with_the_reason(pg_registry):
    with pg_registry.batch("bad-continuation") as b:
        run = b.enqueue(nowhere_signature(pg_registry, "x0"))
        b.on_complete(pg_registry.app.signature("tests.proj.record", ("k",)).set(queue=pg_registry.queue,
                                                                             countdown=1))
    c = pg_registry.transitions.tables.continuations
    with pg_registry.engine.begin() as conn:
        conn.execute(sa.update(c).where(c.c.batch_id == b.id).values(options='{"countdown": "soon"}'))
    pg_registry.node.write_events([RunEvent(run, RunStatus.COMPLETED)])
    [cont] = pg_registry.get_continuations(b.id)
    assert cont.status == ContinuationStatus.FAILED and "refused" in cont.error


@pytest.mark.parametrize("url", [pytest.param("postgresql", marks=needs("postgres", "redis")), "sqlite"])
def test_the_relay_is_elected_by_a_lease_row(request, tmp_path, url):
    """The relay is elected by a lease row (no session state, which transaction pooling would strand),
    on PostgreSQL and SQLite alike: renewed by its holder, refused to another, taken over once its
    holder resigned or it lapsed."""
    if url == "sqlite":
        batches = Batches(memory_app("sqlite-lease"), database_url=f"sqlite:///{tmp_path}/reg.sqlite3",
                          relay_interval=0)
        batches.migrate()
    else:
        batches = request.getfixturevalue("pg_registry")
    outbox = batches.publisher.outbox
    assert outbox.elect("relay", "a", timedelta(seconds=60))
    assert outbox.elect("relay", "a", timedelta(seconds=60))  # renewed
    assert not outbox.elect("relay", "b", timedelta(seconds=60))
    outbox.resign("relay", "a")
    assert outbox.elect("relay", "b", timedelta(seconds=-1))  # taken, and already lapsed (b died)
    assert outbox.elect("relay", "a", timedelta(seconds=60))


@needs("postgres", "redis", "worker")
def test_a_finished_run_delivered_again_is_not_executed(proj, worker):
    """A @batches.task member whose run is already final is not run again."""
    ran = tag("ran")
    with proj.batches.batch("delivered-again") as b:
        run = b.enqueue(proj.noop, ran)
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.COMPLETED
    publish(proj.app, [stored_message(proj, run, b.id)])
    drain(proj)
    assert count(proj, ran) == 1
    assert proj.app.AsyncResult(run).state == "SUCCESS"  # the skip left the stored result alone


@needs("postgres", "redis", "worker")
def test_a_batches_task_continuation_delivered_twice_runs_once(proj, worker):
    """A ``@batches.task`` continuation delivered twice (its producer died between publish and flag) runs once."""
    key = tag("cont")
    with proj.batches.batch("continuation-twice") as b:
        b.enqueue(proj.noop)
        b.on_complete(proj.record_once.s(key))
    assert proj.batches.wait(b.id, timeout=WAIT).is_finished
    eventually(lambda: count(proj, key) == 1, "the continuation", WAIT)
    [cont] = proj.batches.get_continuations(b.id)
    from celery_batches.message import Message

    publish(proj.app, [Message(cont.id, cont.task_name, f'["{key}"]', "{}", None, continuation_of=b.id)])
    drain(proj)
    assert count(proj, key) == 1


@needs("postgres")
def test_a_registry_of_the_first_schema_upgrades_in_place_with_its_data():
    """Migrate to 0001, write a batch as 0001 stored it, upgrade: the batch reads back, and its
    unpublished runs (no lease: written before leases existed) are the relay's at once."""
    from celery_batches.store.migrate import head_revision, migrate

    with private_registry(memory_app("upgrade"), "cbt_up", migrate=False) as batches:
        prefix = batches.settings.table_prefix
        migrate(batches.engine, prefix, revision="0001")
        batch_id, run_id, now = str(uuid.uuid4()), str(uuid.uuid4()), utcnow()
        with batches.engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {prefix}batches (id, name, status, total_jobs, completed_jobs, "
                                 "failed_jobs, cancelled_jobs, created_at) VALUES (:id, 'old', 1, 1, 0, 0, 0, :now)"),
                         {"id": batch_id, "now": now})
            conn.execute(sa.text(f"INSERT INTO {prefix}runs (id, batch_id, position, status, task_name, args, kwargs, "
                                 "created_at, retries, published) VALUES (:id, :b, 0, 0, 'tests.proj.noop', '[]', "
                                 "'{}', :now, 0, false)"), {"id": run_id, "b": batch_id, "now": now})
        batches.migrate()
        with batches.engine.connect() as conn:
            assert conn.scalar(sa.text(f"SELECT version_num FROM {prefix}alembic_version")) == head_revision()
        old = batches.get_batch(batch_id)
        assert old.status == BatchStatus.STARTED
        # what later migrations added (labels, cancel_on_failure, max_concurrency, results) reads as "not asked for"
        assert (old.description, old.properties, old.tags, old.cancel_on_failure, old.max_concurrency,
                old.results) == (None, {}, (), False, None, False)
        lease, runs, _ = batches.publisher.outbox.take_lapsed(10)
        assert [m.id for m in runs] == [run_id] and runs[0].batch_id == batch_id


@needs("postgres")
def test_a_lease_taken_early_in_a_long_transaction_counts_from_its_end():
    """A publish lease taken early in a transaction that runs longer than the lease (a million jobs take
    a minute to write) counts again from the transaction's end: the producer still holds it when the
    commit is through."""
    import time

    with private_registry(memory_app("lease"), "cbt_lease", publish_lease=0.5) as batches:
        with batches.engine.begin() as conn:
            tx = batches.transitions.tx(conn, utcnow())
            lease = tx.lease()
            time.sleep(0.7)  # the rest of a long write: longer than the lease
            publication = tx.publication()
        assert publication.lease == lease
        assert batches.publisher.outbox.renew(lease), "the lease had lapsed by the time the commit was through"


@needs("postgres")
def test_a_publication_of_several_chunks_is_all_flagged_before_its_lease_is_dropped():
    """The flags of one chunk are written while the next chunk is sent; the publication still ends
    (its lease dropped) only once every chunk it sent is flagged."""
    app = memory_app("chunks")
    with private_registry(app, "cbt_chunks", publish_chunk=100) as batches:
        batches.queue = app.conf.task_default_queue
        batch_id, ids, publication = written_unpublished(batches, 350)
        r, p = batches.transitions.tables.runs, batches.transitions.tables.publications
        release, at_drop = batches.publisher.outbox.drop, []

        def flagged() -> int:
            with batches.engine.connect() as conn:
                return conn.scalar(sa.select(sa.func.count()).select_from(r).where(r.c.batch_id == batch_id,
                                                                                  r.c.published))

        def drop_and_count(lease):
            at_drop.append(flagged())
            return release(lease)

        batches.publisher.outbox.drop = drop_and_count
        report = batches.publisher.publish(publication)
        assert (report.runs, report.broker_down, report.lease_lapsed) == (350, False, False)
        assert at_drop == [350]
        with batches.engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(p)) == 0
