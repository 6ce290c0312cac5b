"""PostgreSQL behind PgBouncer in transaction pooling mode (Debian's ``pgbouncer``, no special
settings): producers and workers go through a private bouncer whose few server connections every
client shares, so anything a transaction leaves on a server connection (a prepared statement, a
startup option, a session setting) breaks the next client that gets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from celery import Celery

from celery_batches import Batches, BatchStatus
from tests.helpers import ROOT, WAIT, count, fired_once, needs, private_registry, tag

pytestmark = needs("postgres", "redis")


def test_batches_created_by_three_threads_at_once_through_pgbouncer(pgbouncer):
    """Three producer threads create 30 batches at once through a bouncer with one server connection
    for all of them (no server-side prepared statement may outlive its transaction): every batch is
    written, published and flagged, and every publish lease is dropped."""
    bouncer = pgbouncer(pool_size=1)
    app = Celery(f"bouncer_{uuid.uuid4().hex[:6]}", broker=os.environ["TEST_BROKER_URL"], set_as_current=False)
    with private_registry(app, "cbt_pgb") as direct:
        queue = f"cbt-nowhere-{uuid.uuid4().hex}"  # consumed by no worker
        through = Batches(app, database_url=bouncer.url(os.environ["TEST_DATABASE_URL"]),
                          table_prefix=direct.settings.table_prefix, relay_interval=0)

        def produce(thread: int) -> list[str]:
            ids = []
            for i in range(10):
                with through.batch(f"thread-{thread}-{i}") as b:
                    for j in range(5):
                        b.enqueue(app.signature("tests.proj.noop", (f"{thread}/{i}/{j}",), queue=queue))
                    b.on_complete(app.signature("tests.proj.noop", queue=queue))
                ids.append(b.id)
            return ids

        try:
            with ThreadPoolExecutor(3) as pool:
                ids = [i for batch_ids in pool.map(produce, range(3)) for i in batch_ids]
            t = direct.transitions.tables
            with direct.engine.connect() as conn:
                stored = conn.scalar(sa.select(sa.func.count()).select_from(t.batches))
                runs = conn.execute(sa.select(t.runs.c.published)).scalars().all()
                leases = conn.scalar(sa.select(sa.func.count()).select_from(t.publications))
            assert len(ids) == stored == 30
            assert len(runs) == 150 and all(runs), "every run published and flagged"
            assert leases == 0, "every publish lease released"
            assert app.connection_for_write().default_channel.client.llen(queue) == 150
        finally:
            through.engine.dispose()
            app.connection_for_write().default_channel.client.delete(queue)


@pytest.mark.slow
@needs("worker")
def test_a_worker_through_pgbouncer_claims_every_member(proj, pgbouncer, start_worker):
    """A worker through the bouncer (which refuses startup options such as ``-c synchronous_commit``):
    every member is claimed by the process that runs it (``<node>/<pid>/<delivery>``), the group
    commits, heartbeats and the relay work, and the continuation fires once."""
    bouncer = pgbouncer(pool_size=2)
    url = bouncer.url(os.environ["TEST_DATABASE_URL"])
    w = start_worker(TEST_DATABASE_URL=url)
    producer = Celery(f"bouncer_{uuid.uuid4().hex[:6]}", broker=os.environ["TEST_BROKER_URL"], set_as_current=False)
    through = Batches(producer, database_url=url, table_prefix=proj.batches.settings.table_prefix, relay_interval=0)
    key, seen = tag("cont"), tag("seen")
    try:
        with through.batch("through-pgbouncer") as b:
            for _ in range(20):
                b.enqueue(producer.signature("tests.proj.noop", (seen,), queue=w.queue))
            b.on_success(producer.signature("tests.proj.record", (key,), queue=w.queue))
        done = through.wait(b.id, timeout=WAIT)
    finally:
        through.engine.dispose()
    assert (done.status, done.completed_jobs) == (BatchStatus.COMPLETED, 20) and count(proj, seen) == 20
    fired_once(proj, key, w.queue)
    t = proj.batches.transitions.tables
    with proj.batches.engine.connect() as conn:
        nodes = conn.execute(sa.select(t.runs.c.node).where(t.runs.c.batch_id == b.id)).scalars().all()
    assert all(node and node.count("/") == 2 for node in nodes), nodes
    log = w.log.read_text(errors="replace")
    assert "cannot claim" not in log and "prepared statement" not in log and "unsupported startup" not in log


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs("worker")
def test_the_seed_flows_through_pgbouncer(pgbouncer):
    """The end-to-end flows of tests/test_integration.py (the seed's: create, nest, continuations,
    failures, retries, duplicates, concurrent batches, the relay) with the producer and every worker
    going through PgBouncer: a pytest run of their own whose registry URL is the bouncer's."""
    bouncer = pgbouncer(pool_size=4)
    env = dict(os.environ, TEST_DATABASE_URL=bouncer.url(os.environ["TEST_DATABASE_URL"]), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_integration.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, "a flow failed through PgBouncer (its output is above)"
    assert "passed" in proc.stdout and "skipped" not in proc.stdout
