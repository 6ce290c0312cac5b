"""BatchBuilder: collects jobs, child batches and continuations, and validates them. No I/O.

Everything is checked and serialised when it is added, so a bad job raises inside the ``with``
block, before anything is written or published.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Self

from celery import Task
from celery.canvas import Signature
from kombu import serialization

from . import kombujson
from .errors import BatchClosedError, BatchError, BatchNotFoundError, InvalidBatchError
from .message import RESULTS_HEADER, Message
from .models import ContinuationKind
from .settings import MAX_DESCRIPTION, MAX_NAME, MAX_TAG

if TYPE_CHECKING:
    from celery import Celery

    from .models import Batch

__all__ = ["BatchBuilder", "TaskRef"]

TaskRef = Task | str | Signature
# options a batch sets itself; a Signature carrying them would be silently overridden
_RESERVED_OPTIONS = frozenset({"task_id", "headers", "chord", "group_id", "group_index"})


@dataclass(frozen=True, slots=True)
class ContinuationSpec:
    kind: ContinuationKind
    message: Message
    immutable: bool = False  # given as .si(): gets no results list, as an immutable chord body


@dataclass
class BatchPlan:
    """A batch to write: its jobs (in enqueue order), child batches and continuations."""

    id: str
    name: str
    parent_id: str | None
    created_by: str | None
    jobs: list[Message] = field(default_factory=list)
    children: list["BatchPlan"] = field(default_factory=list)
    continuations: list[ContinuationSpec] = field(default_factory=list)
    description: str | None = None
    properties: str | None = None  # JSON text of an object
    tags: tuple[str, ...] = ()
    cancel_on_failure: bool = False
    max_concurrency: int | None = None
    results: bool = False
    unit_position: int | None = None  # a nested batch's place among its parent's units (jobs and batches)

    @property
    def total_units(self) -> int:
        return len(self.jobs) + len(self.children)

    def walk(self) -> Iterator["BatchPlan"]:
        """Parents before children (the order foreign keys need)."""
        yield self
        for child in self.children:
            yield from child.walk()


def validate_name(name: object, what: str = "batch name") -> str:
    return validate_text(name, what, MAX_NAME)


def validate_text(name: object, what: str, limit: int) -> str:
    """A non-empty string of at most ``limit`` characters that every database can store."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidBatchError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > limit:
        raise InvalidBatchError(f"{what} is {len(name)} characters long; the limit is {limit}")
    if "\x00" in name:  # PostgreSQL text cannot hold it
        raise InvalidBatchError(f"{what} contains a NUL character: {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (os.fsdecode of a non-UTF-8 name): no database stores it
        raise InvalidBatchError(f"{what} is not valid Unicode text: {name!r}") from None
    return name


def validate_properties(properties: object, what: str = "properties") -> dict[str, Any]:
    """A JSON object (a dict of str keys whose values plain JSON can hold); returned as given."""
    if not isinstance(properties, dict) or not all(isinstance(key, str) for key in properties):
        raise InvalidBatchError(f"{what} must be a dict with string keys (a JSON object), got {properties!r}")
    try:
        json.dumps(properties, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidBatchError(f"{what} must hold JSON values only: {exc}") from None
    return properties


def validate_tags(tags: object) -> tuple[str, ...]:
    """Short strings (each at most ``MAX_TAG`` characters), given as a list, tuple or set; duplicates dropped."""
    if isinstance(tags, (str, bytes)) or not isinstance(tags, (list, tuple, set, frozenset)):
        raise InvalidBatchError(f"tags must be a list of strings, got {tags!r}")
    out: list[str] = []
    for tag in tags:
        tag = validate_text(tag, "a tag", MAX_TAG)
        if tag not in out:
            out.append(tag)
    return tuple(sorted(out) if isinstance(tags, (set, frozenset)) else out)


def _labels(plan: BatchPlan, description: str | None, properties: dict[str, Any] | None, tags: Any) -> None:
    """Validate a batch's description, properties and tags into its plan."""
    plan.description = None if description is None else validate_text(description, "description", MAX_DESCRIPTION)
    plan.properties = None if properties is None else json.dumps(validate_properties(properties))
    plan.tags = validate_tags(tags)


class BatchBuilder:
    """Collects a batch's content; obtained from ``Batches.batch()`` or passed to ``configure``."""

    def __init__(self, app: "Celery", name: str, *, created_by: str | None = None,
                 parent_id: str | None = None, batch_id: str | None = None, description: str | None = None,
                 properties: dict[str, Any] | None = None, tags: Iterable[str] = (),
                 cancel_on_failure: bool = False, max_concurrency: int | None = None,
                 results: bool = False) -> None:
        self._app = app
        self._serializer = app.conf.task_serializer  # read once: a Celery setting lookup costs more than a job
        created_by = None if created_by is None else validate_name(created_by, "created_by")
        self._plan = BatchPlan(batch_id or str(uuid.uuid4()), validate_name(name), parent_id, created_by)
        _labels(self._plan, description, properties, tags)
        if not isinstance(cancel_on_failure, bool):
            raise InvalidBatchError(f"cancel_on_failure must be True or False, got {cancel_on_failure!r}")
        self._plan.cancel_on_failure = cancel_on_failure
        if max_concurrency is not None and (not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool)
                                            or max_concurrency < 1):
            raise InvalidBatchError(f"max_concurrency must be a positive integer or None, got {max_concurrency!r}")
        self._plan.max_concurrency = max_concurrency
        if not isinstance(results, bool):
            raise InvalidBatchError(f"results must be True or False, got {results!r}")
        self._plan.results = results
        self._units = 0  # units (jobs and nested batches) added so far: a nested batch's place
        self._closed = False
        self._open_children = 0

    @classmethod
    def reopening(cls, app: "Celery", batch_id: str, batch: "Batch | None") -> Self:
        """The builder that adds to ``batch`` (as read under ``batch_id``): ``BatchNotFoundError`` if
        there is none, ``BatchClosedError`` if it is finished or cancelled."""
        if batch is None:
            raise BatchNotFoundError(batch_id)
        if batch.is_finished:
            raise BatchClosedError(batch_id, batch.status)
        return cls(app, batch.name, created_by=batch.created_by, batch_id=batch_id, results=batch.results)

    @property
    def id(self) -> str:
        """The batch id, known before the batch is committed."""
        return self._plan.id

    @property
    def name(self) -> str:
        return self._plan.name

    # -- jobs ---------------------------------------------------------------------------------
    def enqueue(self, task: TaskRef, *args: Any, **kwargs: Any) -> str:
        """Add a job; returns its run id, which is also its Celery task id."""
        self._check_open()
        position = len(self._plan.jobs) + 1
        message = self._message(task, args, kwargs, f"job #{position} of batch {self.name!r}", self.id,
                                results=self._plan.results)
        self._plan.jobs.append(message)
        self._units += 1
        return message.id

    # -- nested batches -----------------------------------------------------------------------
    @contextmanager
    def batch(self, name: str, *, description: str | None = None, properties: dict[str, Any] | None = None,
              tags: Iterable[str] = (), cancel_on_failure: bool = False,
              max_concurrency: int | None = None) -> Iterator["BatchBuilder"]:
        """A nested batch, counted as one unit of this batch (its own ``max_concurrency``, if any)."""
        self._check_open()
        child = type(self)(self._app, name, created_by=self._plan.created_by, parent_id=self.id,
                             description=description, properties=properties, tags=tags,
                             cancel_on_failure=cancel_on_failure, max_concurrency=max_concurrency,
                             results=self._plan.results)  # a nested batch's results are part of ours
        self._open_children += 1
        try:
            yield child
        except BaseException:
            child.discard()
            raise
        finally:
            self._open_children -= 1
        child._plan.unit_position = self._units  # its place among the units: where its block ended
        self._units += 1
        self._plan.children.append(child.seal())

    def add_batch(self, name: str, configure: Callable[["BatchBuilder"], Any], **options: Any) -> str:
        """Callback-style nested batch: ``configure(child)``; returns the child batch id. ``options``:
        every keyword :meth:`batch` takes."""
        with self.batch(name, **options) as child:
            configure(child)
        return child.id

    # -- continuations ------------------------------------------------------------------------
    def on_success(self, task: TaskRef, *args: Any, **kwargs: Any) -> None:
        """Run ``task`` once if the batch COMPLETES (every unit completed)."""
        self._continuation(ContinuationKind.SUCCESS, task, args, kwargs)

    def on_failure(self, task: TaskRef, *args: Any, **kwargs: Any) -> None:
        """Run ``task`` once if the batch FAILS (every unit finished, some failed or were cancelled)."""
        self._continuation(ContinuationKind.FAILURE, task, args, kwargs)

    def on_complete(self, task: TaskRef, *args: Any, **kwargs: Any) -> None:
        """Run ``task`` once when the batch finishes, COMPLETED or FAILED."""
        self._continuation(ContinuationKind.COMPLETE, task, args, kwargs)

    def on_first_failure(self, task: TaskRef, *args: Any, **kwargs: Any) -> None:
        """Run ``task`` once, as soon as a unit of the batch fails (a job out of retries, or a nested
        batch that finished FAILED), without waiting for the rest; never if none fails."""
        self._continuation(ContinuationKind.FIRST_FAILURE, task, args, kwargs)

    def _continuation(self, kind: ContinuationKind, task: TaskRef, args: tuple, kwargs: dict) -> None:
        """A continuation is a task, a task name or a signature, as a job is, or a chain: its first
        task is published when the batch fires it, the rest ride along as Celery's own chain does."""
        self._check_open()
        what = f"on_{kind.value} continuation of batch {self.name!r}"
        if isinstance(task, Signature) and task.get("subtask_type") == "chain":
            task = _chain_head(task, what)
        immutable = isinstance(task, Signature) and bool(task.immutable)
        self._plan.continuations.append(ContinuationSpec(kind, self._message(task, args, kwargs, what, None),
                                                         immutable))

    # -- what Batches does when the block ends (user code never needs these) -------------------
    @property
    def job_ids(self) -> list[str]:
        """The run ids of the direct jobs added so far, in enqueue order."""
        return [job.id for job in self._plan.jobs]

    def seal(self) -> BatchPlan:
        """Close the builder and return what to write: ``Batches`` calls this as the block exits."""
        if self._open_children:
            raise BatchError(f"a nested batch of {self.name!r} is still open")
        self._closed = True
        return self._plan

    def discard(self) -> None:
        """Close the builder without writing anything (the block raised)."""
        self._closed = True

    # -- internals ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BatchError(f"batch {self.name!r} is already written; use Batches.reopen() to add to it")

    def _message(self, task: TaskRef, args: tuple, kwargs: dict, what: str, batch_id: str | None, *,
                 results: bool = False) -> Message:
        name, args, kwargs, options = _resolve(task, args, kwargs, what)
        if results:  # the worker keeps the return value of a job carrying this header
            options["headers"] = {**(options.get("headers") or {}), RESULTS_HEADER: True}
        serializer = options.get("serializer") or self._serializer
        try:
            if serializer != "json":  # the broker message must encode with the app's serializer too
                serialization.dumps((args, kwargs, {}), serializer=serializer)
            args_json, kwargs_json = kombujson.dumps(args), kombujson.dumps(kwargs)
            options_json = kombujson.dumps(options) if options else None
        except Exception as exc:  # kombu raises EncodeError, TypeError or ValueError depending on the codec
            raise InvalidBatchError(f"{what} ({name}): arguments or options cannot be serialised: {exc}") from exc
        return Message(str(uuid.uuid4()), name, args_json, kwargs_json, options_json, batch_id)


def _resolve(task: TaskRef, args: tuple, kwargs: dict, what: str) -> tuple[str, list, dict, dict]:
    """Turn a Task, a task name or a Signature into (name, args, kwargs, options)."""
    options: dict[str, Any] = {}
    if isinstance(task, Signature):
        if task.get("subtask_type") or not isinstance(task.task, str):
            raise InvalidBatchError(f"{what}: only a single task's signature can be a job, not {task!r}")
        sig = task.clone(args, kwargs)  # merge extra args/kwargs the way Signature.clone does
        name, args, kwargs, options = sig.task, tuple(sig.args), dict(sig.kwargs), dict(sig.options)
        reserved = _RESERVED_OPTIONS & options.keys()
        if reserved:
            raise InvalidBatchError(f"{what}: option(s) {sorted(reserved)} are set by the batch itself")
        if hasattr(options.get("queue"), "name"):  # a kombu Queue
            options["queue"] = options["queue"].name
        if options.get("queue") is not None:
            validate_name(options["queue"], f"{what}: queue")
        _check_publish_options(options, what)
    elif isinstance(task, Task):
        name = task.name
    elif isinstance(task, str):
        name = task
    else:
        raise InvalidBatchError(f"{what}: expected a Celery task, a task name or a signature, got {task!r}")
    name = validate_name(name, f"{what}: task name")
    return name, list(args), dict(kwargs), options


def _chain_head(chain: Signature, what: str) -> Signature:
    """A chain as its first task's signature carrying the rest, the way ``chain.apply_async`` sends it
    (protocol 2's ``chain`` embed: the remaining signatures, last first): the worker that runs the
    first task calls the next with its return value."""
    tasks = list(chain.tasks)  # type: ignore[attr-defined]
    if not tasks:
        raise InvalidBatchError(f"{what}: the chain is empty")
    head, rest = tasks[0], tasks[1:]
    if not isinstance(head, Signature) or head.get("subtask_type") or not isinstance(head.task, str):
        raise InvalidBatchError(f"{what}: a chain must start with a single task's signature, not {head!r}")
    if "chain" in head.options or any(not isinstance(t, Signature) for t in rest):
        raise InvalidBatchError(f"{what}: a chain's parts must be signatures, not {chain!r}")
    head = head.clone().set(**chain.options)  # the chain's own options go to its first task, as in chain.run
    return head.set(chain=[dict(t) for t in reversed(rest)]) if rest else head


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _when(value: Any) -> bool:
    if isinstance(value, datetime):
        return True
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value)
            return True
        except ValueError:
            return False
    return False


#: publish options Celery reads at publish time, and what each must be: a bad one is refused here,
#: before anything is written (at publish time it would fail only that run, long after the caller left)
_OPTION_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "countdown": (_number, "a number of seconds"),
    "eta": (_when, "a datetime or an ISO 8601 string"),
    "expires": (lambda v: _number(v) or _when(v), "a number of seconds, a datetime or an ISO 8601 string"),
    "priority": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255, "an integer 0-255"),
    "time_limit": (_number, "a number of seconds"),
    "soft_time_limit": (_number, "a number of seconds"),
    "exchange": (lambda v: isinstance(v, str) or hasattr(v, "name"), "an exchange name"),
    "routing_key": (lambda v: isinstance(v, str), "a string"),
    "compression": (lambda v: isinstance(v, str), "a compression name"),
    "serializer": (lambda v: isinstance(v, str), "a serializer name"),
}


def _check_publish_options(options: dict[str, Any], what: str) -> None:
    for name, value in options.items():
        check = _OPTION_CHECKS.get(name)
        if value is not None and check is not None and not check[0](value):
            raise InvalidBatchError(f"{what}: option {name}={value!r} must be {check[1]}")
    if hasattr(options.get("exchange"), "name"):  # a kombu Exchange
        options["exchange"] = options["exchange"].name
