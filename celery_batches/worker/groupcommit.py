"""Group commit of run transitions: signal handlers hand events over, one thread writes them.

A handler never waits for the database: it appends to a buffer and returns. A thread per process
commits the buffer as one transaction every ``flush_interval`` seconds (or at ``flush_max``
events), which turns N round trips into one. A write that fails for a passing reason (the
registry unreachable, a deadlock) is repeated with backoff until it succeeds. A group the
registry refuses for good is split in halves until the one event it refuses is found; that event
is replaced by ``replace_refused(event, error)`` (the run FAILED with the reason) or dropped, and
every other event of the group is committed: one bad value never stalls the others.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Callable, Generic, Sequence, TypeVar

from .. import retry

__all__ = ["GroupCommit"]

log = logging.getLogger(__name__)
E = TypeVar("E")


class GroupCommit(Generic[E]):
    def __init__(self, write: Callable[[Sequence[E]], None], *, interval: float, max_events: int,
                 max_delay: float, refused_for_good: Callable[[BaseException], bool] = lambda exc: False,
                 replace_refused: Callable[[E, BaseException], E | None] = lambda event, exc: None) -> None:
        self._write = write
        self._interval = interval
        self._max_events = max_events
        self._policy = retry.FOREVER.but(max_delay=max_delay, retry_on=lambda exc: not refused_for_good(exc))
        self._replace_refused = replace_refused
        self._cond = threading.Condition()
        self._pending: list[E] = []
        self._writing = 0  # events taken by the thread and not yet committed
        self._pid = 0
        self._running = False  # a writer thread serves this process (it clears this as it exits)
        self._closing = False
        self._urgent = 0  # callers blocked in flush(): skip the wait that lets a group fill up
        atexit.register(self.close)
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """A forked child starts empty, with a lock of its own: the parent's lock may have been taken
        by its writer thread at the instant of the fork, and that thread does not exist here."""
        self._cond = threading.Condition()
        self._pid = 0
        self._pending = []
        self._writing = 0
        self._running = False
        self._urgent = 0

    def add(self, event: E) -> None:
        with self._cond:
            if self._pid != os.getpid() or not self._running:
                self._start()
            self._pending.append(event)
            if len(self._pending) == 1 or len(self._pending) >= self._max_events or self._interval == 0:
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything added so far is committed; False if ``timeout`` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._pid != os.getpid():
                return True
            self._urgent += 1
            self._cond.notify_all()
            try:
                while self._pending or self._writing:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._urgent -= 1

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is buffered (bounded by ``timeout``) and stop the thread."""
        if self._pid != os.getpid() or not self._running:
            return
        if not self.flush(timeout):
            with self._cond:
                lost = len(self._pending) + self._writing
            log.error("celery_batches: %d run transition(s) not committed at exit; recovery "
                      "will resolve them", lost)
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def _start(self) -> None:
        if self._pid != os.getpid():
            # a forked child: events buffered in the parent are the parent's to write
            self._pid = os.getpid()
            self._pending = []
            self._writing = 0
        self._closing = False
        self._running = True
        threading.Thread(target=self._run, name="celery_batches-groupcommit", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing and not self._pending:
                    self._running = False
                    return
                if (len(self._pending) < self._max_events and self._interval > 0
                        and not self._closing and not self._urgent):
                    self._cond.wait(self._interval)  # let the group fill up
                group, self._pending = self._pending, []
                self._writing = len(group)
            self._commit(group)
            with self._cond:
                self._writing = 0
                self._cond.notify_all()

    def _commit(self, group: Sequence[E], replaced: bool = False) -> None:
        """Write ``group``: repeat what failed for a passing reason, isolate what the registry refuses."""
        try:
            what = f"registry write of {len(group)} run transition(s)"
            retry.call(lambda: self._write(group), self._policy, what, log)
        except Exception as exc:  # the registry refuses something in it for good
            self._isolate(group, exc, replaced)

    def _isolate(self, group: Sequence[E], exc: BaseException, replaced: bool) -> None:
        if len(group) > 1:  # halves in order, so a run's later events still follow its earlier ones
            middle = len(group) // 2
            self._commit(group[:middle], replaced)
            self._commit(group[middle:], replaced)
            return
        [event] = group
        replacement = None if replaced else self._replace_refused(event, exc)
        log.error("celery_batches: the registry refuses %r for good (%s); %s", event, exc,
                  "recording it as failed instead" if replacement is not None else "dropping it")
        if replacement is not None:
            self._commit([replacement], replaced=True)
