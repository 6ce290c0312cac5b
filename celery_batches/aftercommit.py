"""Publish after the caller's transaction commits, never if it rolls back.

Used when a batch is written inside the caller's SQLAlchemy ``Session`` or ``Connection``
(``Batches.batch(..., connection=...)``). A Session has an exact ``after_commit`` event. A Connection
only announces a commit before it happens, so there the publisher waits, in a thread, until the
batch is visible from another connection (proof of the commit) and gives up after a deadline (the
commit failed; or, if it was merely slow, the relay publishes later).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session

__all__ = ["on_commit", "caller_connection"]


def caller_connection(connection: Any) -> sa.Connection:
    """The Connection to write with: the Session's own, or the Connection itself."""
    if isinstance(connection, Session):
        return connection.connection()
    if isinstance(connection, sa.Connection):
        if not connection.in_transaction():
            raise TypeError("connection= needs a Connection inside a transaction (engine.begin() or conn.begin())")
        return connection
    raise TypeError(f"connection= takes a SQLAlchemy Session or Connection, not {type(connection).__name__}")


def on_commit(connection: Any, publish: Callable[[], None], visible: Callable[[], bool], timeout: float) -> None:
    """Call ``publish`` once the caller's transaction has committed; forget it on rollback."""
    fired = threading.Event()

    def committed_session(*_: Any) -> None:
        if not fired.is_set():
            fired.set()
            publish()

    def committing_connection(*_: Any) -> None:
        if not fired.is_set():
            fired.set()
            threading.Thread(target=publish_when_visible, name="celery_batches-aftercommit", daemon=True).start()

    def publish_when_visible() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if visible():
                publish()
                return
            time.sleep(0.01)

    def rolled_back(*_: Any) -> None:
        fired.set()

    if isinstance(connection, Session):
        sa.event.listen(connection, "after_commit", committed_session, once=True)
        sa.event.listen(connection, "after_rollback", rolled_back, once=True)
    else:
        sa.event.listen(connection, "commit", committing_connection, once=True)
        sa.event.listen(connection, "rollback", rolled_back, once=True)
