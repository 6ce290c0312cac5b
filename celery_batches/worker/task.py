"""BatchTask: the base class of ``@batches.task`` tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Ignore

from ..models import RunStatus
from ..publish import HEADER
from ..store import RunEvent

if TYPE_CHECKING:
    from ..api import Batches

__all__ = ["BatchTask"]


class BatchTask(Task):
    """Base class for batch members declared with ``@batches.task``.

    Any Celery task can be a batch member; this base adds the cancel-skip: a run whose batch was
    cancelled and that still reaches a worker (the revoke broadcast missed it) is never executed.
    """

    _batches: "Batches | None" = None

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        # Ignore from before_start stops the task (from task_prerun it would not)
        batch_id = getattr(self.request, HEADER, None)
        if batch_id and self._batches is not None and self._batches._is_cancelled(batch_id):
            self.backend.mark_as_revoked(task_id, "batch cancelled", request=self.request)
            # a run that was RUNNING at cancel time and comes back (a retry, a redelivery) ends here
            self._batches._group_commit.add(RunEvent(task_id, RunStatus.CANCELLED, self.request.retries or 0,
                                                     "skipped: batch cancelled"))
            raise Ignore()

