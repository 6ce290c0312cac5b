"""Batches: the service that creates, reads and waits for batches, bound to one Celery app."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from celery import Celery, current_task

from .builder import BatchBuilder, Message
from .errors import BatchNotFoundError, InvalidBatchError
from .models import Batch, BatchStatus, Continuation, JobRun
from .publish import HEADER, publish
from .settings import Settings
from .store import RunEvent, Store, build_tables, make_engine, migrate, utcnow
from .worker import signals
from .worker.bootstep import make_bootstep
from .worker.groupcommit import GroupCommit
from .worker.task import BatchTask

__all__ = ["Batches", "current_batch_id"]

log = logging.getLogger(__name__)


def current_batch_id() -> str | None:
    """Inside a running batch member: its batch id. Anywhere else: None."""
    task = current_task._get_current_object()  # None outside a task
    return getattr(task.request, HEADER, None) if task is not None else None


def _batch_id(value: object) -> str:
    """Batch ids are UUIDs; anything else is a caller's mistake, not an unknown batch."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidBatchError(f"{value!r} is not a batch id (a UUID)") from None


class Batches:
    """Atomic batches for one Celery app.

    Creating it connects the worker signal handlers and adds the relay/reconciler bootstep to
    the app, so create it where the app is defined (the module ``celery -A`` imports).
    """

    def __init__(self, app: Celery, database_url: str | None = None, table_prefix: str | None = None,
                 **settings: Any) -> None:
        self.app = app
        self.settings = Settings.resolve(app.conf, dict(settings, database_url=database_url,
                                                        table_prefix=table_prefix))
        self.engine = make_engine(self.settings.database_url, self.settings.engine_options)
        self.store = Store(self.engine, build_tables(self.settings.table_prefix), self.settings.expires)
        self._group_commit = GroupCommit(self._write_events, interval=self.settings.flush_interval,
                                         max_events=self.settings.flush_max,
                                         max_delay=self.settings.write_retry_max_delay)
        signals.connect(self)
        app.steps["worker"].add(make_bootstep(self))

    # -- schema ------------------------------------------------------------------------------------
    def migrate(self) -> None:
        """Create or upgrade the registry schema (idempotent; safe from many processes at once)."""
        migrate(self.engine, self.settings.table_prefix)

    # -- tasks -------------------------------------------------------------------------------------
    def task(self, *args: Any, **options: Any) -> Any:
        """``app.task`` with :class:`BatchTask` as base: ``@batches.task`` or ``@batches.task(name=...)``."""
        options.setdefault("base", BatchTask)
        return self.app.task(*args, **options)

    # -- creation ----------------------------------------------------------------------------------
    @contextmanager
    def batch(self, name: str, *, created_by: str | None = None) -> Iterator[BatchBuilder]:
        """Build a batch in a ``with`` block: written atomically on a clean exit, not at all otherwise."""
        builder = BatchBuilder(self.app, name, created_by=created_by)
        try:
            yield builder
        except BaseException:
            builder._discard()
            raise
        self._create(builder)

    def create_batch(self, name: str, configure: Callable[[BatchBuilder], Any], *,
                     created_by: str | None = None) -> str:
        """Seed-style creation: ``configure(builder)`` then write; returns the batch id."""
        with self.batch(name, created_by=created_by) as builder:
            configure(builder)
        return builder.id

    def _create(self, builder: BatchBuilder) -> None:
        plan = builder._close()
        with self.engine.begin() as conn:
            due = self.store.insert_tree(conn, plan, utcnow())
        self._publish_runs([job for node in plan.walk() for job in node.jobs])
        self._publish_continuations(due)

    # -- publishing (after commit) -----------------------------------------------------------------
    def _publish_runs(self, runs: Sequence[Message], chunk: int = 5000) -> list[str]:
        sent: list[str] = []
        for start in range(0, len(runs), chunk):
            ids = publish(self.app, runs[start:start + chunk])
            if ids:
                self._retry_write(self.store.mark_published, ids)
            sent += ids
            if len(ids) < len(runs[start:start + chunk]):
                break  # the broker failed; the relay publishes the rest
        return sent

    def _publish_continuations(self, continuations: Sequence[Message]) -> list[str]:
        ids = publish(self.app, continuations)
        if ids:
            self._retry_write(self.store.mark_dispatched, ids)
        return ids

    def _retry_write(self, write: Callable[[Sequence[str]], None], ids: Sequence[str], attempts: int = 5) -> None:
        """Record a publish. The messages are already out, so a failure here must not raise to the
        caller; if every attempt fails the relay will publish those ids again (same task ids)."""
        for attempt in range(1, attempts + 1):
            try:
                return write(ids)
            except Exception:
                if attempt == attempts:
                    log.exception("celery_batches: could not record %d published message(s); the relay "
                                  "will publish them again (same task ids)", len(ids))
                else:
                    time.sleep(0.05 * 2 ** attempt)

    def _write_events(self, events: Sequence[RunEvent]) -> None:
        """Commit a group of run transitions, then publish the continuations it made due."""
        self._publish_continuations(self.store.apply_events(events))

    # -- reads -------------------------------------------------------------------------------------
    def get_batch(self, batch_id: str) -> Batch | None:
        return self.store.get_batch(_batch_id(batch_id))

    def get_batch_jobs(self, batch_id: str) -> list[JobRun]:
        """The batch's direct jobs in enqueue order."""
        return self.store.get_jobs(_batch_id(batch_id))

    def get_continuations(self, batch_id: str) -> list[Continuation]:
        return self.store.get_continuations(_batch_id(batch_id))

    def list_batches(self, *, status: BatchStatus | int | None = None, parent_id: str | None = None,
                     name: str | None = None, limit: int = 50, offset: int = 0) -> list[Batch]:
        """Newest first; top-level batches unless ``parent_id`` is given; ``name`` matches a substring."""
        if not (isinstance(limit, int) and isinstance(offset, int) and limit >= 0 and offset >= 0):
            raise InvalidBatchError(f"limit and offset must be non-negative integers, got {limit!r}, {offset!r}")
        try:
            wanted = None if status is None else BatchStatus(status)
        except ValueError:
            raise InvalidBatchError(f"{status!r} is not a BatchStatus") from None
        return self.store.list_batches(status=wanted, parent_id=None if parent_id is None else _batch_id(parent_id),
                                       name=name, limit=limit, offset=offset)

    def wait(self, batch_id: str, timeout: float | None = None) -> Batch:
        """Poll until the batch is finished; raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        batch_id = _batch_id(batch_id)
        while True:
            batch = self.get_batch(batch_id)
            if batch is None:
                raise BatchNotFoundError(batch_id)
            if batch.is_finished:
                return batch
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {batch_id} is still {batch.status.name} after {timeout}s "
                                   f"({batch.pending_jobs} of {batch.total_jobs} unit(s) pending)")
            time.sleep(self.settings.wait_interval)
