"""What the broker still holds: is a run's message queued, held by a consumer, or gone?

Recovery asks this before it republishes a run whose message may be lost, and to hand back the
messages a dead worker had taken but not acknowledged. Only Redis needs it: kombu's Redis
transport keeps a consumer's unacknowledged messages in the ``unacked`` hash until the visibility
timeout (an hour by default), and a Redis restart without persistence loses queues. RabbitMQ
returns a dead consumer's messages at once and keeps durable queues, so there the probe knows
nothing and recovery leaves messages to the broker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from kombu.utils import json as kjson

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Probe", "Snapshot", "probe_for"]

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """One look at the broker: task ids queued, task ids held unacknowledged (with their delivery tags),
    and whether every queue was read to its end (if not, an id missing from ``queued`` proves nothing)."""

    queued: set[str] = field(default_factory=set)
    held: dict[str, str] = field(default_factory=dict)
    complete: bool = True

    def has(self, task_id: str) -> bool:
        return task_id in self.queued or task_id in self.held


class Probe:
    """A broker we cannot look into: nothing is known, nothing is restored."""

    knows = False

    def __init__(self, app: "Celery", scan_limit: int = 50_000) -> None:
        self.app = app
        self.scan_limit = scan_limit

    def look(self, queues: Iterable[str]) -> Snapshot:
        return Snapshot(complete=False)

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
                        snap.complete = False
                    for raw in client.lrange(key, 0, self.scan_limit - 1):
                        task_id = _task_id(raw)
                        if task_id:
                            snap.queued.add(task_id)
            for tag, raw in client.hgetall(channel.unacked_key).items():
                try:
                    payload = kjson.loads(raw)[0]
                except Exception:
                    continue
                task_id = _task_id(payload)
                if task_id:
                    snap.held[task_id] = tag.decode() if isinstance(tag, bytes) else str(tag)
        return snap

    def restore(self, delivery_tags: Iterable[str]) -> int:
        """Put held messages back at the head of their queue, as kombu does after the visibility timeout."""
        restored = 0
        with self.app.connection_for_write() as conn:
            channel: Any = conn.default_channel
            for tag in delivery_tags:
                channel.qos.restore_by_tag(tag, client=channel.client, leftmost=True)
                restored += 1
        return restored


def _task_id(raw: Any) -> str | None:
    try:
        payload = kjson.loads(raw) if isinstance(raw, (bytes, str)) else raw
        return str(payload["headers"]["id"])
    except Exception:
        return None


def probe_for(app: "Celery", scan_limit: int) -> Probe:
    """The probe for the app's broker transport."""
    try:
        transport = app.connection_for_write().transport_cls
    except Exception:
        return Probe(app, scan_limit)
    name = transport if isinstance(transport, str) else getattr(transport, "driver_type", "")
    return (RedisProbe if name in ("redis", "rediss") else Probe)(app, scan_limit)
