"""The node's heartbeat: a thread in the worker's main process, apart from the relay so that a long
relay pass never makes a live node look gone.

Each beat refreshes the node's row with the pids of its live pool processes and marks the runs
whose messages the node holds without running them (prefetched, or waiting for an ETA), read from
Celery's worker state.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..store.liveness import Liveness

__all__ = ["Heartbeat", "reserved_requests", "pool_pids"]

log = logging.getLogger(__name__)


def reserved_requests() -> list[str] | None:
    """Task ids this worker has received and not started: Celery's reserved (not active) and scheduled
    requests (Celery empties both when its broker connection is lost: those messages are no longer
    this worker's). Read from its weak sets, not from ``state.requests``: that dict can keep a
    request the worker dropped, which would mark a lost message as reserved. None if the sets kept
    changing while we read them (the marks are then left as they are)."""
    from celery.worker import state

    for _ in range(5):  # the event loop may change the sets while we copy them
        try:
            active = {id(request) for request in list(state.active_requests)}
            waiting = list(state.reserved_requests) + list(state.scheduled_requests)
            return list({request.id for request in waiting if id(request) not in active})
        except RuntimeError:
            continue
    return None


def pool_pids(worker: Any) -> list[int]:
    """This process and its live pool processes (prefork); just this process for other pools."""
    processes = getattr(getattr(getattr(worker, "pool", None), "_pool", None), "_pool", None) or []
    return [os.getpid()] + [p.pid for p in list(processes) if getattr(p, "pid", None)]


class Heartbeat:
    def __init__(self, liveness: "Liveness", node: str, interval: float, worker: Any) -> None:
        self.liveness = liveness
        self.node = node
        self.interval = interval
        self.worker = worker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="celery_batches-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def beat(self) -> None:
        try:
            self.liveness.beat(self.node, pool_pids(self.worker), reserved_requests())
        except Exception:
            log.exception("celery_batches: heartbeat of node %s failed; retrying in %.1fs", self.node, self.interval)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
