"""Sending many task messages at once, each exactly as ``app.send_task`` would send it.

``send_task`` costs ~0.8 ms a message on Redis: a round trip each, and Celery's per-call work
(merging options, routing, declaring the queue). The messages of one publication differ only in
task id and arguments, so for each *shape* (task, options, headers) the first message is built by
``send_task`` itself, with a producer that records the publish call instead of sending it; every
message of that shape is then that call with the fields Celery derived from the id and the
arguments made again (id, correlation id, root id, argsrepr, kwargsrepr, retries, body), handed to
kombu's ``Producer.publish``. On Redis and RabbitMQ a session goes further (``wire.py``): every
message reaches the broker at ``flush`` (one pipeline, one socket write), and one of a shape whose
first message kombu wrote as JSON is that message with its own fields, not kombu's work again;
other transports publish through kombu's ``Producer.batch`` (each at once where it does not
buffer). tests/test_sending.py sends the same signatures both ways and compares the stored
messages field by field. Times Celery derives from "now" (an eta from
``countdown``, an absolute ``expires``) are the recorded message's for every copy of its shape in
the chunk: they differ from ``send_task``'s by the time the chunk takes to go out.

What a copy cannot reproduce goes through ``send_task`` one by one: a router that may look at the
arguments, receivers of ``before_task_publish``/``after_task_publish``/``task_sent`` (each message
must reach them), task-sent events, task protocol 1. Celery's ``backend.on_task_call`` (a Redis or
RPC result backend subscribing the producer to each result early) is not made for copies:
``AsyncResult.get()`` subscribes when it is called.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from celery import signals
from celery.app.routes import MapRoute
from celery.utils.saferepr import saferepr
from kombu import Producer

from .wire import Wire, open_wire

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["RECEIVER_PREFIX", "Sender", "Session"]

#: the ``dispatch_uid`` of every signal receiver of ours starts with this: ours look only at messages
#: sent from inside a member (its ``Task.replace()``), never at a copy, so they do not stop copies
RECEIVER_PREFIX = "celery_batches:"

#: kombu's operations per buffered message, at most (an lpush, a pexpire per priority step)
_OPS_PER_MESSAGE = 12


class _Recorder(Producer):
    """A producer whose ``publish`` records the call ``send_task`` makes, and sends nothing."""

    recorded: tuple[Any, dict[str, Any]] | None = None

    def publish(self, body: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.recorded = (body, kwargs)


@dataclass
class _Shape:
    """The publish call ``send_task`` made for one message, and which of its fields it derived from that message."""

    body: tuple
    kwargs: dict[str, Any]
    derived: frozenset[str]  # header names to make again per message
    task_id: str
    wire: Any = None  # what the session's wire needs for copies of this shape (None: no copies)


def _saferepr(value: Any, maxlen: int, maxlevels: int) -> str:
    """Celery's ``saferepr``, which costs about as much as sending the message: made directly
    where its text is known (JSON's plain values and containers, shorter than ``maxlen``)."""
    text = _plain_repr(value, 0, maxlevels)
    if text is not None and len(text) < maxlen:
        return text
    return saferepr(value, maxlen, maxlevels=maxlevels)


def _plain_repr(value: Any, depth: int, maxlevels: int) -> str | None:
    """What ``saferepr`` writes for a str, int, float, bool, None, or a list or dict of them
    (None for anything else, and for a container it would elide): its own quoting for strings
    (``'`` escaped, nothing else), ``str`` for numbers, ``repr`` for the rest."""
    kind = type(value)
    if kind is str:
        return "'" + value.replace("'", "\\'") + "'"
    if kind is int or kind is float or kind is bool or value is None:
        return repr(value)
    if depth >= maxlevels:
        return None
    if kind is list:
        parts = [_plain_repr(item, depth + 1, maxlevels) for item in value]
        return None if None in parts else "[" + ", ".join(parts) + "]"  # type: ignore[arg-type]
    if kind is dict:
        items = []
        for key, item in value.items():
            key_text, item_text = _plain_repr(key, maxlevels, maxlevels), _plain_repr(item, depth + 1, maxlevels)
            if key_text is None or item_text is None:
                return None
            items.append(f"{key_text}: {item_text}")
        return "{" + ", ".join(items) + "}"
    return None


class Session:
    """The messages of one publication, sent through one producer (and one kombu batch where the
    transport buffers)."""

    def __init__(self, app: "Celery", producer: Producer, batch: Any, copies: bool, wire: Wire | None = None) -> None:
        self.app = app
        self.producer = producer
        self._batch = batch
        self._copies = copies
        self._wire = wire
        #: messages reach the broker only at ``flush`` (else each as ``send`` returns)
        self.buffered = batch is not None or wire is not None
        self.handed = 0  # messages ``send`` took
        self._on_wire: list[int] = []  # the position of each message the wire buffered
        self.stored_copies = 0  # messages the wire wrote as copies of the first of their shape
        self._shapes: dict[tuple, _Shape] = {}
        self._recorder: _Recorder | None = None
        self._repr_size = (app.amqp.argsrepr_maxsize, app.amqp.kwargsrepr_maxsize, app.conf.task_repr_maxlevels)

    def send(self, name: str, args: list, kwargs: dict, *, task_id: str, headers: dict | None,
             options: dict[str, Any], shape_key: tuple | None = None, args_json: str | None = None,
             kwargs_json: str | None = None) -> None:
        """Send one message (buffered where the transport buffers: ``flush`` sends them).

        ``shape_key`` names what the messages sharing a shape have in common (the task, its
        options and headers); None sends this one through ``send_task``. ``args_json`` and
        ``kwargs_json``: ``args`` and ``kwargs`` as kombu's JSON encodes them, where the caller
        has them (a copy on the wire takes its body from them)."""
        if not self._copies or shape_key is None:
            self.app.send_task(name, args, kwargs, task_id=task_id, producer=self.producer, headers=headers,
                               add_to_parent=False, **options)
            self.handed += 1
            return
        shape = self._shapes.get(shape_key)
        first = shape is None
        if shape is None:
            shape = self._shapes[shape_key] = self._record(name, args, kwargs, task_id, headers, options)
        body, publish = self._copy(shape, task_id, args, kwargs, options.get("retries", 0), first)
        if self._wire is None:
            self.producer.publish(body, **publish)
        elif shape.wire is not None and args_json is not None and kwargs_json is not None:
            self._on_wire.append(self.handed)
            self._wire.copy(shape.wire, publish["headers"], publish.get("correlation_id"), args_json, kwargs_json)
            self.stored_copies += 1
        else:
            self._on_wire.append(self.handed)
            stored = self._wire.publish(body, publish, args_json, kwargs_json)
            if first:
                shape.wire = stored
        self.handed += 1

    def flush(self) -> list[int]:
        """Send what the transport buffered; returns the positions (in the order ``send`` took them)
        of the messages the broker answered with an error (the others arrived). Raises if the
        broker did not answer: then none of it counts as sent (kombu cannot tell how much arrived)."""
        if self._batch is not None:
            self._batch.flush()
        if self._wire is not None:
            return [self._on_wire[i] for i in self._wire.flush()]
        return []

    def _record(self, name: str, args: list, kwargs: dict, task_id: str, headers: dict | None,
                options: dict[str, Any]) -> _Shape:
        if self._recorder is None:
            self._recorder = _Recorder(self.producer.channel, auto_declare=False)
        self._recorder.recorded = None
        self.app.send_task(name, args, kwargs, task_id=task_id, producer=self._recorder, headers=headers,
                           add_to_parent=False, **options)
        if self._recorder.recorded is None:
            raise RuntimeError(f"send_task published nothing for {name} (a custom publish path?)")
        body, publish = self._recorder.recorded
        h = publish["headers"]
        # a field is made again only where Celery derived it from this message (a user's own
        # argsrepr, or a header the user set, stays as given)
        derived = {key for key, value in (("id", task_id), ("root_id", task_id), ("retries", options.get("retries", 0)),
                                          *zip(("argsrepr", "kwargsrepr"), self._reprs(args, kwargs)))
                   if h.get(key) == value}
        return _Shape(body, publish, frozenset(derived), task_id)

    def _reprs(self, args: list, kwargs: dict) -> tuple[str, str]:
        """argsrepr and kwargsrepr, as Celery's ``as_task_v2`` makes them."""
        amax, kmax, levels = self._repr_size
        return _saferepr(args, amax, levels), _saferepr(kwargs, kmax, levels)

    def _copy(self, shape: _Shape, task_id: str, args: list, kwargs: dict, retries: int,
              first: bool) -> tuple[tuple, dict[str, Any]]:
        publish = dict(shape.kwargs)
        headers = dict(publish["headers"])
        derived = shape.derived
        for key in ("id", "root_id"):
            if key in derived:
                headers[key] = task_id
        if "retries" in derived:
            headers["retries"] = retries
        if derived & {"argsrepr", "kwargsrepr"}:
            argsrepr, kwargsrepr = self._reprs(args, kwargs)
            if "argsrepr" in derived:
                headers["argsrepr"] = argsrepr
            if "kwargsrepr" in derived:
                headers["kwargsrepr"] = kwargsrepr
        publish["headers"] = headers
        if publish.get("correlation_id") == shape.task_id:
            publish["correlation_id"] = task_id
        if not first:
            publish["declare"] = []  # declared with the first of its shape
        if self._batch is not None or self._wire is not None:
            publish["retry"] = False  # buffered: nothing to retry until the flush, which reports its failure
        return (args, kwargs, *shape.body[2:]), publish


class Sender:
    """Opens sessions of ``app``'s messages; knows whether copies can stand for ``send_task``.

    ``bulk`` False: every message through ``send_task`` and kombu's own publish, one by one (the
    ``bulk_publish`` setting; the publisher also turns it off when the bulk path fails where
    kombu's own does not)."""

    def __init__(self, app: "Celery", *, bulk: bool = True) -> None:
        self.app = app
        self.bulk = bulk

    def plain(self, producer: Producer) -> Session:
        """A session that sends each message at once through ``send_task`` (no copies, no buffer)."""
        return Session(self.app, producer, None, False)

    def copies_allowed(self) -> bool:
        """Can a copy of a recorded ``send_task`` call stand for ``send_task`` right now?"""
        if not self.bulk:
            return False
        conf = self.app.conf
        if conf.task_protocol != 2 or conf.task_send_sent_event:
            return False
        for signal in (signals.before_task_publish, signals.after_task_publish, signals.task_sent):
            if any(not str(lookup[0]).startswith(RECEIVER_PREFIX) for lookup, _receiver in signal.receivers):
                return False
        # a route given as a function may look at the arguments; a mapping looks at the name only
        return all(isinstance(route, MapRoute) for route in self.app.amqp.router.routes)

    @contextlib.contextmanager
    def session(self, producer: Producer, size: int) -> Iterator[Session]:
        """A session for up to ``size`` messages; buffered where kombu can batch for the transport."""
        batching = self.bulk and getattr(producer, "supports_batch_publish", False)
        copies = self.copies_allowed()
        wire = open_wire(producer) if copies else None
        if wire is not None:
            try:
                yield Session(self.app, producer, None, copies, wire)
            finally:
                wire.close()
            return
        with (producer.batch(max_size=max(1, size) * _OPS_PER_MESSAGE) if batching
              else contextlib.nullcontext()) as batch:
            yield Session(self.app, producer, batch, copies)
