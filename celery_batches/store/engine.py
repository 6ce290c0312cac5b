"""Engine creation: PostgreSQL (psycopg 3) or the embedded SQLite default, configured for our access pattern."""

from __future__ import annotations

import os
from typing import Any, Mapping

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

__all__ = ["make_engine"]


def make_engine(url: str, options: Mapping[str, Any]) -> sa.Engine:
    """Create the registry engine.

    SQLite gets one writer at a time (``BEGIN IMMEDIATE``) and WAL, so concurrent threads and
    processes queue on the lock instead of failing on a read-to-write upgrade.
    """
    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() == "postgresql" and sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {}
    if sa_url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        if sa_url.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool
    else:
        kwargs["pool_pre_ping"] = True
    kwargs.update(options)
    engine = sa.create_engine(sa_url, **kwargs)
    _fork_safe(engine)
    if engine.dialect.name == "sqlite":
        _serialise_sqlite_writers(engine)
    return engine


def _fork_safe(engine: sa.Engine) -> None:
    """Never use a pooled connection in a process other than the one that opened it.

    A prefork worker child inherits the parent's pool; sharing one socket between two processes
    corrupts both sessions. SQLAlchemy's recipe: remember the pid, and have the pool replace a
    connection checked out in another process.
    """

    @sa.event.listens_for(engine, "connect")
    def _remember_pid(_dbapi_conn: Any, record: Any) -> None:
        record.info["pid"] = os.getpid()

    @sa.event.listens_for(engine, "checkout")
    def _check_pid(_dbapi_conn: Any, record: Any, proxy: Any) -> None:
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise sa.exc.DisconnectionError("connection was opened in another process")


def _serialise_sqlite_writers(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy emit BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
