"""Read models returned by the API: frozen value objects, no I/O."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import InvalidBatchError

__all__ = ["Batch", "BatchStatus", "JobRun", "RunStatus", "Continuation", "ContinuationStatus", "WHEN_MATCHES",
           "batch_progress", "canonical_id", "valid_id"]


def batch_progress(total: int, pending: int, finished: bool) -> float:
    """Finished units over total units, 0.0–1.0: the one definition every view of a batch uses.

    An empty batch (``total == 0``) is 1.0 once it has finished and 0.0 before (a continue-with
    stage with no jobs waits, empty, for its antecedent).
    """
    if total <= 0:
        return 1.0 if finished else 0.0
    return (total - pending) / total


class BatchStatus(enum.IntEnum):
    """Lifecycle of a batch (the seed's values)."""

    CREATED = 0  # stored, runs not published yet (continue-with batches wait here)
    STARTED = 1
    COMPLETED = 2  # every unit completed
    FAILED = 3  # every unit finished and at least one failed or was cancelled
    CANCELLED = 4

    @property
    def is_final(self) -> bool:
        return self >= BatchStatus.COMPLETED


#: ``continue_batch_with(..., when=...)``: the antecedent's final statuses that start the stage
#: (any other cancels it)
WHEN_MATCHES: dict[str, tuple[BatchStatus, ...]] = {
    "success": (BatchStatus.COMPLETED,),
    "failure": (BatchStatus.FAILED,),
    "complete": (BatchStatus.COMPLETED, BatchStatus.FAILED),
}


def canonical_id(value: object) -> str | None:
    """A batch, run or continuation id (a UUID) in its one stored spelling; None if it is none."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return None


def valid_id(value: object, what: str = "batch") -> str:
    """A batch (or run) id given to the API, in its stored spelling: anything but a UUID is the
    caller's mistake (``InvalidBatchError``), not an unknown batch (or run)."""
    found = canonical_id(value)
    if found is None:
        raise InvalidBatchError(f"{value!r} is not a {what} id (a UUID)")
    return found


class RunStatus(enum.IntEnum):
    """Lifecycle of one job (one Celery task id). Final statuses are exactly those >= COMPLETED."""

    PENDING = 0
    RUNNING = 1
    RETRYING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def is_final(self) -> bool:
        return self >= RunStatus.COMPLETED



class ContinuationKind(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    COMPLETE = "complete"
    FIRST_FAILURE = "first_failure"  # at the batch's first failed unit, without waiting for the rest


class ContinuationStatus(enum.IntEnum):
    WAITING = 0  # batch not finished yet
    DUE = 1  # batch finished with a matching status; to be published (the outbox)
    DISPATCHED = 2  # published to the broker
    SKIPPED = 3  # batch finished with a status this continuation does not fire on, or was cancelled
    FAILED = 4  # the broker refused its message for good (a bad option); ``error`` says why


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch as the registry holds it.

    The ``*_jobs`` counters count *units*: each direct job is one unit, and each nested batch is
    one unit of its parent (counted when the nested batch finishes, by its outcome), whatever it
    holds. ``total_jobs`` is the number of units; the jobs of a nested batch are counted in it.
    """

    id: str
    name: str
    parent_id: str | None
    status: BatchStatus
    total_jobs: int  # units: direct jobs plus nested batches
    completed_jobs: int
    failed_jobs: int
    cancelled_jobs: int
    created_by: str | None
    created_at: datetime
    completed_at: datetime | None
    expires_at: datetime | None
    description: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)  # a JSON object (set_properties merges into it)
    tags: tuple[str, ...] = ()
    cancel_on_failure: bool = False  # the first failed unit cancels the rest of its subtree
    max_concurrency: int | None = None  # at most this many of its direct jobs published and unfinished
    results: bool = False  # its jobs' return values are kept and passed to its continuations

    @property
    def pending_jobs(self) -> int:
        """Units (jobs and child batches) that have not finished yet."""
        return max(self.total_jobs - self.completed_jobs - self.failed_jobs - self.cancelled_jobs, 0)

    @property
    def progress(self) -> float:
        """Finished units over total units, 0.0–1.0 (see :func:`batch_progress` for an empty batch)."""
        return batch_progress(self.total_jobs, self.pending_jobs, self.is_finished)

    @property
    def is_finished(self) -> bool:
        return self.status.is_final


@dataclass(frozen=True, slots=True)
class JobResult:
    """One unit's outcome in a ``results=True`` batch: a job's return value (None while it has not
    completed, or if it failed or was cancelled), or a nested batch's own list of ``JobResult``
    whatever its status (``run_id`` is then the nested batch's id)."""

    run_id: str
    status: RunStatus | BatchStatus
    value: Any
    error: str | None


@dataclass(frozen=True, slots=True)
class JobRun:
    id: str
    batch_id: str
    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str | None
    status: RunStatus
    order: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    retries: int
    traceback: str | None = None  # a FAILED run's last attempt's (``traceback_max_chars``, its end kept)


@dataclass(frozen=True, slots=True)
class Continuation:
    id: str
    batch_id: str
    kind: ContinuationKind
    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    status: ContinuationStatus
    dispatched_at: datetime | None
    error: str | None = None  # why it could not be published (status FAILED)
