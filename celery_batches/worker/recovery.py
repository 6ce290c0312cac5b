"""Recovery: every run reaches a final state, whatever a worker or the broker lost.

Runs in the relay pass (one node at a time). Four steps, each bounded per pass:

1. **Gone nodes.** A node whose heartbeat this process has not seen change for ``node_timeout``
   seconds is gone (measured on this process's own clock, so clock skew and a registry outage
   that stopped every heartbeat at once do not count). Its RUNNING runs end as Celery would end
   them: FAILED "worker lost", unless the task is ``acks_late`` (Celery redelivers those): then,
   like the runs it had reserved but not started, the run is handed back — its message put back at the
   head of its queue if the broker still holds it for the dead consumer (Redis), else left to the
   lost-message search below (or to the broker: RabbitMQ returns a dead consumer's messages).
2. **Dead pool processes** of a live node: runs they had claimed and not finished end FAILED
   "worker lost" (the process died: a hard time limit, an OOM kill), even where Celery's own
   report of it was lost, or where the outcome was buffered in the process when it died; a task
   Celery runs again when its process dies (``acks_late`` with ``reject_on_worker_lost``, or
   ``retry_on_worker_lost``) is handed back instead, as Celery requeues it.
3. **Runs a cancel left running** that came back to waiting (handed back by step 1, or by the
   search below): nothing publishes a run of a cancelled batch, so they end CANCELLED, as
   ``BatchTask`` would end them if their message were delivered.
4. **Lost messages** (Redis, RabbitMQ: see ``publishing/probe.py`` for what each probe can see): published
   runs that no live node has reserved or runs, older than ``lost_after`` seconds, are looked for in the
   broker. A message in no queue and no consumer's hands at two looks some seconds apart (a message
   in flight between two places is seen at one of them) is published again under a new lease (same
   task id). One unacknowledged that no live node has marked as its own for as long (its
   consumer died) is put back at the head of its queue (Redis; RabbitMQ does that itself).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable, Sequence

from celery import states
from celery.backends.base import DisabledBackend

from .. import kombujson

from ..models import RunStatus
from ..publishing.probe import Probe, Snapshot
from ..store import RunEvent, utcnow
from ..store.rows import as_utc

if TYPE_CHECKING:
    from celery import Celery

    from ..settings import Settings
    from ..store.liveness import Liveness

__all__ = ["Recovery", "backend_outcome"]

log = logging.getLogger(__name__)


def backend_outcome(app: "Celery", run_id: str, result_max_bytes: int, *, keeps_results: bool = False,
                    not_before: datetime | None = None) -> RunEvent | None:
    """The run's outcome as the app's result backend recorded it (SUCCESS, FAILURE, REVOKED), if any.

    ``keeps_results`` (a ``results=True`` batch): a SUCCESS brings its value along, and a value the
    registry cannot keep fails the run, as it would have on the worker. ``not_before`` (when
    ``retry_failed`` put the run back): an outcome dated earlier is an earlier attempt's, not this
    one's. A backend that cannot be read knows nothing this time (the error is logged)."""
    backend = app.backend
    if isinstance(backend, DisabledBackend):
        return None
    try:
        meta = backend.get_task_meta(run_id)
    except Exception as exc:  # noqa: BLE001 - one unreadable outcome must not stop the others
        log.warning("celery_batches: could not read run %s from the result backend: %s: %s",
                    run_id, type(exc).__name__, exc)
        return None
    state, result = meta.get("status"), meta.get("result")
    if state not in (states.SUCCESS, states.FAILURE, states.REVOKED):
        return None
    if not_before is not None and not _dated_since(meta.get("date_done"), not_before):
        return None
    if state == states.SUCCESS:
        if not keeps_results:
            return RunEvent(run_id, RunStatus.COMPLETED)
        kept, error = kombujson.keep(result, result_max_bytes)
        return RunEvent(run_id, RunStatus.COMPLETED, result=kept) if error is None \
            else RunEvent(run_id, RunStatus.FAILED, 0, error)
    if state == states.FAILURE:
        return RunEvent(run_id, RunStatus.FAILED, 0, f"{type(result).__name__}: {result}")
    return RunEvent(run_id, RunStatus.CANCELLED, 0, "revoked")


def _dated_since(date_done: Any, since: datetime) -> bool:
    """Was an outcome recorded at ``date_done`` (a datetime or ISO text, naive meaning UTC) at or
    after ``since``? Unknown dates are not."""
    if isinstance(date_done, str):
        try:
            date_done = datetime.fromisoformat(date_done)
        except ValueError:
            return False
    if not isinstance(date_done, datetime):
        return False
    return as_utc(date_done) >= since


class Recovery:
    def __init__(self, settings: "Settings", app: "Celery", liveness: "Liveness", probe: Probe,
                 record: Callable[[Sequence[RunEvent]], None], me: str) -> None:
        self.app, self.settings, self.liveness, self.probe = app, settings, liveness, probe
        self.record = record  # commit RunEvents and publish what they made due
        self.me = me  # this node's name
        self._seen: dict[str, tuple[object, float]] = {}  # node -> (last heartbeat value, when it changed)
        # run id -> (what the lost-message search saw: "unacked <delivery tag>" or "absent <attempt>", since
        # when, pass of the last look): one message unacknowledged, or one attempt's message missing, throughout
        self._absent: dict[str, tuple[str, float, int]] = {}
        self._pass = 0
        self._cursor: tuple[Any, str] | None = None

    def run_once(self) -> dict[str, int]:
        done = {"runs_worker_lost": 0, "runs_replacement_lost": 0, "runs_handed_back": 0, "messages_restored": 0,
                "runs_republished": 0, "continuations_republished": 0, "runs_cancelled": 0}
        self._pass += 1
        nodes = self.liveness.nodes()
        now = time.monotonic()
        for name, (beat, _pids) in nodes.items():
            if self._seen.get(name, (None,))[0] != beat:
                self._seen[name] = (beat, now)
        for name in list(self._seen):
            if name not in nodes:
                del self._seen[name]
        for name, (beat, pids) in nodes.items():
            if name != self.me and now - self._seen[name][1] > self.settings.node_timeout:
                self._resolve_gone(name, done)
            else:
                self._resolve_dead_processes(name, beat, pids, done)
        self._cancel_stranded(done)
        if self.probe.knows:
            self._search_lost(done)
            self._search_lost_continuations(done)
            # what this pass did not look at again starts over anyway (it ran, finished, was marked)
            self._absent = {key: seen for key, seen in self._absent.items() if seen[2] == self._pass}
        return done

    # -- 1. gone nodes ------------------------------------------------------------------------------
    def _resolve_gone(self, node: str, done: dict[str, int]) -> None:
        rows = self.liveness.left_by(node, limit=self.settings.recovery_batch)
        running = [row for row in rows if row.status == int(RunStatus.RUNNING)]
        lost = [row for row in running if not self._redelivered_by_celery(row.task_name)]
        back = [row for row in rows if row not in lost]
        self._fail(lost, f"worker lost: node {node} stopped heartbeating while this run was running", done)
        if back:
            done["messages_restored"] += self._restore(back)
            done["runs_handed_back"] += self.liveness.hand_back_runs([str(row.id) for row in back], left_by=node)
        if len(rows) < self.settings.recovery_batch:
            log.warning("celery_batches: node %s is gone (no heartbeat for %ss); resolved %d open run(s)",
                        node, self.settings.node_timeout, len(rows))
            self.liveness.forget(node)
            self._seen.pop(node, None)

    def _redelivered_by_celery(self, task_name: str) -> bool:
        """Would Celery deliver this task's message again after its worker died? Only ``acks_late``."""
        task = self.app.tasks.get(task_name)
        return bool(task.acks_late if task is not None else self.app.conf.task_acks_late)

    def _restore(self, rows: Sequence[Any]) -> int:
        if not self.probe.knows:
            return 0
        snap = self.probe.look(self._queues(rows))
        tags = [snap.unacked[str(row.id)] for row in rows if str(row.id) in snap.unacked]
        return self.probe.restore(tags) if tags else 0

    # -- 2. dead pool processes ---------------------------------------------------------------------
    def _resolve_dead_processes(self, node: str, beat: Any, pids: set[int], done: dict[str, int]) -> None:
        if not pids or beat is None:
            return
        rows = self.liveness.claimed_by_dead_processes(node, pids, beat - timedelta(seconds=1),
                                                       limit=self.settings.recovery_batch)
        # a task Celery runs again when its process dies (acks_late + reject_on_worker_lost requeues
        # its message, retry_on_worker_lost sends a retry) is handed back, as Celery hands it back
        again = [row for row in rows if self._requeued_on_process_death(row.task_name)]
        self._fail([row for row in rows if row not in again],
                   f"worker lost: its pool process on node {node} died while running it "
                   "(an outcome it had not yet recorded was lost with it)", done)
        for holder in {row.node.rsplit("/", 1)[0] for row in again}:
            done["runs_handed_back"] += self.liveness.hand_back_runs(
                [str(row.id) for row in again if row.node.startswith(f"{holder}/")], left_by=holder)

    def _requeued_on_process_death(self, task_name: str) -> bool:
        """Does Celery run this task again when its pool process dies under it?"""
        task, conf = self.app.tasks.get(task_name), self.app.conf
        if task is None:
            return bool(conf.task_acks_late and conf.task_reject_on_worker_lost)
        return bool((task.acks_late and task.reject_on_worker_lost) or getattr(task, "retry_on_worker_lost", False))

    def _fail(self, rows: Sequence[Any], error: str, done: dict[str, int], key: str = "runs_worker_lost") -> None:
        """End runs that nothing will run to their end: with the outcome the result backend kept, if the
        app has one and it kept one; FAILED with ``error`` otherwise."""
        if rows:
            most = self.settings.result_max_bytes
            self.record([backend_outcome(self.app, str(row.id), most, keeps_results=bool(row.keeps_results),
                                         not_before=as_utc(row.reset_at))
                         or RunEvent(str(row.id), RunStatus.FAILED, 0, error) for row in rows])
            done[key] += len(rows)

    def _cancel_stranded(self, done: dict[str, int]) -> None:
        """A run that was running when its batch was cancelled, and came back to waiting: CANCELLED
        (what ``BatchTask`` records when such a run's message is delivered after the cancel)."""
        rows = self.liveness.stranded(self.settings.recovery_batch)
        if rows:
            self.record([RunEvent(str(row.id), RunStatus.CANCELLED, row.retries,
                                  "cancelled: its batch was cancelled while it ran, and it came back") for row in rows])
            done["runs_cancelled"] += len(rows)

    # -- 3. lost messages ---------------------------------------------------------------------------
    def _search_lost(self, done: dict[str, int]) -> None:
        limit = self.settings.recovery_batch
        window = self.liveness.unmarked(utcnow() - timedelta(seconds=self.settings.lost_after), limit, self._cursor)
        if not window:
            self._cursor = None
            return
        try:
            self._look(window, done)
        finally:
            # the cursor holds this window until every run missing from it had its second look
            if not any(str(row.id) in self._absent for row in window):
                self._cursor = (window[-1].created_at, str(window[-1].id)) if len(window) == limit else None

    def _look(self, rows: Sequence[Any], done: dict[str, int]) -> None:
        rows = [row for row in rows if self._queue_of(row)]
        snap: Snapshot = self.probe.look(self._queues(rows))
        # a queue the probe could not read to its end (longer than the scan limit, or RabbitMQ's with
        # messages in it): a run missing from it proves nothing
        rows = [row for row in rows if self._queue_of(row) not in snap.unknown]
        now, confirm = time.monotonic(), self._confirm()
        lost, orphaned = [], []
        for row in rows:
            run_id = str(row.id)
            if run_id in snap.queued and run_id not in snap.unacked:
                self._absent.pop(run_id, None)
                continue
            # a retrying run's attempts each have a message of their own, unacknowledged or missing in turn for a
            # moment (before a heartbeat marks it, while the next is sent): each is watched on its own
            tag = snap.unacked.get(run_id)
            state = f"unacked {tag}" if tag else f"absent {row.retries}"
            if self._missing(run_id, state, now, confirm):
                (orphaned if tag else lost).append(row)
        if orphaned:  # unacknowledged, and no live node says it reserved it: its consumer died
            done["messages_restored"] += self.probe.restore([snap.unacked[str(row.id)] for row in orphaned])
        # a run handed to its replacement (Task.replace) lost the replacement's message: that message was
        # Celery's, not ours to publish again, and publishing the replaced one would run its body twice
        replacements = [row for row in lost if row.replaced]
        if replacements:
            log.warning("celery_batches: the replacements of %d run(s) are in no queue and unacknowledged at no worker",
                        len(replacements))
            self._fail(replacements, "lost: the message of its replacement (Task.replace) is in no queue and "
                                     "unacknowledged at no worker", done, key="runs_replacement_lost")
        lost = [row for row in lost if not row.replaced]
        if lost:  # back to the outbox: the relay publishes them (same task ids)
            log.warning("celery_batches: %d run(s) published long ago are in no queue and unacknowledged at no worker; "
                        "publishing them again", len(lost))
            done["runs_republished"] += self.liveness.hand_back_runs([str(row.id) for row in lost], unpublish=True)

    def _search_lost_continuations(self, done: dict[str, int]) -> None:
        """Continuations published long ago that never started, whose message is missing at two looks,
        go back to the outbox (a plain task continuation claims its row as it starts, like any other)."""
        rows = self.liveness.unstarted_continuations(utcnow() - timedelta(seconds=self.settings.lost_after),
                                                     self.settings.recovery_batch)
        rows = [row for row in rows if self._queue_of(row)]
        if not rows:
            return
        snap = self.probe.look(self._queues(rows))
        rows = [row for row in rows if self._queue_of(row) not in snap.unknown]
        now, confirm = time.monotonic(), self._confirm()
        lost = []
        for row in rows:
            key = f"continuation:{row.id}"
            if snap.has(str(row.id)):
                self._absent.pop(key, None)
            elif self._missing(key, "absent", now, confirm):
                lost.append(str(row.id))
        if lost:
            log.warning("celery_batches: %d continuation(s) published long ago never started and are in no "
                        "queue; publishing them again", len(lost))
            done["continuations_republished"] += self.liveness.redue(lost)

    def _missing(self, key: str, state: str, now: float, confirm: float) -> bool:
        """Has ``key`` been seen in ``state`` at looks in consecutive passes spanning at least
        ``confirm`` seconds? A pass that did not look at it (a node marked it reserved, it ran) starts over."""
        seen = self._absent.get(key)
        if seen is None or seen[0] != state or seen[2] < self._pass - 1:
            self._absent[key] = (state, now, self._pass)
            return False
        if now - seen[1] >= confirm:
            del self._absent[key]
            return True
        self._absent[key] = (state, seen[1], self._pass)
        return False

    def _confirm(self) -> float:
        """Seconds between two looks that find a message missing: one in flight between two places is
        seen at one of them, and a live node marks what it holds at every heartbeat."""
        return max(2 * self.settings.relay_interval, 3 * self.settings.heartbeat_interval, 1.0)

    def _queues(self, rows: Sequence[Any]) -> set[str]:
        return {queue for row in rows if (queue := self._queue_of(row))}

    def _queue_of(self, row: Any) -> str | None:
        """The queue a run's message went to, as Celery routes it; None if we cannot tell (a custom
        exchange or routing key: the message is wherever the broker's bindings put it)."""
        options = kombujson.loads(row.options) if row.options else {}
        if options.get("exchange") or options.get("routing_key"):
            return None
        if options.get("queue"):
            return str(options["queue"])
        try:
            queue = self.app.amqp.router.route({}, row.task_name)["queue"]
        except Exception:
            return None
        return getattr(queue, "name", None) or (queue if isinstance(queue, str) else None)
