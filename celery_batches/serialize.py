"""The JSON shapes of batches, jobs and continuations, and the one date format for people.

``celery -A proj batches list|show|jobs --json`` and the dashboard's JSON API (``/api/batches…``, see
docs/dashboard.md) print exactly these dictionaries; the dashboard adds only its ``url`` links.
The outcomes of the other commands (``migrate``, ``wait``, ``cancel``, ``retry``, ``purge``) are the
small objects at the end; ``cancel`` and ``retry`` have the keys of the dashboard's POST answers.
Every value is plain JSON already: times are ISO 8601 strings in UTC, statuses their names, the
stored (kombu) JSON of arguments is decoded.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from .models import BatchStatus, JobResult
from .store.pagerows import BatchDetail, BatchRef, BatchRow, ContinuationRow, Counts, JobRow, RunDetail, TreeEntry

__all__ = [
    "PROGRESS_DIGITS",
    "batch_json",
    "cancel_json",
    "continuation_json",
    "counts_json",
    "detail_json",
    "iso",
    "job_json",
    "migrate_json",
    "purge_json",
    "ref_json",
    "results_json",
    "retry_json",
    "run_json",
    "stored_json",
    "tree_entry_json",
    "wait_json",
    "when",
]

PROGRESS_DIGITS = 4  # decimals of a batch's "progress" (0.0–1.0) in JSON
WHEN_FORMAT = "%Y-%m-%d %H:%M:%S"  # how tables and pages show a time (UTC, no zone suffix)


def iso(value: datetime | None) -> str | None:
    """A time as JSON: ISO 8601 with its UTC offset (``2026-11-28T15:20:45.717772+00:00``), or None."""
    return value.isoformat() if value is not None else None


def when(value: datetime | None, empty: str = "") -> str:
    """A time for people (``2026-11-28 15:20:45``, UTC), or ``empty`` when there is none."""
    return value.strftime(WHEN_FORMAT) if value else empty


def stored_json(text: str | None) -> Any:
    """Arguments as stored (kombu JSON text), decoded; text that is not JSON (truncated) as is."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def counts_json(c: Counts) -> dict[str, int]:
    """Outcome counters: ``total``, ``completed``, ``failed``, ``cancelled``, ``pending``."""
    return {"total": c.total, "completed": c.completed, "failed": c.failed, "cancelled": c.cancelled,
            "pending": c.pending}


def batch_json(row: BatchRow) -> dict[str, Any]:
    """A batch with its counters, progress (:attr:`Batch.progress <celery_batches.Batch.progress>`),
    its number of child batches and its continue-with link."""
    b = row.batch
    return {
        "id": b.id, "name": b.name, "status": b.status.name, "parent_id": b.parent_id,
        "total_jobs": b.total_jobs, "completed_jobs": b.completed_jobs, "failed_jobs": b.failed_jobs,
        "cancelled_jobs": b.cancelled_jobs, "pending_jobs": b.pending_jobs,
        "progress": round(b.progress, PROGRESS_DIGITS), "children": row.children, "created_by": b.created_by,
        "created_at": iso(b.created_at), "completed_at": iso(b.completed_at), "expires_at": iso(b.expires_at),
        "antecedent_id": row.antecedent_id, "continue_when": row.continue_when,
        "description": b.description, "properties": b.properties, "tags": list(b.tags),
        "cancel_on_failure": b.cancel_on_failure, "max_concurrency": b.max_concurrency, "results": b.results,
    }


def ref_json(r: BatchRef | None) -> dict[str, Any] | None:
    """A link to another batch: ``id``, ``name``, ``status`` (and ``continue_when`` for a stage)."""
    if r is None:
        return None
    data: dict[str, Any] = {"id": r.id, "name": r.name, "status": r.status.name}
    if r.continue_when:
        data["continue_when"] = r.continue_when
    return data


def tree_entry_json(n: TreeEntry) -> dict[str, Any]:
    """One batch of a subtree: its own ``units``, its direct ``jobs`` and the ``subtree_jobs`` roll-up."""
    return {
        "id": n.id, "name": n.name, "parent_id": n.parent_id, "status": n.status.name, "depth": n.depth,
        "units": counts_json(n.units), "jobs": counts_json(n.jobs), "subtree_jobs": counts_json(n.subtree_jobs),
        "subtree_batches": n.subtree_batches,
    }


def continuation_json(c: ContinuationRow) -> dict[str, Any]:
    """A continuation: ``kind`` is ``success``, ``failure`` or ``complete``; ``error`` says why a
    FAILED one could not be published."""
    return {
        "id": c.id, "kind": c.kind, "task_name": c.task_name, "args": stored_json(c.args),
        "kwargs": stored_json(c.kwargs), "status": c.status.name, "due_at": iso(c.due_at),
        "dispatched_at": iso(c.dispatched_at), "error": c.error,
    }


def job_json(job: JobRow) -> dict[str, Any]:
    """A job (one run of a batch); ``duration`` in seconds once it has finished."""
    return {
        "id": job.id, "position": job.position, "status": job.status.name, "task_name": job.task_name,
        "args": stored_json(job.args), "kwargs": stored_json(job.kwargs), "queue": job.queue,
        "retries": job.retries, "created_at": iso(job.created_at), "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "duration": job.duration.total_seconds() if job.duration is not None else None, "error": job.error,
        "result": None if job.result is None else stored_json(job.result),
    }


def run_json(d: RunDetail) -> dict[str, Any]:
    """One job on its own (the dashboard's ``/api/runs/<id>``): :func:`job_json`'s keys, its
    ``batch`` (:func:`ref_json`) and its ``traceback`` (a FAILED run's last attempt's, else None)."""
    return dict(job_json(d.job), batch=ref_json(d.batch), traceback=d.traceback)


def results_json(results: list[JobResult]) -> list[dict[str, Any]]:
    """A ``results=True`` batch's units in order (:meth:`Batches.get_results
    <celery_batches.Batches.get_results>`): ``run_id`` (a nested batch's id), ``status``, ``value``
    (a nested batch's own list) and ``error``."""
    return [{"run_id": r.run_id, "status": r.status.name,
             "value": results_json(r.value) if isinstance(r.status, BatchStatus) else r.value, "error": r.error}
            for r in results]


def detail_json(d: BatchDetail) -> dict[str, Any]:
    """A batch with its neighbourhood: ``batch``, ``ancestors`` (root first), ``antecedent``,
    ``successors``, its direct ``jobs``, the ``subtree`` roll-up, the ``tree`` (depth-first) and
    its ``continuations``."""
    return {
        "batch": batch_json(d.row),
        "ancestors": [ref_json(a) for a in d.ancestors],
        "antecedent": ref_json(d.antecedent),
        "successors": [ref_json(s) for s in d.successors],
        "jobs": counts_json(d.root.jobs),
        "subtree": dict(counts_json(d.root.subtree_jobs), batches=d.root.subtree_batches),
        "tree": [tree_entry_json(n) for n in d.tree],
        "tree_truncated": d.tree_truncated,
        "continuations": [continuation_json(c) for c in d.continuations],
    }


# -- the outcomes of the command line's actions ----------------------------------------------------

def migrate_json(database: str, revision: str) -> dict[str, Any]:
    """``migrate``: the registry (its URL without the password) and the schema revision it is at."""
    return {"database": database, "revision": revision}


def wait_json(row: BatchRow, *, timed_out: bool) -> dict[str, Any]:
    """``wait``: the batch as it was last read, and whether the wait gave up before it finished."""
    return {"batch": batch_json(row), "timed_out": timed_out}


def cancel_json(batch_id: str, cancelled_runs: int, batch_status: BatchStatus | None) -> dict[str, Any]:
    """``cancel``: the runs it cancelled (0 for a batch that had already finished) and the batch's status after."""
    return {"batch_id": batch_id, "cancelled_runs": cancelled_runs,
            "batch_status": batch_status.name if batch_status is not None else None}


def retry_json(batch_id: str, retried_runs: int, batch_status: BatchStatus | None) -> dict[str, Any]:
    """``retry``: the failed runs it published again and the batch's status after."""
    return {"batch_id": batch_id, "retried_runs": retried_runs,
            "batch_status": batch_status.name if batch_status is not None else None}


def purge_json(deleted_batches: int) -> dict[str, Any]:
    """``purge``: how many batches it deleted (the expired top-level ones and every batch of their trees)."""
    return {"deleted_batches": deleted_batches}


def metrics_json(snap: Any) -> dict[str, Any]:
    """The metrics' numbers (a ``store.tallies.Snapshot``): ``batches metrics --json``."""
    data = dataclasses.asdict(snap)
    data["duration_buckets"] = [["+Inf" if le == float("inf") else le, n] for le, n in snap.duration_buckets]
    return data
