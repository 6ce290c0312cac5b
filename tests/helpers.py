"""Helpers the test modules share; the fixtures are in ``conftest.py``.

Test modules import from here (and ``tests.proj``), never from one another or from ``conftest.py``.
Nothing here reads the session's configuration at import time (``conftest.py`` sets it in the
environment, and builds on this module, never the other way round). Every wait is a deadline,
never a sleep: a check that passes returns at once, whatever the deadline.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn

import pytest
import sqlalchemy as sa
from celery import Celery
from werkzeug.test import Client

from benchmarks.services import free_port  # noqa: F401  (re-exported for the test modules)
from celery_batches import Batches
from celery_batches.message import Message
from celery_batches.models import ContinuationStatus

#: the repository: the working directory (and ``PYTHONPATH``) of every process the tests start
ROOT = Path(__file__).resolve().parent.parent


# -- what a test needs beyond this process (the marks setup.cfg registers) ---------------------------
#: the services a test may need, each with the environment variables that say where it is
SERVICES = {"postgres": ("TEST_DATABASE_URL",),
            "redis": ("TEST_REDIS_URL", "TEST_BROKER_URL", "TEST_BACKEND_URL"),
            "rabbitmq": ("TEST_AMQP_URL",)}
#: everything a test may need: a service, real ``celery worker`` processes, a headless Chromium
NEEDS = (*SERVICES, "worker", "browser")
DEFAULT_PORTS = {"postgresql": 5432, "redis": 6379, "rediss": 6379, "amqp": 5672, "pyamqp": 5672, "amqps": 5671}


class needs(list):
    """``needs("postgres", "redis")``: the marks of a test that needs those (some of ``NEEDS``), and
    ``integration``, their umbrella. A decorator, a module's ``pytestmark``, or a ``pytest.param``'s
    ``marks``. A service it names is probed before the test runs (``conftest.needed_services``)."""

    def __init__(self, *what: str) -> None:
        if not what or set(what) - set(NEEDS):
            raise ValueError(f"needs{what}: name some of {', '.join(NEEDS)}")
        super().__init__([pytest.mark.integration, *(getattr(pytest.mark, name) for name in what)])

    def __call__(self, test: Callable) -> Callable:
        for mark in self:
            test = mark(test)
        return test


def unavailable(reason: str) -> NoReturn:
    """Something a test needs is missing: fail under CI (``CI=true``, where everything must run), skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}: in CI a missing dependency fails the test")
    pytest.skip(reason)


def address(url: str) -> tuple[str, int]:
    """The host and port a service URL reaches (its scheme's default port if it names none)."""
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORTS[parts.scheme.split("+")[0]]


@functools.cache
def answers(host: str, port: int) -> bool:
    """Something accepts TCP connections there (asked once a session)."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require(*services: str) -> None:
    """Skip (under CI: fail) the test unless each of ``services`` answers where the environment says it is."""
    silent = sorted({f"{name} at {host}:{port}" for name in services for variable in SERVICES[name]
                     for host, port in [address(os.environ[variable])] if not answers(host, port)})
    if silent:
        unavailable(f"not answering: {', '.join(silent)}")


# -- deadlines ---------------------------------------------------------------------------------------
#: a real ``celery worker -P prefork -c 2`` taking messages from Redis and writing to PostgreSQL
WAIT = 60.0
#: real workers while a fault is injected (processes killed, connections cut, the broker restarted):
#: redeliveries, retried group commits and relay passes come on top of the work itself
FAULT_WAIT = 90.0
#: recovery after a node died: node timeout + lost-message search (two looks) + relay passes + a
#: margin for a loaded machine
RECOVERY = 90.0
#: the in-process solo worker on the in-memory transport, which polls
EMBEDDED_WAIT = 20.0


def eventually(check: Callable[[], Any], what: str, timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- counting what the tasks of tests.proj did (Redis counters) --------------------------------------
def tag(label: str) -> str:
    """A key no other test (or session) uses: the tasks of ``tests.proj`` count their runs under it."""
    return f"t:{label}:{uuid.uuid4().hex}"


def count(proj: Any, key: str) -> int:
    return int(proj.r.get(key) or 0)


def drain(proj: Any, queue: str | None = None, *, app: Celery | None = None, timeout: float = WAIT) -> None:
    """Wait until everything published so far on the queue has been taken by the worker.

    Sentinels go in behind it (Redis lists are FIFO); once all of them ran, every earlier message
    was received, and anything as quick as a continuation has run. ``app``: publish the sentinels
    through another app's broker (a worker on a broker of its own).
    """
    key = tag("drain")
    for _ in range(4):
        (app or proj.app).send_task("tests.proj.plain", (key,), queue=queue or proj.app.conf.task_default_queue)
    eventually(lambda: count(proj, key) == 4, "the queue to drain", timeout)


def fired_once(proj: Any, key: str, queue: str | None = None, timeout: float = WAIT, *,
               app: Celery | None = None) -> None:
    """The continuation counting under ``key`` ran, and (once the queue drained) exactly once."""
    eventually(lambda: count(proj, key) >= 1, f"continuation {key}", timeout)
    drain(proj, queue, app=app, timeout=timeout)
    assert count(proj, key) == 1


def never_fired(proj: Any, *keys: str) -> None:
    """After draining the queue (anything published has run), none of ``keys`` ran."""
    drain(proj)
    assert [count(proj, k) for k in keys] == [0] * len(keys)


def with_continuations(b: Any, tasks: Any) -> dict[str, str]:
    """One continuation of each kind on builder ``b``, each counting under a key of its own; the
    three are given in the three forms the API takes (task and arguments, signature, task name).
    ``tasks``: anything with a ``record(key)`` task (``tests.proj``, or a scenario backend)."""
    keys = {kind: tag(kind) for kind in ("success", "failure", "complete")}
    b.on_success(tasks.record, keys["success"])
    b.on_failure(tasks.record.s(keys["failure"]))
    b.on_complete(tasks.record.name, keys["complete"])
    return keys


# -- reading the registry ----------------------------------------------------------------------------
def counters(batch: Any) -> tuple:
    return batch.status, batch.total_jobs, batch.completed_jobs, batch.failed_jobs, batch.cancelled_jobs


def continuation_states(batches: Batches, batch_id: str) -> list[tuple[str, ContinuationStatus]]:
    """Every continuation of the batch as (kind, status), sorted: duplicates of a kind are kept."""
    return sorted((c.kind.value, c.status) for c in batches.get_continuations(batch_id))


def continuations_become(batches: Batches, batch_id: str, expected: list[tuple[str, ContinuationStatus]],
                         timeout: float = WAIT) -> None:
    """Continuations are published (then flagged) just after the commit that finished their batch:
    wait until their states are ``expected``."""
    eventually(lambda: continuation_states(batches, batch_id) == sorted(expected),
               f"continuation states {sorted(expected)} (have {continuation_states(batches, batch_id)})", timeout)


TABLES = ("batches", "runs", "batch_jobs", "continuations")


def row_counts(batches: Batches, *, name: str | None = None,
               batch_ids: Iterable[str] | None = None) -> dict[str, int]:
    """Rows in each registry table: all of them, or only those of the batches called ``name``, or of
    the batches ``batch_ids``."""
    t = batches.transitions.tables
    columns = {"batches": t.batches.c.id, "runs": t.runs.c.batch_id, "batch_jobs": t.batch_jobs.c.batch_id,
               "continuations": t.continuations.c.batch_id}
    ids: Any = None
    if name is not None:
        ids = sa.select(t.batches.c.id).where(t.batches.c.name == name)
    elif batch_ids is not None:
        ids = list(batch_ids)
    with batches.engine.connect() as conn:
        return {table: conn.scalar(sa.select(sa.func.count()).select_from(column.table)
                                   .where(sa.true() if ids is None else column.in_(ids)))
                for table, column in columns.items()}


# -- registries and apps of a test's own -------------------------------------------------------------
def memory_app(label: str, **conf: Any) -> Celery:
    """A Celery app on the in-memory broker, with a unique name and a default queue of its own: the
    memory transport's queues are shared by every app in the process."""
    name = f"{label}_{uuid.uuid4().hex[:10]}"
    app = Celery(name, broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue=f"q_{name}", worker_hijack_root_logger=False, **conf)
    return app


@contextmanager
def private_registry(app: Celery, label: str, *, migrate: bool = True, **settings: Any) -> Iterator[Batches]:
    """A ``Batches`` on tables of its own (prefix ``<label>_<random>_``) in the test PostgreSQL
    database, with no relay thread; its tables are dropped afterwards."""
    from celery_batches.store import drop_schema

    prefix = f"{label}_{uuid.uuid4().hex[:6]}_"
    batches = Batches(app, database_url=os.environ["TEST_DATABASE_URL"], table_prefix=prefix, relay_interval=0,
                      **settings)
    try:
        if migrate:
            batches.migrate()
        yield batches
    finally:
        drop_schema(batches.engine, prefix)
        batches.engine.dispose()


# -- messages as a redelivery sends them -------------------------------------------------------------
def stored_message(proj: Any, run_id: str, batch_id: str) -> Message:
    """The Celery message of a stored run, as the producer or the relay publishes it."""
    from kombu.utils import json as kjson

    [job] = [j for j in proj.batches.get_batch_jobs(batch_id) if j.id == run_id]
    options = kjson.dumps({"queue": proj.app.conf.task_default_queue})  # to the session worker
    return Message(job.id, job.task_name, kjson.dumps(job.args), kjson.dumps(job.kwargs), options, batch_id)


def publish(app: Celery, messages: list) -> list[str]:
    """Send stored messages as the publication does (same task ids and headers), bypassing it and its flags:
    what a redelivery or a second publisher sends. Returns the ids sent."""
    from kombu.utils import json as kjson

    from celery_batches.message import CONTINUATION_HEADER, HEADER

    for m in messages:
        headers = {HEADER: m.batch_id} if m.batch_id else {CONTINUATION_HEADER: m.continuation_of}
        app.send_task(m.task_name, kjson.loads(m.args), kjson.loads(m.kwargs), task_id=m.id, headers=headers,
                      **(kjson.loads(m.options) if m.options else {}))
    return [m.id for m in messages]


# -- batches written and not published (a producer that has not published yet, or died) --------------
def nowhere_signature(batches: Batches, *args: Any, **options: Any) -> Any:
    """A ``tests.proj.noop`` signature to ``batches.queue`` (a queue no worker consumes)."""
    return batches.app.signature("tests.proj.noop", args).set(queue=batches.queue, **options)


def written_unpublished(batches: Batches, n: int = 3, *, now: datetime | None = None, **options: Any) -> tuple:
    """A batch of ``n`` jobs committed and not published: ``(batch id, run ids, its publication)``."""
    from celery_batches.builder import BatchBuilder
    from celery_batches.store import utcnow

    builder = BatchBuilder(batches.app, "unpublished")
    ids = [builder.enqueue(nowhere_signature(batches, f"x{i}", **options)) for i in range(n)]
    with batches.engine.begin() as conn:
        publication = batches.trees.insert_tree(conn, builder.seal(), now or utcnow())
    return builder.id, ids, publication


def lapse(batches: Batches, lease: Any) -> None:
    """Make a publish lease lapse (as if its holder died an hour ago): its runs are the relay's."""
    from celery_batches.store import utcnow

    p = batches.transitions.tables.publications
    with batches.engine.begin() as conn:
        conn.execute(sa.update(p).where(p.c.id == lease).values(expires_at=utcnow() - timedelta(hours=1)))


# -- the command line and the dashboard --------------------------------------------------------------
def celery(*args: str, app: str | None = "tests.proj", timeout: float = 60) -> subprocess.CompletedProcess:
    """``celery -A <app> batches <args>``, run as a command in a subprocess (its output captured)."""
    cmd = [sys.executable, "-m", "celery"] + (["-A", app] if app else []) + ["batches", *args]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=timeout)


#: the WSGI environment of a request from this machine
LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


class Local(Client):
    """A test client whose requests come from 127.0.0.1 (Werkzeug's sets no REMOTE_ADDR at all)."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["environ_base"] = {**LOCAL, **(kwargs.get("environ_base") or {})}
        return super().open(*args, **kwargs)


def text(response: Any) -> str:
    return response.get_data(as_text=True)


def csrf_from(html: str) -> str:
    """The CSRF token of a page's form."""
    return re.search(r'name="csrf_token" value="([0-9a-f]{64})"', html).group(1)


def unique_name(label: str) -> str:
    """A batch name no other test uses, short enough to show whole on a page."""
    return f"{label}-{uuid.uuid4().hex[:10]}"


def pending_batch(proj: Any, queue: str, name: str, jobs: int = 3, **kwargs: Any) -> str:
    """A batch of the session's registry whose jobs go to ``queue`` (one no worker consumes): they stay PENDING."""
    with proj.batches.batch(name, **kwargs) as b:
        for i in range(jobs):
            b.enqueue(proj.noop.s(f"never-{i}").set(queue=queue))
    return b.id


# -- processes -----------------------------------------------------------------------------------------
def worker_argv(app: str, queue: str, concurrency: int = 2) -> list[str]:
    """``celery worker`` as the tests run it: prefork with two pool processes, on one queue, INFO log,
    without gossip, mingle or heartbeat (nothing in the tests uses them, and they slow the start)."""
    return [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "prefork", "-c", str(concurrency), "-Q", queue,
            "-l", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]


def session() -> str:
    """This test session's id (``conftest.py`` sets it): in its table prefix, queue and worker log names."""
    return os.environ["TEST_SESSION"]


class Worker:
    """A real ``celery -A tests.proj worker -P prefork -c 2`` process; as a context manager, stopped at exit.

    ``env`` overrides the session's configuration for this worker (another broker, registry or prefix)."""

    def __init__(self, proj: Any, queue: str, concurrency: int = 2, name: str | None = None, **env: str) -> None:
        self.proj = proj
        self.queue = queue
        name = name or queue
        self.log = Path(f"/tmp/celery_batches-worker-{session()}-{name}.log")
        self.environ = dict(os.environ, TEST_QUEUE=queue, PYTHONPATH=str(ROOT), **env)
        self.proc = subprocess.Popen([*worker_argv("tests.proj", queue, concurrency), "-n", f"{name}@%h"],
                                     cwd=ROOT, env=self.environ, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        tag = f"ready:{uuid.uuid4()}"
        if "TEST_BROKER_URL" in env:  # a worker on another broker: say hello through that broker
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
        """Close the worker main process's connections to its Redis broker from the server's side (what a
        broker restart does to it); the worker reconnects. Returns how many were closed."""
        import redis

        broker = self.environ["TEST_BROKER_URL"]
        _, broker_port = address(broker)
        sockets = set()
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                sockets.add(target[len("socket:["):-1])
        peers = []
        for line in Path(f"/proc/{self.proc.pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in sockets and remote.endswith(f":{broker_port:04X}"):
                host, port = local.split(":")
                ip = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))
                peers.append(f"{ip}:{int(port, 16)}")
        client = redis.Redis.from_url(broker)
        return sum(bool(client.client_kill(peer)) for peer in peers)

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


def relay_log() -> str:
    """Every worker log of this session: the relay's report is in the log of whichever node ran the pass."""
    return "".join(path.read_text(errors="replace")
                   for path in Path("/tmp").glob(f"celery_batches-worker-{session()}-*.log"))


def relay_reported(fragment: str, timeout: float = WAIT) -> None:
    """Wait for ``fragment`` of the relay's report in a worker log. The report is logged after the pass
    commits, so a batch the pass finished may be done before it is written."""
    eventually(lambda: fragment in relay_log(), "the relay's report in a worker log", timeout)


def start_redis(port: int) -> subprocess.Popen:
    """A Redis server of a test's own on ``port`` (keeping nothing on disk), once it answers."""
    import redis

    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    eventually(pings, "redis to start", 20)
    return server


def works_in_a_child_forked_while_held(lock: Any, child: Callable[[], bool]) -> bool:
    """Fork while another thread of this process holds ``lock`` (what a prefork worker's relay or group
    commit thread may do at the instant of a fork); True if ``child()`` returned True in the child
    within 10 seconds, instead of blocking on the lock its parent's thread held."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        try:
            os._exit(0 if child() else 1)
        except BaseException:
            os._exit(2)
    release.set()
    thread.join()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0
