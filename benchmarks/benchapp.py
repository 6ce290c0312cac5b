"""The Celery app the benchmarks run in one real ``celery worker -P prefork -c 2``."""

from __future__ import annotations

import os
import socket

import redis
from celery import Celery

from celery_batches import Batches

env = os.environ.get
REDIS = env("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
#: the broker (Redis unless BENCH_BROKER_URL says otherwise, e.g. amqp://guest:guest@127.0.0.1:5672//);
#: results and the benchmark's counters always live in Redis
BROKER = env("BENCH_BROKER_URL", REDIS)
app = Celery("benchapp", broker=BROKER, backend=REDIS)
app.conf.update(task_default_queue=env("BENCH_QUEUE", "celery_batches_bench"), worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)
if BROKER.startswith("amqp"):  # py-amqp drops a socket RabbitMQ's flow control paused for 1 s (docs/howto.md)
    app.conf.broker_transport_options = {"socket_settings": {socket.TCP_USER_TIMEOUT: 30000}}
batches = Batches(app, database_url=env("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
                  table_prefix=env("BENCH_PREFIX", "cbbench_"),
                  flush_interval=float(env("BENCH_FLUSH_INTERVAL", "0")) or None,  # None: the default
                  # BENCH_PREPARED_STATEMENTS=1: what server-side prepared statements save (off by default:
                  # PgBouncer's transaction pooling loses them; docs/deploying.md)
                  prepared_statements=env("BENCH_PREPARED_STATEMENTS", "0") == "1")
r = redis.Redis.from_url(REDIS)


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
