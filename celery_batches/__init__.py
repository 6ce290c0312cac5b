"""celery_batches: atomic batches for Celery, tracked in a PostgreSQL (or SQLite) registry.

The layers, top down (docs/architecture.md is the map): ``cli`` and ``dashboard`` read and act
through ``api`` (``Batches``, which builds every part); ``builder`` collects a batch without I/O;
``worker`` runs inside ``celery worker``; ``publishing`` talks to the broker; ``store`` holds all
the SQL. Below them, plain values every layer shares: ``models``, ``message``, ``settings``,
``errors``, ``retry``, ``kombujson`` (and ``serialize``, the JSON the CLI and the dashboard share).
"""

from .api import Batches, current_batch_id
from .builder import BatchBuilder
from .errors import BatchClosedError, BatchError, BatchNotFoundError, InvalidBatchError, RunNotFoundError
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
    "RunNotFoundError",
    "JobResult",
    "JobRun",
    "RunStatus",
    "current_batch_id",
]
