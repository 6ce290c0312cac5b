"""Fixtures for the integration tests: real PostgreSQL, real Redis, real ``celery worker`` processes.

Every session gets its own table prefix, queue and Redis database keys, set in the environment
before ``tests.proj`` is imported, so the workers the fixtures start (which import the same
module) see the same configuration. A missing service skips these tests locally and fails them
when ``CI=true``. Helpers that are not fixtures (and know nothing of the session) are in ``helpers.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable, NoReturn

import pytest

pytest.register_assert_rewrite("tests.helpers")  # its asserts report values, as a test module's do

from tests.helpers import WAIT, eventually, private_registry, worker_argv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SESSION = uuid.uuid4().hex[:8]
os.environ.setdefault("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
os.environ.setdefault("TEST_BROKER_URL", "redis://127.0.0.1:6379/9")
os.environ.setdefault("TEST_BACKEND_URL", "redis://127.0.0.1:6379/9")
os.environ.setdefault("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
os.environ["TEST_PREFIX"] = f"cbt_{SESSION}_"
os.environ["TEST_QUEUE"] = f"cbt-{SESSION}"
#: under CI a missing service or tool fails the tests that need it; anywhere else it skips them
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Something a test needs is missing: fail under CI (where everything must run), skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason}: in CI a missing dependency fails the test")
    pytest.skip(reason)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def services() -> None:
    missing = [name for name, port in (("PostgreSQL", 5432), ("Redis", 6379)) if not _answers("127.0.0.1", port)]
    if missing:
        unavailable(f"{' and '.join(missing)} not answering on 127.0.0.1")


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
def fresh_database_url(services: None) -> Any:
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
def pgbouncer(services: None) -> Callable[..., Any]:
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


AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest, services: None) -> str:
    """Each broker Celery users run: the session's Redis, then the local RabbitMQ."""
    if request.param == "amqp" and not _answers("127.0.0.1", 5672):
        unavailable("RabbitMQ not answering on 127.0.0.1:5672")
    return os.environ["TEST_BROKER_URL"] if request.param == "redis" else AMQP_URL


@pytest.fixture
def registry_on(services: None) -> Callable[[str], Any]:
    """``registry_on(broker_url)``: a Batches on tables of its own (no relay in this process) whose app
    publishes to that broker; ``.worker_env`` starts workers of ``tests.proj`` on that broker and
    those tables (``start_worker(**registry.worker_env)``). A registry serves one broker: the session
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
def registry(services: None) -> Any:
    """A Batches on a private prefix of the real PostgreSQL, publishing to the real Redis, no worker."""
    from celery import Celery

    app = Celery(f"private_{uuid.uuid4().hex[:6]}", broker=os.environ["TEST_BROKER_URL"], set_as_current=False)
    with private_registry(app, "cbt_ob") as batches:
        batches.queue = f"cbt-nowhere-{uuid.uuid4().hex}"  # consumed by no worker
        yield batches
        app.connection_for_write().default_channel.client.delete(batches.queue)


def relay_log() -> str:
    """Every worker log of this session: the relay's report is in the log of whichever node ran the pass."""
    return "".join(path.read_text(errors="replace")
                   for path in Path("/tmp").glob(f"celery_batches-worker-{SESSION}-*.log"))


def relay_reported(fragment: str, timeout: float = WAIT) -> None:
    """Wait for ``fragment`` of the relay's report in a worker log. The report is logged after the pass
    commits, so a batch the pass finished may be done before it is written."""
    eventually(lambda: fragment in relay_log(), "the relay's report in a worker log", timeout)


class Worker:
    """A real ``celery -A tests.proj worker -P prefork -c 2`` process; as a context manager, stopped at exit."""

    def __init__(self, proj: Any, queue: str, concurrency: int = 2, name: str | None = None, **env: str) -> None:
        self.proj = proj
        self.queue = queue
        name = name or queue
        self.log = Path(f"/tmp/celery_batches-worker-{SESSION}-{name}.log")
        environ = dict(os.environ, TEST_QUEUE=queue, PYTHONPATH=str(ROOT), **env)
        self.proc = subprocess.Popen([*worker_argv("tests.proj", queue, concurrency), "-n", f"{name}@%h"],
                                     cwd=ROOT, env=environ, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        tag = f"ready:{uuid.uuid4()}"
        if "TEST_BROKER_URL" in env:  # a worker on another broker: say hello through that broker
            from celery import Celery

            Celery("hello", broker=env["TEST_BROKER_URL"], set_as_current=False).send_task(
                "tests.proj.noop", (tag,), queue=queue)
        else:
            proj.noop.apply_async((tag,), queue=queue)
        eventually(lambda: proj.r.exists(tag) or self.proc.poll() is not None, "the worker to start", 60)
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited at start:\n{self.log.read_text()[-3000:]}")

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def kill_children(self) -> list[int]:
        pids = self.children()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def drop_broker_connections(self) -> int:
        """Close the worker main process's connections to Redis from the server's side (what a broker
        restart does to it); the worker reconnects. Returns how many were closed."""
        import redis

        sockets = set()
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                sockets.add(target[len("socket:["):-1])
        addresses = []
        for line in Path(f"/proc/{self.proc.pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in sockets and remote.endswith(f":{6379:04X}"):
                host, port = local.split(":")
                ip = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))
                addresses.append(f"{ip}:{int(port, 16)}")
        client = redis.Redis.from_url(os.environ["TEST_REDIS_URL"])
        return sum(bool(client.client_kill(address)) for address in addresses)

    def kill(self) -> None:
        """SIGKILL the whole worker, pool processes first (what an OOM kill or a lost node does)."""
        for pid in self.children():
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


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
