"""Django's database connections as the caller's transaction (``connection=django.db.connection``),
and Django's ``default`` database as the registry's default.

Nothing here imports Django unless the caller already did (a Django connection was passed, or the
process is a Django project): celery_batches works without Django installed.
"""

from __future__ import annotations

import os
import sys
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import sqlalchemy as sa

from ..errors import InvalidBatchError
from ..store.engine import lend, make_lending_engine

__all__ = ["default_database_url", "is_django_connection", "joined", "on_commit"]

#: OPTIONS of a Django PostgreSQL database that are Django's own, not libpq connection parameters
_DJANGO_OPTIONS = {"isolation_level", "server_side_binding", "pool", "assume_role", "prepare_threshold",
                   "cursor_factory", "context", "autocommit"}
_LOCAL = {None, "", "localhost", "127.0.0.1", "::1"}
#: per registry engine, per Django alias: the lending engine (built once; its dialect initialised once)
_ENGINES: "weakref.WeakKeyDictionary[sa.Engine, dict[str, sa.Engine]]" = weakref.WeakKeyDictionary()


def is_django_connection(connection: Any) -> bool:
    """``django.db.connection``, ``connections[alias]`` or any Django database wrapper (without
    importing Django: a process that never imported ``django.db`` has none)."""
    django_db = sys.modules.get("django.db")
    if django_db is None:
        return False
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.utils.connection import ConnectionProxy

    return isinstance(connection, (BaseDatabaseWrapper, ConnectionProxy))


def _wrapper(connection: Any) -> Any:
    from django.db import connections

    return connections[connection.alias]  # this thread's wrapper (``django.db.connection`` is a proxy of it)


def _check_same_database(registry: sa.Engine, wrapper: Any) -> None:
    """The registry must live in the database the Django connection writes to: else its rows would
    not be in the caller's transaction at all."""
    url, settings = registry.url, wrapper.settings_dict
    same = wrapper.vendor == registry.dialect.name
    if same and wrapper.vendor == "postgresql":
        same = (url.database == settings.get("NAME")
                and int(url.port or 5432) == int(settings.get("PORT") or 5432)
                and ((url.host in _LOCAL and settings.get("HOST") in _LOCAL) or url.host == settings.get("HOST")))
    elif same and wrapper.vendor == "sqlite":
        same = os.path.realpath(str(url.database or "")) == os.path.realpath(str(settings.get("NAME") or ""))
    if not same:
        where = f"{wrapper.vendor} {settings.get('NAME')!r}"
        if wrapper.vendor == "postgresql":
            where += f" on {settings.get('HOST') or 'localhost'}:{settings.get('PORT') or 5432}"
        raise InvalidBatchError(
            f"connection= is Django's database {wrapper.alias!r} ({where}), but the registry is "
            f"{url.render_as_string(hide_password=True)}: a batch joins a transaction of the registry's own "
            "database only (leave batches_database_url unset to use Django's default database)")


def _lending_engine(registry: sa.Engine, wrapper: Any) -> sa.Engine:
    per_alias = _ENGINES.setdefault(registry, {})
    engine = per_alias.get(wrapper.alias)
    if engine is None:
        _check_same_database(registry, wrapper)
        engine = per_alias[wrapper.alias] = make_lending_engine(
            registry.url.render_as_string(hide_password=False))
    return engine


@contextmanager
def joined(connection: Any, registry: sa.Engine) -> Iterator[sa.Connection]:
    """A SQLAlchemy ``Connection`` on the Django connection's own DBAPI connection, in a savepoint of
    its current atomic block (or in an atomic block of its own when it has none): what it writes is
    all or nothing, and lasts only if Django's outermost transaction commits."""
    from django.db import transaction

    wrapper = _wrapper(connection)
    engine = _lending_engine(registry, wrapper)
    wrapper.validate_thread_sharing()
    with transaction.atomic(using=wrapper.alias):
        wrapper.validate_no_broken_transaction()
        with lend(engine, wrapper.connection) as conn:
            yield conn


def on_commit(connection: Any, settle: Callable[[], None]) -> None:
    """``settle()`` once Django's transaction commits (at once outside an atomic block); never if it,
    or a savepoint the call is inside, rolls back."""
    from django.db import transaction

    transaction.on_commit(settle, using=connection.alias)


def _settings_database() -> dict[str, Any] | None:
    """Django's ``DATABASES["default"]`` in a configured Django project, else None."""
    conf = sys.modules.get("django.conf")
    if not os.environ.get("DJANGO_SETTINGS_MODULE") and not (conf is not None and conf.settings.configured):
        return None  # not a Django project (kombu imports parts of Django wherever it is installed)
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
    except ImportError:
        return None
    try:
        return dict(settings.DATABASES["default"])
    except (ImproperlyConfigured, ImportError, KeyError):
        return None


def default_database_url() -> str | None:
    """Django's ``default`` database as a SQLAlchemy URL (PostgreSQL through psycopg 3, or SQLite), in
    a configured Django project; None elsewhere, or for a database the registry does not run on."""
    db = _settings_database()
    if not db:
        return None
    engine = str(db.get("ENGINE", ""))
    if engine.endswith(("postgresql", "postgis")):
        options = {key: str(value) for key, value in (db.get("OPTIONS") or {}).items()
                   if key not in _DJANGO_OPTIONS and isinstance(value, (str, int))}
        url = sa.URL.create("postgresql+psycopg", username=db.get("USER") or None,
                            password=db.get("PASSWORD") or None, host=db.get("HOST") or None,
                            port=int(db["PORT"]) if db.get("PORT") else None, database=db.get("NAME") or None,
                            query=options)
    elif engine.endswith("sqlite3") and str(db.get("NAME") or ":memory:") != ":memory:":
        url = sa.URL.create("sqlite", database=str(db["NAME"]))
    else:
        return None
    return url.render_as_string(hide_password=False)
