"""The outbox: the only code that publishes runs and continuations, after the transaction that made them due.

A transaction that makes runs or continuations publishable (a new batch, an add, a started stage,
a finished batch's continuations) gives them a *publish lease*. After the commit the publisher
sends them in chunks, renewing the lease before each chunk and flagging what reached the broker.
The relay (a worker thread, one node at a time) takes over only what carries a lapsed lease: the
producer died, the broker was down, or the flag could not be written. So nothing is published by
two publishers at once, and nothing committed stays unpublished.

Messages go out a chunk at a time (``sending.py``: one Redis pipeline per chunk, each message as
``send_task`` would send it): a broker that is down stops the publisher (the relay goes on
later); a message the broker or Celery refuses for good (an option of the wrong type) fails its
run, or its continuation, with the reason, and the others go out.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from kombu.exceptions import ContentDisallowed, EncodeError, OperationalError

from . import kombujson, retry
from .builder import Message
from .models import RunStatus
from .sending import Sender, Session
from .store import Outbox, RunEvent

if TYPE_CHECKING:
    from celery import Celery

    from .store.outbox import OutboxStore

__all__ = ["CONTINUATION_HEADER", "HEADER", "Publisher", "Report"]

#: Message header carrying a member's batch id. Namespaced: user headers override Celery's own.
HEADER = "celery_batches_batch_id"
#: Message header of a continuation: the batch whose finish fired it.
CONTINUATION_HEADER = "celery_batches_continuation_of"

log = logging.getLogger(__name__)
#: what publishing one message raises when the message itself is wrong (not the broker)
_REFUSALS = (TypeError, ValueError, LookupError, EncodeError, ContentDisallowed)


@dataclass
class Report:
    """What one publication did."""

    runs: int = 0
    continuations: int = 0
    refused: int = 0
    broker_down: bool = False
    lease_lapsed: bool = False
    errors: list[str] = field(default_factory=list)


class Publisher:
    """Publishes outboxes: a producer's right after its commit, or the relay's lapsed ones.

    ``record`` commits run transitions (the run FAILED when the broker refuses its message) and
    returns what they made due, which is published in turn.
    """

    def __init__(self, app: "Celery", store: "OutboxStore", record: Callable[[Sequence[RunEvent]], Outbox], *,
                 chunk: int = 1000) -> None:
        self.app = app
        self.store = store
        self.record = record
        self.chunk = chunk
        self._connection_errors: tuple[type[BaseException], ...] | None = None
        self.sender = Sender(app)

    def publish(self, outbox: Outbox) -> Report:
        report = Report()
        self._publish(outbox, report, depth=0)
        if report.broker_down or report.lease_lapsed:
            log.error("celery_batches: published %d run(s) and %d continuation(s) of this outbox; the relay "
                      "will publish the rest (%s)", report.runs, report.continuations,
                      "the broker is unreachable" if report.broker_down else "the publish lease lapsed")
        return report

    def relay(self, limit: int) -> Report:
        """Publish what waits under a lapsed lease, ``limit`` rows at a time, until none is left."""
        total = Report()
        while True:
            lease, runs, continuations = self.store.take_lapsed(limit)
            if lease is None:
                return total
            report = self.publish(Outbox(runs, continuations, lease))
            total.runs += report.runs
            total.continuations += report.continuations
            total.refused += report.refused
            if report.broker_down or report.lease_lapsed or (len(runs) < limit and len(continuations) < limit):
                total.broker_down, total.lease_lapsed = report.broker_down, report.lease_lapsed
                return total

    def _publish(self, outbox: Outbox, report: Report, depth: int) -> None:
        if not outbox.runs and not outbox.continuations:
            return
        lease = outbox.publication
        refused: list[RunEvent] = []
        overlap = len(outbox.runs) > self.chunk and self.store.engine.dialect.name != "sqlite"  # one writer there
        with _Flagger(self._flag_runs, overlap) as flagger:
            for start in range(0, len(outbox.runs), self.chunk):
                if not self._hold(lease, report):
                    return
                chunk = outbox.runs[start:start + self.chunk]
                sent, bad = self._send(chunk, report)
                if sent:
                    flagger.flag(sent)
                report.runs += len(sent)
                refused += [RunEvent(m.id, RunStatus.FAILED, 0, "celery_batches: the broker refused this run's "
                                                                f"message: {type(exc).__name__}: {exc}") for m, exc in bad]
                if report.broker_down:
                    break
        if outbox.continuations and not report.broker_down and self._hold(lease, report):
            sent, bad = self._send(outbox.continuations, report)
            if sent:
                self._write("flag dispatched continuations", self.store.mark_dispatched, sent)
            report.continuations += len(sent)
            for m, exc in bad:
                self._write("fail a refused continuation", self.store.refuse_continuation, m.id,
                            "celery_batches: the broker refused this continuation's message: "
                            f"{type(exc).__name__}: {exc}")
        if refused:
            report.refused += len(refused)
            then = self.record(refused)  # counted FAILED; may finish batches and make continuations due
            if depth < 16:
                self._publish(then, report, depth + 1)
        if lease and not report.broker_down and not report.lease_lapsed:
            self._write("release a publish lease", self.store.release, lease)

    def _hold(self, lease: str | None, report: Report) -> bool:
        """Renew the lease before a chunk; False (stop) if it lapsed: the relay may own the rest now."""
        if lease is None or report.lease_lapsed:
            return not report.lease_lapsed
        held = self._write("renew a publish lease", self.store.renew, lease)
        if not held:
            report.lease_lapsed = True
        return bool(held)

    def _send(self, messages: Sequence[Message], report: Report) -> tuple[list[str], list[tuple[Message, Exception]]]:
        """Send a chunk; what it returns as sent reached the broker (a buffered chunk whose flush
        failed counts as not sent: the relay publishes it again, and claims keep a duplicate from
        running twice)."""
        sent: list[str] = []
        refused: list[tuple[Message, Exception]] = []
        try:
            with self.app.producer_or_acquire() as producer, self.sender.session(producer, len(messages)) as session:
                for m in messages:
                    try:
                        self._send_one(m, session)
                    except Exception as exc:
                        if self._broker_down(exc):
                            raise
                        log.error("celery_batches: the broker refused message %s (%s): %s: %s", m.id, m.task_name,
                                  type(exc).__name__, exc)
                        refused.append((m, exc))
                        continue
                    sent.append(m.id)
                session.flush()
        except Exception as exc:
            if not self._broker_down(exc):
                raise
            report.broker_down = True
            report.errors.append(f"{type(exc).__name__}: {exc}")
            return [], refused
        return sent, refused

    @staticmethod
    def _send_one(m: Message, session: Session) -> None:
        options = kombujson.loads(m.options) if m.options else {}
        headers = dict(options.pop("headers", None) or {})
        if m.batch_id:
            headers[HEADER] = m.batch_id
        if m.continuation_of:
            headers[CONTINUATION_HEADER] = m.continuation_of
        if m.retries:
            options["retries"] = m.retries
        session.send(m.task_name, kombujson.loads(m.args), kombujson.loads(m.kwargs), task_id=m.id, headers=headers or None,
                     options=options, shape_key=(m.task_name, m.options, m.batch_id, m.continuation_of),
                     args_json=m.args, kwargs_json=m.kwargs)

    def _broker_down(self, exc: BaseException) -> bool:
        """Is this the broker (or the result store) being unreachable — try again later — rather than
        a refusal of this one message? Only the errors Celery and kombu raise for a bad option or an
        unserialisable argument count as a refusal, and only if the broker answers; anything else
        (a connection error, an error we do not know) stops this publisher, and the relay tries later."""
        if self._connection_errors is None:
            conn = self.app.connection_for_write()
            self._connection_errors = (OSError, OperationalError, *conn.connection_errors, *conn.channel_errors)
        if isinstance(exc, self._connection_errors) or not isinstance(exc, _REFUSALS):
            return True
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
        except Exception:
            return True
        return False

    def _flag_runs(self, sent: list[str]) -> None:
        """Flag sent runs; a run a worker holds right now is flagged on a second try (or needs none)."""
        left = sent
        for attempt in range(3):
            left = self._write("flag published runs", self.store.mark_published, left) or []
            if not left:
                return
            time.sleep(0.05 * (attempt + 1))

    @staticmethod
    def _write(what: str, write: Callable, *args: object) -> object:
        """A bookkeeping write after messages went out: never raises to the caller. If every attempt
        fails, the lease lapses and the relay publishes those messages again (the same task ids)."""
        try:
            return retry.call(lambda: write(*args), retry.BOOKKEEPING, what, log)
        except Exception:
            log.exception("celery_batches: could not %s; the relay will see to it", what)
            return None


class _Flagger:
    """Flags each chunk's sent runs; for a publication of several chunks, in a thread of its own
    while the next chunk is sent (the flag is PostgreSQL's work, the sending ours: on two cores
    the flags of a 10,000-run batch then cost no time of their own). At most one chunk's flag is
    in flight; leaving waits for it, so nothing after a publication (a lease released, its
    continuations sent) runs before its runs are flagged."""

    def __init__(self, flag: Callable[[list[str]], None], overlap: bool) -> None:
        self._flag = flag
        self._overlap = overlap
        self._thread: threading.Thread | None = None

    def flag(self, sent: list[str]) -> None:
        if not self._overlap:
            self._flag(sent)
            return
        self._wait()
        self._thread = threading.Thread(target=self._flag, args=(sent,), name="celery_batches-flag", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> _Flagger:
        return self

    def __exit__(self, *exc: object) -> None:
        self._wait()
