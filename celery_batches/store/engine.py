"""Engine creation: PostgreSQL (psycopg 3) or the embedded SQLite default, configured for our access pattern."""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any, Iterator, Mapping

import sqlalchemy as sa
import sqlalchemy.dialects.sqlite
from sqlalchemy.pool import NullPool, StaticPool

__all__ = ["lend", "make_claim_engine", "make_engine", "make_lending_engine", "refused_for_good"]


def make_engine(url: str, options: Mapping[str, Any], *, prepared_statements: bool = False) -> sa.Engine:
    """Create the registry engine.

    SQLite gets one writer at a time (``BEGIN IMMEDIATE``) and WAL, so concurrent threads and
    processes queue on the lock instead of failing on a read-to-write upgrade.

    On PostgreSQL nothing outlives a transaction on the server: no startup options, no session
    settings, and (unless ``prepared_statements``) no server-side prepared statements, which psycopg
    makes by itself of a statement run five times. So every connection works through PgBouncer in
    transaction pooling mode, where consecutive transactions of one connection may reach different
    server connections (PgBouncer before 1.21 does not carry prepared statements across them).
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
        if sa_url.get_driver_name() == "psycopg" and not prepared_statements:
            kwargs["connect_args"] = {"prepare_threshold": None}
    connect_args = {**kwargs.get("connect_args", {}), **options.get("connect_args", {})}
    kwargs.update(options)
    if connect_args:
        kwargs["connect_args"] = connect_args
    engine = sa.create_engine(sa_url, **kwargs)
    _fork_safe(engine)
    if engine.dialect.name == "sqlite":
        _serialise_sqlite_writers(engine)
    return engine


def make_claim_engine(url: str, options: Mapping[str, Any], *, prepared_statements: bool = False
                      ) -> sa.Engine | None:
    """A small engine for claims (one before every member task starts), or None to use the main one.

    On PostgreSQL a claim is one statement in autocommit: one round trip, no BEGIN/COMMIT, no
    pre-ping (a dead pooled connection fails the statement, and the caller's retry takes a fresh
    one). The statement itself asks not to wait for the disk flush (``store/liveness.py``).
    """
    if sa.make_url(url).get_backend_name() != "postgresql":
        return None
    return make_engine(url, {**options, "isolation_level": "AUTOCOMMIT", "pool_pre_ping": False},
                       prepared_statements=prepared_statements)


class _Lent:
    """Someone else's DBAPI connection, lent to SQLAlchemy for statements only: ending its transaction
    (commit, rollback) and closing it stay with its owner, so those are no-ops here, and nothing may
    change its settings (autocommit, isolation level)."""

    __slots__ = ("_dbapi",)

    def __init__(self, dbapi: Any) -> None:
        object.__setattr__(self, "_dbapi", dbapi)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dbapi, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"celery_batches does not change {name!r} of a connection lent to it")

    def commit(self) -> None:
        """The owner commits."""

    def rollback(self) -> None:
        """The owner rolls back."""

    def close(self) -> None:
        """The owner closes."""

    def add_notice_handler(self, _handler: Any) -> None:
        """Not once per use of the same connection (psycopg's dialect adds one at every connect)."""


#: the DBAPI connection :func:`lend` is lending in this context
_LENDING: ContextVar[Any] = ContextVar("celery_batches_lending")


def make_lending_engine(url: str) -> sa.Engine:
    """An engine of ``url``'s dialect that opens no connection of its own: each ``Connection`` it gives
    (:func:`lend`) runs on a DBAPI connection its owner lent, inside the owner's transaction, and never
    commits, rolls back or closes it (no pool: nothing is kept after the ``Connection`` closes)."""
    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() == "postgresql" and sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {}
    if sa_url.get_backend_name() == "postgresql":
        kwargs["use_native_hstore"] = False  # would register an adapter on the owner's connection
    engine = sa.create_engine(sa_url, creator=lambda: _Lent(_LENDING.get()), poolclass=NullPool,
                              pool_reset_on_return=None, **kwargs)
    if engine.dialect.name == "sqlite":
        engine.dialect.colspecs = {**engine.dialect.colspecs, sa.DateTime: _ParsedDateTime}
    return engine


class _ParsedDateTime(sa.dialects.sqlite.DATETIME):
    """A DATETIME column read on a connection that may parse it itself (Django opens its sqlite3
    connections with ``detect_types``): a ``datetime`` is taken as it is, text is parsed as usual."""

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        parse = super().result_processor(dialect, coltype)
        if parse is None:
            return None
        return lambda value: value if value is None or isinstance(value, datetime) else parse(value)


@contextmanager
def lend(engine: sa.Engine, dbapi_connection: Any) -> Iterator[sa.Connection]:
    """A ``Connection`` of a :func:`make_lending_engine` over ``dbapi_connection``, in its owner's
    current transaction; closing it leaves that transaction and the connection as they are."""
    token = _LENDING.set(dbapi_connection)
    try:
        conn = engine.connect()
    finally:
        _LENDING.reset(token)
    with conn:
        yield conn


def _fork_safe(engine: sa.Engine) -> None:
    """Never use a pooled connection, or a pool lock, in a process other than the one that made it.

    A prefork worker child inherits the parent's pool: sharing one socket between two processes
    corrupts both sessions, and a lock a parent's thread (the relay, the group commit) had taken at the
    instant of the fork stays taken forever in the child. So every forked child starts with a new,
    empty pool (SQLAlchemy's ``dispose(close=False)``: the parent's connections are left alone).
    """
    if isinstance(engine.pool, StaticPool):
        return  # one in-memory SQLite connection: nothing a child could share safely anyway
    ref = weakref.ref(engine)

    def after_fork_in_child() -> None:
        forked = ref()
        if forked is not None:
            forked.dispose(close=False)

    os.register_at_fork(after_in_child=after_fork_in_child)


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


def refused_for_good(exc: BaseException) -> bool:
    """Did the registry refuse this write because of what it carries (so repeating it cannot help)?

    True for a value the database rejects (a malformed UUID, text it cannot store, a violated
    constraint) and for values that cannot even be sent. Everything else — a lost connection, a
    deadlock, a restarting server, an error we do not know — is worth repeating.
    """
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        exc = exc.orig or exc  # raised while binding parameters
    if isinstance(exc, sa.exc.DBAPIError):
        return not exc.connection_invalidated and isinstance(
            exc, (sa.exc.DataError, sa.exc.IntegrityError, sa.exc.ProgrammingError))
    return isinstance(exc, (UnicodeError, ValueError, TypeError))
