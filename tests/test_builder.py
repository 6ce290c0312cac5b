"""Batch building and validation: no worker, no broker server, SQLite in tmp_path.

Every invalid input must raise ``InvalidBatchError`` (also a ``ValueError``) naming the offending
job or thing, before anything is written to the registry or published to the broker.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import sqlalchemy as sa
from celery import Celery, chain, group
from kombu import Queue

from celery_batches import BatchBuilder, BatchError, Batches, BatchStatus, InvalidBatchError, RunStatus
from celery_batches.message import HEADER
from tests.helpers import memory_app, row_counts

DEFAULT_URL = "sqlite:///celery_batches.sqlite3"
ENV = "CELERY_BATCHES_DATABASE_URL"


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def app():
    app = memory_app("builder")
    yield app
    app.close()


@pytest.fixture
def batches(app, tmp_path):
    b = Batches(app, database_url=f"sqlite:///{tmp_path}/reg.sqlite3", relay_interval=0)
    yield b
    b.engine.dispose()


@pytest.fixture
def sqlite_registry(batches):
    """``batches`` (SQLite in tmp_path, the memory broker) with its schema created: for the tests that
    check what is, or is not, written."""
    batches.migrate()
    return batches


@pytest.fixture
def tasks(app, batches):
    class T:
        @batches.task(name="shop.validate", shared=False)
        def validate(order_id):
            return order_id

        @app.task(name="shop.plain", shared=False)
        def plain(*args, **kwargs):
            return None

    return T


def queue_size(app: Celery, queue: str) -> int:
    with app.connection_for_write() as conn:
        return conn.default_channel.queue_declare(queue=queue).message_count


def assert_nothing_written(b: Batches) -> None:
    assert set(row_counts(b).values()) == {0}, row_counts(b)
    assert queue_size(b.app, b.app.conf.task_default_queue) == 0


def not_a_task(order_id):  # a plain function, not a Celery task
    return order_id


# -- batch name and created_by --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "   ", "\t\n", None, 123, b"bytes", "x" * 256, "nul\x00", "path-\udcff"],
                         ids=["empty", "spaces", "whitespace", "none", "int", "bytes", "256-chars", "nul",
                              "lone-surrogate"])
def test_invalid_batch_name_raises_and_writes_nothing(sqlite_registry, tasks, name):
    with pytest.raises(InvalidBatchError, match="batch name") as info:
        with sqlite_registry.batch(name) as b:
            b.enqueue(tasks.validate, 1)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, BatchError)
    assert_nothing_written(sqlite_registry)


def test_batch_name_of_255_characters_is_accepted(sqlite_registry, tasks):
    name = "n" * 255
    with sqlite_registry.batch(name) as b:
        b.enqueue(tasks.validate, 1)
    stored = sqlite_registry.get_batch(b.id)
    assert stored is not None and stored.name == name


def test_invalid_nested_batch_name_writes_nothing(sqlite_registry, tasks):
    with pytest.raises(InvalidBatchError, match="batch name"):
        with sqlite_registry.batch("outer") as b:
            b.enqueue(tasks.validate, 1)
            with b.batch("") as child:
                child.enqueue(tasks.validate, 2)
    assert_nothing_written(sqlite_registry)


def test_created_by_over_255_characters_raises(sqlite_registry, tasks):
    with pytest.raises(InvalidBatchError, match="created_by"):
        with sqlite_registry.batch("orders", created_by="c" * 256) as b:
            b.enqueue(tasks.validate, 1)
    assert_nothing_written(sqlite_registry)


def test_created_by_of_255_characters_is_stored(sqlite_registry, tasks):
    with sqlite_registry.batch("orders", created_by="c" * 255) as b:
        b.enqueue(tasks.validate, 1)
    assert sqlite_registry.get_batch(b.id).created_by == "c" * 255


# -- task references ------------------------------------------------------------------------------
@pytest.mark.parametrize("task", [42, not_a_task, None, "", "t" * 256],
                         ids=["int", "function", "none", "empty-name", "name-256-chars"])
def test_bad_task_reference_raises_naming_the_job(sqlite_registry, tasks, task):
    with pytest.raises(InvalidBatchError, match=r"job #3 of batch 'orders'") as info:
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            b.enqueue("shop.plain", 2)
            b.enqueue(task, 3)
    assert isinstance(info.value, ValueError)
    assert_nothing_written(sqlite_registry)


@pytest.mark.parametrize("kind", ["group", "chain"])
def test_group_or_chain_signature_is_not_a_job(sqlite_registry, tasks, kind):
    canvas = {"group": group, "chain": chain}[kind](tasks.validate.s(1), tasks.validate.s(2))
    with pytest.raises(InvalidBatchError, match=r"job #1 of batch 'orders'"):
        with sqlite_registry.batch("orders") as b:
            b.enqueue(canvas)
    assert_nothing_written(sqlite_registry)


def test_signature_with_reserved_option_is_rejected(sqlite_registry, tasks):
    with pytest.raises(InvalidBatchError, match=r"job #2 of batch 'orders'.*task_id"):
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            b.enqueue(tasks.validate.s(2).set(task_id=str(uuid.uuid4())))
    assert_nothing_written(sqlite_registry)


@pytest.mark.parametrize("option", [{"countdown": "5"}, {"expires": "soon"}, {"eta": "tomorrow"},
                                    {"priority": 300}, {"time_limit": "1m"}, {"routing_key": 5}])
def test_a_publish_option_celery_would_refuse_is_rejected_before_anything_is_written(sqlite_registry, tasks, option):
    """An option Celery would refuse at publish is refused while the batch is built, naming the job."""
    [(name, value)] = option.items()
    with pytest.raises(InvalidBatchError, match=rf"job #2 of batch 'orders'.*option {name}="):
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            b.enqueue(tasks.validate.s(2).set(**option))
    assert_nothing_written(sqlite_registry)


def test_good_publish_options_pass(sqlite_registry, tasks):
    from datetime import datetime, timezone

    with sqlite_registry.batch("orders") as b:
        b.enqueue(tasks.validate.s(1).set(countdown=5, expires=60, priority=3, time_limit=10.5,
                                          eta=datetime.now(timezone.utc), routing_key="orders"))
    assert len(sqlite_registry.get_batch_jobs(b.id)) == 1


def test_bad_job_in_nested_batch_names_the_nested_batch(sqlite_registry, tasks):
    with pytest.raises(InvalidBatchError, match=r"job #2 of batch 'payment'"):
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            with b.batch("payment") as payment:
                payment.enqueue(tasks.validate, 2)
                payment.enqueue(not_a_task, 3)
    assert_nothing_written(sqlite_registry)


@pytest.mark.parametrize("kind", ["on_success", "on_failure", "on_complete"])
def test_bad_continuation_is_rejected(sqlite_registry, tasks, kind):
    with pytest.raises(InvalidBatchError, match=rf"{kind} continuation of batch 'orders'"):
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            getattr(b, kind)(not_a_task)
    assert_nothing_written(sqlite_registry)


# -- serialisation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda b, t: b.enqueue(t.validate, object()),
        lambda b, t: b.enqueue(t.validate, order_id={1, 2}),
        lambda b, t: b.enqueue("shop.plain", [object()]),
        lambda b, t: b.enqueue(t.validate.s(object())),
        lambda b, t: b.enqueue(t.validate.s(), {1, 2}),
    ],
    ids=["object-arg", "set-kwarg", "nested-object", "signature-arg", "set-merged-into-signature"],
)
def test_unserialisable_arguments_raise_naming_the_job(sqlite_registry, tasks, call):
    with pytest.raises(InvalidBatchError, match=r"job #2 of batch 'orders'") as info:
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            call(b, tasks)
    assert isinstance(info.value, ValueError)
    assert_nothing_written(sqlite_registry)


def test_unserialisable_continuation_arguments_raise(sqlite_registry, tasks):
    with pytest.raises(InvalidBatchError, match="on_success continuation of batch 'orders'"):
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            b.on_success(tasks.plain, object())
    assert_nothing_written(sqlite_registry)


def test_exception_inside_block_writes_nothing(sqlite_registry, tasks):
    with pytest.raises(RuntimeError, match="boom"):
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            b.on_success(tasks.plain)
            raise RuntimeError("boom")
    assert_nothing_written(sqlite_registry)


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["bad-prefix", "1abc", "drop table;", "a b", "x" * 41])
def test_invalid_table_prefix_raises(app, tmp_path, prefix):
    with pytest.raises(InvalidBatchError, match="table_prefix") as info:
        Batches(app, database_url=f"sqlite:///{tmp_path}/reg.sqlite3", table_prefix=prefix)
    assert isinstance(info.value, ValueError)
    assert repr(prefix) in str(info.value)


def test_valid_table_prefix_names_the_tables(app, tmp_path):
    b = Batches(app, database_url=f"sqlite:///{tmp_path}/reg.sqlite3", table_prefix="shop_v2_")
    assert b.transitions.tables.batches.name == "shop_v2_batches"
    assert b.transitions.tables.runs.name.startswith("shop_v2_")
    b.migrate()
    assert {"shop_v2_batches", "shop_v2_runs"} <= set(sa.inspect(b.engine).get_table_names())
    b.engine.dispose()


def test_unknown_setting_raises_type_error(app, tmp_path):
    with pytest.raises(TypeError, match="flush_intervall"):
        Batches(app, database_url=f"sqlite:///{tmp_path}/reg.sqlite3", flush_intervall=0.1)


def test_database_url_argument_wins(app, monkeypatch):
    monkeypatch.setenv(ENV, "sqlite:///from-env.sqlite3")
    app.conf.batches_database_url = "sqlite:///from-conf.sqlite3"
    b = Batches(app, database_url="sqlite:///from-arg.sqlite3")
    assert b.settings.database_url == "sqlite:///from-arg.sqlite3"


def test_database_url_app_conf_beats_environment(app, monkeypatch):
    monkeypatch.setenv(ENV, "sqlite:///from-env.sqlite3")
    app.conf.batches_database_url = "sqlite:///from-conf.sqlite3"
    assert Batches(app).settings.database_url == "sqlite:///from-conf.sqlite3"


def test_database_url_environment_beats_default(app, monkeypatch):
    monkeypatch.setenv(ENV, "sqlite:///from-env.sqlite3")
    assert Batches(app).settings.database_url == "sqlite:///from-env.sqlite3"


def test_database_url_default(app, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    b = Batches(app)
    assert b.settings.database_url == DEFAULT_URL
    assert str(b.engine.url) == DEFAULT_URL  # the engine exists but has not connected


# -- ids, signatures, closed builders -------------------------------------------------------------
def test_enqueue_returns_the_run_id_and_builder_id_is_known_in_the_block(sqlite_registry, tasks):
    with sqlite_registry.batch("orders", created_by="checkout") as b:
        assert isinstance(b, BatchBuilder)
        batch_id = b.id
        assert isinstance(batch_id, str) and str(uuid.UUID(batch_id)) == batch_id
        run_ids = [b.enqueue(tasks.validate, 1), b.enqueue("shop.plain", order_id=2),
                   b.enqueue(tasks.validate.s(3))]
        b.on_complete("shop.plain", b.id)
    assert b.id == batch_id
    for run_id in run_ids:
        assert isinstance(run_id, str) and str(uuid.UUID(run_id)) == run_id
    assert len(set(run_ids)) == 3

    batch = sqlite_registry.get_batch(batch_id)
    assert batch.status == BatchStatus.STARTED and batch.total_jobs == 3 and batch.created_by == "checkout"
    jobs = sqlite_registry.get_batch_jobs(batch_id)
    assert [j.id for j in jobs] == run_ids  # enqueue order
    assert [j.task_name for j in jobs] == ["shop.validate", "shop.plain", "shop.validate"]
    assert [j.args for j in jobs] == [[1], [], [3]]
    assert jobs[1].kwargs == {"order_id": 2}
    assert all(j.status == RunStatus.PENDING and j.batch_id == batch_id for j in jobs)
    assert [c.args for c in sqlite_registry.get_continuations(batch_id)] == [[batch_id]]

    # the Celery task id is the run id; the batch id travels in our namespaced header
    with sqlite_registry.app.connection_for_read() as conn:
        q = conn.SimpleQueue(sqlite_registry.app.conf.task_default_queue, no_ack=True)
        messages = [q.get(timeout=5) for _ in run_ids]
        q.close()
    assert [m.headers["id"] for m in messages] == run_ids
    assert {m.headers[HEADER] for m in messages} == {batch_id}


@pytest.mark.parametrize("immutable", [False, True], ids=["signature", "immutable-signature"])
def test_signature_options_are_stored_and_args_merge_like_clone(sqlite_registry, tasks, immutable):
    queue = f"inventory_{uuid.uuid4().hex[:8]}"
    make = tasks.plain.si if immutable else tasks.plain.s
    sig = make(2, order_id=123, gift=False).set(queue=queue, priority=3)
    with sqlite_registry.batch("orders") as b:
        run_id = b.enqueue(sig, 1, gift=True, note="x")
    (job,) = sqlite_registry.get_batch_jobs(b.id)
    expected = sig.clone((1,), {"gift": True, "note": "x"})
    assert job.id == run_id
    assert job.task_name == "shop.plain"
    assert job.args == list(expected.args)
    assert job.kwargs == dict(expected.kwargs)
    if not immutable:
        assert job.args == [1, 2] and job.kwargs == {"order_id": 123, "gift": True, "note": "x"}
    else:
        assert job.args == [2] and job.kwargs == {"order_id": 123, "gift": False}
    assert job.queue == queue
    assert queue_size(sqlite_registry.app, queue) == 1  # published to the signature's queue
    assert queue_size(sqlite_registry.app, sqlite_registry.app.conf.task_default_queue) == 0


def test_kombu_queue_option_is_stored_by_name(sqlite_registry, tasks):
    name = f"inventory_{uuid.uuid4().hex[:8]}"
    with sqlite_registry.batch("orders") as b:
        b.enqueue(tasks.validate.s(1).set(queue=Queue(name)))
    assert sqlite_registry.get_batch_jobs(b.id)[0].queue == name


@pytest.mark.parametrize("queue", ["", "q" * 256, "q\x00", "q\udcff", 42],
                         ids=["empty", "256-chars", "nul", "lone-surrogate", "int"])
def test_a_queue_the_registry_cannot_store_is_refused(sqlite_registry, tasks, queue):
    with pytest.raises(InvalidBatchError, match=r"job #2 of batch 'orders': queue"):
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            b.enqueue(tasks.validate.s(2).set(queue=queue))
    assert_nothing_written(sqlite_registry)


def test_builder_is_closed_after_the_block(sqlite_registry, tasks):
    with sqlite_registry.batch("orders") as b:
        b.enqueue(tasks.validate, 1)
    with pytest.raises(BatchError):
        b.enqueue(tasks.validate, 2)
    with pytest.raises(BatchError):
        b.on_success(tasks.plain)
    with pytest.raises(BatchError):
        with b.batch("late"):
            pass
    assert sqlite_registry.get_batch(b.id).total_jobs == 1
    assert len(sqlite_registry.get_batch_jobs(b.id)) == 1
    assert row_counts(sqlite_registry)["batches"] == 1


def test_builder_is_closed_after_a_block_that_raised(sqlite_registry, tasks):
    with pytest.raises(RuntimeError):
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            raise RuntimeError("boom")
    with pytest.raises(BatchError):
        b.enqueue(tasks.validate, 2)
    assert_nothing_written(sqlite_registry)


def test_nested_builder_is_closed_after_its_block(sqlite_registry, tasks):
    with sqlite_registry.batch("orders") as b:
        with b.batch("payment") as payment:
            payment.enqueue(tasks.validate, 1)
        with pytest.raises(BatchError):
            payment.enqueue(tasks.validate, 2)
    child = sqlite_registry.list_batches(parent_id=b.id)
    assert [c.id for c in child] == [payment.id] and child[0].total_jobs == 1


def test_a_nested_batch_takes_its_place_among_the_units_where_its_block_ends(app):
    """``results=True`` orders units by these places: a nested batch given up inside its parent's
    block takes none, so the units after it keep their order."""
    b = BatchBuilder(app, "outer", results=True)
    b.enqueue("t.a")
    with pytest.raises(RuntimeError):
        with b.batch("given up"):
            raise RuntimeError("given up")
    with b.batch("kept") as kept:
        kept.enqueue("t.b")
    b.enqueue("t.c")
    plan = b.seal()
    assert [(child.name, child.unit_position, child.results) for child in plan.children] == [("kept", 1, True)]
    assert all(job.options and "celery_batches_results" in job.options for job in plan.jobs)


# -- chord parity: continuations as a chord body can be, every batch() option everywhere ------------
def test_a_chain_continuation_is_its_first_task_carrying_the_rest(app, tasks):
    builder = BatchBuilder(app, "orders", results=True)
    builder.on_success((tasks.validate.s() | tasks.plain.s(1) | tasks.plain.si(2)).set(priority=4))
    builder.on_failure(tasks.plain.si(3))
    builder.on_complete(tasks.plain.s(4))
    chained, immutable, plain = builder.seal().continuations
    options = json.loads(chained.message.options)
    assert chained.message.task_name == "shop.validate" and json.loads(chained.message.args) == []
    assert options["priority"] == 4  # the chain's own options go to its first task, as chain.apply_async does
    # Celery's protocol 2 chain embed: the signatures still to run, the last first
    assert [(s["task"], s["args"], s["immutable"]) for s in options["chain"]] == [
        ("shop.plain", [2], True), ("shop.plain", [1], False)]
    assert [c.immutable for c in (chained, immutable, plain)] == [False, True, False]
    assert json.loads(plain.message.options or "{}").get("chain") is None


@pytest.mark.parametrize("head", ["group", "empty"])
def test_a_chain_continuation_must_start_with_one_task(sqlite_registry, tasks, head):
    canvas = (group(tasks.validate.s(1), tasks.validate.s(2)) | tasks.plain.s()) if head == "group" else chain()
    with pytest.raises(InvalidBatchError, match=r"on_success continuation of batch 'orders'"):
        with sqlite_registry.batch("orders") as b:
            b.enqueue(tasks.validate, 1)
            b.on_success(canvas)
    assert_nothing_written(sqlite_registry)


EVERY_OPTION = {"created_by": "checkout", "description": "the seventh order", "properties": {"order": 7},
                "tags": ["shop", "orders"], "cancel_on_failure": True, "max_concurrency": 2, "results": True}


def labels(batch) -> dict:
    """What the batch() options set, as the registry reads them back."""
    return {"created_by": batch.created_by, "description": batch.description, "properties": batch.properties,
            "tags": list(batch.tags), "cancel_on_failure": batch.cancel_on_failure,
            "max_concurrency": batch.max_concurrency, "results": batch.results}


@pytest.mark.parametrize("how", ["batch", "create_batch", "continue_batch_with", "abatch", "acreate_batch"])
def test_every_way_of_creating_a_batch_takes_every_batch_option(sqlite_registry, tasks, how):
    def configure(b):
        b.enqueue(tasks.validate, 1)

    async def abatch() -> str:
        async with sqlite_registry.abatch("orders", **EVERY_OPTION) as b:
            configure(b)
        return b.id

    if how == "abatch":
        batch_id = asyncio.run(abatch())
    elif how == "acreate_batch":
        batch_id = asyncio.run(sqlite_registry.acreate_batch("orders", configure, **EVERY_OPTION))
    elif how == "batch":
        with sqlite_registry.batch("orders", **EVERY_OPTION) as b:
            configure(b)
        batch_id = b.id
    elif how == "create_batch":
        batch_id = sqlite_registry.create_batch("orders", configure, **EVERY_OPTION)
    else:
        first = sqlite_registry.create_batch("first", configure)
        batch_id = sqlite_registry.continue_batch_with(first, "orders", configure, when="complete", **EVERY_OPTION)
    assert labels(sqlite_registry.get_batch(batch_id)) == EVERY_OPTION


def test_add_batch_takes_every_nested_batch_option(sqlite_registry, tasks):
    nested = {key: value for key, value in EVERY_OPTION.items() if key not in ("created_by", "results")}
    with sqlite_registry.batch("orders", created_by="checkout") as b:
        child = b.add_batch("payment", lambda inner: inner.enqueue(tasks.validate, 1), **nested)
    assert labels(sqlite_registry.get_batch(child)) == dict(nested, created_by="checkout", results=False)


@pytest.mark.parametrize("option", ["parent_id", "batch_id", "colour"])
def test_continue_batch_with_refuses_what_batch_does_not_take(sqlite_registry, tasks, option):
    first = sqlite_registry.create_batch("first", lambda b: b.enqueue(tasks.validate, 1))
    with pytest.raises(TypeError, match=option):
        sqlite_registry.continue_batch_with(first, "next", lambda b: b.enqueue(tasks.validate, 2),
                                            **{option: str(uuid.uuid4())})
    assert [batch.id for batch in sqlite_registry.list_batches()] == [first]
