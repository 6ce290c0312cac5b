"""The registry's plain values: the clock, text as a database stores it, a run transition, what a
transaction made publishable, and rows turned into the public models."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple

import sqlalchemy as sa

from .. import kombujson

from ..message import Message
from ..models import (Batch, BatchStatus, Continuation, ContinuationKind, ContinuationStatus, JobRun, RunStatus,
                      canonical_id)
from ..settings import ERROR_CHARS

__all__ = ["Created", "Finished", "Publication", "RunEvent", "as_utc", "error_text", "batch_from_row",
           "continuation_from_row", "continuation_message", "from_epoch", "is_run_id", "run_from_row", "run_message",
           "storable_text", "traceback_text", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def from_epoch(epoch: float | None) -> datetime | None:
    """A signal's epoch seconds as an aware UTC datetime."""
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)


def storable_text(text: str | None) -> str | None:
    """Untrusted text (an exception's message) as every database can store it.

    PostgreSQL text cannot hold NUL, and no UTF-8 database takes a lone surrogate (what
    ``os.fsdecode`` makes of a non-UTF-8 path); either would fail the whole transaction that
    carries it, on every retry. Both are written as backslash escapes instead.
    """
    if not text:
        return text
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def error_text(exc: object, prefix: str = "") -> str | None:
    """An exception as a run or continuation keeps it: ``<prefix><Type>: <message>``, at most
    ``ERROR_CHARS`` characters (None for no exception)."""
    if exc is None:
        return None
    return f"{prefix}{type(exc).__name__}: {exc}"[:ERROR_CHARS]


#: what replaces the beginning of a traceback longer than ``traceback_max_chars``
TRACEBACK_CUT = "[... the traceback's beginning was cut]\n"


def traceback_text(einfo: object, max_chars: int) -> str | None:
    """A failure's traceback (Celery's ``ExceptionInfo``, or its text) as a run keeps it: at most
    ``max_chars`` characters, its end kept (the raising frame and the exception); None for none or 0."""
    text = getattr(einfo, "traceback", einfo)
    if not max_chars or not isinstance(text, str) or not text:
        return None
    if len(text) <= max_chars:
        return text
    if max_chars <= 2 * len(TRACEBACK_CUT):
        return text[-max_chars:]
    return TRACEBACK_CUT + text[-(max_chars - len(TRACEBACK_CUT)):]


def is_run_id(value: object) -> bool:
    """Run ids are UUIDs (the Celery task id a batch gave its member); anything else is not ours."""
    return canonical_id(value) == str(value).lower()


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class Created(NamedTuple):
    """A batch a transaction created (a top-level batch, a nested one, a continue-with stage)."""

    batch_id: str
    name: str
    jobs: int  # its units, as ``Batch.total_jobs`` counts them


class Finished(NamedTuple):
    """A batch a transaction finished: COMPLETED, FAILED or CANCELLED."""

    batch_id: str
    name: str
    status: BatchStatus
    jobs: int
    seconds: float  # from its creation to this transaction


@dataclass
class Publication:
    """What a transaction made publishable, to publish after it commits: runs and continuations,
    under the transaction's publish lease (``publication``, a row of the publications table); and
    the batches it created and finished, announced once after the commit
    (:func:`celery_batches.signals.announce`, which empties both lists)."""

    runs: list[Message] = field(default_factory=list)
    continuations: list[Message] = field(default_factory=list)
    lease: str | None = None
    created: list[Created] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)

    def extend(self, other: "Publication") -> None:
        self.runs += other.runs
        self.continuations += other.continuations
        self.lease = self.lease or other.lease
        self.created += other.created
        self.finished += other.finished


@dataclass(frozen=True, slots=True)
class RunEvent:
    """A run's transition as a worker signal saw it: the unit of the group commit."""

    run_id: str
    status: RunStatus
    retries: int = 0
    error: str | None = None
    at: float = field(default_factory=time.time)  # when the signal fired (epoch seconds)
    started: float | None = None  # a final event's folded RUNNING time
    node: str | None = None  # RUNNING: the ``<node>/<pid>`` running it (when its claim could not be written);
    # RETRYING clears it: the retry is a new message, whoever holds it marks it
    result: str | None = None  # COMPLETED in a results=True batch: the return value's JSON
    continuation: bool = False  # FAILED only: ``run_id`` is a continuation's, whose message no worker can run
    traceback: str | None = None  # FAILED only: the failed attempt's traceback, already cut to the setting

    def rank(self) -> tuple[int, int]:
        """Order of two progress events of one run: the later attempt, then RETRYING after RUNNING."""
        return (self.retries, int(self.status == RunStatus.RETRYING))


def run_message(row: sa.Row) -> Message:
    """A run row as the message that publishes it: its next attempt is ``retries`` (0 for a new run)."""
    return Message(str(row.id), row.task_name, row.args, row.kwargs, row.options, str(row.batch_id),
                   retries=getattr(row, "retries", 0) or 0)


def continuation_message(row: sa.Row) -> Message:
    """A continuation row as the message that publishes it (it knows the batch that fired it)."""
    return Message(str(row.id), row.task_name, row.args, row.kwargs, row.options, continuation_of=str(row.batch_id))


def batch_from_row(row: sa.Row) -> Batch:
    return Batch(
        id=row.id, name=row.name, parent_id=row.parent_id, status=BatchStatus(row.status),
        total_jobs=row.total_jobs, completed_jobs=row.completed_jobs, failed_jobs=row.failed_jobs,
        cancelled_jobs=row.cancelled_jobs, created_by=row.created_by, created_at=as_utc(row.created_at),
        completed_at=as_utc(row.completed_at), expires_at=as_utc(row.expires_at),
        description=row.description, properties=json.loads(row.properties) if row.properties else {},
        tags=tuple(json.loads(row.tags)) if row.tags else (), cancel_on_failure=bool(row.cancel_on_failure),
        max_concurrency=row.max_concurrency, results=bool(row.results),
    )


def run_from_row(row: sa.Row) -> JobRun:
    return JobRun(
        id=row.id, batch_id=row.batch_id, task_name=row.task_name, args=kombujson.loads(row.args),
        kwargs=kombujson.loads(row.kwargs), queue=row.queue, status=RunStatus(row.status), order=row.position,
        created_at=as_utc(row.created_at), started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at), error=row.error, retries=row.retries,
        traceback=getattr(row, "traceback", None),
    )


def continuation_from_row(row: sa.Row) -> Continuation:
    return Continuation(row.id, row.batch_id, ContinuationKind(row.kind), row.task_name, kombujson.loads(row.args),
                        kombujson.loads(row.kwargs), ContinuationStatus(row.status), as_utc(row.dispatched_at), row.error)
