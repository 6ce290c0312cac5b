"""The publisher: the only code that publishes runs and continuations, after the transaction that made them due.

A transaction that makes runs or continuations publishable (a new batch, an add, a started stage,
a finished batch's continuations) gives them a *publish lease*. After the commit the publisher
sends them in chunks, renewing the lease before each chunk and flagging what reached the broker.
The relay (a worker thread, one node at a time) takes over only what carries a lapsed lease: the
producer died, the broker was down, or the flag could not be written. So nothing is published by
two publishers at once, and nothing committed stays unpublished.

Messages go out a chunk at a time (``sending.py``: on Redis and RabbitMQ one write per chunk, each
message as ``send_task`` would send it). When something fails, what failed decides, never the
exception's type alone (kombu counts ``KeyError`` among Redis's connection errors, and Celery's
``QueueNotFound`` is one): the messages not known to have reached the broker are sent again one by
one through kombu's own publish, and one that fails again is judged by whether the broker answers
a fresh connection. A broker that does not answer stops the publisher, with its lease kept: the
relay goes on later and nothing is lost. A message the broker answers for and still will not take
(an option of the wrong type, a queue Celery does not know, a queue RabbitMQ declared with other
arguments) fails its run, or its continuation, with the reason, and everything else goes out. A
connection error on one message while the broker answers waits one lease (the relay tries again),
twice at most, then counts as a refusal: no single row blocks the relay.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from collections import Counter

from kombu.exceptions import OperationalError

from .. import kombujson, retry
from ..ceding import pause
from ..message import CONTINUATION_HEADER, HEADER, Message
from ..models import RunStatus
from ..settings import OWED_FLAG_LEASES, PUBLISH_DEFERRALS, PUBLISH_NESTING
from ..signals import announce
from ..store import Publication, RunEvent
from .sending import Sender, Session

if TYPE_CHECKING:
    from celery import Celery

    from ..store.outbox import Outbox

__all__ = ["Publisher", "Report"]


log = logging.getLogger(__name__)


def _connection_trouble(exc: BaseException) -> bool:
    """An error a socket, a server going away or a timeout raises (not one a message earns)."""
    if isinstance(exc, LookupError):  # kombu lists KeyError among Redis's connection errors
        return False
    kinds: list[type] = [OSError, OperationalError]
    try:
        from redis import exceptions as redis_errors

        kinds += [redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError]
    except ImportError:  # pragma: no cover (no redis client installed)
        pass
    try:
        from amqp import exceptions as amqp_errors

        kinds.append(amqp_errors.ConnectionError)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, tuple(kinds))


@dataclass
class Report:
    """What one publication did."""

    runs: int = 0
    continuations: int = 0
    refused: int = 0
    deferred: int = 0
    broker_down: bool = False
    lease_lapsed: bool = False
    unflagged: bool = False  # some sent runs could not be flagged: the lease must lapse, not be dropped
    errors: list[str] = field(default_factory=list)
    #: until when (``time.monotonic()``) the publisher surely holds its lease: its bookkeeping writes
    #: are tried again until then (nothing else publishes its rows meanwhile)
    leased_until: float = field(default_factory=time.monotonic)


@dataclass
class _Sent:
    """What sending some messages did: ``sent`` reached the broker, ``refused`` never will (with why),
    ``deferred`` waits one lease; ``down``: the broker stopped answering (the rest was not sent)."""

    sent: list[str] = field(default_factory=list)
    refused: list[tuple[Message, str]] = field(default_factory=list)
    deferred: list[Message] = field(default_factory=list)
    down: str | None = None


class Publisher:
    """Publishes publications: a producer's right after its commit, or the relay's lapsed ones.

    Every publication of a committed transaction passes :meth:`publish` first, so that is where the
    batches it created and finished are announced (:func:`celery_batches.signals.announce`); the
    relay's publications, read back from the outbox, carry none.

    ``record`` commits run transitions (the run FAILED when the broker refuses its message) and
    returns what they made due, which is published in turn.
    """

    def __init__(self, app: "Celery", outbox: "Outbox", record: Callable[[Sequence[RunEvent]], Publication], *,
                 chunk: int = 1000, bulk: bool = True) -> None:
        self.app = app
        self.outbox = outbox
        self.record = record
        self.chunk = chunk
        self.sender = Sender(app, bulk=bulk)
        self._deferrals: Counter[str] = Counter()  # message id -> times this publisher deferred it

    def publish(self, publication: Publication) -> Report:
        report = Report(leased_until=self._lease_from_now())  # the lease was taken (or renewed) just before
        self._publish(publication, report, depth=0)
        if report.broker_down or report.lease_lapsed:
            log.error("celery_batches: published %d run(s) and %d continuation(s) of this publication; the relay "
                      "will publish the rest (%s)", report.runs, report.continuations,
                      "the broker is unreachable" if report.broker_down else "the publish lease lapsed")
        return report

    def relay(self, limit: int) -> Report:
        """Publish what waits under a lapsed lease, ``limit`` rows at a time, until none is left."""
        total = Report()
        while True:
            lease, runs, continuations = self.outbox.take_lapsed(limit)
            if lease is None:
                return total
            report = self.publish(Publication(runs, continuations, lease))
            total.runs += report.runs
            total.continuations += report.continuations
            total.refused += report.refused
            total.deferred += report.deferred
            if report.broker_down or report.lease_lapsed or (len(runs) < limit and len(continuations) < limit):
                total.broker_down, total.lease_lapsed = report.broker_down, report.lease_lapsed
                return total

    def _publish(self, publication: Publication, report: Report, depth: int) -> None:
        # every publication a committed transaction made passes here first: the one place that
        # announces the batches it created and finished (``announce`` empties them: never twice)
        announce(publication, self.app)
        if not publication.runs and not publication.continuations:
            return
        lease = publication.lease
        refused: list[RunEvent] = []
        deferred: list[Message] = []
        overlap = len(publication.runs) > self.chunk and self.outbox.engine.dialect.name != "sqlite"  # one writer there
        with _Flagger(lambda sent: self._flag_runs(sent, lease, report), overlap) as flagger:
            for start in range(0, len(publication.runs), self.chunk):
                if not self._renew(lease, report):
                    break
                done = self._send(publication.runs[start:start + self.chunk])
                if done.sent:
                    flagger.flag(done.sent)
                report.runs += len(done.sent)
                refused += [RunEvent(m.id, RunStatus.FAILED, 0, "celery_batches: the broker refused this run's "
                                                                f"message: {why}") for m, why in done.refused]
                deferred += done.deferred
                if done.down:
                    report.broker_down = True
                    report.errors.append(done.down)
                    break
        if publication.continuations and not report.broker_down and self._renew(lease, report):
            done = self._send(publication.continuations)
            if done.sent:
                self._write("flag dispatched continuations", self.outbox.mark_dispatched, done.sent,
                            until=report.leased_until)
            report.continuations += len(done.sent)
            for m, why in done.refused:
                self._write("fail a refused continuation", self.outbox.refuse_continuation, m.id,
                            f"celery_batches: the broker refused this continuation's message: {why}",
                            until=report.leased_until)
            report.refused += len(done.refused)
            deferred += done.deferred
            if done.down:
                report.broker_down = True
                report.errors.append(done.down)
        if deferred:
            report.deferred += len(deferred)
            self._write("defer messages the broker did not take", self.outbox.defer,
                        [m.id for m in deferred if m.batch_id], [m.id for m in deferred if not m.batch_id],
                        until=report.leased_until)
        if refused:
            report.refused += len(refused)
            then = self.record(refused)  # counted FAILED; may finish batches and make continuations due
            announce(then, self.app)  # (what it finished, even past the nesting limit)
            if depth < PUBLISH_NESTING:
                self._publish(then, report, depth + 1)
        if lease and not report.broker_down and not report.lease_lapsed and not report.unflagged:
            self._write("drop a publish lease", self.outbox.drop, lease, until=report.leased_until)

    def _renew(self, lease: str | None, report: Report) -> bool:
        """Renew the lease before a chunk; False (stop) if it lapsed: the relay may own the rest now."""
        if lease is None or report.lease_lapsed:
            return not report.lease_lapsed
        renewed = self._write("renew a publish lease", self.outbox.renew, lease, until=report.leased_until)
        if not renewed:
            report.lease_lapsed = True
        else:
            report.leased_until = self._lease_from_now()
        return bool(renewed)

    def _lease_from_now(self) -> float:
        """Until when a lease renewed now surely holds (a margin for the clocks of other hosts)."""
        return time.monotonic() + 0.8 * self.outbox.lease_time.total_seconds()

    def _send(self, messages: Sequence[Message]) -> _Sent:
        """Send messages: all at once, then one by one what that could not send (see the module)."""
        done = _Sent()
        rest, error = self._send_together(messages, done)
        if rest:
            self._send_alone(rest, done)
            if error is not None and not _connection_trouble(error) and not done.refused and not done.down \
                    and self.sender.bulk:
                # kombu's own publish sent what the bulk path failed on: the bulk path is at fault
                # here (a kombu or py-amqp that is not what it was proven on), not the messages
                log.warning("celery_batches: bulk publishing failed (%s: %s) where kombu's own publish did not; "
                            "publishing message by message from now on in this process",
                            type(error).__name__, error)
                self.sender.bulk = False
        return done

    def _send_together(self, messages: Sequence[Message], done: _Sent) -> tuple[list[Message], Exception | None]:
        """One session for all of them; returns what did not go out, and the error that stopped it."""
        session: Session | None = None
        try:
            with self.app.producer_or_acquire() as producer, \
                    self.sender.session(producer, len(messages)) as session:
                for m in messages:
                    self._send_one(m, session)
                    pause()  # an event loop waiting on this thread gets the GIL now and then (ceding.py)
                failed = set(session.flush())  # the messages the broker answered with an error
        except Exception as exc:
            # a buffered session sent nothing (kombu discards an unflushed batch); an unbuffered one
            # sent exactly the messages it was handed before the error
            gone = 0 if session is None or session.buffered else session.handed
            done.sent += [m.id for m in messages[:gone]]
            return list(messages[gone:]), exc
        done.sent += [m.id for i, m in enumerate(messages) if i not in failed]
        return [messages[i] for i in sorted(failed)], None

    def _send_alone(self, messages: Sequence[Message], done: _Sent) -> None:
        """Each message through kombu's own publish; one that fails is tried once more on a fresh
        connection, then judged by whether the broker answers (see the module)."""
        for m in messages:
            error: Exception | None = None
            for fresh in (False, True):
                try:
                    self._publish_alone(m, fresh)
                    break
                except Exception as exc:
                    error = exc
                    if not self._broker_answers():
                        done.down = f"{type(exc).__name__}: {exc}"
                        return
            else:
                why = f"{type(error).__name__}: {error}"
                if _connection_trouble(error) and self._deferrals[m.id] < PUBLISH_DEFERRALS:
                    self._deferrals[m.id] += 1
                    log.warning("celery_batches: message %s (%s) failed while the broker answers (%s); trying it "
                                "again in a while", m.id, m.task_name, why)
                    done.deferred.append(m)
                else:
                    self._deferrals.pop(m.id, None)
                    log.error("celery_batches: the broker refused message %s (%s): %s", m.id, m.task_name, why)
                    done.refused.append((m, why))
                continue
            self._deferrals.pop(m.id, None)
            done.sent.append(m.id)

    def _publish_alone(self, m: Message, fresh: bool) -> None:
        """One message through ``send_task`` and kombu, on the producer pool or a fresh connection."""
        if not fresh:
            with self.app.producer_or_acquire() as producer:
                self._send_one(m, self.sender.plain(producer))
            return
        with self.app.connection_for_write() as conn:
            self._send_one(m, self.sender.plain(self.app.amqp.Producer(conn)))

    @staticmethod
    def _send_one(m: Message, session: Session) -> None:
        """Hand one stored message to ``session`` as ``send_task`` would get it."""
        options = kombujson.loads(m.options) if m.options else {}
        headers = dict(options.pop("headers", None) or {})
        if m.batch_id:
            headers[HEADER] = m.batch_id
        if m.continuation_of:
            headers[CONTINUATION_HEADER] = m.continuation_of
        if m.retries:
            options["retries"] = m.retries
        session.send(m.task_name, kombujson.loads(m.args), kombujson.loads(m.kwargs), task_id=m.id,
                     headers=headers or None, options=options,
                     shape_key=(m.task_name, m.options, m.batch_id, m.continuation_of),
                     args_json=m.args, kwargs_json=m.kwargs)

    def _broker_answers(self) -> bool:
        """Does the broker take a fresh connection right now (on Redis, answer its PING)?"""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0.2, timeout=2)
                conn.default_channel  # noqa: B018 (opening it is the check: kombu's Redis channel pings)
            return True
        except Exception:  # noqa: BLE001 - any failure to connect means no
            return False

    def _flag_runs(self, sent: list[str], lease: str | None, report: Report) -> None:
        """Flag sent runs; a run a worker holds right now is flagged on a second try (or needs none).

        A flag that keeps failing is tried again for as long as the lease can be renewed (then
        nothing else publishes these runs); once it cannot, the runs are left unflagged under a
        lease left to lapse, and the flags are owed (:meth:`_owe`): written in the background when
        the registry is back, before the relay, which waits a lease after an outage, publishes the
        runs again (claims keep a ``@batches.task`` from running twice; a plain task would not be)."""
        left, renewals = sent, 0
        for attempt in range(3):
            while (flagged := self._write("flag published runs", self.outbox.mark_published, left,
                                          until=report.leased_until)) is None:
                renewals += 1
                if lease is None or renewals > 10 or not self._write("renew a publish lease", self.outbox.renew,
                                                                     lease, until=report.leased_until):
                    report.unflagged = True
                    self._owe(left)
                    return
                report.leased_until = self._lease_from_now()
            left = flagged
            if not left:
                return
            time.sleep(0.05 * (attempt + 1))

    def _owe(self, run_ids: list[str]) -> None:
        """Write the flags of runs that went out but could not be flagged under the lease, in a thread
        of their own (the caller goes on), for up to ``OWED_FLAG_LEASES`` leases. Flagging is true
        whoever holds the rows now; a process that exits first leaves them to the relay."""
        patience = OWED_FLAG_LEASES * self.outbox.lease_time.total_seconds()

        def pay() -> None:
            until, left = time.monotonic() + patience, run_ids
            while left and time.monotonic() < until:
                left = self._write("write owed published flags", self.outbox.mark_published, left, until=until)
                if left is None:
                    log.error("celery_batches: %d run(s) went out but could not be flagged published; the relay "
                              "will publish them again", len(run_ids))
                    return
                if left:
                    time.sleep(0.1)

        threading.Thread(target=pay, name="celery_batches-owed-flags", daemon=True).start()

    @staticmethod
    def _write(what: str, write: Callable, *args: object, until: float) -> object:
        """A bookkeeping write after messages went out, tried again while the lease surely holds
        (``until``); never raises to the caller. If it never succeeds, the lease lapses and the relay
        publishes those messages again (the same task ids)."""
        try:
            return retry.call(lambda: write(*args), retry.BOOKKEEPING, what, log, until=until)
        except Exception:
            log.exception("celery_batches: could not %s; the relay will see to it", what)
            return None


class _Flagger:
    """Flags each chunk's sent runs; for a publication of several chunks, in a thread of its own
    while the next chunk is sent (the flag is PostgreSQL's work, the sending ours: on two cores
    the flags of a 10,000-run batch then cost no time of their own). At most one chunk's flag is
    in flight; leaving waits for it, so nothing after a publication (a lease dropped, its
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
