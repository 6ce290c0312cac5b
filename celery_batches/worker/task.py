"""BatchTask: the base class of ``@batches.task`` tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Ignore

from ..models import RunStatus
from ..message import CONTINUATION_HEADER, HEADER
from ..store import RunEvent
from ..store.liveness import UNCLAIMED

if TYPE_CHECKING:
    from .node import Node

__all__ = ["CLAIM", "REPLACED", "SKIPPED", "TOKEN", "BatchTask"]

# What the worker notes on a request as it runs (attributes of ``task.request``):
#: the claim the task_prerun handler made (a ``Claim``, or for a continuation True/False/None)
CLAIM = "celery_batches_claim"
#: a continuation delivery's claim token (its replacement presents it)
TOKEN = "celery_batches_token"
#: BatchTask decided not to run this delivery (its Ignore ends nothing)
SKIPPED = "celery_batches_skipped"
#: the task replaced itself: the replacement carries the run on
REPLACED = "celery_batches_replaced"


class BatchTask(Task):
    """Base class for batch members and continuations declared with ``@batches.task``.

    Any Celery task can be a batch member; this base adds what only the registry can tell, read
    before the task body runs: a delivery of a run that is already final (a redelivery, a relay
    republish) or a second delivery of a continuation is not executed, and a run whose batch was
    cancelled (the revoke broadcast missed it) is skipped and counted CANCELLED.
    """

    _node: "Node | None" = None  # set by ``Batches.task``

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        # Ignore from before_start stops the task (from task_prerun it would not)
        node, request = self._node, self.request
        batch_id = getattr(request, HEADER, None)
        continuation_of = getattr(request, CONTINUATION_HEADER, None)
        if node is None or not (batch_id or continuation_of):
            return
        claim = getattr(request, CLAIM, UNCLAIMED)  # made by the task_prerun handler
        verdict = node.verdict(task_id, None if batch_id else continuation_of, claim)
        if verdict == "run":
            return
        setattr(request, SKIPPED, True)
        if verdict == "cancel":
            self.backend.mark_as_revoked(task_id, "batch cancelled", request=request)
            # a run that was RUNNING at cancel time and comes back (a retry, a redelivery) ends here
            node.record(RunEvent(task_id, RunStatus.CANCELLED, request.retries or 0,
                                               "skipped: batch cancelled"))
        raise Ignore()
