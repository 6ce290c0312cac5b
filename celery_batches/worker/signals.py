"""Thin Celery signal handlers: turn task signals into run transitions for the group commit.

Where each signal runs matters (docs/architecture.md, "Where Celery sends each signal"):
``task_prerun``/``task_success``/``task_retry`` and ordinary ``task_failure`` run in the pool child
with the request (and our header) at hand;
``task_failure`` for a lost worker or a hard time limit runs in the worker's main process with no
request, so there the run is found by its task id alone. Handlers are connected strongly
(``weak=False``) with a ``dispatch_uid`` per ``Node``, and only act on tasks of
their own app. Fork safety needs no signal: the engine and the group commit notice a new pid.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from celery import signals

from .. import kombujson
from ..builder import RESULTS_HEADER
from ..models import RunStatus
from ..outbox import CONTINUATION_HEADER, HEADER
from ..settings import ERROR_CHARS
from ..store import RunEvent

if TYPE_CHECKING:
    from .node import Node

__all__ = ["connect"]

log = logging.getLogger(__name__)


def connect(node: "Node") -> None:
    app = node.app
    uid = f"celery_batches:{id(node)}"
    add = node.record

    def member(sender: Any) -> tuple[Any, str | None]:
        """The current request and its batch id, for a task of our app running in this process."""
        if getattr(sender, "app", None) is not app:
            return None, None
        request = sender.request
        return request, getattr(request, HEADER, None)

    def on_prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        request, batch_id = member(sender)
        if request is not None and not batch_id and getattr(request, CONTINUATION_HEADER, None):
            # a continuation notes its first start (recovery's lost-message search needs to know it ran)
            request.celery_batches_claim = node.claim_continuation(task_id or request.id)
            return
        if batch_id:
            # synchronous: the run names this process before its body runs, so if the process dies
            # (with whatever it had buffered) recovery knows the run was executing here
            claim = node.claim(task_id or request.id, request.retries or 0)
            request.celery_batches_claim = claim
            if claim is None:
                add(RunEvent(task_id or request.id, RunStatus.RUNNING, request.retries or 0,
                             node=f"{node.name}/{os.getpid()}"))

    def on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
        request, batch_id = member(sender)
        if not batch_id:
            return
        if not getattr(request, RESULTS_HEADER, None):
            add(RunEvent(request.id, RunStatus.COMPLETED, request.retries or 0))
            return
        kept, error = kombujson.keep(result, node.settings.result_max_bytes)
        if error is None:
            add(RunEvent(request.id, RunStatus.COMPLETED, request.retries or 0, result=kept))
        else:  # the batch promised its continuations this value and cannot keep it: the run fails
            add(RunEvent(request.id, RunStatus.FAILED, request.retries or 0, error[:ERROR_CHARS]))

    def on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app and getattr(request, HEADER, None):
            add(RunEvent(request.id, RunStatus.RETRYING, request.retries or 0, _error(reason)))

    def on_failure(sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any) -> None:
        request, batch_id = member(sender)
        if request is None or not task_id:
            return
        if request.id == task_id:  # pool child: we know whether it is a member
            if batch_id:
                add(RunEvent(task_id, RunStatus.FAILED, request.retries or 0, _error(exception)))
        else:  # main process (lost worker, hard time limit): look it up by task id when writing
            add(RunEvent(task_id, RunStatus.FAILED, 0, _error(exception)))

    def on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
        # main process; the request may lack our header, so the write looks the run up by id
        if getattr(sender, "app", None) is app and getattr(request, "id", None):
            add(RunEvent(request.id, RunStatus.CANCELLED, 0, "revoked"))

    def on_process_shutdown(**_: Any) -> None:
        node.group_commit.close()

    for signal, handler in (
        (signals.task_prerun, on_prerun),
        (signals.task_success, on_success),
        (signals.task_retry, on_retry),
        (signals.task_failure, on_failure),
        (signals.task_revoked, on_revoked),
        (signals.worker_process_shutdown, on_process_shutdown),
    ):
        signal.connect(handler, weak=False, dispatch_uid=f"{uid}:{handler.__name__}")


def _error(exc: Any) -> str | None:
    if exc is None:
        return None
    text = f"{type(exc).__name__}: {exc}"
    return text[:ERROR_CHARS]
