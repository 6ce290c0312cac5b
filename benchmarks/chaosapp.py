"""The Celery app of the chaos soak (``benchmarks/chaos.py``): its workers, producers and checker import it.

Everything comes from environment variables chaos.py sets, so every process sees the same run:
``CHAOS_BROKER_URL`` (the private Redis the soak restarts), ``CHAOS_COUNTER_URL`` (the shared Redis
that keeps the execution counts across those restarts), ``CHAOS_DATABASE_URL``, ``CHAOS_PREFIX``
(table prefix), ``CHAOS_KEYS`` (counter key prefix) and ``CHAOS_APP_NAME`` (the PostgreSQL
``application_name`` the fault loop uses to find this process's connections).

``CHAOS_PROFILE`` picks Celery's settings: ``defaults`` keeps them as Celery ships them (no global
acks_late, no result backend, the default visibility timeout), so the product must cope with
them; ``acks-late`` turns on ``task_acks_late`` for every task and a Redis result backend
(``CHAOS_BACKEND_URL``, on the shared Redis: broker restarts do not touch it).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, Task, signals

from celery_batches import Batches
from celery_batches.signals import batch_finished

env = os.environ.get
MAX_RETRIES = 3

PROFILE = env("CHAOS_PROFILE", "defaults")
ACKS_LATE = PROFILE == "acks-late"
app = Celery("chaosapp", broker=env("CHAOS_BROKER_URL", "redis://127.0.0.1:6390/0"),
             backend=env("CHAOS_BACKEND_URL", "redis://127.0.0.1:6379/12") if ACKS_LATE else None)
app.conf.update(task_default_queue=env("CHAOS_QUEUE", "chaos"), broker_connection_retry_on_startup=True,
                task_acks_late=ACKS_LATE, result_expires=3600)
# Recovery speed. Set through app.conf, where a setting this version does not know yet is ignored
# (an unknown keyword argument to Batches would raise).
app.conf.update(batches_relay_interval=1, batches_publish_lease=5, batches_heartbeat_interval=1,
                batches_node_timeout=10, batches_lost_after=10, batches_flush_interval=0.05)
batches = Batches(
    app,
    database_url=env("CHAOS_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    table_prefix=env("CHAOS_PREFIX", "cbchaos_"),
    engine_options={"connect_args": {"application_name": env("CHAOS_APP_NAME", "cbchaos")}},
)
counters = redis.Redis.from_url(env("CHAOS_COUNTER_URL", "redis://127.0.0.1:6379/11"))
KEYS = env("CHAOS_KEYS", "cbchaos")
STARTS, ENDS, CONTINUATIONS = f"{KEYS}:starts", f"{KEYS}:ends", f"{KEYS}:continuations"
REPLACED, CONTINUATIONS_DONE, REDELIVERED = f"{KEYS}:replaced", f"{KEYS}:continuations_done", f"{KEYS}:redelivered"
PUBLISHED, PUBLOG = f"{KEYS}:published", f"{KEYS}:publog"
FINISHED = f"{KEYS}:finished"  # one "<batch id> <status> <app name> <pid>" per batch_finished signal


@batch_finished.connect(weak=False, dispatch_uid="chaos-finished-spy")
def count_finished(sender: object = None, batch_id: str = "", status: Any = None, **_: object) -> None:
    """Note every ``batch_finished`` signal, in whichever process sent it (a worker's pool process,
    its main process, a producer): the check counts them per batch."""
    counters.rpush(FINISHED, f"{batch_id} {getattr(status, 'name', status)} {env('CHAOS_APP_NAME', '?')} "
                             f"{os.getpid()}")


@signals.after_task_publish.connect(weak=False, dispatch_uid="chaos-publish-spy")
def count_publish(sender: str | None = None, headers: dict | None = None, **_: object) -> None:
    """Count every message that reached the broker per (task id, attempt), and note who sent it:
    tells a message lost in the broker or a killed worker from one never published, and names
    both publishers of a job that ran twice."""
    if not headers or sender == "chaos.sentinel":
        return
    field = f"{headers.get('id')}:{headers.get('retries') or 0}"
    pipe = counters.pipeline(transaction=False)
    pipe.hincrby(PUBLISHED, field)
    now = time.time()
    pipe.rpush(PUBLOG, f"{field} {env('CHAOS_APP_NAME', '?')} pid {os.getpid()} at "
                       f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d}")
    pipe.execute()


class ChaosFailure(Exception):
    """A member that fails on purpose (the producer decided so)."""


def _execute(task: Task, spec: dict) -> str:
    """The body every member shares. ``spec`` (chosen by the producer) fixes the outcome:
    retry ``retries`` times, then fail if ``fail``, else succeed. ``retries`` above MAX_RETRIES
    exhausts them (a FAILED run)."""
    attempt = task.request.retries or 0
    field = f"{task.request.id}:{attempt}"
    counters.hincrby(STARTS, field)  # first thing: every start counts, even one killed a moment later
    if (task.request.delivery_info or {}).get("redelivered"):  # the broker delivered this message again
        counters.hincrby(REDELIVERED, field)
    if spec.get("sleep"):
        time.sleep(spec["sleep"])
    counters.hincrby(ENDS, field)
    if attempt < spec.get("retries", 0):
        raise task.retry(countdown=spec.get("countdown", 0), exc=ChaosFailure(f"retry after attempt {attempt}"))
    if spec.get("fail"):
        raise ChaosFailure("fails on purpose")
    return task.request.id  # a results=True batch keeps it: the check compares it with the run's id


@batches.task(name="chaos.work", bind=True, max_retries=MAX_RETRIES)
def work(self: Task, spec: dict) -> str:
    return _execute(self, spec)


@batches.task(name="chaos.work_late", bind=True, max_retries=MAX_RETRIES, acks_late=True)
def work_late(self: Task, spec: dict) -> str:
    return _execute(self, spec)


@app.task(name="chaos.plain_work", bind=True, max_retries=MAX_RETRIES)
def plain_work(self: Task, spec: dict) -> str:
    """A plain ``@app.task`` member: no cancel-skip."""
    return _execute(self, spec)


@batches.task(name="chaos.work_replace", bind=True)
def work_replace(self: Task, spec: dict) -> None:
    """Replaces itself (``Task.replace``) with ``chaos.work`` of the same spec, which runs under this
    task's id and is what the run records. Its own body counts apart (``REPLACED``)."""
    counters.hincrby(REPLACED, self.request.id)
    return self.replace(work.si(spec))


@app.task(name="chaos.continuation", bind=True)
def continuation(self: Task, *args: Any) -> None:
    """Counts its executions by task id, which is the continuation row's id. Its last argument is
    its kind; a ``results=True`` batch's continuation gets the results list before it."""
    counters.hincrby(CONTINUATIONS, self.request.id)


@batches.task(name="chaos.continuation_member", bind=True)
def continuation_member(self: Task, *args: Any) -> None:
    """The same as a ``@batches.task``."""
    counters.hincrby(CONTINUATIONS, self.request.id)


@batches.task(name="chaos.continuation_retry", bind=True, max_retries=MAX_RETRIES)
def continuation_retry(self: Task, *args: Any) -> None:
    """A ``@batches.task`` continuation that retries once: counted as it fires (its first attempt),
    and apart as it ends (its retry; a second delivery of a retry would count twice there)."""
    if not self.request.retries:
        counters.hincrby(CONTINUATIONS, self.request.id)
        raise self.retry(countdown=0)
    counters.hincrby(CONTINUATIONS_DONE, self.request.id)


def redelivered_by_celery(task_name: str) -> bool:
    """May Celery itself run this task again after a kill (its message acknowledged only at the end)?"""
    return ACKS_LATE or task_name == "chaos.work_late"


@app.task(name="chaos.sentinel")
def sentinel(key: str) -> None:
    """Sent behind everything else to drain the queue before the final check."""
    counters.incr(key)
