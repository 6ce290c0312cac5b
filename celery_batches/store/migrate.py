"""Create or upgrade the registry schema with Alembic, one process at a time."""

from __future__ import annotations

import zlib

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

__all__ = ["SchemaTooOld", "check_schema", "drop_schema", "head_revision", "migrate", "schema_revision"]


class SchemaTooOld(RuntimeError):
    """The registry's schema is older than this version of celery_batches needs."""


def _config(prefix: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "celery_batches.store:migrations")
    cfg.attributes["prefix"] = prefix
    return cfg


def head_revision() -> str:
    """The newest schema revision this version of celery_batches knows."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config("")).get_current_head() or ""


def schema_revision(engine: sa.Engine, prefix: str) -> str | None:
    """The revision the registry's schema is at (None: no schema there yet)."""
    version = sa.Table(f"{prefix}alembic_version", sa.MetaData(), sa.Column("version_num", sa.String(32)))
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(version.name):
            return None
        return conn.scalar(sa.select(version.c.version_num))


def check_schema(engine: sa.Engine, prefix: str) -> str | None:
    """Raise ``SchemaTooOld``, saying what to do, if the schema is older than this code's head;
    return the revision found (None: no schema yet, which a ``migrate`` running meanwhile may
    create). Revisions are numbered in order; a newer schema, from a newer version, is left alone."""
    found, head = schema_revision(engine, prefix), head_revision()
    if found is not None and found < head:
        raise SchemaTooOld(
            f"celery_batches: the registry (tables {prefix}*) is at schema revision {found or 'none'}, and this "
            f"version of celery_batches needs {head}. Upgrade it first: `celery -A <your app> batches migrate` "
            "(or Batches.migrate()), from one process; workers and producers of the new version start after it.")
    return found


def migrate(engine: sa.Engine, prefix: str, revision: str = "head") -> None:
    """Upgrade to ``revision`` (the newest by default); idempotent and safe when many processes start at once.

    On PostgreSQL a transaction-level advisory lock (keyed by the prefix) serialises concurrent
    callers, and the DDL runs in that same transaction, so a loser sees the finished schema.
    """
    cfg = _config(prefix)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            key = zlib.crc32(f"celery_batches.migrate:{prefix}".encode())
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def drop_schema(engine: sa.Engine, prefix: str) -> None:
    """Drop every registry table of ``prefix``, version table included (test and benchmark scratch)."""
    from .tables import build_tables
    from .tallies import drop_triggers

    with engine.begin() as conn:
        drop_triggers(conn, prefix)
    build_tables(prefix).metadata.drop_all(engine)
    sa.Table(f"{prefix}alembic_version", sa.MetaData()).drop(engine, checkfirst=True)
