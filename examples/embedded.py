"""Shared by the examples: a Celery app that runs without services unless told otherwise.

Without ``CELERY_BROKER_URL`` the app uses Celery's in-memory broker and the examples start a
worker thread in their own process (the registry then defaults to a SQLite file). With it set,
start a worker separately: ``celery -A examples.<module> worker``.
"""

from __future__ import annotations

import os
import threading
import warnings

from celery import Celery
from celery.exceptions import SecurityWarning

EMBEDDED = not os.environ.get("CELERY_BROKER_URL")
#: set by an example's continuation (in embedded mode it runs in this process's worker thread)
continuation_ran = threading.Event()


def make_app(name: str) -> Celery:
    app = Celery(name, broker=os.environ.get("CELERY_BROKER_URL", "memory://localhost/"))
    # CELERY_EXAMPLE_QUEUE lets the tests run each example on a queue of its own
    app.conf.update(task_default_queue=os.environ.get("CELERY_EXAMPLE_QUEUE", "celery"),
                    worker_hijack_root_logger=False, worker_redirect_stdouts=False,
                    broker_connection_retry_on_startup=True,
                    broker_transport_options={"polling_interval": 0.05} if EMBEDDED else {})
    return app


def start_worker(app: Celery) -> None:
    """In embedded mode, run a worker in a thread of this process; otherwise do nothing."""
    if not EMBEDDED:
        return
    warnings.filterwarnings("ignore", category=SecurityWarning)  # the demo may well run as root
    worker = app.Worker(pool="threads", concurrency=4, loglevel="WARNING", without_heartbeat=True,
                        without_mingle=True, without_gossip=True, quiet=True)
    threading.Thread(target=worker.start, name="embedded-worker", daemon=True).start()


def wait_for_continuation(timeout: float = 30.0) -> None:
    """In embedded mode, keep this process (and its worker thread) alive until the continuation ran:
    the batch finishes first, and its continuation is published and run right after."""
    if EMBEDDED and not continuation_ran.wait(timeout):
        print(f"the continuation did not run within {timeout:g}s", flush=True)
