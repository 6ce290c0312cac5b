"""The outbox's SQL: publish leases, published flags, what the relay may take, the relay's election.

A run or continuation is *waiting* while it is not flagged published (a run also only while it is
PENDING: one a worker has touched was published). It carries the publish lease of the transaction
that made it publishable; the relay takes only waiting rows whose lease has lapsed (or that carry
none, like rows written before leases existed), and takes them over under a lease of its own.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Sequence

import sqlalchemy as sa

from ..message import Message
from ..models import BatchStatus, ContinuationStatus, RunStatus
from .rows import continuation_message, run_message, storable_text, utcnow
from .queries import run_message_columns, sql_name
from .tables import Tables

__all__ = ["Outbox"]


class Outbox:
    def __init__(self, engine: sa.Engine, tables: Tables, lease: timedelta) -> None:
        self.engine = engine
        self.tables = tables
        self.lease_time = lease
        runs = sql_name(engine.dialect, tables.runs)
        self._pg_flag = self._PG_FLAG.format(runs=runs, pending=int(RunStatus.PENDING))

    # -- leases --------------------------------------------------------------------------------------
    def renew(self, lease: str) -> bool:
        """Extend a publish lease that has not lapsed; False if it has (the relay may own its rows now).

        A publisher calls this before every chunk, so it holds at least ``lease`` seconds per chunk.
        """
        p, now = self.tables.publications, utcnow()
        with self.engine.begin() as conn:
            return conn.execute(sa.update(p).where(p.c.id == lease, p.c.expires_at > now)
                                .values(expires_at=now + self.lease_time)).rowcount == 1

    def exists(self, lease: str) -> bool:
        """Is the lease there for everyone to see: the transaction that made it committed (and no
        publisher has dropped it yet)?"""
        p = self.tables.publications
        with self.engine.connect() as conn:
            return conn.scalar(sa.select(p.c.id).where(p.c.id == lease)) is not None

    def drop(self, lease: str) -> None:
        """The publisher is done: its lease goes, and whatever it left unpublished is the relay's now."""
        p = self.tables.publications
        with self.engine.begin() as conn:
            conn.execute(sa.delete(p).where(p.c.id == lease))

    def elect(self, name: str, holder: str, ttl: timedelta) -> bool:
        """Take or keep the named lease for ``ttl``: True if ``holder`` has it now.

        A plain row, so it needs no session state: it works through PgBouncer's transaction
        pooling and on SQLite, and a holder that dies loses it when ``ttl`` runs out.
        """
        leases, now = self.tables.leases, utcnow()
        with self.engine.begin() as conn:
            taken = conn.execute(sa.update(leases).where(
                leases.c.name == name, sa.or_(leases.c.holder == holder, leases.c.expires_at < now))
                .values(holder=holder, expires_at=now + ttl)).rowcount
            if taken:
                return True
            exists = conn.scalar(sa.select(sa.func.count()).select_from(leases).where(leases.c.name == name))
            if exists:
                return False
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(leases).values(name=name, holder=holder, expires_at=now + ttl))
            return True
        except sa.exc.IntegrityError:  # another node inserted it first
            return False

    def resign(self, name: str, holder: str) -> None:
        leases = self.tables.leases
        with self.engine.begin() as conn:
            conn.execute(sa.delete(leases).where(leases.c.name == name, leases.c.holder == holder))

    # -- flags ---------------------------------------------------------------------------------------
    def mark_published(self, run_ids: Sequence[str], *, portable: bool = False) -> list[str]:
        """Flag runs published; returns the PENDING ones it could not flag yet (a worker holds their row).

        Rows a worker is transitioning right now are skipped rather than waited for: waiting would
        let this statement and a group commit lock the same rows in opposite orders (deadlock).
        A run a worker moved past PENDING needs no flag: only PENDING runs are ever waiting.
        On PostgreSQL it is one statement (the ids as one array); ``portable``: the two-statement
        path SQLite takes, on PostgreSQL too (tests/test_outbox.py holds the two equal).
        """
        r = self.tables.runs
        if self.engine.dialect.name == "postgresql" and not portable:
            with self.engine.begin() as conn:
                return [str(i) for i in conn.exec_driver_sql(self._pg_flag, {"ids": list(run_ids)}).scalars()]
        mine = (sa.select(r.c.id).where(r.c.id.in_(run_ids), r.c.status == int(RunStatus.PENDING),
                                        sa.not_(r.c.published))
                .with_for_update(skip_locked=True))
        with self.engine.begin() as conn:
            conn.execute(sa.update(r).where(r.c.id.in_(mine.scalar_subquery())).values(published=True))
            return [str(i) for i in conn.execute(sa.select(r.c.id).where(
                r.c.id.in_(run_ids), r.c.status == int(RunStatus.PENDING), sa.not_(r.c.published))).scalars()]

    # ``mark_published`` on PostgreSQL in one round trip: the waiting runs among the ids, those of
    # them no worker holds locked, flagged; what was waiting and is not flagged comes back.
    _PG_FLAG = """
        WITH waiting AS (SELECT id FROM {runs} WHERE id = ANY(CAST(%(ids)s AS uuid[]))
                         AND status = {pending} AND NOT published),
             mine AS (SELECT r.id FROM {runs} AS r WHERE r.id IN (SELECT id FROM waiting)
                      FOR UPDATE SKIP LOCKED),
             flagged AS (UPDATE {runs} AS r SET published = true FROM mine
                         WHERE r.id = mine.id AND r.status = {pending} AND NOT r.published RETURNING r.id)
        SELECT id FROM waiting WHERE id NOT IN (SELECT id FROM flagged)"""

    def mark_dispatched(self, continuation_ids: Sequence[str]) -> None:
        c = self.tables.continuations
        with self.engine.begin() as conn:
            conn.execute(sa.update(c).where(c.c.id.in_(continuation_ids), c.c.status == int(ContinuationStatus.DUE))
                         .values(status=int(ContinuationStatus.DISPATCHED), dispatched_at=utcnow()))

    def defer(self, run_ids: Sequence[str], continuation_ids: Sequence[str]) -> None:
        """Hold waiting rows back for one lease (a lease of their own that nobody renews): the relay
        takes them again when it lapses, and meanwhile takes everything behind them."""
        p, r, c, now = self.tables.publications, self.tables.runs, self.tables.continuations, utcnow()
        lease = str(uuid.uuid4())
        with self.engine.begin() as conn:
            conn.execute(sa.insert(p).values(id=lease, expires_at=now + self.lease_time))
            if run_ids:
                conn.execute(sa.update(r).where(r.c.id.in_(list(run_ids)), r.c.status == int(RunStatus.PENDING),
                                                sa.not_(r.c.published)).values(publication_id=lease))
            if continuation_ids:
                conn.execute(sa.update(c).where(c.c.id.in_(list(continuation_ids)),
                                                c.c.status == int(ContinuationStatus.DUE))
                             .values(publication_id=lease))

    def refuse_continuation(self, continuation_id: str, error: str) -> None:
        """The broker refused this continuation's message for good: FAILED, with the reason."""
        c = self.tables.continuations
        with self.engine.begin() as conn:
            conn.execute(sa.update(c).where(c.c.id == continuation_id, c.c.status == int(ContinuationStatus.DUE))
                         .values(status=int(ContinuationStatus.FAILED), error=storable_text(error)))

    # -- the relay -----------------------------------------------------------------------------------
    def _lapsed(self, table: sa.Table, now: datetime) -> sa.ColumnElement[bool]:
        p = self.tables.publications
        live = sa.select(p.c.id).where(p.c.id == table.c.publication_id, p.c.expires_at >= now)
        return sa.not_(sa.exists(live))

    def take_lapsed(self, limit: int) -> tuple[str | None, list[Message], list[Message]]:
        """Take over up to ``limit`` waiting runs and continuations whose lease lapsed, under a new lease.

        Returns ``(lease, runs, continuations)``; the caller publishes them like a producer would.
        """
        r, b, c, p = self.tables.runs, self.tables.batches, self.tables.continuations, self.tables.publications
        now = utcnow()
        with self.engine.begin() as conn:
            runs_q = (sa.select(r.c.id).join(b, b.c.id == r.c.batch_id)
                      .where(sa.not_(r.c.published), r.c.status == int(RunStatus.PENDING),
                             r.c.held.isnot(True), b.c.status == int(BatchStatus.STARTED), self._lapsed(r, now))
                      .order_by(r.c.created_at).limit(limit).with_for_update(of=r, skip_locked=True))
            run_ids = list(conn.execute(runs_q).scalars())
            # a continuation a delivery claimed was published (only its flag is missing): never again
            cont_q = (sa.select(c.c.id).where(c.c.status == int(ContinuationStatus.DUE), c.c.claimed_by.is_(None),
                                              self._lapsed(c, now))
                      .order_by(c.c.due_at).limit(limit).with_for_update(skip_locked=True))
            cont_ids = list(conn.execute(cont_q).scalars())
            if not run_ids and not cont_ids:
                return None, [], []
            lease = str(uuid.uuid4())
            conn.execute(sa.insert(p).values(id=lease, expires_at=now + self.lease_time))
            runs = conn.execute(sa.update(r).where(r.c.id.in_(run_ids)).values(publication_id=lease).returning(
                *run_message_columns(r), r.c.created_at)).all() if run_ids else []
            conts = conn.execute(sa.update(c).where(c.c.id.in_(cont_ids)).values(publication_id=lease).returning(
                c.c.id, c.c.task_name, c.c.args, c.c.kwargs, c.c.options, c.c.batch_id, c.c.due_at)
            ).all() if cont_ids else []
        runs = sorted(runs, key=lambda row: (row.created_at, str(row.batch_id), row.position))
        conts = sorted(conts, key=lambda row: row.due_at)
        return lease, [run_message(row) for row in runs], [continuation_message(row) for row in conts]

    def prune(self, older_than: timedelta) -> int:
        """Delete leases that lapsed long ago (rows pointing to a missing lease count as lapsed)."""
        p = self.tables.publications
        with self.engine.begin() as conn:
            return conn.execute(sa.delete(p).where(p.c.expires_at < utcnow() - older_than)).rowcount
