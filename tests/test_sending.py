"""Bulk sending: a message sent as a copy of a recorded ``send_task`` call is the message ``send_task`` sends.

Each case sends the same signatures (same task ids) both ways to a queue no worker consumes, reads
back what the broker stored, and compares it field by field: on Redis the stored JSON itself, on
RabbitMQ the delivered message. Only the delivery tag may differ, and the times Celery derives
from "now" (eta, expires) by the moment between the two sends. Then real workers run batches
published this way, on Redis and on RabbitMQ.
"""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest
import sqlalchemy as sa
from celery import Celery, signals
from kombu import Exchange, Queue
from kombu.utils import json as kjson

from celery_batches.message import HEADER
from celery_batches.publishing.sending import Sender
from tests.helpers import eventually, free_port, needs, private_registry, start_redis, tag

TIMES = ("eta", "expires")


@pytest.fixture
def broker(broker_url):
    """The session's Redis, then RabbitMQ: a test on it is marked ``redis``, then ``rabbitmq`` (the
    params of ``broker_url``)."""
    return broker_url


@pytest.fixture
def app(broker):
    app = Celery(f"sending_{uuid.uuid4().hex[:6]}", broker=broker, set_as_current=False)
    app.conf.task_default_queue = f"cbt-sending-{uuid.uuid4().hex[:8]}"
    yield app
    with app.connection_for_write() as conn:
        for queue in app.amqp.queues.values():
            try:
                conn.default_channel.queue_delete(queue.name)
            except Exception:  # noqa: BLE001  (a queue RabbitMQ never declared)
                pass


def read_all(app, queue: str) -> list[dict]:
    """Every message stored on ``queue``, oldest first, as comparable dicts."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if conn.transport.driver_type == "redis":
            client = channel.client
            raw = []
            for step in channel.priority_steps:
                key = channel._q_for_pri(queue, step)
                raw += [(key, item) for item in reversed(client.lrange(key, 0, -1))]
                client.delete(key)
            out = []
            for key, item in raw:
                m = json.loads(item)
                m["body"] = json.loads(base64.b64decode(m["body"])) if m["content-type"] == "application/json" \
                    else m["body"]
                m["properties"].pop("delivery_tag")
                m["key"] = key
                out.append(m)
            return out
        out = []
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            properties = dict(message.properties)
            properties.pop("delivery_tag", None)
            properties.pop("application_headers", None)  # the headers, compared as such
            out.append({"headers": message.headers, "properties": properties, "body": message.body,
                        "content-type": message.content_type, "content-encoding": message.content_encoding,
                        "routing_key": message.delivery_info.get("routing_key")})
        return out


def comparable(message: dict) -> tuple[dict, dict]:
    """A message with its now-derived times taken out (compared apart, to the second)."""
    headers = dict(message["headers"])
    times = {k: headers.pop(k) for k in TIMES}
    properties = message["properties"]
    expiration = properties.pop("expiration", None)
    return dict(message, headers=headers), {**times, "expiration": expiration}


def close_in_time(a: dict, b: dict) -> bool:
    for key in TIMES:
        if (a[key] is None) != (b[key] is None):
            return False
        if a[key] is not None and abs((datetime.fromisoformat(a[key]) - datetime.fromisoformat(b[key]))
                                      .total_seconds()) > 5:
            return False
    if (a["expiration"] is None) != (b["expiration"] is None):
        return False
    return a["expiration"] is None or abs(int(a["expiration"]) - int(b["expiration"])) <= 5000


def send_both_ways(app, options: dict, queue: str, n: int = 4) -> tuple[list[dict], list[dict], Sender]:
    """Send n messages with send_task, then the same through a session (two shapes, arguments of
    kombu's JSON types, some quoted the way saferepr does not quote them), as the publication does:
    the arguments decoded from their stored JSON, and that JSON."""
    ids = [str(uuid.uuid4()) for _ in range(n)]
    calls = [((i, f"a{i}" * i, "it's" if i % 2 else 'a\\b\n'),
              {"k": [i, None, "é"], "at": datetime(2026, 1, i + 1, tzinfo=timezone.utc), "d": Decimal(f"{i}.5"),
               "u": uuid.UUID(int=i)},
              {HEADER: "b-1", "x-user": i % 2}) for i in range(n)]
    stored = [(kjson.dumps(list(args)), kjson.dumps(kwargs)) for args, kwargs, _ in calls]
    for task_id, (args_json, kwargs_json), (_, _, headers) in zip(ids, stored, calls):
        app.send_task("tests.proj.noop", kjson.loads(args_json), kjson.loads(kwargs_json), task_id=task_id,
                      headers=headers, add_to_parent=False, **options)
    reference = read_all(app, queue)
    sender = Sender(app)
    with app.producer_or_acquire() as producer, sender.session(producer, n) as session:
        for task_id, (args_json, kwargs_json), (_, _, headers) in zip(ids, stored, calls):
            session.send("tests.proj.noop", kjson.loads(args_json), kjson.loads(kwargs_json), task_id=task_id,
                         headers=headers, options=dict(options),
                         shape_key=("noop", json.dumps(options, sort_keys=True), headers["x-user"]),
                         args_json=args_json, kwargs_json=kwargs_json)
        session.flush()
    sender.stored_copies = session.stored_copies  # type: ignore[attr-defined]
    return reference, read_all(app, queue), sender


CASES = {
    "defaults": {},
    "queue and priority": {"queue": "{q}-other", "priority": 7},
    "countdown and expires": {"countdown": 30, "expires": 600},
    "time limits, shadow, user argsrepr": {"time_limit": 10, "soft_time_limit": 5, "shadow": "nick",
                                           "argsrepr": "(hidden)"},
    "serializer and compression": {"serializer": "pickle", "compression": "zlib"},
    "exchange and routing key": {"exchange": "{q}-ex", "routing_key": "{q}-rk"},
    "retries": {"retries": 3},
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_copied_message_is_the_message_send_task_sends(app, case):
    queue = app.conf.task_default_queue
    options = {k: v.format(q=queue) if isinstance(v, str) and "{q}" in v else v for k, v in CASES[case].items()}
    target = options.get("queue", queue)
    if "exchange" in options:  # a direct exchange bound to a queue of its own
        target = f"{queue}-bound"
        bound = Queue(target, Exchange(options["exchange"], type="direct"), routing_key=options["routing_key"])
        app.conf.task_queues = [Queue(queue), bound]
        with app.connection_for_write() as conn:
            bound.declare(channel=conn.default_channel)
    elif "queue" in options:
        app.conf.task_queues = [Queue(queue), Queue(target)]

    reference, copies, sender = send_both_ways(app, options, target)

    assert sender.copies_allowed()
    assert len(reference) == len(copies) == 4, (reference, copies)
    for ref, copy in zip(reference, copies):
        (ref_fields, ref_times), (copy_fields, copy_times) = comparable(ref), comparable(copy)
        assert copy_fields == ref_fields
        assert close_in_time(ref_times, copy_times), (ref_times, copy_times)
    # on each broker the second message of each shape was written as a copy of the first (JSON only)
    assert sender.stored_copies == (0 if "serializer" in options else 2)
    if "priority" in options and app.conf.broker_url.startswith("redis"):
        assert all(m["key"].endswith("6") for m in copies)  # kombu's priority step for 7


def test_a_route_mapping_is_copied_and_a_route_function_is_not(app):
    queue = app.conf.task_default_queue
    app.conf.task_routes = {"tests.proj.*": {"queue": f"{queue}-routed"}}
    reference, copies, sender = send_both_ways(app, {}, f"{queue}-routed")
    assert sender.copies_allowed() and len(copies) == 4
    assert [comparable(m)[0] for m in copies] == [comparable(m)[0] for m in reference]

    app.conf.task_routes = [lambda name, args, kwargs, options, task=None, **kw: {"queue": f"{queue}-{args[0]}"}]
    app.amqp.flush_routes()  # Celery builds the routes and the router once per app; this app changed them
    app.amqp.__dict__.pop("router", None)
    assert not Sender(app).copies_allowed()


def test_publish_signal_receivers_get_every_message(app):
    """With a receiver of before/after_task_publish connected, each message goes through send_task."""
    seen: list[str] = []

    def receiver(headers=None, **_):
        seen.append(headers["id"])

    signals.before_task_publish.connect(receiver, weak=False)
    try:
        reference, copies, sender = send_both_ways(app, {}, app.conf.task_default_queue)
        assert not sender.copies_allowed()
    finally:
        signals.before_task_publish.disconnect(receiver)
    assert len(seen) == 8 and seen[:4] == seen[4:]  # the reference sends and the session's, each once
    assert [comparable(m)[0] for m in copies] == [comparable(m)[0] for m in reference]


@needs("postgres", "redis", "worker")
def test_workers_run_a_batch_published_in_bulk_on_each_broker(broker, proj, registry_on, start_worker):
    """A real worker on each broker runs every job of a batch published through the session, once."""
    batches = registry_on(broker)
    worker = start_worker(**batches.worker_env)
    key = tag("bulk")
    with batches.batch("bulk") as b:
        for i in range(300):
            b.enqueue(batches.app.signature("tests.proj.noop", (f"{key}:{i % 3}",), queue=worker.queue))
    eventually(lambda: batches.get_batch(b.id).status.is_final, "the batch to finish")
    batch = batches.get_batch(b.id)
    assert (batch.status.name, batch.completed_jobs) == ("COMPLETED", 300)
    assert [int(proj.r.get(f"{key}:{i}") or 0) for i in range(3)] == [100, 100, 100]


@needs("postgres", "redis")
def test_a_broker_lost_mid_publication_leaves_the_rest_to_the_relay():
    """Redis stops after the first chunk reached it: that chunk is flagged, nothing after it is, and once
    Redis is back the relay publishes exactly the rest (the same task ids)."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port)
    app = Celery(f"midway_{uuid.uuid4().hex[:6]}", broker=url, set_as_current=False)
    app.conf.broker_connection_retry = False
    app.conf.task_publish_retry = False
    try:
        with private_registry(app, "cbt_midway", publish_chunk=4, publish_lease=1) as batches:
            queue = f"cbt-midway-{uuid.uuid4().hex[:6]}"
            open_session = batches.publisher.sender.session
            flushes = []

            @contextlib.contextmanager
            def session_then_stop_redis(producer, size):
                with open_session(producer, size) as session:
                    yield session
                    if not flushes:
                        session.flush()
                        flushes.append(size)
                        server.terminate()
                        server.wait(10)

            batches.publisher.sender.session = session_then_stop_redis
            with batches.batch("midway") as b:
                ids = [b.enqueue(app.signature("tests.proj.noop", (str(i),), queue=queue)) for i in range(10)]
            runs = {j.id: j for j in batches.get_batch_jobs(b.id)}
            assert flushes == [4]
            assert sum(published(batches, i) for i in ids) == 4

            server = start_redis(port)
            batches.publisher.sender.session = open_session
            eventually(lambda: lapsed_and_relayed(batches), "the relay to publish the rest", 30)
            stored = [m["headers"]["id"] for m in read_all(app, queue)]
            assert sorted(stored) == sorted(ids[4:]) and len(runs) == 10
    finally:
        server.terminate()
        server.wait(10)


def published(batches, run_id: str) -> bool:
    r = batches.transitions.tables.runs
    with batches.engine.connect() as conn:
        return bool(conn.scalar(sa.select(r.c.published).where(r.c.id == run_id)))


def lapsed_and_relayed(batches) -> bool:
    batches.publisher.relay(100)
    r = batches.transitions.tables.runs
    with batches.engine.connect() as conn:
        return not conn.scalar(sa.select(sa.func.count()).select_from(r).where(sa.not_(r.c.published)))


def test_the_fast_argsrepr_is_celerys_saferepr():
    """argsrepr/kwargsrepr written from ``repr`` where that is safe are exactly Celery's ``saferepr``:
    20,000 random argument lists and dicts of JSON's types (and a few others), strings with quotes,
    backslashes, control and non-ASCII characters, nesting deeper than saferepr shows, lengths
    around the limit."""
    import random

    from celery.utils.saferepr import saferepr

    from celery_batches.publishing.sending import _plain_repr, _saferepr

    rnd = random.Random(20261201)
    alphabet = ["a", "Z", "0", " ", "'", '"', "\\", "\n", "\t", "é", "☃", "\x00", "{", "]", ",", ":"]

    def value(depth: int):
        kind = rnd.randrange(12 if depth < 4 else 7)
        if kind == 0:
            return "".join(rnd.choice(alphabet) for _ in range(rnd.choice((0, 1, 3, 20, 300))))
        if kind == 1:
            return rnd.choice((0, -7, 2 ** 70, True, False))
        if kind == 2:
            return rnd.choice((0.5, -1e300, float("inf"), 1 / 3))
        if kind == 3:
            return None
        if kind == 4:
            return rnd.choice((Decimal("1.5"), datetime(2026, 1, 1), uuid.UUID(int=5), b"x'y"))
        if kind in (5, 6):
            return "plain"
        if kind in (7, 8, 9):
            return [value(depth + 1) for _ in range(rnd.randrange(5))]
        if kind == 10:
            return {rnd.choice(("k", "it's", 1, None)): value(depth + 1) for _ in range(rnd.randrange(4))}
        return tuple(value(depth + 1) for _ in range(rnd.randrange(3)))

    fast = 0
    for case in range(20_000):
        maxlen, levels = rnd.choice((1024, 100, 40)), rnd.choice((3, 3, 2, 4, 1))
        top = [value(1) for _ in range(rnd.randrange(5))] if case % 2 else \
            {f"k{i}": value(1) for i in range(rnd.randrange(5))}
        assert _saferepr(top, maxlen, levels) == saferepr(top, maxlen, maxlevels=levels), (top, maxlen, levels)
        plain = _plain_repr(top, 0, levels)
        fast += plain is not None and len(plain) < maxlen
    assert fast > 2000, fast  # the fast path was taken, not only the fallback
