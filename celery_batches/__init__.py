"""celery_batches: atomic batches for Celery, tracked in a PostgreSQL (or SQLite) registry."""

from .api import Batches, current_batch_id
from .builder import BatchBuilder
from .errors import BatchClosedError, BatchError, BatchNotFoundError, InvalidBatchError
from .models import Batch, BatchStatus, JobResult, JobRun, RunStatus
from .worker.task import BatchTask

__all__ = [
    "Batch",
    "BatchBuilder",
    "BatchClosedError",
    "BatchError",
    "BatchNotFoundError",
    "BatchStatus",
    "BatchTask",
    "Batches",
    "InvalidBatchError",
    "JobResult",
    "JobRun",
    "RunStatus",
    "current_batch_id",
]
