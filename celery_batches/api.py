"""Batches: the service that creates, reads and waits for batches, bound to one Celery app."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import sqlalchemy as sa
from celery import Celery, current_task

from .aftercommit import caller_connection, on_commit
from .broker import probe_for
from .builder import BatchBuilder
from .errors import BatchClosedError, BatchNotFoundError, InvalidBatchError
from .models import Batch, BatchStatus, Continuation, JobRun, RunStatus
from .outbox import CONTINUATION_HEADER, HEADER, Publisher
from .settings import Settings
from .store import Outbox, RunEvent, Store, build_tables, make_engine, migrate, refused_for_good, utcnow
from .store.liveness import UNCLAIMED, Claim, Liveness
from .store.outbox import OutboxStore
from .worker import signals
from .worker.bootstep import make_bootstep
from .worker.groupcommit import GroupCommit
from .worker.task import BatchTask

__all__ = ["Batches", "current_batch_id"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def current_batch_id() -> str | None:
    """Inside a running batch member: its batch id; inside a continuation: the batch that fired it.
    Anywhere else: None."""
    task = current_task._get_current_object()  # None outside a task
    if task is None:
        return None
    return getattr(task.request, HEADER, None) or getattr(task.request, CONTINUATION_HEADER, None)


def _batch_id(value: object) -> str:
    """Batch ids are UUIDs; anything else is a caller's mistake, not an unknown batch."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidBatchError(f"{value!r} is not a batch id (a UUID)") from None


def _refusal(event: RunEvent, exc: BaseException) -> RunEvent | None:
    """What to record instead of a transition the registry refuses for good: the run FAILED, saying why."""
    if event.status == RunStatus.FAILED and event.error and event.error.startswith("celery_batches:"):
        return None  # already a refusal
    return RunEvent(event.run_id, RunStatus.FAILED, event.retries,
                    f"celery_batches: the registry refused this run's {event.status.name} transition: "
                    f"{type(exc).__name__}: {str(exc)[:1000]}")


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
        tables = build_tables(self.settings.table_prefix)
        lease = timedelta(seconds=self.settings.publish_lease)
        self.store = Store(self.engine, tables, self.settings.expires, lease)
        self.outbox = Publisher(app, OutboxStore(self.engine, tables, lease), self.store.apply_events,
                                chunk=self.settings.publish_chunk)
        # this worker process's incarnation: a restarted worker is a new node; pool processes inherit it
        self.node = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.liveness = Liveness(self.engine, tables, self._claim_engine())
        self.probe = probe_for(app, self.settings.probe_scan_limit)
        self._group_commit = GroupCommit(self._write_events, interval=self.settings.flush_interval,
                                         max_events=self.settings.flush_max,
                                         max_delay=self.settings.write_retry_max_delay,
                                         refused_for_good=refused_for_good, replace_refused=_refusal)
        app.celery_batches = self  # how `celery -A proj batches ...` finds this instance
        signals.connect(self)
        app.steps["worker"].add(make_bootstep(self))
        app.task(name="celery_batches.purge_expired", shared=False, ignore_result=True)(self.purge_expired)

    def _claim_engine(self) -> sa.Engine:
        """Claims (one per task start) commit without waiting for the disk on PostgreSQL: a claim
        lost in a server crash leaves the run PENDING, which recovery handles like a lost message."""
        if self.engine.dialect.name != "postgresql":
            return self.engine
        options = dict(self.settings.engine_options)
        connect_args = dict(options.pop("connect_args", {}))
        connect_args["options"] = f"{connect_args.get('options', '')} -c synchronous_commit=off".strip()
        return make_engine(self.settings.database_url, {**options, "connect_args": connect_args})

    # -- schema ------------------------------------------------------------------------------------
    def migrate(self) -> None:
        """Create or upgrade the registry schema (idempotent; safe from many processes at once)."""
        migrate(self.engine, self.settings.table_prefix)

    # -- tasks -------------------------------------------------------------------------------------
    def task(self, *args: Any, **options: Any) -> Any:
        """``app.task`` with :class:`BatchTask` as base: ``@batches.task`` or ``@batches.task(name=...)``."""
        options.setdefault("base", BatchTask)
        options.setdefault("_batches", self)
        return self.app.task(*args, **options)

    # -- creation ----------------------------------------------------------------------------------
    @contextmanager
    def batch(self, name: str, *, created_by: str | None = None, connection: Any = None) -> Iterator[BatchBuilder]:
        """Build a batch in a ``with`` block: written atomically on a clean exit, not at all otherwise.

        With ``connection`` (a SQLAlchemy ``Session`` or a ``Connection`` in a transaction, on the
        registry's database) the batch is written in the caller's transaction: it exists only if the
        caller commits, and its messages are published right after that commit (or by the relay).
        """
        builder = BatchBuilder(self.app, name, created_by=created_by)
        with self._building(builder):
            yield builder
        plan = builder._close()
        if connection is None:
            self._publish(self._write(lambda conn: self.store.insert_tree(conn, plan, utcnow())))
            return
        conn = caller_connection(connection)
        outbox = self.store.insert_tree(conn, plan, utcnow())
        on_commit(connection, lambda: self._publish(outbox),
                  visible=lambda: self.store.get_batch(plan.id) is not None, timeout=self.settings.publish_lease)

    def create_batch(self, name: str, configure: Callable[[BatchBuilder], Any], *,
                     created_by: str | None = None) -> str:
        """Seed-style creation: ``configure(builder)`` then write; returns the batch id."""
        with self.batch(name, created_by=created_by) as builder:
            configure(builder)
        return builder.id

    @contextmanager
    def reopen(self, batch_id: str) -> Iterator[BatchBuilder]:
        """Add jobs, nested batches and continuations to an unfinished batch, atomically.

        Raises ``BatchNotFoundError`` for an unknown id and ``BatchClosedError`` if the batch is
        finished or cancelled (checked under the batch's row lock when the block exits).
        """
        batch_id = _batch_id(batch_id)
        batch = self.get_batch(batch_id)
        if batch is None:
            raise BatchNotFoundError(batch_id)
        if batch.is_finished:
            raise BatchClosedError(batch_id, batch.status)
        builder = BatchBuilder(self.app, batch.name, created_by=batch.created_by, batch_id=batch_id)
        with self._building(builder):
            yield builder
        plan = builder._close()
        self._publish(self._write(lambda conn: self.store.add_to_batch(conn, batch_id, plan, utcnow())))

    def add_jobs_to_batch(self, batch_id: str, configure: Callable[[BatchBuilder], Any]) -> list[str]:
        """Seed-style add: ``configure(builder)``; returns the run ids of the direct jobs added."""
        with self.reopen(batch_id) as builder:
            configure(builder)
        return [job.id for job in builder._plan.jobs]

    def continue_batch_with(self, batch_id: str, name: str, configure: Callable[[BatchBuilder], Any], *,
                            when: str = "success") -> str:
        """A new batch that starts when ``batch_id`` finishes and ``when`` matches its outcome.

        ``when``: "success" (antecedent COMPLETED), "failure" (FAILED) or "complete" (either). Until
        then the new batch is CREATED with its runs unpublished; if the antecedent finishes the other
        way, or is cancelled, the new batch is CANCELLED. Returns the new batch id.
        """
        if when not in ("success", "failure", "complete"):
            raise InvalidBatchError(f"when must be 'success', 'failure' or 'complete', not {when!r}")
        antecedent = _batch_id(batch_id)
        builder = BatchBuilder(self.app, name)
        with self._building(builder):
            configure(builder)
        plan = builder._close()
        self._publish(self._write(lambda conn: self.store.insert_tree(conn, plan, utcnow(),
                                                                      antecedent=(antecedent, when))))
        return plan.id

    @staticmethod
    @contextmanager
    def _building(builder: BatchBuilder) -> Iterator[None]:
        try:
            yield
        except BaseException:
            builder._discard()
            raise

    # -- cancel and expiry -------------------------------------------------------------------------
    def cancel_batch(self, batch_id: str) -> int:
        """Cancel the batch's whole subtree (and the continue-with stages waiting on it).

        Pending runs become CANCELLED and are revoked in Celery; running ones finish and are
        recorded; no continuation of a cancelled batch fires. Returns how many runs were cancelled.
        """
        batch_id = _batch_id(batch_id)
        run_ids, outbox = self._write(lambda conn: self.store.cancel(conn, batch_id, utcnow()))
        for start in range(0, len(run_ids), 1000):
            try:
                self.app.control.revoke(run_ids[start:start + 1000])
            except Exception:  # the registry already says CANCELLED; BatchTask skips them anyway
                log.exception("celery_batches: could not broadcast the revoke of %d run(s)", len(run_ids))
        self._publish(outbox)
        return len(run_ids)

    def purge_expired(self) -> int:
        """Delete finished top-level batches past ``expires_at``, with their whole tree; returns batches deleted."""
        return self.store.purge_expired(utcnow())

    def _claim(self, run_id: str, retries: int) -> Claim | None:
        """For the worker, as a member starts: mark its run RUNNING on this process (see Liveness.claim).
        None if the registry cannot be reached: the member runs, its RUNNING goes through the group commit."""
        # <node>/<pid>/<delivery>: a repeat of this claim (its commit went unanswered) finds the run its own
        node = f"{self.node}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        try:
            return self._read(lambda: self.liveness.claim(run_id, retries, node, utcnow()))
        except sa.exc.DBAPIError:
            log.error("celery_batches: cannot claim run %s in the registry; running it (its outcome is "
                      "recorded when the registry answers again)", run_id, exc_info=True)
            return None

    def _claim_continuation(self, continuation_id: str) -> bool | None:
        """For the worker, as a continuation starts: True if this delivery is its first, False if an
        earlier one claimed it, None if it is no continuation of ours or the registry cannot be reached."""
        token = str(uuid.uuid4())
        try:
            return self._read(lambda: self.liveness.claim_continuation(continuation_id, token))
        except sa.exc.DBAPIError:
            log.error("celery_batches: cannot claim continuation %s in the registry; running it",
                      continuation_id, exc_info=True)
            return None

    def _delivery_verdict(self, run_id: str, continuation_of: str | None, claim: Any = UNCLAIMED) -> str:
        """For BatchTask, before a delivery runs: "run", "skip" (already finished: a redelivery or a
        republish of a finished run, or a continuation that already ran) or "cancel" (the run or its
        batch was cancelled). A registry that cannot be read says "run": failing the task would be worse."""
        if continuation_of is not None:
            claimed = self._claim_continuation(run_id) if claim is UNCLAIMED else claim
            return "skip" if claimed is False else "run"
        if claim is UNCLAIMED:
            claim = self._claim(run_id, 0)
        if claim is None or claim.run_status is None:
            return "run"  # no registry to ask, or not a run of ours
        if claim.run_status == RunStatus.CANCELLED or (
                claim.batch_status == BatchStatus.CANCELLED and not claim.run_status.is_final):
            return "cancel"
        return "run" if claim.claimed else "skip"  # finished, or running elsewhere

    def _read(self, read: Callable[[], _T], attempts: int = 4) -> _T:
        """Run a registry read, again if its connection died (a restarted or failed-over database,
        a killed backend: the pool has already dropped the dead connections) or the server refused it."""
        delay = 0.05
        for attempt in range(1, attempts + 1):
            try:
                return read()
            except sa.exc.DBAPIError as exc:
                if attempt == attempts or not (exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError)):
                    raise
                log.warning("celery_batches: registry read failed (attempt %d): %s; retrying", attempt, exc.orig)
                if not exc.connection_invalidated:
                    time.sleep(delay)
                    delay *= 2
        raise AssertionError("unreachable")

    def _write(self, work: Callable[[Any], _T], attempts: int = 5) -> _T:
        """Run ``work(conn)`` in a transaction of its own, again if PostgreSQL chose it as the victim
        of a deadlock or a serialization failure (a cancel and a worker's group commit lock the same
        rows in different orders); the whole transaction is repeated, so nothing is half-done."""
        for attempt in range(1, attempts + 1):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except sa.exc.DBAPIError as exc:
                if attempt == attempts or getattr(exc.orig, "sqlstate", None) not in ("40P01", "40001"):
                    raise
                log.warning("celery_batches: transaction lost a deadlock (attempt %d); retrying", attempt)
                time.sleep(0.01 * attempt)
        raise AssertionError("unreachable")

    # -- publishing (after commit) -----------------------------------------------------------------
    def _publish(self, outbox: Outbox) -> None:
        self.outbox.publish(outbox)

    def _write_events(self, events: Sequence[RunEvent]) -> None:
        """Commit a group of run transitions, then publish what it made due."""
        self.outbox.publish(self.store.apply_events(events))

    # -- reads -------------------------------------------------------------------------------------
    def get_batch(self, batch_id: str) -> Batch | None:
        """The batch, or None if no batch has that id (a malformed id names no batch either)."""
        try:
            batch_id = _batch_id(batch_id)
        except InvalidBatchError:
            return None
        return self.store.get_batch(batch_id)

    def get_batch_jobs(self, batch_id: str) -> list[JobRun]:
        """The batch's direct jobs in enqueue order."""
        return self.store.get_jobs(_batch_id(batch_id))

    def get_continuations(self, batch_id: str) -> list[Continuation]:
        return self.store.get_continuations(_batch_id(batch_id))

    def list_batches(self, *, status: BatchStatus | int | None = None, parent_id: str | None = None,
                     name: str | None = None, limit: int = 50, offset: int = 0) -> list[Batch]:
        """Newest first; top-level batches unless ``parent_id`` is given; ``name`` matches a substring, ignoring case."""
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
