"""A message as the registry stores it and the broker carries it: the row type every part passes
along (the builder makes it, the store writes and reads it, the publisher sends it) and the names
of the headers a worker reads back."""

from __future__ import annotations

from dataclasses import dataclass

from . import kombujson

__all__ = ["CONTINUATION_HEADER", "HEADER", "Message", "REPLACES_HEADER", "RESULTS_HEADER"]

#: Message header carrying a member's batch id. Namespaced: user headers override Celery's own.
HEADER = "celery_batches_batch_id"
#: Message header of a continuation: the batch whose finish fired it.
CONTINUATION_HEADER = "celery_batches_continuation_of"
#: Message header of a job whose batch keeps results (``results=True``): the worker records its return value.
RESULTS_HEADER = "celery_batches_results"
#: Message header of a replacement (``Task.replace()``): the claim of the delivery it takes over.
REPLACES_HEADER = "celery_batches_replaces"


@dataclass(frozen=True, slots=True)
class Message:
    """One Celery message to publish: a job (with its batch id) or a continuation (with the batch that fired it)."""

    id: str
    task_name: str
    args: str  # kombu JSON
    kwargs: str  # kombu JSON
    options: str | None  # kombu JSON
    batch_id: str | None = None
    continuation_of: str | None = None  # a continuation: the batch whose finish fired it
    retries: int = 0  # the attempt it starts (a run published again after its retry's message was lost)

    @property
    def queue(self) -> str | None:
        return (kombujson.loads(self.options) or {}).get("queue") if self.options else None
