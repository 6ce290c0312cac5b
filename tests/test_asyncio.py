"""The async twins (``abatch``, ``areopen``, ``await_batch``, ``aget_batch``, ``alist_batches``,
``acancel_batch``, ``aretry_failed``) against real PostgreSQL and Redis, and the FastAPI example driven
in-process through httpx's ASGITransport with a real ``celery worker`` running the jobs.

Each test runs its coroutine with ``asyncio.run`` (no pytest plugin). "The loop is not blocked" is
proved by a ticker coroutine that keeps waking every few milliseconds while the call is awaited.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from typing import Any, Awaitable

import pytest
import sqlalchemy as sa

from celery_batches import BatchClosedError, BatchNotFoundError, BatchStatus, InvalidBatchError
from celery_batches.aio import AsyncBatchBuilder, _settled
from tests.helpers import (WAIT, count, fired_once, memory_app, needs, nowhere_signature, row_counts, tag,
                           unique_name)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

#: the ticker's period: a loop blocked for a wait interval would miss a hundred wake-ups in a row
TICK = 0.005


async def ticking(awaitable: Awaitable[Any]) -> tuple[Any, int, float]:
    """Await ``awaitable`` while a ticker wakes every ``TICK`` s on the same loop: (its outcome, a
    result or the exception it raised; the ticks; the worst lateness of a tick)."""
    loop = asyncio.get_running_loop()
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            due = loop.time() + TICK
            await asyncio.sleep(TICK)
            ticks.append(loop.time() - due)

    running = asyncio.create_task(ticker())
    try:
        outcome: Any = await awaitable
    except Exception as exc:  # noqa: BLE001 - the outcome under test
        outcome = exc
    finally:
        running.cancel()
    return outcome, len(ticks), max(ticks, default=0.0)


# -- without services ------------------------------------------------------------------------------
def test_run_ids_are_unique_version_4_uuids_in_every_thread_and_after_a_fork() -> None:
    """``AsyncBatchBuilder.enqueue``'s run ids: canonical UUID 4 text, none repeated across 20,000 of
    them drawn in two threads at once, nor by a forked child continuing its parent's stream."""
    import os

    app = memory_app("ids")
    ids: list[str] = []

    def draw() -> None:
        b = AsyncBatchBuilder(app, "ids")
        ids.extend(b.enqueue("t") for _ in range(10_000))

    threads = [threading.Thread(target=draw) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 20_000
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in ids[:1000] + ids[-1000:])

    read, write = os.pipe()
    parent = AsyncBatchBuilder(app, "fork")
    parent.enqueue("t")  # the stream has started: the child inherits its unused bytes
    pid = os.fork()
    if pid == 0:  # the child: write one id and leave at once
        os.write(write, AsyncBatchBuilder(app, "child").enqueue("t").encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_id = os.read(read, 100).decode()
    os.close(read)
    assert child_id != parent.enqueue("t")


def test_a_bad_job_is_found_when_the_plan_is_made_whole() -> None:
    """``enqueue`` records without checking; ``materialize`` (the commit thread) raises InvalidBatchError
    naming the job, its batch and its position, as the sync builder's enqueue would; good jobs become
    the messages the sync builder makes, with the run ids enqueue returned."""
    app = memory_app("defer")
    b = AsyncBatchBuilder(app, "outer")
    first = b.enqueue("tests.proj.noop", "a")
    b.enqueue("tests.proj.noop", object())
    plan = b.seal()
    with pytest.raises(InvalidBatchError, match=r"job #2 of batch 'outer' \(tests.proj.noop\).*cannot be serialised"):
        b.materialize(plan)

    good = AsyncBatchBuilder(app, "good", results=True)
    run_id = good.enqueue(app.signature("tests.proj.noop").set(queue="q"), "a", k=1)
    plan = good.seal()
    good.materialize(plan)
    [message] = plan.jobs
    assert (message.id, message.task_name, message.args, message.kwargs, message.batch_id) == (
        run_id, "tests.proj.noop", '["a"]', '{"k": 1}', plan.id)
    assert '"queue": "q"' in message.options and "celery_batches_results" in message.options
    assert first != run_id


def test_a_cancelled_caller_waits_for_the_thread_then_is_cancelled() -> None:
    """``_settled``: cancelling the awaiting task does not abandon the thread's work; the task ends,
    cancelled, only once that work is done (and a second cancel changes nothing)."""
    started, go_on, finished = threading.Event(), threading.Event(), threading.Event()

    def work() -> str:
        started.set()
        go_on.wait(10)
        finished.set()
        return "written"

    async def main() -> tuple[bool, bool]:
        task = asyncio.create_task(_settled(work))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        pending = not task.done()
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pending, finished.is_set()

    assert asyncio.run(main()) == (True, True)
    assert asyncio.run(_settled(lambda: "ok")) == "ok"


def test_pause_sleeps_only_in_a_ceding_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ceding.pause`` does nothing outside ``ceding()``; inside, it sleeps ``PAUSE`` once every
    ``SLICE`` seconds of work, and the block restores what was there before (nesting)."""
    import time

    from celery_batches import ceding

    slept: list[float] = []
    monkeypatch.setattr(ceding.time, "sleep", slept.append)
    monkeypatch.setattr(ceding, "SLICE", 0.005)

    def work(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            ceding.pause()

    work(0.03)
    assert slept == []
    with ceding.ceding():
        work(0.05)
        with ceding.ceding():
            pass
        assert getattr(ceding._state, "due", None) is not None  # the outer block's pacing goes on
    assert 2 <= len(slept) <= 11 and set(slept) == {ceding.PAUSE}  # 10 unless the thread was descheduled
    assert getattr(ceding._state, "due", None) is None
    slept.clear()
    work(0.02)
    assert slept == []


# -- against PostgreSQL and Redis --------------------------------------------------------------------
def runs_published(batches: Any, batch_id: str) -> tuple[int, int]:
    """(runs of the batch, how many of them are flagged published)."""
    runs = batches.transitions.tables.runs
    with batches.engine.connect() as conn:
        return tuple(conn.execute(sa.select(sa.func.count(), sa.func.count().filter(runs.c.published))
                                  .where(runs.c.batch_id == batch_id)).one())


def queued(batches: Any) -> int:
    return batches.app.connection_for_write().default_channel.client.llen(batches.queue)


@needs("worker")
def test_fastapi_example_creates_a_batch_its_jobs_and_continuation_run_once(proj: Any, worker: Any) -> None:
    """POST /imports creates the batch with ``async with abatch``; the session's real worker runs its three
    jobs and its on_success continuation exactly once; GET /imports/<id>?wait= (``await_batch``) and
    ``aget_batch`` read it COMPLETED; an unknown id is a 404."""
    from examples.fastapi_app import make_api

    rows = [tag(f"row-{i}") for i in range(3)]  # tests.proj.noop counts its runs under its argument
    api = make_api(proj.batches, proj.noop, proj.record)  # record(batch_id) counts under the batch id

    async def main() -> tuple[str, dict, Any]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test") as client:
            created = await client.post("/imports", json={"name": unique_name("q3"), "rows": rows})
            assert created.status_code == 201, created.text
            batch_id = created.json()["batch_id"]
            read = await client.get(f"/imports/{batch_id}", params={"wait": WAIT})
            assert read.status_code == 200
            assert (await client.get(f"/imports/{uuid.uuid4()}")).status_code == 404
            return batch_id, read.json(), await proj.batches.await_batch(batch_id, timeout=WAIT)

    batch_id, read, batch = asyncio.run(main())
    assert (read["status"], read["total"], read["completed"], read["finished"]) == ("COMPLETED", 3, 3, True)
    assert (batch.id, batch.status, batch.completed_jobs) == (batch_id, BatchStatus.COMPLETED, 3)
    fired_once(proj, batch_id)  # the continuation, once (after the queue drained: every job ran by then)
    assert [count(proj, row) for row in rows] == [1, 1, 1]


def test_await_batch_times_out_without_blocking_the_loop(pg_registry: Any) -> None:
    """A batch whose jobs go where no worker reads stays open: ``await_batch(timeout=1.5)`` raises
    TimeoutError after about 1.5 s, and meanwhile a ticker on the same loop kept waking every few ms: no
    stall came near the 0.5 s wait interval (a ``time.sleep`` of it would have stopped the loop 0.5 s
    at a time, three times)."""
    pg_registry.settings = dataclasses.replace(pg_registry.settings, wait_interval=0.5)

    async def main() -> tuple[Any, int, float, float]:
        async with pg_registry.abatch(unique_name("open")) as b:
            for i in range(3):
                b.enqueue(nowhere_signature(pg_registry, i))
        loop = asyncio.get_running_loop()
        start = loop.time()
        outcome, ticks, worst = await ticking(pg_registry.await_batch(b.id, timeout=1.5))
        return outcome, ticks, worst, loop.time() - start

    outcome, ticks, worst, elapsed = asyncio.run(main())
    assert isinstance(outcome, TimeoutError), outcome
    assert "still STARTED" in str(outcome)
    assert 1.5 <= elapsed < 6.0
    assert ticks >= 100 and worst < 0.4, (ticks, worst)


@needs("worker")
def test_aretry_failed_acancel_batch_and_alist_batches(proj: Any, worker: Any, nowhere: str) -> None:
    """``aretry_failed`` publishes the failed run again and the batch completes; ``alist_batches`` finds it by
    tag; ``acancel_batch`` cancels an open batch's runs; ``areopen`` refuses a cancelled or unknown batch."""
    flag, label = tag("flag"), unique_name("tag")

    async def main() -> None:
        batches = proj.batches
        async with batches.abatch(unique_name("retry"), tags=[label]) as b:
            b.enqueue(proj.fail_unless, flag)
            b.enqueue(proj.noop)
        failed = await batches.await_batch(b.id, timeout=WAIT)
        assert (failed.status, failed.failed_jobs) == (BatchStatus.FAILED, 1)
        proj.r.set(flag, 1)
        assert await batches.aretry_failed(b.id) == 1
        done = await batches.await_batch(b.id, timeout=WAIT)
        assert (done.status, done.completed_jobs, done.failed_jobs) == (BatchStatus.COMPLETED, 2, 0)
        assert [x.id for x in await batches.alist_batches(tag=label)] == [b.id]
        assert await batches.alist_batches(tag=label, status=BatchStatus.FAILED) == []

        async with batches.abatch(unique_name("cancel")) as c:
            for i in range(3):
                c.enqueue(proj.noop.s(tag(f"never-{i}")).set(queue=nowhere))
        assert await batches.acancel_batch(c.id) == 3
        cancelled = await batches.aget_batch(c.id)
        assert (cancelled.status, cancelled.cancelled_jobs) == (BatchStatus.CANCELLED, 3)
        with pytest.raises(BatchClosedError):
            async with batches.areopen(c.id) as more:
                more.enqueue(proj.noop)
        with pytest.raises(BatchNotFoundError):
            async with batches.areopen(str(uuid.uuid4())):
                pass

    asyncio.run(main())


def test_areopen_adds_jobs_and_a_nested_batch(pg_registry: Any) -> None:
    """``areopen`` adds jobs and a nested batch (whose jobs are serialised in the commit thread too) to an
    open batch, in enqueue order, each published once."""
    async def main() -> tuple[str, list[str], list[str]]:
        async with pg_registry.abatch(unique_name("reopen")) as b:
            first = [b.enqueue(nowhere_signature(pg_registry, i)) for i in range(2)]
        async with pg_registry.areopen(b.id) as more:
            added = [more.enqueue(nowhere_signature(pg_registry, "x"))]
            with more.batch("nested") as nested:
                nested_id = nested.id
                nested.enqueue(nowhere_signature(pg_registry, "n"))
        return b.id, first + added, [nested_id]

    batch_id, job_ids, [nested_id] = asyncio.run(main())
    assert [j.id for j in pg_registry.get_batch_jobs(batch_id)] == job_ids
    assert pg_registry.get_batch(batch_id).total_jobs == 4  # 3 jobs and the nested batch
    assert [j.args for j in pg_registry.get_batch_jobs(nested_id)] == [["n"]]
    assert runs_published(pg_registry, batch_id) == (3, 3) and runs_published(pg_registry, nested_id) == (1, 1)
    assert queued(pg_registry) == 4


def test_an_exception_or_a_bad_job_in_abatch_writes_nothing(pg_registry: Any) -> None:
    """The block raising, or a job that cannot be serialised (found in the commit thread, raised as
    InvalidBatchError naming it), a bad one in a nested batch included: no row, no message.
    ``connection=`` is refused with a TypeError."""
    ids: list[str] = []

    async def main() -> None:
        with pytest.raises(RuntimeError, match="the request failed"):
            async with pg_registry.abatch(unique_name("raises")) as b:
                ids.append(b.id)
                b.enqueue(nowhere_signature(pg_registry, 1))
                raise RuntimeError("the request failed")
        with pytest.raises(InvalidBatchError, match=r"job #2 of batch 'bad'.*cannot be serialised"):
            async with pg_registry.abatch("bad") as b:
                ids.append(b.id)
                b.enqueue(nowhere_signature(pg_registry, 1))
                b.enqueue(nowhere_signature(pg_registry), object())
        with pytest.raises(InvalidBatchError, match=r"job #1 of batch 'inner'"):
            async with pg_registry.abatch("outer") as b:
                ids.append(b.id)
                b.enqueue(nowhere_signature(pg_registry, 1))
                with b.batch("inner") as inner:
                    inner.enqueue(42)  # not a task
        with pytest.raises(TypeError, match="connection"):
            async with pg_registry.abatch("joined", connection=object()):  # type: ignore[arg-type]
                pass
        with pytest.raises(TypeError, match="connection"):
            await pg_registry.acancel_batch(str(uuid.uuid4()), connection=object())  # type: ignore[arg-type]

    asyncio.run(main())
    assert row_counts(pg_registry, batch_ids=ids) == {"batches": 0, "runs": 0, "batch_jobs": 0, "continuations": 0}
    assert row_counts(pg_registry, name="inner")["batches"] == 0
    assert queued(pg_registry) == 0


def test_cancelling_the_awaiting_task_mid_commit_leaves_the_batch_whole(pg_registry: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The task awaiting ``abatch``'s exit is cancelled while the commit thread is inside the transaction
    (rows written, not committed): the task does not end until the thread committed and published, then
    it raises CancelledError, and the batch is all there and all published. A transaction that fails
    half-way instead leaves nothing."""
    n = 500
    inside, go_on = threading.Event(), threading.Event()
    insert_tree = pg_registry.trees.insert_tree

    def paused(conn: Any, plan: Any, now: Any, **kwargs: Any) -> Any:
        publication = insert_tree(conn, plan, now, **kwargs)  # every row written, nothing committed yet
        inside.set()
        assert go_on.wait(WAIT)
        return publication

    monkeypatch.setattr(pg_registry.trees, "insert_tree", paused)
    ids: list[str] = []

    async def create(name: str) -> None:
        async with pg_registry.abatch(name) as b:
            ids.append(b.id)
            for i in range(n):
                b.enqueue(nowhere_signature(pg_registry, i))

    async def main() -> tuple[bool, tuple]:
        task = asyncio.create_task(create(unique_name("cancelled")))
        assert await asyncio.to_thread(inside.wait, WAIT)
        task.cancel()
        await asyncio.sleep(0.2)
        waited = not task.done()  # the cancellation waits for the thread
        seen_meanwhile = await asyncio.to_thread(runs_published, pg_registry, ids[0])  # uncommitted: nothing
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return waited, seen_meanwhile

    waited, seen_meanwhile = asyncio.run(main())
    assert waited and seen_meanwhile == (0, 0)
    assert pg_registry.get_batch(ids[0]).total_jobs == n
    assert runs_published(pg_registry, ids[0]) == (n, n)
    assert queued(pg_registry) == n

    def broken(conn: Any, plan: Any, now: Any, **kwargs: Any) -> Any:
        insert_tree(conn, plan, now, **kwargs)
        raise OSError("the connection dropped mid-transaction")

    monkeypatch.setattr(pg_registry.trees, "insert_tree", broken)
    with pytest.raises(OSError, match="dropped"):
        asyncio.run(create(unique_name("broken")))
    assert row_counts(pg_registry, batch_ids=ids[1:]) == {"batches": 0, "runs": 0, "batch_jobs": 0, "continuations": 0}
    assert queued(pg_registry) == n


def test_no_registry_or_broker_call_runs_on_the_loops_thread(pg_registry: Any) -> None:
    """Every statement the twins send to the registry, every publication and every revoke runs in another
    thread than the event loop's: abatch, areopen, acreate_batch, aget_batch, alist_batches, await_batch,
    acancel_batch and aretry_failed, each called once."""
    threads: dict[str, set[int]] = {"sql": set(), "publish": set(), "revoke": set()}

    def on_sql(*_: Any) -> None:
        threads["sql"].add(threading.get_ident())

    publish, revoke = pg_registry.publisher.publish, pg_registry._revoke

    def publishing(publication: Any) -> Any:
        threads["publish"].add(threading.get_ident())
        return publish(publication)

    def revoking(run_ids: list[str]) -> None:
        threads["revoke"].add(threading.get_ident())
        revoke(run_ids)

    sa.event.listen(pg_registry.engine, "before_cursor_execute", on_sql)
    pg_registry.publisher.publish, pg_registry._revoke = publishing, revoking

    async def main() -> int:
        async with pg_registry.abatch(unique_name("threads")) as b:
            b.enqueue(nowhere_signature(pg_registry, 1))
        async with pg_registry.areopen(b.id) as more:
            more.enqueue(nowhere_signature(pg_registry, 2))
        other = await pg_registry.acreate_batch(unique_name("threads"), lambda c: c.enqueue(nowhere_signature(pg_registry)))
        assert (await pg_registry.aget_batch(other)).total_jobs == 1
        assert b.id in [x.id for x in await pg_registry.alist_batches(limit=10)]
        with pytest.raises(TimeoutError):
            await pg_registry.await_batch(b.id, timeout=0.05)
        assert await pg_registry.aretry_failed(b.id) == 0
        assert await pg_registry.acancel_batch(b.id) == 2
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(main())
    finally:
        sa.event.remove(pg_registry.engine, "before_cursor_execute", on_sql)
    assert all(threads.values()), threads
    assert loop_thread not in set().union(*threads.values())
