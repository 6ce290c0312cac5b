"""Fixtures: the session's configuration and services, registries of a test's own, real ``celery worker``
processes.

Every session gets its own table prefix, queue and Redis keys, set in the environment before
``tests.proj`` is imported, so the workers the fixtures start (which import the same module) see the
same configuration. Where the services are comes from ``TEST_DATABASE_URL``, ``TEST_BROKER_URL``,
``TEST_BACKEND_URL``, ``TEST_REDIS_URL`` and ``TEST_AMQP_URL``.

What a test needs beyond this process is in its marks (``needs(...)`` of ``helpers.py``; setup.cfg
lists them): the services they name are probed before it runs, and one that does not answer skips
the test locally and fails it under ``CI=true``. A test using a fixture that reaches a service or
starts a worker (``FIXTURE_NEEDS``) is marked so whatever its module says, so ``-m "not integration"``
never runs one. Helpers that are not fixtures are in ``helpers.py``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Callable

import pytest

pytest.register_assert_rewrite("tests.helpers")  # its asserts report values, as a test module's do

from tests.helpers import NEEDS, SERVICES, Worker, needs, private_registry, require, unavailable  # noqa: E402

SESSION = uuid.uuid4().hex[:8]
os.environ.setdefault("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
os.environ.setdefault("TEST_BROKER_URL", "redis://127.0.0.1:6379/9")
os.environ.setdefault("TEST_BACKEND_URL", "redis://127.0.0.1:6379/9")
os.environ.setdefault("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
os.environ.setdefault("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
os.environ["TEST_SESSION"] = SESSION
os.environ["TEST_PREFIX"] = f"cbt_{SESSION}_"
os.environ["TEST_QUEUE"] = f"cbt-{SESSION}"

#: what each fixture needs beyond this process (with the fixtures built on it)
FIXTURE_NEEDS = {
    "services": ("postgres", "redis"),
    "fresh_database_url": ("postgres",),
    "pgbouncer": ("postgres",),
    "worker": ("worker",),
    "start_worker": ("worker",),
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Before ``-m`` selects: mark each test with what the fixtures it uses need, and ``integration``
    wherever it needs anything."""
    for item in items:
        have = {mark.name for mark in item.iter_markers()}
        wanted = {need for name in getattr(item, "fixturenames", ()) for need in FIXTURE_NEEDS.get(name, ())}
        wanted |= have & set(NEEDS)
        for name in sorted(wanted - have) + (["integration"] if wanted and "integration" not in have else []):
            item.add_marker(name)


@pytest.fixture(autouse=True)
def needed_services(request: pytest.FixtureRequest) -> None:
    """Before each test: the services its marks name answer (else skip, or fail under CI)."""
    require(*(name for name in SERVICES if request.node.get_closest_marker(name)))


@pytest.fixture(scope="session")
def services() -> None:
    """PostgreSQL and Redis answer: what the session's registry and workers need (for the fixtures of
    a wider scope than a test's, which run before its marks are probed)."""
    require("postgres", "redis")


@pytest.fixture(scope="session")
def proj(services: None) -> Any:
    """The test app module, with a fresh registry schema for this session (dropped afterwards)."""
    from celery_batches.store import drop_schema
    from tests import proj

    proj.batches.migrate()
    yield proj
    drop_schema(proj.batches.engine, proj.batches.settings.table_prefix)
    proj.r.delete(os.environ["TEST_QUEUE"])


@pytest.fixture
def fresh_database_url() -> Any:
    """A PostgreSQL database of its own (dropped afterwards), for scripts that use the default table prefix.

    Whatever other registries share the ``test`` database (another session, another version's schema)
    cannot leak into it."""
    import sqlalchemy as sa

    name = f"cbt_{SESSION}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(os.environ["TEST_DATABASE_URL"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def pgbouncer() -> Callable[..., Any]:
    """Start private PgBouncers (transaction pooling) in front of the test PostgreSQL: ``start(pool_size)``
    returns one; its ``url(os.environ["TEST_DATABASE_URL"])`` reaches the same database through it."""
    from benchmarks.services import PgBouncer

    if not PgBouncer.available():
        unavailable("pgbouncer is not installed (apt-get install pgbouncer)")
    started: list[PgBouncer] = []

    def start(pool_size: int = 4) -> PgBouncer:
        bouncer = PgBouncer(os.environ["TEST_DATABASE_URL"], pool_size).start()
        started.append(bouncer)
        return bouncer

    yield start
    for bouncer in started:
        bouncer.cleanup()


@pytest.fixture(params=[pytest.param("redis", marks=needs("redis")), pytest.param("amqp", marks=needs("rabbitmq"))])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each broker Celery users run: the session's Redis, then RabbitMQ."""
    return os.environ["TEST_BROKER_URL"] if request.param == "redis" else os.environ["TEST_AMQP_URL"]


@pytest.fixture
def registry_on(services: None) -> Callable[[str], Any]:
    """``registry_on(broker_url)``: a Batches on tables of its own (no relay in this process) whose app
    publishes to that broker; ``.worker_env`` starts workers of ``tests.proj`` on that broker and
    those tables (``start_worker(**batches.worker_env)``). A registry serves one broker: the session
    registry's relays and lost-message searches would take a run of another broker for lost."""
    from celery import Celery

    stack = contextlib.ExitStack()

    def make(url: str) -> Any:
        app = Celery(f"producer_{uuid.uuid4().hex[:6]}", broker=url, set_as_current=False)
        batches = stack.enter_context(private_registry(app, "cbt_br"))
        batches.worker_env = {"TEST_BROKER_URL": url, "TEST_PREFIX": batches.settings.table_prefix}
        return batches

    with stack:
        yield make


@pytest.fixture
def pg_registry(services: None) -> Any:
    """A Batches on tables of its own in the test PostgreSQL, publishing to the test Redis on a queue no
    worker consumes (``.queue``), with no relay: nothing but the test publishes, relays or recovers there."""
    from celery import Celery

    app = Celery(f"private_{uuid.uuid4().hex[:6]}", broker=os.environ["TEST_BROKER_URL"], set_as_current=False)
    with private_registry(app, "cbt_ob") as batches:
        batches.queue = f"cbt-nowhere-{uuid.uuid4().hex}"  # consumed by no worker
        yield batches
        app.connection_for_write().default_channel.client.delete(batches.queue)


@pytest.fixture
def nowhere(proj: Any) -> Any:
    """A queue no worker consumes: runs sent there stay PENDING for as long as the test needs."""
    queue = f"cbt-nowhere-{uuid.uuid4().hex}"
    yield queue
    proj.r.delete(queue, f"_kombu.binding.{queue}")


@pytest.fixture(scope="session")
def worker(proj: Any) -> Worker:
    """The session's shared worker, consuming the session queue."""
    w = Worker(proj, os.environ["TEST_QUEUE"])
    yield w
    w.stop()


@pytest.fixture
def start_worker(proj: Any) -> Callable[..., Worker]:
    """Start a dedicated worker on its own queue (for tests that kill or reconfigure it)."""
    started: list[Worker] = []

    def start(concurrency: int = 2, queue: str | None = None, name: str | None = None, **env: str) -> Worker:
        w = Worker(proj, queue or f"cbt-{SESSION}-{uuid.uuid4().hex[:6]}", concurrency, name, **env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
