"""Migration drift: a registry built by the migrations must be the schema ``build_tables`` describes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from celery_batches.store.migrate import migrate
from celery_batches.store.tables import OPTIONAL_INDEXES, Tables, build_tables
from tests.helpers import Worker, needs


@pytest.fixture(params=[pytest.param("postgresql", marks=needs("postgres")), "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[sa.Engine]:
    """An empty database of its own on each backend, so no other registry can hide or fake a difference."""
    if request.param == "postgresql":
        url = request.getfixturevalue("fresh_database_url")
    else:
        url = f"sqlite:///{tmp_path}/registry.sqlite3"
    engine = sa.create_engine(url)
    yield engine
    engine.dispose()


def _optional(name: str, prefix: str) -> bool:
    return name in {f"ix_{prefix}{index}" for index in OPTIONAL_INDEXES}


def _predicates(engine: sa.Engine, tables: Tables) -> dict[str, str | None]:
    """Each index's WHERE as the database normalised it, keyed by its name without the prefix."""
    inspector = sa.inspect(engine)
    return {ix["name"].replace(tables.prefix, "", 1): (None if where is None else str(where))
            for table in tables.metadata.tables.values() for ix in inspector.get_indexes(table.name)
            if not _optional(ix["name"], tables.prefix)
            for where in [ix.get("dialect_options", {}).get(f"{engine.dialect.name}_where")]}


def _drift(engine: sa.Engine, prefix: str) -> list[str]:
    """Every difference between the migrated schema and ``build_tables(prefix)``, one line each."""
    migrate(engine, prefix)
    tables = build_tables(prefix)
    version_table = f"{prefix}alembic_version"
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "compare_type": True, "compare_server_default": True,
            "include_name": lambda name, type_, _parent: not ((type_ == "table" and name == version_table)
                                                              or (type_ == "index" and _optional(name, prefix)))})
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


@needs("postgres")
def test_name_search_gets_a_trigram_index_where_pg_trgm_can_be_had_and_works_without_one(
        fresh_database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Where the migrating role may create ``pg_trgm`` the batches' names get a trigram index; where
    it may not (no CREATE on the database), the upgrade still completes, and name search reads the
    batches instead."""
    from celery import Celery

    from celery_batches import Batches
    from celery_batches.store.migrate import head_revision

    admin = sa.create_engine(fresh_database_url, isolation_level="AUTOCOMMIT")
    role = f"cbt_noext_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'GRANT CREATE, USAGE ON SCHEMA public TO "{role}"')
        conn.exec_driver_sql(f'REVOKE CREATE ON DATABASE "{admin.url.database}" FROM PUBLIC, "{role}"')
    restricted_url = sa.make_url(fresh_database_url).set(username=role).render_as_string(hide_password=False)
    try:
        found = {}
        for label, url in (("restricted", restricted_url), ("admin", fresh_database_url)):
            app = Celery(f"trgm_{label}", broker="memory://", set_as_current=False)
            batches = Batches(app, database_url=url, table_prefix=f"cbt_{label}_", relay_interval=0)
            batches.migrate()
            with batches.batch("order-12345") as b:
                b.enqueue(app.signature("tests.proj.noop"))
            with batches.batch("report-7"):
                pass
            with batches.engine.connect() as conn:
                version = conn.scalar(sa.text(f"SELECT version_num FROM cbt_{label}_alembic_version"))
            names = {ix["name"] for ix in sa.inspect(batches.engine).get_indexes(f"cbt_{label}_batches")}
            found[label] = (version, f"ix_cbt_{label}_batches_name_trgm" in names,
                            [x.name for x in batches.list_batches(name="DER-123")])
            batches.engine.dispose()
        assert found == {"restricted": (head_revision(), False, ["order-12345"]),
                         "admin": (head_revision(), True, ["order-12345"])}
        assert [r.message for r in caplog.records if "pg_trgm is not available" in r.message] != []
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
            conn.exec_driver_sql(f'DROP ROLE "{role}"')
        admin.dispose()


@needs("postgres", "redis", "worker")
def test_a_worker_refuses_to_start_on_a_schema_older_than_its_code(proj, fresh_database_url):
    """An upgrade deployed before its migration ran: the worker stops at start with what to do,
    rather than fail every write it makes."""
    engine = sa.create_engine(fresh_database_url)
    try:
        migrate(engine, "cbt_old_", revision="0007")
    finally:
        engine.dispose()
    with pytest.raises(RuntimeError, match="worker exited at start") as refused:
        Worker(proj, f"cbt-old-{uuid.uuid4().hex[:6]}", TEST_DATABASE_URL=fresh_database_url, TEST_PREFIX="cbt_old_")
    assert "schema revision 0007" in str(refused.value) and "batches migrate" in str(refused.value)
    # no schema at all yet (a migrate may be running meanwhile): it starts, and says what to run
    with Worker(proj, f"cbt-new-{uuid.uuid4().hex[:6]}", TEST_DATABASE_URL=fresh_database_url,
                TEST_PREFIX="cbt_none_") as started:
        assert "has no schema yet" in started.log.read_text()
