"""The Celery app the integration tests run in real ``celery worker`` processes.

Everything that differs between test sessions (broker, registry, table prefix, queue, group
commit settings) comes from the environment the fixtures set, so the worker and the test
process see the same configuration.
"""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded  # noqa: F401  (documented for readers)

from celery_batches import Batches, current_batch_id
from celery_batches.signals import batch_finished

env = os.environ.get
app = Celery("proj", broker=env("TEST_BROKER_URL", "redis://127.0.0.1:6379/9"),
             backend=env("TEST_BACKEND_URL", "redis://127.0.0.1:6379/9"))
app.conf.update(
    task_default_queue=env("TEST_QUEUE", "celery_batches_tests"),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
    # unacknowledged (acks_late) messages of a killed worker come back after this many seconds
    broker_transport_options={"visibility_timeout": int(env("TEST_VISIBILITY_TIMEOUT", "3600")),
                              "unacked_restore_interval": 1, "unacked_restore_throttle": 1},
)
batches = Batches(
    app,
    database_url=env("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    table_prefix=env("TEST_PREFIX", "cbtest_"),
    flush_interval=float(env("TEST_FLUSH_INTERVAL", "0.02")),
    flush_max=int(env("TEST_FLUSH_MAX", "500")),
    relay_interval=float(env("TEST_RELAY_INTERVAL", "1")),
    publish_lease=float(env("TEST_PUBLISH_LEASE", "30")),
    heartbeat_interval=float(env("TEST_HEARTBEAT_INTERVAL", "1")),
    node_timeout=float(env("TEST_NODE_TIMEOUT", "10")),
    lost_after=float(env("TEST_LOST_AFTER", "10")),
    reconcile_grace=float(env("TEST_RECONCILE_GRACE", "30")),
    traceback_max_chars=int(env("TEST_TRACEBACK_MAX_CHARS", "20000")),
    # lets a fault test find (and kill) exactly this process's database connections
    engine_options={"connect_args": {"application_name": env("TEST_APPLICATION_NAME", "celery_batches_tests")}},
)
r = redis.Redis.from_url(env("TEST_REDIS_URL", "redis://127.0.0.1:6379/9"))

#: a batch whose name starts with this has a ``batch_finished`` receiver that raises (connected first)
RAISING = "signal-raises"


def finished_key(batch_id: str) -> str:
    """The Redis list of the ``batch_finished`` signals a worker process sent for ``batch_id``."""
    return f"signals:finished:{batch_id}"


@batch_finished.connect(weak=False, dispatch_uid="tests-proj-raises")
def raise_on_finished(sender: object = None, batch_id: str = "", name: str = "", **_: object) -> None:
    if name.startswith(RAISING):
        raise RuntimeError(f"a batch_finished receiver raises on purpose for {batch_id}")


@batch_finished.connect(weak=False, dispatch_uid="tests-proj-finished")
def record_finished(sender: object = None, batch_id: str = "", status: object = None, **_: object) -> None:
    """Every ``batch_finished`` a process of this app sends: its status name and pid, per batch
    (the test process, which imports this module too, records its own: a cancel, an empty batch)."""
    r.rpush(finished_key(batch_id), f"{getattr(status, 'name', status)} {os.getpid()}")


@batches.task
def noop(tag: str | None = None) -> None:
    """Counts its executions under ``tag`` (so tests can see duplicates and things that must not run)."""
    if tag:
        r.incr(tag)


@batches.task
def add(x: int, y: int) -> int:
    return x + y


@batches.task
def fail(tag: str | None = None, message: str = "this member fails on purpose") -> None:
    if tag:
        r.incr(tag)
    raise ValueError(message)


@batches.task(bind=True, max_retries=5)
def flaky(self, key: str, failures: int) -> str:
    """Fails ``failures`` times (retrying at once), then succeeds."""
    if r.incr(key) <= failures:
        raise self.retry(countdown=0)
    return "ok"


@batches.task(bind=True, max_retries=2)
def always_retry(self, key: str) -> None:
    r.incr(key)
    raise self.retry(countdown=0, exc=RuntimeError("still broken"))


@batches.task(time_limit=1)
def overrun(tag: str) -> None:
    """Exceeds its hard time limit: the worker kills the child process."""
    r.incr(tag)
    time.sleep(30)


@batches.task
def barrier(key: str, parties: int) -> None:
    """Waits until ``parties`` members reached it, so they finish at the same instant."""
    r.incr(key)
    deadline = time.monotonic() + 20
    while int(r.get(key) or 0) < parties and time.monotonic() < deadline:
        time.sleep(0.001)


@batches.task
def barrier_fail(key: str, parties: int) -> None:
    """``barrier``, then fails: a failure at the same instant as another member's end."""
    barrier(key, parties)
    raise ValueError("fails at the barrier")


@batches.task
def fail_unless(flag: str, tag: str | None = None) -> str:
    """Fails until the Redis key ``flag`` is set (a failure that a later retry_failed fixes)."""
    if tag:
        r.incr(tag)
    if not r.get(flag):
        raise ValueError(f"{flag} is not set yet")
    return "ok"


def _at_once(key: str, seconds: float) -> None:
    """Counts how many run at once under ``key`` (the most ever seen in ``key:max``) for ``seconds``."""
    r.eval("local n = redis.call('incr', KEYS[1]) "
           "if n > tonumber(redis.call('get', KEYS[2]) or '0') then redis.call('set', KEYS[2], n) end",
           2, key, f"{key}:max")
    try:
        time.sleep(seconds)
    finally:
        r.decr(key)


@batches.task
def concurrent(key: str, seconds: float = 0.02) -> None:
    """Counts how many run at once under ``key`` (the most ever seen in ``key:max``)."""
    _at_once(key, seconds)


@batches.task
def concurrent_unless(key: str, flag: str) -> None:
    """``concurrent``, failing at its end until the Redis key ``flag`` is set."""
    _at_once(key, 0.05)
    if not r.get(flag):
        raise ValueError(f"{flag} is not set yet")


@batches.task
def sleep_then(seconds: float, tag: str | None = None) -> None:
    time.sleep(seconds)
    if tag:
        r.incr(tag)


@batches.task
def whoami(key: str) -> None:
    """Stores the batch id it sees through current_batch_id()."""
    r.set(key, current_batch_id() or "none")


@batches.task(acks_late=True)
def slow_ack(seconds: float, tag: str) -> None:
    """acks_late: a worker killed while running it leaves the message to be delivered again."""
    r.incr(tag)
    time.sleep(seconds)


@batches.task
def crawl(key: str, limit: int) -> None:
    """Adds one more crawl to its own batch until ``limit`` ran (a crawler discovering pages)."""
    if r.incr(key) < limit:
        batches.add_jobs_to_batch(current_batch_id(), lambda b: b.enqueue(crawl, key, limit))


@app.task
def plain(tag: str) -> None:
    """A plain @app.task member (not a BatchTask)."""
    r.incr(tag)


@app.task
def record(key: str, *values: object) -> None:
    """A continuation: counts how often it ran."""
    r.incr(key)


@batches.task
def record_once(key: str, *values: object) -> None:
    """A ``@batches.task`` continuation: counts its runs (a second delivery of it is skipped)."""
    r.incr(key)


@batches.task(bind=True)
def track(self, key: str, seconds: float = 0.0) -> None:
    """Counts its starts per run (hash ``key``), then sleeps: tells a killed run from one run twice."""
    r.hincrby(key, self.request.id)
    time.sleep(seconds)


@batches.task(bind=True, acks_late=True)
def track_late(self, key: str, seconds: float = 0.0) -> None:
    """``track`` with acks_late: Celery delivers it again if its worker dies while it runs."""
    r.hincrby(key, self.request.id)
    time.sleep(seconds)


@batches.task
def gate(flag: str, value: object) -> object:
    """Waits (up to 60 s) until the Redis key ``flag`` is set, then returns ``value``: keeps its
    batch open while a test adds to it."""
    deadline = time.monotonic() + 60
    while not r.get(flag) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


@batches.task(ignore_result=True)
def returns(value: object, copies: int = 1) -> object:
    """Returns ``value`` (``copies`` times over, for a string): with no result backend involved, so
    only the batch's own result keeping judges it."""
    return value * copies if isinstance(value, str) else value


@batches.task(ignore_result=True)
def returns_a_set() -> set:
    return {1, 2}


@app.task
def remember(results: list, key: str) -> None:
    """A ``results=True`` continuation: stores the results it got (JSON) under ``key``, counts its runs."""
    r.rpush(key, json.dumps(results))


@app.task
def total(results: list) -> int:
    """The first task of a chain continuation: sums the results list it got, for the next task."""
    return sum(results)


@batches.task(bind=True)
def replace_with(self, key: str, how: str = "direct") -> None:
    """Replaces itself (``Task.replace``): with ``noop(key)`` (``direct``, the replacement takes this
    task's id), or with a chain whose last link takes it (``chain``)."""
    r.incr(f"{key}:replaced")
    if how == "chain":
        return self.replace(noop.si(key) | add.si(1, 2))
    return self.replace(noop.si(key))


@app.task(bind=True)
def plain_replace_with(self, key: str) -> None:
    """``replace_with`` as a plain ``@app.task``."""
    r.incr(f"{key}:replaced")
    return self.replace(noop.si(key))


@batches.task(bind=True)
def ignores(self, key: str, record: str | None = None) -> None:
    """Raises Ignore; with ``record``, after recording that state itself (Celery's custom-state idiom)."""
    from celery.exceptions import Ignore

    r.incr(key)
    if record == "SUCCESS":
        self.update_state(state=record, meta="recorded by the task")
    elif record == "FAILURE":  # as Celery stores an exception
        self.update_state(state=record, meta={"exc_type": "ValueError", "exc_module": "builtins",
                                              "exc_message": ["recorded by the task"]})
    raise Ignore()


@batches.task(bind=True, acks_late=True)
def rejects(self, key: str, requeue_times: int = 0) -> str:
    """Raises Reject: requeued ``requeue_times`` times (then it succeeds), or (0) not requeued."""
    from celery.exceptions import Reject

    n = r.incr(key)
    if requeue_times == 0:
        raise Reject("rejected on purpose", requeue=False)
    if n <= requeue_times:
        raise Reject("requeued on purpose", requeue=True)
    return "ok"


@batches.task(bind=True, max_retries=3)
def retrying_continuation(self, key: str, *values: object) -> None:
    """A ``@batches.task`` continuation that retries once, then counts its completion under ``key``."""
    if r.incr(f"{key}:attempts") == 1:
        raise self.retry(countdown=0)
    r.incr(key)


@batches.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def requeued_if_lost(self, key: str, seconds: float) -> None:
    """acks_late + reject_on_worker_lost: Celery requeues it if its pool process dies under it."""
    r.hincrby(key, self.request.id)
    time.sleep(seconds)


@batches.task
def fail_then_sleep(flag: str, seconds: float) -> str:
    """Fails until the Redis key ``flag`` is set; then takes ``seconds`` and succeeds."""
    if not r.get(flag):
        raise ValueError(f"{flag} is not set yet")
    time.sleep(seconds)
    return "ok"
