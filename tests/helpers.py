"""Helpers the test modules share; the fixtures are in ``conftest.py``.

Nothing here reads the session's configuration at import time, so ``conftest.py`` builds on this
module (never the other way round). Every wait is a deadline, never a sleep: a check that
passes returns at once, whatever the deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import sqlalchemy as sa
from celery import Celery

from benchmarks.services import free_port  # noqa: F401  (re-exported for the test modules)
from celery_batches import Batches
from celery_batches.message import Message
from celery_batches.models import ContinuationStatus

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


# -- processes -----------------------------------------------------------------------------------------
def worker_argv(app: str, queue: str, concurrency: int = 2) -> list[str]:
    """``celery worker`` as the tests run it: prefork with two pool processes, on one queue, INFO log,
    without gossip, mingle or heartbeat (nothing in the tests uses them, and they slow the start)."""
    return [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "prefork", "-c", str(concurrency), "-Q", queue,
            "-l", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]


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
