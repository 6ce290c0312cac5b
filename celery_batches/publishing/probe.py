"""What the broker still holds: is a run's message queued, unacknowledged at a consumer, or gone?

Recovery asks this before it republishes a run whose message may be lost, and to hand back the
messages a dead worker had taken but not acknowledged. kombu's Redis transport keeps a consumer's
unacknowledged messages in the ``unacked`` hash until the visibility timeout (an hour by default),
and a Redis restart without persistence loses queues: there the probe reads the queues (up to a
scan limit) and the unacked hash. RabbitMQ returns a dead consumer's messages at once and keeps
durable queues, but a message a worker took and lost (it died before recording anything) is gone
there too; a queue's messages cannot be listed without taking them, but its count of ready
messages can be read: an empty queue holds no lost message, a busy one is not judged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from .. import kombujson

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["AmqpProbe", "Probe", "RedisProbe", "Snapshot", "probe_for"]

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """One look at the broker: task ids queued, task ids unacknowledged (with their delivery tags),
    and the queues whose messages could not all be read (an id missing from one of those proves nothing)."""

    queued: set[str] = field(default_factory=set)
    unacked: dict[str, str] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)

    def has(self, task_id: str) -> bool:
        return task_id in self.queued or task_id in self.unacked


class Probe:
    """A broker we cannot look into: nothing is known, nothing is restored."""

    knows = False

    def __init__(self, app: "Celery", scan_limit: int = 50_000) -> None:
        self.app = app
        self.scan_limit = scan_limit

    def look(self, queues: Iterable[str]) -> Snapshot:
        return Snapshot(unknown=set(queues))

    def restore(self, delivery_tags: Iterable[str]) -> int:
        return 0


class RedisProbe(Probe):
    """kombu's Redis transport: queues are lists (one per priority step), unacked messages a hash."""

    knows = True

    def look(self, queues: Iterable[str]) -> Snapshot:
        snap = Snapshot()
        with self.app.connection_for_write() as conn:
            channel: Any = conn.default_channel
            client = channel.client
            for queue in set(queues):
                for key in {channel._q_for_pri(queue, step) for step in channel.priority_steps}:
                    length = client.llen(key)
                    if length > self.scan_limit:
                        snap.unknown.add(queue)
                    for raw in client.lrange(_own_key(client, "LRANGE", key), 0, self.scan_limit - 1):
                        task_id = _task_id(raw)
                        if task_id:
                            snap.queued.add(task_id)
            for tag, raw in client.hgetall(_own_key(client, "HGETALL", channel.unacked_key)).items():
                try:
                    payload = kombujson.loads(raw)[0]
                except Exception:
                    continue
                task_id = _task_id(payload)
                if task_id:
                    snap.unacked[task_id] = tag.decode() if isinstance(tag, bytes) else str(tag)
        return snap

    def restore(self, delivery_tags: Iterable[str]) -> int:
        """Put unacknowledged messages back at the head of their queue, as kombu does after the visibility timeout."""
        restored = 0
        with self.app.connection_for_write() as conn:
            channel: Any = conn.default_channel
            for tag in delivery_tags:
                channel.qos.restore_by_tag(tag, client=channel.client, leftmost=True)
                restored += 1
        return restored


class AmqpProbe(Probe):
    """RabbitMQ: only a queue's count of ready messages is read (a passive declare takes nothing). An
    empty queue is known to hold none of the runs looked for; a queue with messages is not judged.
    Unacknowledged messages are RabbitMQ's to return (it does, at once, when their consumer dies)."""

    knows = True

    def look(self, queues: Iterable[str]) -> Snapshot:
        snap = Snapshot()
        with self.app.connection_for_write() as conn:
            channel: Any = conn.channel()
            try:
                for queue in set(queues):
                    try:
                        ready = channel.queue_declare(queue, passive=True).message_count
                    except conn.channel_errors:  # no such queue (RabbitMQ closes the channel): nothing in it
                        channel = conn.channel()
                        ready = 0
                    if ready:
                        snap.unknown.add(queue)
            finally:
                channel.close()
        return snap


def _task_id(raw: Any) -> str | None:
    try:
        payload = kombujson.loads(raw) if isinstance(raw, (bytes, str)) else raw
        return str(payload["headers"]["id"])
    except Exception:
        return None


def _own_key(client: Any, command: str, key: str) -> str:
    """``key`` as ``command`` must name it. With the transport option ``global_keyprefix`` kombu's
    client prefixes the keys of the commands kombu itself sends (``LLEN``, ``HGET``...) but not of
    the others (``LRANGE``, ``HGETALL``): for those the prefix is added here."""
    prefix = getattr(client, "global_keyprefix", "") or ""
    if not prefix or command in getattr(client, "PREFIXED_SIMPLE_COMMANDS", ()):
        return key
    return prefix + key


def probe_for(app: "Celery", scan_limit: int) -> Probe:
    """The probe for the app's broker transport: judged by the transport class the URL resolves to
    (its ``driver_type``), so ``rediss://``, ``sentinel://`` and a custom alias of kombu's Redis
    transport all get the Redis probe. Nothing connects here."""
    try:
        with app.connection_for_write() as conn:
            driver = conn.transport.driver_type
    except Exception:  # noqa: BLE001 - a transport that cannot even be loaded here: nothing to look into
        return Probe(app, scan_limit)
    return {"redis": RedisProbe, "amqp": AmqpProbe}.get(driver, Probe)(app, scan_limit)
