"""Publish after the caller's transaction commits, never if it rolls back.

Used when a batch is written inside the caller's SQLAlchemy ``Session`` or ``Connection``, or a
Django connection's atomic block (``Batches.batch(..., connection=...)``). Whatever ended the caller's outermost transaction — a
commit, a rollback, ``Session.close()`` — the batch is published only if it is visible from
another connection afterwards, which only a commit makes it. Savepoints neither publish nor
discard: only the outermost transaction decides. A Django connection has its own rules, which say
the same: ``transaction.on_commit`` (:mod:`.djangotx`).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy.orm import Session, SessionTransaction

from . import djangotx

__all__ = ["on_commit", "caller_connection", "joined"]

log = logging.getLogger(__name__)


def caller_connection(connection: Any) -> sa.Connection:
    """The Connection to write with: the Session's own, or the Connection itself."""
    if isinstance(connection, Session):
        return connection.connection()
    if isinstance(connection, sa.Connection):
        if not connection.in_transaction():
            raise TypeError("connection= needs a Connection inside a transaction (engine.begin() or conn.begin())")
        return connection
    raise TypeError("connection= takes a SQLAlchemy Session or Connection, or a Django connection, "
                    f"not {type(connection).__name__}")


@contextmanager
def joined(connection: Any, registry: sa.Engine) -> Iterator[sa.Connection | None]:
    """The Connection a write joins the caller's transaction with (None without ``connection``): the
    Session's own, the Connection itself, or one on a Django connection's own DBAPI connection."""
    if connection is None:
        yield None
    elif djangotx.is_django_connection(connection):
        with djangotx.joined(connection, registry) as conn:
            yield conn
    else:
        yield caller_connection(connection)


_PENDING = "celery_batches.after_commit"
_LISTENING = "celery_batches.after_commit.listening"


def _settle_pending(session: Session, transaction: SessionTransaction) -> None:
    """End of a Session transaction: when the outermost one ends, settle (and forget) what it carried."""
    if transaction.parent is None:
        pending, session.info[_PENDING] = session.info.get(_PENDING, []), []
        for settle in pending:
            settle()


def on_commit(connection: Any, publish: Callable[[], None], visible: Callable[[], bool], timeout: float) -> None:
    """Call ``publish`` once the caller's outermost transaction has committed; never otherwise."""

    def settle() -> None:
        try:
            if visible():
                publish()
        except Exception:  # the relay publishes whatever this could not
            log.exception("celery_batches: publishing after the caller's commit failed; the relay will do it")

    if djangotx.is_django_connection(connection):
        djangotx.on_commit(connection, settle)
        return
    if isinstance(connection, Session):
        # One listener per Session, registered once: it fires after the DBAPI commit or rollback (or
        # close) of each transaction and settles what the outermost one carried. A listener per batch
        # would stay on a long-lived Session, and keep its batch's publication, for as long as it lives.
        pending = connection.info.setdefault(_PENDING, [])
        pending.append(settle)
        if not connection.info.get(_LISTENING):
            connection.info[_LISTENING] = True
            sa.event.listen(connection, "after_transaction_end", _settle_pending)
        return

    # A Connection announces its commit before the DBAPI commit runs: settle in a thread once the
    # commit has finished (the connection has left its transaction) or the batch became visible.
    def committing(_conn: sa.Connection) -> None:
        sa.event.remove(connection, "rollback", rolled_back)
        threading.Thread(target=settle_when_committed, name="celery_batches-aftercommit", daemon=True).start()

    def rolled_back(_conn: sa.Connection) -> None:
        sa.event.remove(connection, "commit", committing)

    def settle_when_committed() -> None:
        deadline = time.monotonic() + timeout
        while connection.in_transaction() and time.monotonic() < deadline:
            time.sleep(0.002)
        settle()

    sa.event.listen(connection, "commit", committing, once=True)
    sa.event.listen(connection, "rollback", rolled_back, once=True)
