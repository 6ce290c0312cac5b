"""The plain values the dashboard and ``celery batches list/show`` show: pages, rows, trees, counts.

Read by :mod:`.pages`; no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..models import Batch, BatchStatus, ContinuationStatus, RunStatus, batch_progress

__all__ = ["BatchDetail", "BatchPage", "BatchRef", "BatchRow", "ContinuationRow", "Counts", "JobPage", "JobRow",
           "RunDetail", "TreeEntry"]


@dataclass(frozen=True, slots=True)
class Counts:
    """Outcome counters of a set of units or jobs; ``final``: the batch they belong to has finished
    (so an empty set counts as done, see :func:`~celery_batches.models.batch_progress`)."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    final: bool = False

    @property
    def pending(self) -> int:
        return max(self.total - self.completed - self.failed - self.cancelled, 0)

    @property
    def finished(self) -> int:
        return self.total - self.pending

    @property
    def progress(self) -> float:
        """0.0–1.0, defined exactly like :attr:`Batch.progress <celery_batches.Batch.progress>`."""
        return batch_progress(self.total, self.pending, self.final)


@dataclass(frozen=True, slots=True)
class BatchRow:
    """A batch as the dashboard lists it: the public :class:`Batch` plus its links."""

    batch: Batch
    children: int
    antecedent_id: str | None
    continue_when: str | None

    @property
    def units(self) -> Counts:
        b = self.batch
        return Counts(b.total_jobs, b.completed_jobs, b.failed_jobs, b.cancelled_jobs, b.is_finished)


@dataclass(frozen=True, slots=True)
class BatchRef:
    id: str
    name: str
    status: BatchStatus
    continue_when: str | None = None


@dataclass(frozen=True, slots=True)
class BatchPage:
    rows: list[BatchRow]
    has_newer: bool
    has_older: bool


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One batch of a subtree: its own units, its direct jobs and the jobs of its whole subtree."""

    id: str
    name: str
    parent_id: str | None
    status: BatchStatus
    depth: int
    units: Counts
    jobs: Counts  # direct jobs (runs) of this batch
    subtree_jobs: Counts  # direct jobs of this batch and of every descendant
    subtree_batches: int  # batches in the subtree, this one included


@dataclass(frozen=True, slots=True)
class ContinuationRow:
    id: str
    kind: str
    task_name: str
    args: str
    kwargs: str
    status: ContinuationStatus
    due_at: datetime | None
    dispatched_at: datetime | None
    error: str | None = None  # why it could not be published (status FAILED)


@dataclass(frozen=True, slots=True)
class BatchDetail:
    row: BatchRow
    ancestors: list[BatchRef]  # root first, parent last
    antecedent: BatchRef | None
    successors: list[BatchRef]
    tree: list[TreeEntry]  # depth-first, the batch itself first; at most ``tree_limit`` batches
    tree_truncated: bool
    continuations: list[ContinuationRow] = field(default_factory=list)

    @property
    def root(self) -> TreeEntry:
        return self.tree[0]


@dataclass(frozen=True, slots=True)
class JobRow:
    id: str
    position: int
    status: RunStatus
    task_name: str
    args: str  # kombu JSON text, possibly truncated
    kwargs: str
    queue: str | None
    retries: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    result: str | None = None  # its return value's JSON (a results=True batch's completed job), possibly truncated

    @property
    def duration(self) -> timedelta | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass(frozen=True, slots=True)
class RunDetail:
    """One job as its own page shows it: the job (untruncated), its batch and its traceback."""

    job: JobRow
    batch: BatchRef
    traceback: str | None = None


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: list[JobRow]
    has_previous: bool
    has_next: bool
