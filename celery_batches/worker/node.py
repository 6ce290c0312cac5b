"""The worker's one seam to the registry: what signal handlers, ``BatchTask``, the bootstep and the
relay may ask of it, and nothing else.

``Batches`` builds one ``Node`` and hands it to the worker modules (as dramatiq hands a broker to
its middleware): record a transition, claim a run or a continuation as it starts, decide whether
a delivery runs, commit a group of transitions and publish what they made due.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, Sequence

import sqlalchemy as sa

from .. import retry
from ..models import BatchStatus, RunStatus
from ..store import RunEvent, refused_for_good, utcnow
from ..store.rows import error_text
from ..store.liveness import UNCLAIMED, Claim
from ..store.migrate import check_schema
from .groupcommit import GroupCommit

if TYPE_CHECKING:
    from celery import Celery

    from ..publishing.publisher import Publisher
    from ..settings import Settings
    from ..store import Transitions
    from ..store.liveness import Liveness

__all__ = ["Node", "Verdict"]

log = logging.getLogger(__name__)
Verdict = Literal["run", "skip", "cancel"]


def _refusal(event: RunEvent, exc: BaseException) -> RunEvent | None:
    """What to record instead of a transition the registry refuses for good: the run FAILED, saying why."""
    if event.status == RunStatus.FAILED and event.error and event.error.startswith("celery_batches:"):
        return None  # already a refusal
    return replace(event, status=RunStatus.FAILED, result=None, node=None,
                   error=error_text(exc, f"celery_batches: the registry refused this run's {event.status.name} "
                                         "transition: "))


class Node:
    """This worker process's incarnation (a restarted worker is a new node; pool processes inherit
    it), with the registry parts the worker uses."""

    def __init__(self, app: "Celery", settings: "Settings", transitions: "Transitions", liveness: "Liveness",
                 publisher: "Publisher") -> None:
        self.app = app
        self.settings = settings
        self._transitions = transitions
        self._liveness = liveness
        self._publisher = publisher
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.group_commit: GroupCommit[RunEvent] = GroupCommit(
            self.write_events, interval=settings.flush_interval, max_events=settings.flush_max,
            max_delay=settings.write_retry_max_delay, refused_for_good=refused_for_good, replace_refused=_refusal)

    def check_schema(self) -> None:
        """Raise ``SchemaTooOld`` if the registry's schema is older than this code (a worker refuses to
        start on it). A registry that cannot be reached now is not judged: the worker waits for it."""
        try:
            found = check_schema(self._transitions.engine, self.settings.table_prefix)
        except sa.exc.DBAPIError:
            log.error("celery_batches: cannot read the registry's schema revision at start", exc_info=True)
            return
        if found is None:
            log.warning("celery_batches: the registry has no schema yet (tables %s*): run `celery -A <your app> "
                        "batches migrate`; until then this worker's registry writes are retried",
                        self.settings.table_prefix)

    def record(self, event: RunEvent) -> None:
        """Hand a transition to this process's group commit (never waits for the database)."""
        self.group_commit.add(event)

    def write_events(self, events: Sequence[RunEvent]) -> None:
        """Commit a group of run transitions, then publish what it made due."""
        self._publisher.publish(self._transitions.apply_events(events))

    def claim(self, run_id: str, retries: int, *, force: bool = False, replaces: str | None = None) -> Claim | None:
        """As a member starts: mark its run RUNNING on this process (see ``Liveness.claim``; ``force``
        for a plain task, which runs anyway; ``replaces``: the claim a replacement takes over).

        An unreachable registry is waited for (``retry.CLAIM``): a member that ran with no claim
        could have its message published again and run twice. None only if the registry refuses
        the claim itself: the member runs, its RUNNING goes through the group commit."""
        # <node>/<pid>/<delivery>: a repeat of this claim (its commit went unanswered) finds the run its own
        owner = f"{self.name}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        try:
            return retry.call(lambda: self._liveness.claim(run_id, retries, owner, utcnow(), force=force,
                                                          replaces=replaces), retry.CLAIM, "claim", log)
        except sa.exc.DBAPIError:
            log.error("celery_batches: the registry refused the claim of run %s; running it", run_id, exc_info=True)
            return None

    def claim_continuation(self, continuation_id: str, token: str, retries: int = 0) -> bool | None:
        """As a continuation starts: True if this delivery is its first (or a later attempt of it, or
        its replacement), False if an earlier one claimed it, None if it is no continuation of ours
        (or the registry refuses the claim). An unreachable registry is waited for, as for a run."""
        try:
            return retry.call(lambda: self._liveness.claim_continuation(continuation_id, token, retries), retry.CLAIM,
                              "continuation claim", log)
        except sa.exc.DBAPIError:
            log.error("celery_batches: the registry refused the claim of continuation %s; running it",
                      continuation_id, exc_info=True)
            return None

    def verdict(self, run_id: str, continuation_of: str | None, claim: Any = UNCLAIMED) -> Verdict:
        """Before a ``BatchTask`` delivery runs: "run", "skip" (already finished: a redelivery or a
        republish of a finished run, or a continuation that already ran) or "cancel" (the run or its
        batch was cancelled). A registry that cannot be read says "run": failing the task would be worse."""
        if continuation_of is not None:
            claimed = self.claim_continuation(run_id, uuid.uuid4().hex) if claim is UNCLAIMED else claim
            return "skip" if claimed is False else "run"
        if claim is UNCLAIMED:
            claim = self.claim(run_id, 0)
        if claim is None or claim.run_status is None:
            return "run"  # no registry to ask, or not a run of ours
        if claim.run_status == RunStatus.CANCELLED or (
                claim.batch_status == BatchStatus.CANCELLED and not claim.run_status.is_final):
            return "cancel"
        if claim.claimed:
            return "run"
        if claim.run_status == RunStatus.RUNNING:  # running elsewhere: this delivery's message is gone unrun
            self._write("note a delivery skipped", self._liveness.consumed, run_id)
        return "skip"

    def hand_back(self, run_id: str, owner: str | None, *, replaced_by: str | None = None) -> None:
        """A run this delivery claimed goes back to PENDING for the next delivery (its message is
        requeued) or for its replacement (``replaced_by``: ``Task.replace()``). It waits for the
        registry, however long, as a claim does: the message that carries the run on goes out only
        after it, and a run left RUNNING on a live process whose delivery ended would wait forever
        (no recovery takes a live process's run; a replacement lost on the way would never come)."""
        try:
            retry.call(lambda: self._liveness.hand_back(run_id, owner, replaced_by=replaced_by), retry.CLAIM,
                       "hand back a run", log)
        except Exception:  # noqa: BLE001 - not a passing connection error: the task goes on either way
            log.exception("celery_batches: could not hand back run %s", run_id)

    def hand_back_continuation(self, continuation_id: str, token: str | None) -> None:
        """A continuation this delivery claimed is claimable again (its message is requeued)."""
        self._write("hand back a continuation", self._liveness.hand_back_continuation, continuation_id, token)

    def close(self) -> None:
        """Commit what this process's group commit holds (the process or the worker is stopping)."""
        self.group_commit.close()

    def _write(self, what: str, write: Any, *args: Any, **kwargs: Any) -> Any:
        """A registry write a pool process makes before it goes on (a continuation handed back, a
        skipped delivery noted): repeated if its connection died; logged, not raised, if it still fails
        (recovery resolves what it would have said)."""
        try:
            return retry.call(lambda: write(*args, **kwargs), retry.READ, what, log)
        except Exception:  # noqa: BLE001 - the task goes on either way
            log.exception("celery_batches: could not %s", what)
            return None
