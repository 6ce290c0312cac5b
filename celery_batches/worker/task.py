"""BatchTask: the base class of ``@batches.task`` tasks."""

from __future__ import annotations

from celery import Task

__all__ = ["BatchTask"]


class BatchTask(Task):
    """Base class for batch members declared with ``@batches.task``.

    Any Celery task can be a batch member; this base is where member-only behaviour lives
    (skipping runs whose batch was cancelled before they reached a worker).
    """

