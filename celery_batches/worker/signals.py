"""Thin Celery signal handlers: turn task signals into run transitions for the group commit.

Where each signal runs matters (docs/architecture.md, "Where Celery sends each signal"):
``task_prerun``/``task_success``/``task_retry``/``task_postrun`` and ordinary ``task_failure`` run in
the pool child with the request (and our header) at hand; ``task_failure`` for a lost worker or a
hard time limit, ``task_revoked``, ``task_unknown`` and ``task_rejected`` run in the worker's main
process with no request, so there the run is found by its task id alone. ``before_task_publish``
runs wherever a message is sent: inside a member, it follows the member's ``Task.replace()``.
Handlers are connected strongly (``weak=False``) with a ``dispatch_uid`` per ``Node``, and only act
on tasks of their own app. Fork safety needs no signal: the engine and the group commit notice a
new pid.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

from celery import signals, states

from .. import kombujson
from ..models import RunStatus
from ..message import CONTINUATION_HEADER, HEADER, REPLACES_HEADER, RESULTS_HEADER
from ..publishing.sending import RECEIVER_PREFIX
from ..settings import ERROR_CHARS
from ..store import RunEvent
from ..store.rows import error_text, traceback_text
from .recovery import backend_outcome
from .task import CLAIM, REPLACED, SKIPPED, TOKEN, BatchTask

if TYPE_CHECKING:
    from .node import Node

__all__ = ["connect"]

log = logging.getLogger(__name__)


class Receivers:
    """The signal receivers of one ``Node``: each turns a signal about a task of its app into a run
    transition (handed to the node's group commit) or a registry write of the node."""

    def __init__(self, node: "Node") -> None:
        self.node, self.app = node, node.app

    def _member(self, sender: Any) -> tuple[Any, str | None]:
        """The current request and its batch id, for a task of our app running in this process."""
        if getattr(sender, "app", None) is not self.app:
            return None, None
        request = sender.request
        return request, getattr(request, HEADER, None)

    def on_prerun(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        request, batch_id = self._member(sender)
        if request is not None and not batch_id and getattr(request, CONTINUATION_HEADER, None):
            # a continuation notes its first start (recovery's lost-message search needs to know it ran);
            # its replacement presents the claim of the delivery it replaces
            token = getattr(request, REPLACES_HEADER, None) or str(uuid.uuid4())
            setattr(request, TOKEN, token)
            setattr(request, CLAIM, self.node.claim_continuation(task_id or request.id, token, request.retries or 0))
            return
        if batch_id:
            # synchronous: the run names this process before its body runs, so if the process dies
            # (with whatever it had buffered) recovery knows the run was executing here. A plain
            # task runs whatever the registry says, so its claim takes the run over (``force``).
            claim = self.node.claim(task_id or request.id, request.retries or 0, force=not isinstance(sender, BatchTask),
                               replaces=getattr(request, REPLACES_HEADER, None))
            setattr(request, CLAIM, claim)
            if claim is None:
                self.node.record(RunEvent(task_id or request.id, RunStatus.RUNNING, request.retries or 0,
                             node=f"{self.node.name}/{os.getpid()}"))

    def on_success(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        request, batch_id = self._member(sender)
        if not batch_id:
            return
        if not getattr(request, RESULTS_HEADER, None):
            self.node.record(RunEvent(request.id, RunStatus.COMPLETED, request.retries or 0))
            return
        kept, error = kombujson.keep(result, self.node.settings.result_max_bytes)
        if error is None:
            self.node.record(RunEvent(request.id, RunStatus.COMPLETED, request.retries or 0, result=kept))
        else:  # the batch promised its continuations this value and cannot keep it: the run fails
            self.node.record(RunEvent(request.id, RunStatus.FAILED, request.retries or 0, error[:ERROR_CHARS]))

    def on_retry(self, sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app and getattr(request, HEADER, None):
            self.node.record(RunEvent(request.id, RunStatus.RETRYING, request.retries or 0, error_text(reason)))

    def on_failure(self, sender: Any = None, task_id: str | None = None, exception: Any = None, einfo: Any = None,
                   **_: Any) -> None:
        request, batch_id = self._member(sender)
        if request is None or not task_id:
            return
        # the failed attempt's traceback goes with the failure, in the same transition (and transaction)
        traceback = traceback_text(einfo, self.node.settings.traceback_max_chars)
        if request.id == task_id:  # pool child: we know whether it is a member
            if batch_id:
                self.node.record(RunEvent(task_id, RunStatus.FAILED, request.retries or 0, error_text(exception),
                                          traceback=traceback))
        else:  # main process (lost worker, hard time limit): look it up by task id when writing
            self.node.record(RunEvent(task_id, RunStatus.FAILED, 0, error_text(exception), traceback=traceback))

    def on_revoked(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        # main process; the request may lack our header, so the write looks the run up by id
        if getattr(sender, "app", None) is self.app and getattr(request, "id", None):
            self.node.record(RunEvent(request.id, RunStatus.CANCELLED, 0, "revoked"))

    def on_postrun(self, sender: Any = None, task_id: str | None = None, state: str | None = None, retval: Any = None,
                   **_: Any) -> None:
        """A member or continuation that raised ``Ignore`` or ``Reject`` (no success, failure or retry
        signal follows): its run must still end, or go back to the broker with its message."""
        request, batch_id = self._member(sender)
        continuation = None if request is None else getattr(request, CONTINUATION_HEADER, None)
        if state not in (states.IGNORED, states.REJECTED) or not (batch_id or continuation):
            return
        if getattr(request, SKIPPED, False) or getattr(request, REPLACED, False):
            return  # BatchTask skipped this delivery, or a replacement carries the run on
        run_id, retries = task_id or request.id, request.retries or 0
        if state == states.REJECTED and getattr(retval, "requeue", False):
            # the message goes back to the broker: its next delivery must be able to claim the run
            if batch_id:
                self.node.hand_back(run_id, getattr(getattr(request, CLAIM, None), "owner", None))
            else:
                self.node.hand_back_continuation(run_id, getattr(request, TOKEN, None))
            return
        if not batch_id:
            return  # a continuation fired: how it ended is its own affair, as for any task
        if state == states.REJECTED:  # not requeued: Celery will not run it again
            self.node.record(RunEvent(run_id, RunStatus.FAILED, retries, error_text(retval, "rejected: ")))
            return
        # Ignore: the task may have recorded its own state (update_state, then Ignore); else it did not run
        recorded = backend_outcome(self.app, run_id, self.node.settings.result_max_bytes,
                                   keeps_results=bool(getattr(request, RESULTS_HEADER, None)))
        self.node.record(recorded or RunEvent(run_id, RunStatus.CANCELLED, retries, error_text(retval, "ignored: the task raised ")))

    def on_publish(self, sender: Any = None, body: Any = None, headers: dict | None = None, **_: Any) -> None:
        """A message sent from inside a member or continuation that replaces it (``Task.replace()``:
        Celery gives the replacement the same task id, and one more ``replaced_task_nesting``). The
        replacement is given our headers, so it is recorded as the run, and the run is handed to it."""
        task = self.app.current_worker_task
        if task is None or not headers:
            return
        request = task.request
        batch_id, continuation = getattr(request, HEADER, None), getattr(request, CONTINUATION_HEADER, None)
        if not (batch_id or continuation):
            return
        if (headers.get("replaced_task_nesting") or 0) <= (getattr(request, "replaced_task_nesting", 0) or 0):
            return  # not a replacement: a retry (same nesting), or another task the member sends
        run_id = request.id
        carried = {key: value for key in (HEADER, CONTINUATION_HEADER, RESULTS_HEADER)
                   if (value := getattr(request, key, None))}
        # the claim it takes over: should the run not be handed to it below (the registry is
        # unreachable), its claim can still take the run from this delivery (which, if its own claim
        # failed, the group commit records as running on this process)
        claim = getattr(request, CLAIM, None)
        carried[REPLACES_HEADER] = (getattr(claim, "owner", None) or f"{self.node.name}/{os.getpid()}") if batch_id \
            else getattr(request, TOKEN, None)
        direct = headers.get("id") == run_id
        if direct:
            headers.update(carried)
        elif not (isinstance(body, tuple) and len(body) == 3 and _carry(body[2], run_id, carried)):
            return  # nothing in it holds the member's id: not how Celery replaces a task
        setattr(request, REPLACED, True)
        if batch_id:
            # before the replacement is sent: its delivery then claims the run (and nothing else does)
            self.node.hand_back(run_id, getattr(claim, "owner", None), replaced_by="message" if direct else "canvas")

    def _discarded(self, task_id: str | None, headers: dict, reason: str) -> None:
        """A worker took a message of ours off the broker and will never run it: its run fails at once."""
        if not task_id:
            return
        if headers.get(HEADER):
            self.node.record(RunEvent(task_id, RunStatus.FAILED, headers.get("retries") or 0, f"celery_batches: {reason}"))
        elif headers.get(CONTINUATION_HEADER):
            self.node.record(RunEvent(task_id, RunStatus.FAILED, 0, f"celery_batches: {reason}", continuation=True))

    def on_unknown(self, sender: Any = None, message: Any = None, name: str | None = None, id: str | None = None,
                   **_: Any) -> None:
        if getattr(sender, "app", None) is self.app:
            self._discarded(id, getattr(message, "headers", None) or {},
                         f"no worker knows task {name!r} (this worker discarded its message)")

    def on_rejected(self, sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app:
            headers = getattr(message, "headers", None) or {}
            why = error_text(exc) or "a message in a format the worker does not know"
            self._discarded(headers.get("id"), headers, f"the worker refused its message ({why})")

    def on_process_shutdown(self, **_: Any) -> None:
        self.node.close()


def connect(node: "Node") -> None:
    """Connect the receivers of ``node`` to Celery's signals, strongly, once per node."""
    receivers = Receivers(node)
    uid = f"{RECEIVER_PREFIX}{id(node)}"
    for signal, handler in (
        (signals.task_prerun, receivers.on_prerun),
        (signals.task_success, receivers.on_success),
        (signals.task_retry, receivers.on_retry),
        (signals.task_failure, receivers.on_failure),
        (signals.task_revoked, receivers.on_revoked),
        (signals.task_postrun, receivers.on_postrun),
        (signals.before_task_publish, receivers.on_publish),
        (signals.task_unknown, receivers.on_unknown),
        (signals.task_rejected, receivers.on_rejected),
        (signals.worker_process_shutdown, receivers.on_process_shutdown),
    ):
        signal.connect(handler, weak=False, dispatch_uid=f"{uid}:{handler.__name__}")


def _carry(value: Any, task_id: str, headers: dict[str, Any]) -> bool:
    """Give ``headers`` to the signature (a dict, as a message embeds the rest of a chain or a
    chord's body) that will run as ``task_id``; True if there was one."""
    found = False
    if isinstance(value, dict):
        options = value.get("options")
        if isinstance(options, dict) and options.get("task_id") == task_id:
            options["headers"] = {**(options.get("headers") or {}), **headers}
            found = True
        for item in value.values():
            found = _carry(item, task_id, headers) or found
    elif isinstance(value, (list, tuple)):
        for item in value:
            found = _carry(item, task_id, headers) or found
    return found
