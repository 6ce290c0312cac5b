"""One way to try again: named retry policies for the registry's reads and writes.

Every place that repeats a database call after a failure uses :func:`call` with one of the
policies below, so how long we insist, how we back off and what we log is decided here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import sqlalchemy as sa

__all__ = ["BOOKKEEPING", "CLAIM", "DEADLOCK", "FOREVER", "READ", "Policy", "call", "registry_away"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Policy:
    """How many attempts (None: until it succeeds or the error is not worth another), the pause
    before the second attempt (doubling up to ``max_delay``), and which errors are worth another."""

    attempts: int | None
    delay: float
    max_delay: float = 5.0
    retry_on: Callable[[BaseException], bool] = lambda exc: True
    level: int = logging.WARNING  # how loudly each failed attempt is logged

    def but(self, **changes: object) -> "Policy":
        return replace(self, **changes)  # type: ignore[arg-type]


def registry_away(exc: BaseException) -> bool:
    """A dead connection (restarted or failed-over database, killed backend) or a refused connection."""
    return isinstance(exc, sa.exc.DBAPIError) and (exc.connection_invalidated
                                                    or isinstance(exc, sa.exc.OperationalError))


def _lost_a_race(exc: BaseException) -> bool:
    """PostgreSQL chose this transaction as a deadlock victim or a serialization failure."""
    return isinstance(exc, sa.exc.DBAPIError) and getattr(exc.orig, "sqlstate", None) in ("40P01", "40001")


#: a read whose connection died: the pool has already dropped it, the next attempt gets a fresh one
READ = Policy(attempts=4, delay=0.05, retry_on=registry_away)
#: a write transaction that lost a deadlock: the whole transaction is repeated, so nothing is half-done
DEADLOCK = Policy(attempts=5, delay=0.01, retry_on=_lost_a_race)
#: bookkeeping after messages went out (flags, leases): tried again for as long as the publisher
#: holds its lease (the caller's ``until``: meanwhile nothing else publishes those rows), then the
#: relay sees to it
BOOKKEEPING = Policy(attempts=None, delay=0.1, max_delay=1.0)
#: the group commit: transitions are never dropped for a passing reason (the caller says which are not)
FOREVER = Policy(attempts=None, delay=0.05, level=logging.ERROR)
#: a claim before a member starts: it waits for the registry, however long, so that nothing runs
#: that the registry does not know runs (a member that ran unrecorded can be published and run again)
CLAIM = Policy(attempts=None, delay=0.05, max_delay=2.0, retry_on=registry_away, level=logging.ERROR)


def call(work: Callable[[], _T], policy: Policy, what: str, logger: logging.Logger = log, *,
         until: float | None = None) -> _T:
    """``work()``, repeated under ``policy`` (and, with ``until``, only while the next attempt would
    start before that ``time.monotonic()``); the last error (or one not worth another try) is raised.
    Each failed attempt and a late success are logged on ``logger`` (the caller's)."""
    attempt, delay = 1, policy.delay
    while True:
        try:
            result = work()
        except Exception as exc:
            if (policy.attempts is not None and attempt >= policy.attempts) or not policy.retry_on(exc) \
                    or (until is not None and time.monotonic() + delay > until):
                raise
            logger.log(policy.level, "celery_batches: %s failed (attempt %d): %s: %s; retrying in %.2fs",
                       what, attempt, type(exc).__name__, exc, delay)
            time.sleep(delay)
            attempt, delay = attempt + 1, min(delay * 2, policy.max_delay)
            continue
        if attempt > 1:
            logger.warning("celery_batches: %s succeeded after %d retries", what, attempt - 1)
        return result
