"""Batches: the service that creates, reads and waits for batches, bound to one Celery app."""

from __future__ import annotations

import inspect
import logging
import time
import weakref
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, TypeVar

from celery import Celery, current_task
from celery.backends.base import DisabledBackend

from . import retry
from .publishing import djangotx
from .publishing.aftercommit import joined, on_commit
from .publishing.probe import probe_for
from .aio import AsyncBatches
from .builder import BatchBuilder, validate_properties
from .errors import BatchNotFoundError, InvalidBatchError
from .models import WHEN_MATCHES, Batch, BatchStatus, Continuation, JobResult, JobRun, valid_id
from .message import CONTINUATION_HEADER, HEADER
from .publishing.publisher import Publisher
from .settings import PAGE_SIZE, REVOKE_CHUNK, Settings
from .store import Publication, Transitions, build_tables, make_engine, migrate, reads, utcnow
from .store.engine import make_claim_engine
from .store.commands import Commands
from .store.trees import Trees
from .store.liveness import Liveness
from .store.outbox import Outbox
from .store.tallies import Tallies
from .worker import signals
from .worker.bootstep import make_bootstep
from .worker.node import Node
from .worker.reconcile import Reconciler
from .worker.recovery import Recovery
from .worker.relay import Relay
from .worker.task import BatchTask

__all__ = ["Batches", "current_batch_id"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: the Batches of each Celery app, for :meth:`Batches.for_app` (weak: an app that goes away takes it along)
_BY_APP: "weakref.WeakKeyDictionary[Celery, Batches]" = weakref.WeakKeyDictionary()


def current_batch_id() -> str | None:
    """Inside a running batch member: its batch id; inside a continuation: the batch that fired it.
    Anywhere else: None."""
    task = current_task._get_current_object()  # None outside a task
    if task is None:
        return None
    return getattr(task.request, HEADER, None) or getattr(task.request, CONTINUATION_HEADER, None)


class Batches(AsyncBatches):
    """Atomic batches for one Celery app.

    Creating it connects the worker signal handlers and adds the relay/reconciler bootstep to
    the app, so create it where the app is defined (the module ``celery -A`` imports).
    """

    def __init__(self, app: Celery, database_url: str | None = None, table_prefix: str | None = None,
                 **settings: Any) -> None:
        self.app = app
        self.settings = Settings.resolve(app.conf, dict(settings, database_url=database_url,
                                                        table_prefix=table_prefix),
                                         project_url=djangotx.default_database_url)
        prepared = self.settings.prepared_statements
        self.engine = make_engine(self.settings.database_url, self.settings.engine_options,
                                  prepared_statements=prepared)
        tables = build_tables(self.settings.table_prefix)
        lease = timedelta(seconds=self.settings.publish_lease)
        self.transitions = Transitions(self.engine, tables, self.settings.expires, lease)
        self.trees = Trees(self.transitions)
        self.commands = Commands(self.transitions)
        self.outbox = Outbox(self.engine, tables, lease)
        self.publisher = Publisher(app, self.outbox, self.transitions.apply_events,
                                   chunk=self.settings.publish_chunk, bulk=self.settings.bulk_publish)
        self.liveness = Liveness(self.engine, tables,
                                 make_claim_engine(self.settings.database_url, self.settings.engine_options,
                                                   prepared_statements=prepared))
        self.probe = probe_for(app, self.settings.probe_scan_limit)
        #: the metrics' maintained counts (celery_batches.metrics renders them)
        self.tallies = Tallies(self.engine, tables)
        #: the worker side's one seam to the registry (signal handlers, BatchTask)
        self.node = Node(app, self.settings, self.transitions, self.liveness, self.publisher)
        #: the periodic pass of the worker's main process: relay, recovery, reconciler
        self.relay = Relay(self.settings, self.publisher, self.outbox,
                           Recovery(self.settings, app, self.liveness, self.probe, self.node.write_events, self.node.name),
                           Reconciler(self.settings, app, self.transitions, self.node.write_events), self.tallies,
                           self.node.name)
        _BY_APP[app] = self
        signals.connect(self.node)
        app.steps["worker"].add(make_bootstep(self.node, self.relay, self.liveness))
        app.task(name="celery_batches.purge_expired", shared=False, ignore_result=True)(self.purge_expired)

    @staticmethod
    def for_app(app: Any) -> "Batches | None":
        """The ``Batches`` created for ``app`` (the last one, if several were), or None. This is how
        ``celery -A proj batches ...`` and the dashboard find it from the app alone."""
        try:
            return _BY_APP.get(app)
        except TypeError:  # not weak-referenceable: no Celery app
            return None

    # -- schema ------------------------------------------------------------------------------------
    def migrate(self) -> None:
        """Create or upgrade the registry schema (idempotent; safe from many processes at once)."""
        migrate(self.engine, self.settings.table_prefix)

    # -- tasks -------------------------------------------------------------------------------------
    def task(self, *args: Any, **options: Any) -> Any:
        """``app.task`` with :class:`BatchTask` as base: ``@batches.task`` or ``@batches.task(name=...)``."""
        options.setdefault("base", BatchTask)
        options.setdefault("_node", self.node)
        return self.app.task(*args, **options)

    # -- creation ----------------------------------------------------------------------------------
    @contextmanager
    def batch(self, name: str, *, created_by: str | None = None, connection: Any = None,
              description: str | None = None, properties: dict[str, Any] | None = None,
              tags: Iterable[str] = (), cancel_on_failure: bool = False,
              max_concurrency: int | None = None, results: bool = False) -> Iterator[BatchBuilder]:
        """Build a batch in a ``with`` block: written atomically on a clean exit, not at all otherwise.

        With ``connection`` (a SQLAlchemy ``Session`` or a ``Connection`` in a transaction, or a Django
        connection such as ``django.db.connection``, on the registry's database) the batch is written in
        the caller's transaction: it exists only if the caller commits, and its messages are published
        right after that commit (or by the relay).
        ``description``, ``properties`` (a JSON object) and ``tags`` (short strings) label the batch:
        shown by the dashboard and the CLI, ``tags`` filtered on by :meth:`list_batches`.
        ``cancel_on_failure``: the batch's first failed unit cancels every unfinished run of its
        subtree (running ones finish); the batch then finishes FAILED. ``max_concurrency``: at most
        this many of the batch's direct jobs published and unfinished at once; the others wait
        unpublished, in enqueue order, each released by the transaction that records a job's end.
        ``results``: the registry keeps each job's return value (JSON, at most ``result_max_bytes``)
        and every continuation gets the list of the units' results as its first argument, as a chord
        body does (:meth:`get_results`); nested batches inherit it.
        """
        with self._new_tree(name, connection, None, created_by=created_by, description=description,
                            properties=properties, tags=tags, cancel_on_failure=cancel_on_failure,
                            max_concurrency=max_concurrency, results=results) as builder:
            yield builder

    def create_batch(self, name: str, configure: Callable[[BatchBuilder], Any], **options: Any) -> str:
        """Callback-style creation (as in Hangfire's ``StartNew``): ``configure(builder)``, then write;
        returns the batch id. ``options``: every keyword :meth:`batch` takes."""
        with self.batch(name, **options) as builder:
            configure(builder)
        return builder.id

    @contextmanager
    def _new_tree(self, name: str, connection: Any, antecedent: tuple[str, str] | None,
                  **options: Any) -> Iterator[BatchBuilder]:
        """A new top-level batch (or continue-with stage) built in a block, written when it exits."""
        builder = BatchBuilder(self.app, name, **options)
        with self._building(builder):
            yield builder
        plan = builder.seal()
        self._commit(lambda conn: self.trees.insert_tree(conn, plan, utcnow(), antecedent=antecedent), connection,
                     visible=lambda: reads.get_batch(self.transitions, plan.id) is not None)

    @contextmanager
    def reopen(self, batch_id: str, *, connection: Any = None) -> Iterator[BatchBuilder]:
        """Add jobs, nested batches and continuations to an unfinished batch, atomically.

        Raises ``BatchNotFoundError`` for an unknown id and ``BatchClosedError`` if the batch is
        finished or cancelled (checked before the block runs, and again under the batch's row lock
        when it exits). ``connection``: as for :meth:`batch`.
        """
        batch_id = valid_id(batch_id)
        with joined(connection, self.engine) as caller:
            batch = reads.get_batch(self.transitions, batch_id, conn=caller)
        builder = BatchBuilder.reopening(self.app, batch_id, batch)
        with self._building(builder):
            yield builder
        plan = builder.seal()
        self._commit(lambda conn: self.trees.add_to_batch(conn, batch_id, plan, utcnow()), connection)

    def add_jobs_to_batch(self, batch_id: str, configure: Callable[[BatchBuilder], Any], *,
                          connection: Any = None) -> list[str]:
        """Callback-style add: ``configure(builder)``; returns the run ids of the direct jobs added."""
        with self.reopen(batch_id, connection=connection) as builder:
            configure(builder)
        return builder.job_ids

    def continue_batch_with(self, batch_id: str, name: str, configure: Callable[[BatchBuilder], Any], *,
                            when: str = "success", connection: Any = None, **options: Any) -> str:
        """A new batch that starts when ``batch_id`` finishes and ``when`` matches its outcome.

        ``when``: "success" (antecedent COMPLETED), "failure" (FAILED) or "complete" (either). Until
        then the new batch is CREATED with its runs unpublished; if the antecedent finishes the other
        way, or is cancelled, the new batch is CANCELLED. Returns the new batch id.
        ``connection`` and ``options`` (every other keyword :meth:`batch` takes): as for :meth:`batch`.
        """
        if when not in WHEN_MATCHES:
            raise InvalidBatchError(f"when must be one of {', '.join(map(repr, WHEN_MATCHES))}, not {when!r}")
        unknown = options.keys() - _BATCH_OPTIONS
        if unknown:
            raise TypeError(f"continue_batch_with() got unexpected option(s) {sorted(unknown)}; "
                            f"it takes those of batch(): {sorted(_BATCH_OPTIONS)}")
        with self._new_tree(name, connection, (valid_id(batch_id), when), **options) as builder:
            configure(builder)
        return builder.id

    @staticmethod
    @contextmanager
    def _building(builder: BatchBuilder) -> Iterator[None]:
        try:
            yield
        except BaseException:
            builder.discard()
            raise

    # -- cancel and expiry -------------------------------------------------------------------------
    def cancel_batch(self, batch_id: str, *, connection: Any = None) -> int:
        """Cancel the batch's whole subtree (and the continue-with stages waiting on it).

        Pending runs become CANCELLED and are revoked in Celery; running ones finish and are
        recorded; no continuation of a cancelled batch fires. Returns how many runs were cancelled.
        ``connection``: as for :meth:`batch` (the revoke is broadcast after the caller commits).
        """
        batch_id = valid_id(batch_id)
        cancelled: list[str] = []

        def cancel(conn: Any) -> Publication:
            run_ids, publication = self.commands.cancel(conn, batch_id, utcnow())
            cancelled[:] = run_ids
            return publication

        self._commit(cancel, connection, then=lambda: self._revoke(cancelled),
                     visible=lambda: reads.batch_status(self.transitions, batch_id) == BatchStatus.CANCELLED)
        return len(cancelled)

    def retry_failed(self, batch_id: str, *, connection: Any = None) -> int:
        """Publish every FAILED run of the batch's subtree again (same run id, a fresh retry budget);
        returns how many. Counters move back with the runs, and the batch, its failed nested
        batches and the ancestors that counted them re-open (STARTED) and finish again later. A
        continuation that fired never fires again; one that did not may fire on the new outcome.
        ``BatchClosedError`` if the batch (or one above it) was cancelled; 0 if nothing failed.
        ``connection``: as for :meth:`batch`."""
        batch_id = valid_id(batch_id)
        retried: list[str] = []

        def retry(conn: Any) -> Publication:
            retried[:], publication = self.commands.retry_failed(conn, batch_id, utcnow())
            return publication

        # the result backend still holds each run's failed attempt under the same task id: forget it
        # before the new attempt is published, so nothing reads it as the new attempt's outcome
        self._commit(retry, connection, first=lambda: self._forget_outcomes(retried))
        return len(retried)

    def retry_run(self, run_id: str, *, connection: Any = None) -> str:
        """Publish one FAILED run again (same run id, a fresh retry budget), with the same effects as
        :meth:`retry_failed` has on each run it retries: counters move back, its batch and the
        ancestors that counted it as failed re-open (STARTED) and finish again later; a continuation
        that fired never fires again, one that did not may fire on the new outcome. Its error and
        traceback are cleared. Returns the run's batch id (to :meth:`wait` for).
        ``RunNotFoundError`` for an unknown run, ``InvalidBatchError`` for a run that is not FAILED
        (or an id that is not a UUID), ``BatchClosedError`` if its batch (or one above it) was
        cancelled. ``connection``: as for :meth:`batch`."""
        run_id = valid_id(run_id, "run")
        found: list[str] = []

        def retry(conn: Any) -> Publication:
            batch_id, publication = self.commands.retry_run(conn, run_id, utcnow())
            found[:] = [batch_id]
            return publication

        self._commit(retry, connection, first=lambda: self._forget_outcomes([run_id]))
        return found[0]

    def get_run(self, run_id: str) -> JobRun | None:
        """One job run (with its traceback, if it failed), or None if no run has that id."""
        try:
            run_id = valid_id(run_id, "run")
        except InvalidBatchError:
            return None
        return reads.get_run(self.transitions, run_id)

    def _forget_outcomes(self, run_ids: list[str]) -> None:
        """Drop what the app's result backend kept for these task ids (best effort: the reconciler
        also ignores an outcome dated before the run was put back)."""
        if not run_ids or isinstance(self.app.backend, DisabledBackend):
            return
        try:
            for run_id in run_ids:
                self.app.backend.forget(run_id)
        except Exception:  # noqa: BLE001 - a backend that cannot forget now does not stop the retry
            log.warning("celery_batches: could not forget the earlier outcomes of %d retried run(s) in the "
                        "result backend", len(run_ids), exc_info=True)

    def _revoke(self, run_ids: list[str]) -> None:
        for start in range(0, len(run_ids), REVOKE_CHUNK):
            try:
                self.app.control.revoke(run_ids[start:start + REVOKE_CHUNK])
            except Exception:  # the registry already says CANCELLED; BatchTask skips them anyway
                log.exception("celery_batches: could not broadcast the revoke of %d run(s)", len(run_ids))

    def purge_expired(self) -> int:
        """Delete finished top-level batches past ``expires_at``, with their whole tree; returns batches deleted."""
        return self.trees.purge_expired(utcnow())

    def _commit(self, work: Callable[[Any], Publication], connection: Any, *, visible: Callable[[], bool] | None = None,
                first: Callable[[], None] | None = None, then: Callable[[], None] | None = None) -> None:
        """The one way a write API writes. Without ``connection``: ``work(conn)`` in a transaction of
        our own, then publish what it made publishable (``first()`` before, ``then()`` after). With
        ``connection`` (the caller's Session or Connection, or a Django connection): ``work`` joins the caller's transaction,
        and publishing waits for the caller's commit (``visible`` tells a commit from a rollback; by
        default the transaction's publish lease being there)."""
        def publish(publication: Publication) -> None:
            if first is not None:
                first()
            self._publish(publication)
            if then is not None:
                then()

        if connection is None:
            publish(self._write(work))
            return
        with joined(connection, self.engine) as conn:
            publication = work(conn)
        if visible is None:
            visible = (lambda: False) if publication.lease is None else (
                lambda: self.publisher.outbox.exists(publication.lease))
        on_commit(connection, lambda: publish(publication), visible=visible, timeout=self.settings.publish_lease)

    def _write(self, work: Callable[[Any], _T]) -> _T:
        """``work(conn)`` in a transaction of its own, repeated whole if it lost a deadlock (a cancel
        and a worker's group commit lock the same rows in different orders): nothing is half-done."""
        def transaction() -> _T:
            with self.engine.begin() as conn:
                return work(conn)
        return retry.call(transaction, retry.DEADLOCK, "registry transaction", log)

    # -- publishing (after commit) -----------------------------------------------------------------
    def _publish(self, publication: Publication) -> None:
        self.publisher.publish(publication)

    # -- reads -------------------------------------------------------------------------------------
    def get_batch(self, batch_id: str) -> Batch | None:
        """The batch, or None if no batch has that id (a malformed id names no batch either)."""
        try:
            batch_id = valid_id(batch_id)
        except InvalidBatchError:
            return None
        return reads.get_batch(self.transitions, batch_id)

    def get_batch_jobs(self, batch_id: str) -> list[JobRun]:
        """The batch's direct jobs in enqueue order."""
        return reads.get_jobs(self.transitions, valid_id(batch_id))

    def get_results(self, batch_id: str) -> list[JobResult]:
        """A ``results=True`` batch's units in order: ``JobResult(run_id, status, value, error)``, a
        job's value its return value once COMPLETED (None before, or if it failed or was cancelled), a
        nested batch's value its own list. ``BatchNotFoundError`` for an unknown id,
        ``InvalidBatchError`` for a batch made without ``results=True``."""
        batch_id = valid_id(batch_id)
        found = reads.results(self.transitions, batch_id)
        if found is None:
            batch = reads.get_batch(self.transitions, batch_id)
            if batch is None:
                raise BatchNotFoundError(batch_id)
            raise InvalidBatchError(f"batch {batch_id} keeps no results: create it with results=True")
        return found

    def get_continuations(self, batch_id: str) -> list[Continuation]:
        return reads.get_continuations(self.transitions, valid_id(batch_id))

    def list_batches(self, *, status: BatchStatus | int | None = None, parent_id: str | None = None,
                     name: str | None = None, tag: str | None = None, limit: int = PAGE_SIZE,
                     offset: int = 0) -> list[Batch]:
        """Newest first; top-level batches unless ``parent_id`` is given; ``name`` matches a substring,
        ignoring case; ``tag`` is one of the batch's tags."""
        if not (isinstance(limit, int) and isinstance(offset, int) and limit >= 0 and offset >= 0):
            raise InvalidBatchError(f"limit and offset must be non-negative integers, got {limit!r}, {offset!r}")
        try:
            wanted = None if status is None else BatchStatus(status)
        except ValueError:
            raise InvalidBatchError(f"{status!r} is not a BatchStatus") from None
        parent = None if parent_id is None else valid_id(parent_id)
        if tag is not None and not isinstance(tag, str):
            raise InvalidBatchError(f"tag must be a string, got {tag!r}")
        return reads.batch_list(self.transitions, status=wanted, parent_id=parent, name=name, tag=tag, limit=limit,
                                offset=offset)

    def set_properties(self, batch_id: str, mapping: dict[str, Any]) -> dict[str, Any]:
        """Merge ``mapping``'s keys into the batch's properties, atomically; returns the new properties.

        ``BatchNotFoundError`` if no batch has that id; ``InvalidBatchError`` (and nothing written)
        if ``mapping`` is not a JSON object."""
        batch_id = valid_id(batch_id)
        merged = self.trees.merge_properties(batch_id, validate_properties(mapping, "set_properties mapping"))
        if merged is None:
            raise BatchNotFoundError(batch_id)
        return merged

    def wait(self, batch_id: str, timeout: float | None = None) -> Batch:
        """Poll until the batch is finished; raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        batch_id = valid_id(batch_id)
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


#: the keywords :meth:`Batches.batch` takes besides the name and the connection: what every other way
#: of creating a batch accepts too
_BATCH_OPTIONS = frozenset(inspect.signature(Batches.batch).parameters) - {"self", "name", "connection"}
