"""The Celery app the benchmarks run in one real ``celery worker -P prefork -c 2``."""

from __future__ import annotations

import os
import re
import socket
import uuid

import redis
from celery import Celery

from celery_batches import Batches

env = os.environ.get
REDIS = env("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
#: the broker (Redis unless BENCH_BROKER_URL says otherwise, e.g. amqp://guest:guest@127.0.0.1:5672//);
#: results and the benchmark's counters always live in Redis
BROKER = env("BENCH_BROKER_URL", REDIS)
#: BENCH_KEY_PREFIX: the run's results (Celery's result backend) and counters under this prefix of Redis keys,
#: which ``drop_keys`` deletes (the tiny runs of tests/test_benchmarks.py); the broker's keys are the
#: queue's (BENCH_QUEUE), deleted by name
KEYS = env("BENCH_KEY_PREFIX", "")
app = Celery("benchapp", broker=BROKER, backend=REDIS)
app.conf.update(task_default_queue=env("BENCH_QUEUE", "celery_batches_bench"), worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)
if KEYS:
    app.conf.result_backend_transport_options = {"global_keyprefix": KEYS}
if BROKER.startswith("amqp"):  # py-amqp drops a socket RabbitMQ's flow control paused for 1 s (docs/howto.md)
    app.conf.broker_transport_options = {"socket_settings": {socket.TCP_USER_TIMEOUT: 30000}}
batches = Batches(app, database_url=env("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
                  table_prefix=env("BENCH_PREFIX", "cbbench_"),
                  flush_interval=float(env("BENCH_FLUSH_INTERVAL", "0")) or None,  # None: the default
                  # BENCH_PREPARED_STATEMENTS=1: what server-side prepared statements save (off by default:
                  # PgBouncer's transaction pooling loses them; docs/deploying.md)
                  prepared_statements=env("BENCH_PREPARED_STATEMENTS", "0") == "1")
r = redis.Redis.from_url(REDIS)


def bench_key(kind: str) -> str:
    """A fresh Redis key for a counter or a flag of the run (under BENCH_KEY_PREFIX)."""
    return f"{KEYS}bench:{kind}:{uuid.uuid4()}"


def drop_keys() -> int:
    """Delete every Redis key under BENCH_KEY_PREFIX (results, counters, flags); how many there were."""
    if not KEYS:
        raise RuntimeError("BENCH_KEY_PREFIX is not set: the run's keys share the namespace of everything else")
    pattern = re.sub(r"([\\\[\]*?])", r"\\\1", KEYS) + "*"  # the prefix itself matched literally
    keys = list(r.scan_iter(match=pattern, count=1000))
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i:i + 1000])
    return len(keys)


@batches.task
def noop(key: str) -> None:
    """The task all three ways run: it bumps a Redis counter (the floor reads it)."""
    r.incr(key)


@batches.task(acks_late=True)
def noop_late(key: str) -> None:
    """The floor's task with ``acks_late``: acknowledged after it ran, as a reliable setup would run it."""
    r.incr(key)


@app.task
def done(*_: object, key: str) -> None:
    """Chord callback and batch continuation: marks the moment everything finished."""
    r.set(key, 1)
