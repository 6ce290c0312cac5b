"""Letting an event loop's thread in while a worker thread works for it.

A coroutine awaiting the async twins' commit thread waits on a thread that does Python work for
a second or more (serialising, the COPY, sending), and every wake-up of the loop's thread then needs
the GIL back. CPython hands it over after its switch interval (5 ms) at best; a thread that also
makes many short I/O calls takes it back before the waiting thread has woken up, again and again,
and the loop waits 30-110 ms now and then (docs/benchmarks.md, looplag). So the long loops of
that work call :func:`pause`: in a thread inside :func:`ceding`, every ``SLICE`` seconds of work it
sleeps ``PAUSE`` seconds, long enough for the waiting thread to take the GIL; anywhere else it
does nothing but read one thread-local attribute.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["PAUSE", "SLICE", "ceding", "pause"]

#: seconds of work between two pauses
SLICE = 0.002
#: seconds each pause lets other threads run (about 7% of the work's time)
PAUSE = 0.0001

_state = threading.local()
_now = time.perf_counter


def pause() -> None:
    """A point in a long loop where another thread may run: see the module."""
    due = getattr(_state, "due", None)
    if due is not None and _now() >= due:
        time.sleep(PAUSE)
        _state.due = _now() + SLICE


@contextmanager
def ceding() -> Iterator[None]:
    """In this thread, until the block exits, :func:`pause` pauses every ``SLICE`` seconds."""
    outer = getattr(_state, "due", None)
    _state.due = _now() + SLICE
    try:
        yield
    finally:
        _state.due = outer
