"""Group commit of run transitions: signal handlers hand events over, one thread writes them.

A handler never waits for the database: it appends to a buffer and returns. A thread per process
commits the buffer as one transaction every ``flush_interval`` seconds (or at ``flush_max``
events), which turns N round trips into one. A failed write is retried with backoff and logged
loudly until it succeeds; what a killed process held in memory is recovered by the reconciler
(from the result backend, or after ``run_timeout``).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Callable, Sequence

from ..store import RunEvent

__all__ = ["GroupCommit"]

log = logging.getLogger(__name__)


class GroupCommit:
    def __init__(self, write: Callable[[Sequence[RunEvent]], None], *, interval: float, max_events: int,
                 max_delay: float) -> None:
        self._write = write
        self._interval = interval
        self._max_events = max_events
        self._max_delay = max_delay
        self._cond = threading.Condition()
        self._pending: list[RunEvent] = []
        self._writing = 0  # events taken by the thread and not yet committed
        self._pid = 0
        self._running = False  # a writer thread serves this process (it clears this as it exits)
        self._closing = False
        self._urgent = 0  # callers blocked in flush(): skip the wait that lets a group fill up
        atexit.register(self.close)

    def add(self, event: RunEvent) -> None:
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
            log.error("celery_batches: %d run transition(s) not committed at exit; the reconciler "
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

    def _commit(self, group: list[RunEvent]) -> None:
        delay, attempt = 0.05, 0
        while True:
            try:
                self._write(group)
                if attempt:
                    log.warning("celery_batches: registry write succeeded after %d retries", attempt)
                return
            except Exception:
                attempt += 1
                log.exception("celery_batches: registry write of %d run transition(s) failed "
                              "(attempt %d); retrying in %.2fs", len(group), attempt, delay)
                time.sleep(delay)
                delay = min(delay * 2, self._max_delay)
