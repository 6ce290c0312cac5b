"""Errors raised by celery_batches. Everything derives from :class:`BatchError`."""

from __future__ import annotations

__all__ = ["BatchError", "BatchNotFoundError", "BatchClosedError", "InvalidBatchError"]


class BatchError(Exception):
    """Base class of every error this library raises on purpose."""


class BatchNotFoundError(BatchError, LookupError):
    """No batch has the given id."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch with id {batch_id!r}")
        self.batch_id = batch_id


class BatchClosedError(BatchError):
    """The batch is finished or cancelled, so it takes no more jobs."""

    def __init__(self, batch_id: str, status: object) -> None:
        super().__init__(f"batch {batch_id} is {getattr(status, 'name', status)} and takes no more jobs")
        self.batch_id = batch_id
        self.status = status


class InvalidBatchError(BatchError, ValueError):
    """Invalid input: raised before anything is written or published."""
