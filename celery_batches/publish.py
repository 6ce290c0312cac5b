"""Turn stored messages into Celery messages: ``task_id`` = run id, batch id in our header."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

from kombu.utils import json as kjson

from .builder import Message

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["HEADER", "publish"]

#: Message header carrying a member's batch id. Namespaced: user headers override Celery's own.
HEADER = "celery_batches_batch_id"

log = logging.getLogger(__name__)


def publish(app: "Celery", messages: Sequence[Message]) -> list[str]:
    """Publish ``messages`` over one producer; returns the ids that reached the broker, in order.

    Stops at the first failure and logs it: what was not published stays in the outbox, where
    the relay finds it (publishing again is harmless: the task id is the run id).
    """
    sent: list[str] = []
    if not messages:
        return sent
    try:
        with app.producer_or_acquire() as producer:
            for m in messages:
                options = kjson.loads(m.options) if m.options else {}
                headers = {HEADER: m.batch_id} if m.batch_id else None
                app.send_task(m.task_name, kjson.loads(m.args), kjson.loads(m.kwargs), task_id=m.id,
                              producer=producer, headers=headers, **options)
                sent.append(m.id)
    except Exception:
        log.exception("celery_batches: published %d of %d message(s); the relay will publish the rest",
                      len(sent), len(messages))
    return sent
