"""Maintained counts for the metrics: the ``tallies`` ledger, the triggers that keep it, and its reads.

Counting batches and runs by status at scrape time is a scan of millions of rows. Instead the
database keeps a ledger of signed deltas, written by triggers on ``batches`` that fire only when a
batch changes status, is inserted or deleted, or a finished batch's counters move (a run finishing
in an open batch, the hot path, only has its trigger's ``WHEN`` evaluated). A batch's *share* of
the ledger is:

* ``batches:<status>`` 1, and ``children:<status>`` 1 if it has a parent;
* once finished, its counters: ``final:completed``, ``final:failed``, ``final:cancelled`` and
  ``final:open`` (units not counted yet: runs still running in a cancelled batch);
* deleted (purged) once finished: ``purged``, the runs it had finished, so that the total of jobs
  ever finished (the charts' jobs per minute) does not drop when old batches go.

The counters count units (direct runs and child batches, design.md), and a child is counted in its
parent exactly while it is finished, so runs by final status = finished batches' counters (the
ledger) + open batches' counters (read live: there are few) - finished children (the ledger).
Open runs split into running (the claimed ones: a small partial index) and retrying (only in open
batches), the rest pending. Top-level batches finishing also add one observation to the duration
histogram; recovery adds ``recovered:<how>``. Compaction folds the deltas into one row per name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Mapping

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..models import BatchStatus, ContinuationStatus, RunStatus
from ..settings import SAMPLES_KEPT, TALLY_VACUUM_ROWS
from .queries import sql_name
from .rows import as_utc
from .tables import Tables

log = logging.getLogger(__name__)

__all__ = ["DURATION_BUCKETS", "RECOVERY", "Snapshot", "Tallies", "create_triggers", "drop_triggers"]

#: upper bounds (seconds) of the batch duration histogram's buckets; a batch runs seconds to days
DURATION_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 21600, 86400)
#: how recovery resolves a run (the recovery counter's label): handed back to be delivered again,
#: its lost message published again, failed as its worker was lost, failed as its replacement's
#: message was lost, cancelled as its batch was, or given the outcome the result backend kept
RECOVERY = ("handed_back", "republished", "worker_lost", "replacement_lost", "cancelled", "reconciled")

_FINAL = int(BatchStatus.COMPLETED)  # a batch status at or above this is finished
_COUNTERS = (("completed", "completed_jobs"), ("failed", "failed_jobs"), ("cancelled", "cancelled_jobs"))
_OPS = ("insert", "update", "delete")


def _share(row: str, sign: str, source: str = "") -> str:
    """The ``(name, n)`` rows of one batch's share, ``row`` naming it (``NEW``, ``OLD`` or a table alias)."""
    status = f"CAST({row}.status AS VARCHAR(8))"
    final = f"{row}.status >= {_FINAL}"
    done = "(" + " + ".join(f"{row}.{column}" for _, column in _COUNTERS) + ")"
    parts = [f"SELECT 'batches:' || {status} AS name, {sign}1 AS n {source}",
             f"SELECT 'children:' || {status}, {sign}1 {source} WHERE {row}.parent_id IS NOT NULL"]
    parts += [f"SELECT 'final:{name}', {sign}{row}.{column} {source} WHERE {final}" for name, column in _COUNTERS]
    parts.append(f"SELECT 'final:open', {sign}({row}.total_jobs - {done}) {source} WHERE {final}")
    return " UNION ALL ".join(parts)


def _observation(dialect: str, row: str, source: str = "", when: str = "") -> str:
    """A finished top-level batch's one observation of the duration histogram (bucket and sum)."""
    if dialect == "postgresql":
        seconds = f"extract(epoch FROM {row}.completed_at - {row}.created_at)"
    else:
        seconds = f"((julianday({row}.completed_at) - julianday({row}.created_at)) * 86400.0)"
    bucket = " ".join(f"WHEN {seconds} <= {le} THEN '{le}'" for le in DURATION_BUCKETS)
    cond = f"{row}.parent_id IS NULL AND {row}.status >= {_FINAL} AND {row}.completed_at IS NOT NULL{when}"
    return (f"SELECT 'duration_le:' || CASE {bucket} ELSE '+Inf' END, 1 {source} WHERE {cond} UNION ALL "
            f"SELECT 'duration_ms', CAST(round({seconds} * 1000) AS BIGINT) {source} WHERE {cond}")


def _purged(row: str) -> str:
    """A finished batch deleted (purged): the runs it had finished, kept in the jobs-finished total
    (its units less itself as a unit of its parent, which counted it)."""
    done = " + ".join(f"{row}.{column}" for _, column in _COUNTERS)
    parent = f"CASE WHEN {row}.parent_id IS NULL THEN 0 ELSE 1 END"
    return f"SELECT 'purged', {done} - {parent} WHERE {row}.status >= {_FINAL}"


def _delta(dialect: str, op: str, tallies: str) -> str:
    """The INSERT a trigger runs for ``op``: the new share minus the old, summed by name."""
    parts = []  # the first names the columns
    if op != "insert":
        parts.append(_share("OLD", "-"))
    if op == "delete":
        parts.append(_purged("OLD"))
    if op != "delete":
        parts.append(_share("NEW", ""))
        parts.append(_observation(dialect, "NEW", when="" if op == "insert" else f" AND OLD.status < {_FINAL}"))
    return (f"INSERT INTO {tallies} (name, n) SELECT name, sum(n) FROM ({' UNION ALL '.join(parts)}) AS d "
            "GROUP BY name HAVING sum(n) <> 0")


#: an update that moves the ledger: a status change, a finished batch's counters moving, a parent set or cleared
_MOVES = (f"OLD.status <> NEW.status OR (NEW.status >= {_FINAL} AND (OLD.total_jobs <> NEW.total_jobs OR "
          + " OR ".join(f"OLD.{c} <> NEW.{c}" for _, c in _COUNTERS)
          + ")) OR (OLD.parent_id IS NULL) <> (NEW.parent_id IS NULL)")


def create_triggers(conn: sa.Connection, prefix: str) -> None:
    """The triggers that keep ``tallies`` (a migration's step), and the ledger of the rows already there."""
    dialect, q = conn.dialect.name, conn.dialect.identifier_preparer.quote
    batches, tallies = q(f"{prefix}batches"), q(f"{prefix}tallies")
    for op in _OPS:
        when = f"WHEN ({_MOVES})" if op == "update" else ""
        name = q(f"{prefix}tally_{op}")
        if dialect == "postgresql":
            conn.exec_driver_sql(f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                                 f"{_delta(dialect, op, tallies)}; RETURN NULL; END $$")
            conn.exec_driver_sql(f"CREATE TRIGGER {name} AFTER {op.upper()} ON {batches} "
                                 f"FOR EACH ROW {when} EXECUTE FUNCTION {name}()")
        else:
            conn.exec_driver_sql(f"CREATE TRIGGER {name} AFTER {op.upper()} ON {batches} "
                                 f"FOR EACH ROW {when} BEGIN {_delta(dialect, op, tallies)}; END")
    source = f"FROM {batches} AS b"
    conn.exec_driver_sql(
        f"INSERT INTO {tallies} (name, n) SELECT name, sum(n) FROM ({_share('b', '', source)} UNION ALL "
        f"{_observation(dialect, 'b', source)}) AS d GROUP BY name HAVING sum(n) <> 0")


def drop_triggers(conn: sa.Connection, prefix: str) -> None:
    """Undo :func:`create_triggers` (dropping the table drops PostgreSQL's triggers, not their functions)."""
    q, pg = conn.dialect.identifier_preparer.quote, conn.dialect.name == "postgresql"
    batches = q(f"{prefix}batches")
    for op in _OPS:
        name = q(f"{prefix}tally_{op}")
        if pg and sa.inspect(conn).has_table(f"{prefix}batches"):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON {batches}")
        elif not pg:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
        if pg:
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {name}()")


@dataclass(frozen=True)
class Snapshot:
    """The metrics' numbers at one moment (``batches`` and ``runs`` by lowercase status name)."""

    batches: dict[str, int]
    runs: dict[str, int]
    unpublished_runs: int
    oldest_unpublished_seconds: float
    continuations_due: int
    recovered: dict[str, int]
    #: cumulative counts of top-level batch durations: (upper bound in seconds or inf, count)
    duration_buckets: list[tuple[float, int]] = field(default_factory=list)
    duration_count: int = 0
    duration_sum: float = 0.0
    #: jobs in a final status, purged ones included (a failure ``retry_failed`` puts back leaves it)
    finished_total: int = 0


class Tallies:
    def __init__(self, engine: sa.Engine, tables: Tables) -> None:
        self.engine, self.tables = engine, tables

    def recovered(self, counts: Mapping[str, int]) -> None:
        """Add to the recovery counter (``how`` -> runs, ``how`` one of :data:`RECOVERY`), in one transaction."""
        rows = [{"name": f"recovered:{how}", "n": n} for how, n in counts.items() if n]
        if rows:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(self.tables.tallies), rows)

    def compact(self) -> int:
        """Fold the ledger's deltas into one row per name (any process, any time: concurrent
        writers' rows are left for the next compaction); returns how many rows it folded. After a
        burst (a bulk creation's triggers), PostgreSQL's ledger is vacuumed at once, so reads
        (an index-only scan) are fast again without waiting for autovacuum."""
        t = self.tables.tallies
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                name = sql_name(conn.dialect, t)
                folded = conn.exec_driver_sql(
                    f"WITH gone AS (DELETE FROM {name} RETURNING name, n), "
                    f"kept AS (INSERT INTO {name} (name, n) SELECT name, sum(n) FROM gone GROUP BY name "
                    "HAVING sum(n) <> 0) SELECT count(*) FROM gone").scalar_one()
            else:  # SQLite: one writer at a time, so read, clear and write back in one transaction
                sums = conn.execute(sa.select(t.c.name, sa.func.sum(t.c.n)).group_by(t.c.name)).all()
                folded = conn.execute(sa.delete(t)).rowcount
                rows = [{"name": name, "n": n} for name, n in sums if n]
                if rows:
                    conn.execute(sa.insert(t), rows)
        if folded > TALLY_VACUUM_ROWS and self.engine.dialect.name == "postgresql":
            try:
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.exec_driver_sql(f"VACUUM (ANALYZE) {sql_name(conn.dialect, t)}")
            except sa.exc.DBAPIError:  # not the tables' owner, say: autovacuum will do it
                log.warning("celery_batches: could not VACUUM the metrics' ledger; autovacuum will", exc_info=True)
        return int(folded)

    def snapshot(self, now: datetime) -> Snapshot:
        """Every gauge and counter, from the ledger and a few small indexed reads, in one transaction."""
        t, b, r, c = self.tables.tallies, self.tables.batches, self.tables.runs, self.tables.continuations
        opened = b.c.status < _FINAL
        with self.engine.connect() as conn:
            ledger = dict(conn.execute(sa.select(t.c.name, sa.func.sum(t.c.n)).group_by(t.c.name)).all())
            live = conn.execute(sa.select(
                *(sa.func.coalesce(sa.func.sum(b.c[column]), 0) for _, column in _COUNTERS),
                sa.func.coalesce(sa.func.sum(b.c.total_jobs), 0)).where(opened)).one()
            running = conn.scalar(sa.select(sa.func.count()).where(
                r.c.status == int(RunStatus.RUNNING), r.c.node.isnot(None)))
            retrying = conn.scalar(sa.select(sa.func.count()).where(
                r.c.status == int(RunStatus.RETRYING), r.c.batch_id.in_(sa.select(b.c.id).where(opened))))
            unpublished = conn.execute(sa.select(sa.func.count(), sa.func.min(r.c.created_at)).where(
                sa.not_(r.c.published), r.c.held.isnot(True))).one()
            due = conn.scalar(sa.select(sa.func.count()).where(c.c.status == int(ContinuationStatus.DUE)))

        def get(name: str) -> int:
            return int(ledger.get(name) or 0)

        batches = {s.name.lower(): get(f"batches:{int(s)}") for s in BatchStatus}
        runs = {}
        for (name, _), counted in zip(_COUNTERS, live):
            runs[name] = get(f"final:{name}") + int(counted) - get(f"children:{int(BatchStatus[name.upper()])}")
        waiting = get("final:open") + int(live[3]) - sum(int(live[i]) for i in range(3)) \
            - sum(get(f"children:{int(s)}") for s in BatchStatus if not s.is_final)
        runs = {"pending": waiting - int(running or 0) - int(retrying or 0), "running": int(running or 0),
                "retrying": int(retrying or 0), **runs}
        oldest = as_utc(unpublished[1])
        cumulative, buckets = 0, []
        for le in (*DURATION_BUCKETS, float("inf")):
            cumulative += get(f"duration_le:{'+Inf' if le == float('inf') else le}")
            buckets.append((float(le), cumulative))
        return Snapshot(
            batches=batches, runs=runs, unpublished_runs=int(unpublished[0]),
            oldest_unpublished_seconds=max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0,
            continuations_due=int(due or 0),
            recovered={how: get(f"recovered:{how}") for how in RECOVERY},
            duration_buckets=buckets, duration_count=cumulative, duration_sum=get("duration_ms") / 1000.0,
            finished_total=sum(runs[name] for name, _ in _COUNTERS) + get("purged"))

    # -- the charts' record -------------------------------------------------------------------------
    def sample(self, now: datetime) -> bool:
        """Record this minute's totals (once: any later call in the same minute does nothing), and
        forget samples older than ``SAMPLES_KEPT``. True if this call wrote the minute's row."""
        s, minute = self.tables.samples, now.replace(second=0, microsecond=0)
        snap = self.snapshot(now)
        row = {"at": minute, "finished": snap.finished_total,
               "durations": json.dumps([n for _, n in snap.duration_buckets])}
        with self.engine.begin() as conn:
            conn.execute(sa.delete(s).where(s.c.at < minute - SAMPLES_KEPT))
            insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(s)
            return conn.execute(insert.values(row).on_conflict_do_nothing(index_elements=["at"])
                                .returning(s.c.at)).first() is not None

    def history(self, since: datetime) -> list[tuple[datetime, int, list[int]]]:
        """The samples from ``since`` on, oldest first: (minute, jobs finished ever, duration histogram)."""
        s = self.tables.samples
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(s.c.at, s.c.finished, s.c.durations).where(s.c.at >= since)
                                .order_by(s.c.at)).all()
        return [(as_utc(at), int(finished), json.loads(durations)) for at, finished, durations in rows]
