"""Messages written to the broker as kombu itself would write them, many at a time.

A *wire* takes over where kombu's ``Producer.publish`` would hand a prepared message to the
transport. The first message of each shape goes through kombu (prepared by ``Producer.publish``,
routed by the channel) and what reaches the broker is kept: on Redis the stored JSON and the
commands that store it, on RabbitMQ the AMQP frames. A later message of the shape is that, with
its per-message fields replaced (task id, correlation id, argument reprs, retries, body); its body
is the batch's stored JSON of the arguments, never decoded and encoded again. A shape gets copies
only if rebuilding its first message this way gives the bytes kombu wrote for it (JSON, no
compression): anything else goes through kombu, message by message, in the same session.

Everything a session wrote reaches the broker at ``flush``: one Redis pipeline, one socket write
on RabbitMQ. Redis answers each command: a message whose command it refused is reported, the
others arrived. A flush the broker does not answer reports the whole session as not sent (some of
it may have arrived; it is published again, and claims keep a duplicate from running twice).
tests/test_sending.py compares what both write, field by field, on both brokers.

The wire leans on kombu's and py-amqp's internals, so it is used only with the versions it was
proven on (``PROVEN``); any other version publishes through kombu's own path.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import struct
import uuid
from dataclasses import dataclass
from typing import Any

from importlib.metadata import PackageNotFoundError, version

from kombu import Producer

from .. import kombujson

__all__ = ["PROVEN", "Wire", "body_json", "open_wire", "proven"]

#: the versions the wire was proven on (tests/test_sending.py), as [lowest, above the highest)
PROVEN = {"kombu": ((5, 7), (5, 8)), "amqp": ((5, 4), (5, 5)), "redis": ((6, 4), (8, 3))}


def proven(package: str) -> bool:
    """Is the installed ``package`` a version the wire was proven on?"""
    try:
        parts = tuple(int(p) for p in version(package).split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    low, high = PROVEN[package]
    return low <= parts < high

_FRAME_END = b"\xce"
_BASIC = 60  # AMQP class id of basic.*
_PUBLISH = struct.pack(">HH", _BASIC, 40)  # basic.publish


def body_json(args_json: str, kwargs_json: str, embed_json: str) -> bytes:
    """A task message's JSON body (protocol 2: ``[args, kwargs, embed]``) from its parts' JSON."""
    return f"[{args_json}, {kwargs_json}, {embed_json}]".encode()


class _Captured:
    """Stands in for kombu's batch state on a producer for one publish: keeps the prepared message
    and its routing arguments (what ``Producer._publish`` hands a batch) instead of sending them."""

    def __init__(self) -> None:
        self.call: tuple[Any, dict[str, Any]] | None = None

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> None:
        self.call = (message, kwargs)


class Wire:
    """One session's messages, buffered and written at ``flush``."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.channel = producer.channel
        self.messages = 0  # messages buffered so far (their positions, in order)

    def publish(self, body: tuple, publish: dict[str, Any], args_json: str | None,
                kwargs_json: str | None) -> Any:
        """Buffer one message prepared by kombu; return what copies of its shape need, or None
        if they cannot be copies (then each goes through here too)."""
        local = self.producer._batch_local  # kombu >= 5.7: the hook its own publish batches use
        before = getattr(local, "current", None)
        local.current = captured = _Captured()
        try:
            self.producer.publish(body, **publish)
        finally:
            local.current = before
        if captured.call is None:
            raise RuntimeError("kombu published without its batch hook (an unknown kombu version?)")
        message, kwargs = captured.call
        self.messages += 1
        embed = kombujson.dumps(body[2]) if len(body) == 3 else None
        expected = None if args_json is None or kwargs_json is None or embed is None \
            else body_json(args_json, kwargs_json, embed)
        return self._first(message, kwargs, expected, embed)

    def _first(self, message: Any, kwargs: dict[str, Any], body: bytes | None, embed: str | None) -> Any:
        raise NotImplementedError

    def copy(self, template: Any, headers: dict[str, Any], correlation_id: Any, args_json: str,
             kwargs_json: str) -> None:
        """Buffer a message of ``template``'s shape with its own headers, correlation id and arguments."""
        self.messages += 1
        self._copy(template, headers, correlation_id, args_json, kwargs_json)

    def _copy(self, template: Any, headers: dict[str, Any], correlation_id: Any, args_json: str,
              kwargs_json: str) -> None:
        raise NotImplementedError

    def flush(self) -> list[int]:
        """Write everything buffered; the positions of the messages the broker refused."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- Redis --------------------------------------------------------------------------------------------
@dataclass
class _Stored:
    """A message as kombu stores it on Redis (base64 body, delivery tag and info added), and the
    commands that stored it; a copy stands in wherever a command carried the message."""

    message: dict[str, Any]
    commands: list[tuple[str, tuple]]
    payload: str
    embed: str


class _Commands:
    """What kombu's Redis channel hands a publish batch: each final command of one message."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple]] = []

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


class RedisWire(Wire):
    """Redis: one pipeline; kombu's channel routes each first message (``basic_publish`` with a
    batch, exactly as kombu's own publish batch calls it) and records its final commands."""

    def __init__(self, producer: Producer) -> None:
        super().__init__(producer)
        self._stack = contextlib.ExitStack()
        client = self._stack.enter_context(self.channel.conn_or_acquire())
        self.pipeline = self._stack.enter_context(client.pipeline(transaction=False))
        self._owners: list[int] = []  # the position of the message each pipelined command stores

    def _first(self, message: dict[str, Any], kwargs: dict[str, Any], body: bytes | None,
               embed: str | None) -> _Stored | None:
        commands = _Commands()
        self.channel.basic_publish(message, _publish_batch=commands, **kwargs)
        for name, args in commands.commands:
            getattr(self.pipeline, name)(*args)
        self._owners += [self.messages - 1] * len(commands.commands)
        if body is None or embed is None or "compression" in message["headers"]:
            return None
        if (message["content-type"], message["content-encoding"], message["properties"].get("body_encoding")) \
                != ("application/json", "utf-8", "base64") or base64.b64decode(message["body"]) != body:
            return None  # not JSON, or the stored arguments are not what kombu encoded
        payload = kombujson.dumps(message)
        if not any(arg == payload for _, args in commands.commands for arg in args):
            return None
        return _Stored(message, commands.commands, payload, embed)

    def _copy(self, template: _Stored, headers: dict[str, Any], correlation_id: Any, args_json: str,
              kwargs_json: str) -> None:
        message = dict(template.message)
        message["body"] = base64.b64encode(body_json(args_json, kwargs_json, template.embed)).decode("ascii")
        message["headers"] = headers
        properties = message["properties"] = dict(message["properties"])
        properties["correlation_id"] = correlation_id
        properties["delivery_tag"] = str(uuid.uuid4())
        payload = kombujson.dumps(message)
        for name, args in template.commands:
            getattr(self.pipeline, name)(*(payload if arg == template.payload else arg for arg in args))
        self._owners += [self.messages - 1] * len(template.commands)

    def flush(self) -> list[int]:
        replies = self.pipeline.execute(raise_on_error=False)  # a lost connection still raises
        return sorted({owner for owner, reply in zip(self._owners, replies) if isinstance(reply, Exception)})

    def close(self) -> None:
        self._stack.close()


# -- RabbitMQ (py-amqp) --------------------------------------------------------------------------------
@dataclass
class _Frames:
    """A message's AMQP frames as segments: bytes the same for every message of the shape, and
    the names of what each message fills in (its headers table, its correlation id)."""

    method: bytes  # the whole basic.publish method frame
    properties: list[bytes | str]
    headers: list[bytes | str]  # the headers table's items: encoded, or a key encoded per message
    embed: str


class AmqpWire(Wire):
    """RabbitMQ through py-amqp: the frames of a session's messages in one socket write.

    The first message of a shape is framed by py-amqp's own frame writer (into a buffer, not the
    socket); its copies are framed here from its segments, and must give the same bytes for the
    first message, or the shape gets no copies."""

    def __init__(self, producer: Producer) -> None:
        super().__init__(producer)
        self.connection = self.channel.connection
        self._out: list[bytes] = []

    def _first(self, message: Any, kwargs: dict[str, Any], body: bytes | None, embed: str | None) -> _Frames | None:
        from amqp import spec
        from amqp.method_framing import frame_writer
        from amqp.serialization import dumps

        written: list[bytes] = []

        class _Buffer:
            @staticmethod
            def write(data: Any) -> None:
                written.append(bytes(data))

        args = dumps("Bssbb", (0, kwargs.get("exchange") or "", kwargs.get("routing_key") or "",
                               bool(kwargs.get("mandatory")), bool(kwargs.get("immediate"))))
        frame_writer(self.connection, _Buffer)(1, self.channel.channel_id, spec.Basic.Publish, args, message)
        frames = b"".join(written)
        self._out.append(frames)
        properties = message.properties
        if body is None or embed is None or properties.get("content_type") != "application/json" \
                or properties.get("content_encoding") != "utf-8" or "compression" in (
                    properties.get("application_headers") or {}):
            return None
        template = _Frames(self._frame(1, struct.pack(">HH", *spec.Basic.Publish) + args), [], [], embed)
        for key, kind in message.PROPERTIES:
            value = properties.get(key)
            if value is None:
                continue
            if key in ("application_headers", "correlation_id"):
                template.properties.append(key)
            else:
                template.properties.append(dumps(kind, [value]))
        template.properties.insert(0, message._serialize_properties()[:2])  # the flags: 14 properties, one word
        for key, value in (properties.get("application_headers") or {}).items():
            if key in _PER_MESSAGE:
                template.headers.append(key)
            elif template.headers and isinstance(template.headers[-1], bytes):
                template.headers[-1] += _item(key, value)  # consecutive fixed items as one
            else:
                template.headers.append(_item(key, value))
        mine = self._frames(template, properties.get("application_headers") or {},
                            properties.get("correlation_id"), body)
        return template if mine == frames else None

    def _copy(self, template: _Frames, headers: dict[str, Any], correlation_id: Any, args_json: str,
              kwargs_json: str) -> None:
        self._out.append(self._frames(template, headers, correlation_id,
                                      body_json(args_json, kwargs_json, template.embed)))

    def _frames(self, template: _Frames, headers: dict[str, Any], correlation_id: Any, body: bytes) -> bytes:
        table = b"".join(_item(part, headers[part]) if isinstance(part, str) else part for part in template.headers)
        properties = []
        for part in template.properties:
            if part == "application_headers":
                properties.append(struct.pack(">I", len(table)) + table)
            elif part == "correlation_id":
                value = str(correlation_id).encode("utf-8", "surrogatepass")
                properties.append(struct.pack("B", len(value)) + value)
            else:
                properties.append(part)  # type: ignore[arg-type]
        out = [template.method, self._frame(2, struct.pack(">HHQ", _BASIC, 0, len(body)) + b"".join(properties))]
        size = self.connection.frame_max - 8
        out += [self._frame(3, body[i:i + size]) for i in range(0, len(body), size)]
        return b"".join(out)

    def _frame(self, kind: int, payload: bytes) -> bytes:
        return struct.pack(">BHI", kind, self.channel.channel_id, len(payload)) + payload + _FRAME_END

    def flush(self) -> list[int]:
        if not self._out:
            return []
        data, self._out = b"".join(self._out), []
        connection = self.connection
        if connection is None or connection.transport is None:
            raise ConnectionError("the AMQP connection is closed")
        if connection.client_properties.get("capabilities", {}).get("connection.blocked"):
            with contextlib.suppress(socket.timeout):  # as py-amqp's basic_publish: see a Connection.Blocked
                connection.drain_events(timeout=0)
        connection.transport.write(data)
        return []  # basic.publish has no answer: what the socket took, RabbitMQ took


#: headers Celery derives from each message (sending.py decides which of them a shape makes again)
_PER_MESSAGE = frozenset({"id", "root_id", "argsrepr", "kwargsrepr", "retries"})


def _item(key: str, value: Any) -> bytes:
    """One AMQP field-table item, as py-amqp encodes it (strings and small ints here, the rest by py-amqp)."""
    k = key.encode("utf-8", "surrogatepass")
    if type(value) is str:
        v = value.encode("utf-8", "surrogatepass")
        return struct.pack("B", len(k)) + k + b"S" + struct.pack(">I", len(v)) + v
    if type(value) is int and -2147483647 <= value <= 2147483647:
        return struct.pack("B", len(k)) + k + struct.pack(">ci", b"I", value)
    from amqp.serialization import dumps
    return dumps("F", [{key: value}])[4:]


def open_wire(producer: Producer) -> Wire | None:
    """A wire for this producer's transport, or None where kombu's own path must be used (another
    transport, or a kombu, py-amqp or redis-py version the wire was not proven on)."""
    if not proven("kombu"):
        return None
    channel = producer.channel
    try:
        from kombu.transport.redis import Channel as RedisChannel
    except ImportError:  # pragma: no cover (the redis client is not installed)
        RedisChannel = ()  # type: ignore[assignment,misc]
    if isinstance(channel, RedisChannel) and getattr(producer, "supports_batch_publish", False):
        return RedisWire(producer) if proven("redis") else None
    try:
        import amqp
    except ImportError:  # pragma: no cover
        return None
    if proven("amqp") and isinstance(channel, amqp.Channel) \
            and getattr(channel.basic_publish, "__func__", None) is amqp.Channel._basic_publish \
            and hasattr(producer, "_batch_local"):
        return AmqpWire(producer)  # not in publisher-confirm mode (then each publish waits for its ack)
    return None
