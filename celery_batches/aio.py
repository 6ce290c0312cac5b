"""The async twins of ``Batches`` (Django's "a" prefix), for asyncio producers such as FastAPI.

The event loop never waits on the registry or the broker: every transaction, read and publish runs
in a worker thread (the loop's default executor) while the calling coroutine awaits it, and
``await_batch`` sleeps with ``asyncio.sleep``. Nothing here blocks the loop's thread.

Two things differ from the sync API, both so that a big batch does not stall the loop:

- ``abatch``/``areopen`` hand out an :class:`AsyncBatchBuilder`, whose ``enqueue`` only records the
  job and its run id; the job is validated and serialised in the commit thread when the block exits
  (an invalid job raises ``InvalidBatchError`` there, with nothing written). Validating and
  serialising 10,000 jobs on the loop would hold it for about 150 ms (docs/asyncio.md).
- Cancelling the coroutine that awaits a write does not abandon the write half-way: a transaction
  is whole or absent anyway, and the thread goes on to publish what it committed. The coroutine's
  ``CancelledError`` is raised once that thread is done, so whoever cancelled it can read the outcome.

The thread's long loops (serialising, the COPY, sending) pause 0.1 ms every 2 ms of work
(``ceding.py``), so the loop's thread gets the GIL back between two of its wake-ups.

``connection=`` (joining the caller's transaction) is refused with a ``TypeError``: an ``AsyncSession``
or ``AsyncConnection`` lives on the loop's thread, and a sync Session, or a Django connection (one per
thread), would be written from the worker thread and published from whichever thread commits it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import os
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, TypeVar

from .builder import BatchBuilder, BatchPlan, TaskRef
from .ceding import ceding, pause
from .errors import BatchNotFoundError
from .message import Message
from .models import Batch, BatchStatus, valid_id
from .settings import PAGE_SIZE

if TYPE_CHECKING:
    from celery import Celery

    from .settings import Settings

__all__ = ["AsyncBatchBuilder", "AsyncBatches"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def _run_ids(n: int = 512) -> list[str]:
    """``n`` version 4 UUIDs as text, from one ``os.urandom`` call: ``str(uuid.uuid4())`` costs about
    four times as much, and ``enqueue`` on the loop is mostly the run id's cost."""
    hexes = os.urandom(16 * n).hex()
    return [f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"
            for h in (hexes[i:i + 32] for i in range(0, 32 * n, 32))]


class _RunIdSource(threading.local):
    """Run ids drawn ahead, for one thread (a list popped by several threads could hand one id out
    twice), replaced in a forked child (a child must not repeat the ids its parent had drawn)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def next(self) -> str:
        ids = self.ids
        if not ids:
            ids += _run_ids()
        return ids.pop()


_source = _RunIdSource()


def _fresh_source() -> None:
    global _source
    _source = _RunIdSource()


os.register_at_fork(after_in_child=_fresh_source)


class _Job:
    """A job recorded by :meth:`AsyncBatchBuilder.enqueue`, made a ``Message`` in the commit thread."""

    __slots__ = ("id", "task", "args", "kwargs")

    def __init__(self, run_id: str, task: TaskRef, args: tuple, kwargs: dict) -> None:
        self.id, self.task, self.args, self.kwargs = run_id, task, args, kwargs


class AsyncBatchBuilder(BatchBuilder):
    """The builder of ``abatch``/``areopen``: ``enqueue`` records the job and returns its run id at
    once; validation and serialisation happen in the commit thread as the block exits, where a bad
    job raises ``InvalidBatchError`` naming it and nothing is written. Arguments are serialised then,
    not at ``enqueue``: do not change an object after enqueueing it. Everything else (nested batches,
    continuations, options) is ``BatchBuilder``'s, checked at once."""

    def enqueue(self, task: TaskRef, *args: Any, **kwargs: Any) -> str:
        """Add a job; returns its run id (its Celery task id). Checked when the block exits."""
        self._check_open()
        run_id = _source.next()
        self._plan.jobs.append(_Job(run_id, task, args, kwargs))  # type: ignore[arg-type]  # made a Message later
        self._units += 1
        return run_id

    def materialize(self, plan: BatchPlan) -> None:
        """Validate and serialise every recorded job of ``plan``'s tree, in place (the commit thread
        calls this); ``InvalidBatchError`` for the first bad one, as ``BatchBuilder.enqueue`` would."""
        for part in plan.walk():
            part.jobs = [self._made(part, job, position) if isinstance(job, _Job) else job
                         for position, job in enumerate(part.jobs, 1)]

    def _made(self, plan: BatchPlan, job: _Job, position: int) -> Message:
        pause()  # the loop awaiting this thread gets the GIL now and then (ceding.py)
        message = self._message(job.task, job.args, job.kwargs, f"job #{position} of batch {plan.name!r}", plan.id,
                                results=plan.results)
        return dataclasses.replace(message, id=job.id)


async def _settled(func: Callable[..., _T], *args: Any) -> _T:
    """``func(*args)`` in a worker thread (with the caller's context variables, ceding the GIL to
    the loop's thread now and then: ceding.py), awaited.

    If the awaiting task is cancelled meanwhile, the thread still runs to its end (a thread cannot
    be stopped, and a write must not be left to chance): the ``CancelledError`` is raised once it
    did, so the caller's cancellation takes effect only when the registry and the broker hold the
    whole outcome. What the thread raised then is logged, not lost."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, functools.partial(contextvars.copy_context().run, _ceded, func, *args))
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError as exc:
            if not future.done():
                cancelled = cancelled or exc
                continue
            if cancelled is None and future.cancelled():  # the executor went away (loop shutdown)
                raise
            cancelled = cancelled or exc
        except BaseException:
            if cancelled is None:
                raise
            log.exception("celery_batches: a write whose caller was cancelled failed")
        if cancelled is not None:
            raise cancelled
        return result


def _ceded(func: Callable[..., _T], *args: Any) -> _T:
    """``func(*args)``, its long loops pausing now and then for the loop's thread (ceding.py)."""
    with ceding():
        return func(*args)


def _no_connection(connection: Any, what: str) -> None:
    if connection is not None:
        raise TypeError(
            f"{what}(connection=...) is not supported: the async twins write in a worker thread, in a "
            f"transaction of their own ({type(connection).__name__} given). To join your own transaction, call "
            f"the sync API with a sync Session in a worker thread that also commits it, e.g. "
            f"await asyncio.to_thread(...) (docs/asyncio.md)")


class AsyncBatches:
    """The async twins of :class:`~celery_batches.Batches`' producer API (a mixin of ``Batches``)."""

    if TYPE_CHECKING:  # what Batches provides
        app: Celery
        settings: Settings

        def batch(self, name: str, **options: Any) -> Any: ...
        def reopen(self, batch_id: str, *, connection: Any = None) -> Any: ...
        def get_batch(self, batch_id: str) -> Batch | None: ...
        def list_batches(self, **filters: Any) -> list[Batch]: ...
        def cancel_batch(self, batch_id: str, *, connection: Any = None) -> int: ...
        def retry_failed(self, batch_id: str, *, connection: Any = None) -> int: ...
        def retry_run(self, run_id: str, *, connection: Any = None) -> str: ...
        def create_batch(self, name: str, configure: Callable[[BatchBuilder], Any], **options: Any) -> str: ...
        @staticmethod
        def _building(builder: BatchBuilder) -> Any: ...

    @asynccontextmanager
    async def abatch(self, name: str, *, created_by: str | None = None, connection: None = None,
                     description: str | None = None, properties: dict[str, Any] | None = None,
                     tags: Iterable[str] = (), cancel_on_failure: bool = False,
                     max_concurrency: int | None = None, results: bool = False) -> AsyncIterator[AsyncBatchBuilder]:
        """``async with batches.abatch(name, ...) as b``: :meth:`batch` for a coroutine. On a clean exit
        the batch is validated, written in one transaction and published, all in a worker thread
        while the coroutine awaits; nothing at all if the block raises or a job is invalid.
        ``connection`` is refused (``TypeError``): see docs/asyncio.md."""
        _no_connection(connection, "abatch")
        options: dict[str, Any] = dict(created_by=created_by, description=description, properties=properties,
                                       tags=tags, cancel_on_failure=cancel_on_failure,
                                       max_concurrency=max_concurrency, results=results)
        builder = AsyncBatchBuilder(self.app, name, **options)  # options checked now, on entry
        with self._building(builder):
            yield builder
        plan = builder.seal()
        await _settled(self._write_plan, builder, plan, lambda: self.batch(plan.name, **options))

    @asynccontextmanager
    async def areopen(self, batch_id: str, *, connection: None = None) -> AsyncIterator[AsyncBatchBuilder]:
        """``async with batches.areopen(batch_id) as b``: :meth:`reopen` for a coroutine (the checks
        and the write in a worker thread). ``BatchNotFoundError``, ``BatchClosedError`` as there."""
        _no_connection(connection, "areopen")
        batch_id = valid_id(batch_id)
        builder = AsyncBatchBuilder.reopening(self.app, batch_id, await self.aget_batch(batch_id))
        with self._building(builder):
            yield builder
        plan = builder.seal()
        await _settled(self._write_plan, builder, plan, lambda: self.reopen(batch_id))

    def _write_plan(self, builder: AsyncBatchBuilder, plan: BatchPlan, opening: Callable[[], Any]) -> None:
        """In the commit thread: serialise the recorded jobs, then write and publish ``plan`` through
        the sync ``batch()``/``reopen()`` block, so every write takes the one path (its transaction,
        its publication, its signals): the block's own builder is handed the finished plan."""
        with opening() as writer:
            builder.materialize(plan)  # InvalidBatchError here: the block raises, nothing is written
            writer._plan = plan

    async def acreate_batch(self, name: str, configure: Callable[[BatchBuilder], Any], **options: Any) -> str:
        """:meth:`create_batch` in a worker thread, ``configure(builder)`` included: the way to build a
        very big batch without holding the loop for the enqueue loop itself. Returns the batch id."""
        _no_connection(options.get("connection"), "acreate_batch")
        return await _settled(functools.partial(self.create_batch, name, configure, **options))

    async def await_batch(self, batch_id: str, timeout: float | None = None) -> Batch:
        """:meth:`wait` for a coroutine: reads in a worker thread, sleeps ``wait_interval`` with
        ``asyncio.sleep`` between reads; ``TimeoutError`` after ``timeout`` seconds,
        ``BatchNotFoundError`` for an unknown id."""
        batch_id = valid_id(batch_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            batch = await self.aget_batch(batch_id)
            if batch is None:
                raise BatchNotFoundError(batch_id)
            if batch.is_finished:
                return batch
            interval = self.settings.wait_interval
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"batch {batch_id} is still {batch.status.name} after {timeout}s "
                                       f"({batch.pending_jobs} of {batch.total_jobs} unit(s) pending)")
                interval = min(interval, left)
            await asyncio.sleep(interval)

    async def aget_batch(self, batch_id: str) -> Batch | None:
        """:meth:`get_batch`, read in a worker thread."""
        return await asyncio.to_thread(self.get_batch, batch_id)

    async def alist_batches(self, *, status: BatchStatus | int | None = None, parent_id: str | None = None,
                            name: str | None = None, tag: str | None = None, limit: int = PAGE_SIZE,
                            offset: int = 0) -> list[Batch]:
        """:meth:`list_batches`, read in a worker thread."""
        return await asyncio.to_thread(functools.partial(self.list_batches, status=status, parent_id=parent_id,
                                                         name=name, tag=tag, limit=limit, offset=offset))

    async def acancel_batch(self, batch_id: str, *, connection: None = None) -> int:
        """:meth:`cancel_batch` in a worker thread (the revoke too); a cancelled caller still lets it finish."""
        _no_connection(connection, "acancel_batch")
        return await _settled(self.cancel_batch, batch_id)

    async def aretry_failed(self, batch_id: str, *, connection: None = None) -> int:
        """:meth:`retry_failed` in a worker thread (the publish too); a cancelled caller still lets it finish."""
        _no_connection(connection, "aretry_failed")
        return await _settled(self.retry_failed, batch_id)

    async def aretry_run(self, run_id: str, *, connection: None = None) -> str:
        """:meth:`retry_run` in a worker thread (the publish too); a cancelled caller still lets it finish."""
        _no_connection(connection, "aretry_run")
        return await _settled(self.retry_run, run_id)

