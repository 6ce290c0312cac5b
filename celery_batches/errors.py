"""Errors raised by celery_batches. Everything derives from :class:`BatchError`."""

from __future__ import annotations

__all__ = ["BatchError", "BatchNotFoundError", "BatchClosedError", "InvalidBatchError", "RunNotFoundError"]


class BatchError(Exception):
    """Base class of every error this library raises on purpose."""


class BatchNotFoundError(BatchError, LookupError):
    """No batch has the given id."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch with id {batch_id!r}")
        self.batch_id = batch_id


class RunNotFoundError(BatchError, LookupError):
    """No run (job) has the given id (:meth:`Batches.retry_run <celery_batches.Batches.retry_run>`).

    A ``LookupError`` like :class:`BatchNotFoundError`, but not one: the id named a job, not a batch."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no job run with id {run_id!r}")
        self.run_id = run_id


class BatchClosedError(BatchError):
    """The batch is finished or cancelled, so it takes no more jobs."""

    def __init__(self, batch_id: str, status: object) -> None:
        super().__init__(f"batch {batch_id} is {getattr(status, 'name', status)} and takes no more jobs")
        self.batch_id = batch_id
        self.status = status


class InvalidBatchError(BatchError, ValueError):
    """Invalid input: raised before anything is written or published."""
