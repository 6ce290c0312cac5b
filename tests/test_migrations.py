"""Migration drift: a registry built by the migrations must be the schema ``build_tables`` describes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from celery_batches.store.migrate import migrate
from celery_batches.store.tables import Tables, build_tables


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[sa.Engine]:
    """An empty database of its own on each backend, so no other registry can hide or fake a difference."""
    if request.param == "postgresql":
        url = request.getfixturevalue("fresh_database_url")
    else:
        url = f"sqlite:///{tmp_path}/registry.sqlite3"
    engine = sa.create_engine(url)
    yield engine
    engine.dispose()


def _predicates(engine: sa.Engine, tables: Tables) -> dict[str, str | None]:
    """Each index's WHERE as the database normalised it, keyed by its name without the prefix."""
    inspector = sa.inspect(engine)
    return {ix["name"].replace(tables.prefix, "", 1): (None if where is None else str(where))
            for table in tables.metadata.tables.values() for ix in inspector.get_indexes(table.name)
            for where in [ix.get("dialect_options", {}).get(f"{engine.dialect.name}_where")]}


def _drift(engine: sa.Engine, prefix: str) -> list[str]:
    """Every difference between the migrated schema and ``build_tables(prefix)``, one line each."""
    migrate(engine, prefix)
    tables = build_tables(prefix)
    version_table = f"{prefix}alembic_version"
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "compare_type": True, "compare_server_default": True,
            "include_name": lambda name, type_, _parent: not (type_ == "table" and name == version_table)})
        diffs = compare_metadata(context, tables.metadata)
    # compare_metadata groups the changes of one column in a list
    found = [repr(d) for group in diffs for d in (group if isinstance(group, list) else [group])]

    # a client-side default is not in the DDL: COPY and plain SQL would not get it, so it drifts silently
    inspector = sa.inspect(engine)
    for table in tables.metadata.tables.values():
        reflected = {c["name"]: c for c in inspector.get_columns(table.name)}
        found += [f"{table.name}.{c.name}: default={getattr(c.default, 'arg', c.default)!r} in tables.py only"
                  " (the migrations give no server default)" for c in table.columns
                  if c.default is not None and c.name in reflected and reflected[c.name].get("default") is None]

    # Alembic does not compare partial-index predicates: build the tables under another prefix and compare
    reference = build_tables(f"ref_{prefix}")
    reference.metadata.create_all(engine)
    migrated, wanted = _predicates(engine, tables), _predicates(engine, reference)
    found += [f"index {name}: WHERE {migrated.get(name)!r} after the migrations, {wanted.get(name)!r} from tables.py"
              for name in sorted(migrated.keys() | wanted.keys()) if migrated.get(name) != wanted.get(name)]
    return found


@pytest.mark.parametrize("prefix", ["celery_batches_", "Cb_Drift_"])
def test_migrations_match_the_tables(engine: sa.Engine, prefix: str) -> None:
    """Migrating a fresh database yields exactly what the code queries (the default and a mixed-case prefix)."""
    drift = _drift(engine, prefix)
    assert not drift, f"{len(drift)} difference(s) between the migrations and tables.py:\n" + "\n".join(drift)
