"""Worker liveness in the registry: node heartbeats, run claims, and what a dead node left open.

A worker node (one ``celery worker`` process, one *incarnation*: a restarted worker is a new node)
heartbeats a row with the pids of its live pool processes, and marks the runs whose messages it
holds but has not started (prefetched, or waiting for an ETA). A pool process claims a run when
it starts it, synchronously, writing ``<node>/<pid>/<delivery>`` into the run: so a run that was executing
when its process or node died is known, even if every transition buffered there was lost.
"""

from __future__ import annotations

from datetime import datetime
from typing import Iterator, Sequence

import sqlalchemy as sa

from ..models import BatchStatus, ContinuationStatus, RunStatus
from .rows import as_utc, is_run_id, utcnow
from ..settings import IDS_PER_STATEMENT
from .queries import sql_name
from .tables import Tables

__all__ = ["UNCLAIMED", "Claim", "Liveness"]

#: what a worker's request carries when its task_prerun handler made no claim for it
UNCLAIMED = object()


_OPEN = (int(RunStatus.PENDING), int(RunStatus.RUNNING), int(RunStatus.RETRYING))
_WAITING = (int(RunStatus.PENDING), int(RunStatus.RETRYING))


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), IDS_PER_STATEMENT):
        yield ids[start:start + IDS_PER_STATEMENT]


class Claim:
    """What a claim found: the run was open and is now RUNNING here (``claimed``), and its batch's
    status; ``owner``: what the claim wrote into the run (``<node>/<pid>/<delivery>``)."""

    __slots__ = ("claimed", "run_status", "batch_status", "owner")

    def __init__(self, claimed: bool, run_status: RunStatus | None, batch_status: BatchStatus | None,
                 owner: str | None = None) -> None:
        self.claimed, self.run_status, self.batch_status, self.owner = claimed, run_status, batch_status, owner


class Liveness:
    def __init__(self, engine: sa.Engine, tables: Tables, claim_engine: sa.Engine | None = None) -> None:
        self.engine = engine
        self.claim_engine = claim_engine or engine
        self.tables = tables
        r, b = tables.runs, tables.batches
        batch_status = sa.select(b.c.status).where(b.c.id == r.c.batch_id).scalar_subquery().label("batch_status")
        retries, node, at = sa.bindparam("b_retries"), sa.bindparam("b_node"), sa.bindparam("b_at")
        force = sa.bindparam("b_force", type_=sa.Boolean)
        replaces = sa.bindparam("b_replaces", type_=sa.String)
        # Claimable: PENDING, or RETRYING by this later attempt (a copy of the attempt that raised the
        # retry, delivered again, is not), or RUNNING in an earlier attempt (a retry's message can
        # arrive before the RETRYING transition is committed), or RUNNING by this very delivery
        # (``node`` ends with a token of the delivery: this claim repeated after its commit went
        # unanswered). Any other delivery of a RUNNING run is not claimed: a republish or a
        # duplicate never makes it run twice. ``force`` (a plain task, which runs whatever the
        # registry says): any unfinished run, so the registry names the process that runs it.
        # ``replaces``: the claim of the delivery this one replaces (``Task.replace()``), taken
        # over with the replacement's own count of retries. A run handed to a replacement is claimed
        # only by deliveries that present the claim it replaced (the replacement, and its retries,
        # which keep its headers): a copy of the replaced message is skipped. Built once: a claim
        # runs before every member task.
        claimable = sa.or_(
            sa.and_(sa.or_(r.c.status == int(RunStatus.PENDING),
                           sa.and_(r.c.status == int(RunStatus.RETRYING), r.c.retries < retries)),
                    sa.or_(r.c.replaced.is_(None), replaces.isnot(None), force)),
            sa.and_(r.c.status == int(RunStatus.RUNNING),
                    sa.or_(force, r.c.retries < retries, r.c.node == node, r.c.node == replaces)))
        self._claim = (sa.update(r).where(r.c.id == sa.bindparam("b_id"), claimable)
                       .values(status=int(RunStatus.RUNNING), node=node, claimed_at=at,
                               retries=sa.case((r.c.node == replaces, retries), (r.c.retries > retries, r.c.retries),
                                               else_=retries),
                               started_at=sa.func.coalesce(r.c.started_at, at))
                       .returning(batch_status))
        self._claim_found = sa.select(r.c.status, batch_status).where(r.c.id == sa.bindparam("b_id"))
        self._pg_claim = self._PG_CLAIM.format(
            runs=sql_name(self.claim_engine.dialect, r), batches=sql_name(self.claim_engine.dialect, b), running=int(RunStatus.RUNNING),
            pending=int(RunStatus.PENDING), retrying=int(RunStatus.RETRYING)
        ) if self.claim_engine.dialect.name == "postgresql" else None

    # The claim on PostgreSQL: the same conditions as ``self._claim`` without SQLAlchemy's
    # per-statement work, which cost as much as the round trip itself (a claim runs before every
    # member task); tests/test_transitions.py holds the two equal. Its own transaction (autocommit)
    # is committed without waiting for the disk flush (``set_config(..., true)`` lasts that
    # transaction only, so nothing stays on a connection PgBouncer hands on): a claim lost in a
    # server crash leaves the run PENDING, which recovery handles like a lost message.
    _PG_CLAIM = """
        UPDATE {runs} AS r SET status = {running}, node = %(b_node)s, claimed_at = %(b_at)s,
               retries = CASE WHEN r.node = %(b_replaces)s THEN %(b_retries)s
                              ELSE greatest(r.retries, %(b_retries)s) END,
               started_at = coalesce(r.started_at, %(b_at)s)
        FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
        WHERE r.id = %(b_id)s
          AND (((r.status = {pending} OR (r.status = {retrying} AND r.retries < %(b_retries)s))
                AND (r.replaced IS NULL OR CAST(%(b_replaces)s AS text) IS NOT NULL OR %(b_force)s))
               OR (r.status = {running} AND (%(b_force)s OR r.retries < %(b_retries)s OR r.node = %(b_node)s
                                             OR r.node = %(b_replaces)s)))
        RETURNING (SELECT b.status FROM {batches} AS b WHERE b.id = r.batch_id) AS batch_status"""


    # -- a pool process starting a run ----------------------------------------------------------------
    def claim(self, run_id: str, retries: int, node: str, at: datetime, *, force: bool = False,
              replaces: str | None = None, portable: bool = False) -> Claim:
        """Mark the run RUNNING on ``node`` before its body runs, in one statement; say what it found.

        Nothing changes for a final run (a redelivery of finished work) or, unless ``force`` or it
        ``replaces`` that claim, one running elsewhere: the caller skips it. ``portable``: the
        SQLAlchemy statement on PostgreSQL too (for the tests).
        """
        params = {"b_id": run_id, "b_retries": retries, "b_node": node, "b_at": at, "b_force": force,
                  "b_replaces": replaces}
        with self.claim_engine.begin() as conn:
            if self._pg_claim is not None and not portable:
                row = conn.exec_driver_sql(self._pg_claim, params).first()
            else:
                row = conn.execute(self._claim, params).first()
            if row is not None:
                return Claim(True, RunStatus.RUNNING, BatchStatus(row.batch_status), node)
            found = conn.execute(self._claim_found, {"b_id": run_id}).first()
        if found is None:
            return Claim(False, None, None)
        return Claim(False, RunStatus(found.status), BatchStatus(found.batch_status))

    def consumed(self, run_id: str) -> None:
        """A delivery of this RUNNING run was taken off the broker and not run (it is running
        elsewhere, as far as the registry knows): no message of it is left in the broker. Should
        the run come back to waiting (its holder was lost), the relay publishes it again, where
        otherwise it would wait for a message that no longer exists (RabbitMQ redelivers a dead
        consumer's acks_late message at once, before recovery knows the consumer is gone)."""
        r = self.tables.runs
        with self.engine.begin() as conn:
            conn.execute(sa.update(r).where(r.c.id == run_id, r.c.status == int(RunStatus.RUNNING))
                         .values(published=False))

    def hand_back(self, run_id: str, owner: str | None, *, replaced_by: str | None = None) -> int:
        """The delivery ``owner`` (None: whichever) gives up the run it claimed, which is not over:
        PENDING again, no node. Its message went back to the broker (``Reject(requeue=True)``): the
        next delivery claims it. Or a replacement takes it over (``Task.replace()``, ``replaced_by``
        "message" or "canvas", see the ``replaced`` column): only the replacement claims it, and its
        retries count from 0 again."""
        r = self.tables.runs
        values: dict = {"status": int(RunStatus.PENDING), "node": None}
        if replaced_by is not None:
            values.update(replaced=replaced_by, retries=0)
        mine = sa.true() if owner is None else r.c.node == owner
        with self.engine.begin() as conn:
            return conn.execute(sa.update(r).where(r.c.id == run_id, r.c.status == int(RunStatus.RUNNING), mine)
                                .values(**values)).rowcount

    def claim_continuation(self, continuation_id: str, token: str, retries: int = 0) -> bool | None:
        """The first delivery of a continuation claims it: True for that one, False for any later
        delivery (a republish), None if no continuation row has that id. ``token`` is one per
        delivery, so a repeat of the same claim (its commit went unanswered) finds it its own; a
        later attempt (``retries``: a continuation's own retry) claims it again."""
        c, now = self.tables.continuations, utcnow()
        due = c.c.status == int(ContinuationStatus.DUE)
        with self.claim_engine.begin() as conn:
            # a delivery proves the message was published: a DUE one (its flag not written yet) is DISPATCHED
            claimed = conn.execute(
                sa.update(c).where(c.c.id == continuation_id,
                                   sa.or_(c.c.claimed_by.is_(None), c.c.claimed_by == token,
                                          sa.func.coalesce(c.c.retries, 0) < retries))
                .values(started_at=sa.func.coalesce(c.c.started_at, now), claimed_by=token, retries=retries,
                        status=sa.case((due, int(ContinuationStatus.DISPATCHED)), else_=c.c.status),
                        dispatched_at=sa.func.coalesce(c.c.dispatched_at, now))).rowcount
            if claimed:
                return True
            return False if conn.scalar(sa.select(c.c.id).where(c.c.id == continuation_id)) else None

    def hand_back_continuation(self, continuation_id: str, token: str) -> None:
        """A continuation's delivery gave its message back to the broker (``Reject(requeue=True)``):
        the next delivery claims it."""
        c = self.tables.continuations
        with self.engine.begin() as conn:
            conn.execute(sa.update(c).where(c.c.id == continuation_id, c.c.claimed_by == token)
                         .values(claimed_by=None))

    # -- a node's heartbeat -----------------------------------------------------------------------------
    def beat(self, node: str, pids: Sequence[int], reserved: Sequence[str] | None) -> None:
        """Refresh the node's row (and its live pool pids), and make the runs it marks exactly
        ``reserved``: the runs whose messages it has reserved but not started. A run it marked and no longer
        holds (dropped with a lost broker connection, say) loses the mark, so recovery looks for its
        message again. ``reserved=None`` (the worker's state could not be read) leaves the marks alone."""
        n, r, now = self.tables.nodes, self.tables.runs, utcnow()
        pid_text = ",".join(str(p) for p in sorted(pids))
        with self.engine.begin() as conn:
            updated = conn.execute(sa.update(n).where(n.c.name == node)
                                   .values(heartbeat_at=now, pids=pid_text)).rowcount
            if not updated:
                conn.execute(sa.insert(n).values(name=node, started_at=now, heartbeat_at=now, pids=pid_text))
            if reserved is None:
                return
            # only our runs' ids (a task of the app may carry any id); the marks change by the difference,
            # a few thousand ids per statement (a node can hold more messages than a statement has parameters)
            wanted = {str(i).lower() for i in reserved if is_run_id(i)}
            marked = {str(i) for i in conn.execute(sa.select(r.c.id).where(r.c.node == node,
                                                                            r.c.status.in_(_WAITING))).scalars()}
            # a claim replaces the mark with "<node>/<pid>/<delivery>" and RUNNING: never unmarked here
            for ids in _chunks(sorted(marked - wanted)):
                conn.execute(sa.update(r).where(r.c.id.in_(ids), r.c.node == node, r.c.status.in_(_WAITING))
                             .values(node=None))
            for ids in _chunks(sorted(wanted - marked)):
                conn.execute(sa.update(r).where(r.c.id.in_(ids), r.c.status.in_(_WAITING),
                                                sa.or_(r.c.node.is_(None), r.c.node != node))
                             .values(node=node))

    def nodes(self) -> dict[str, tuple[datetime, set[int]]]:
        """Every node row: its last heartbeat and live pool pids."""
        n = self.tables.nodes
        with self.engine.connect() as conn:
            return {row.name: (as_utc(row.heartbeat_at), {int(p) for p in (row.pids or "").split(",") if p})
                    for row in conn.execute(sa.select(n))}

    def forget(self, node: str) -> None:
        n = self.tables.nodes
        with self.engine.begin() as conn:
            conn.execute(sa.delete(n).where(n.c.name == node))

    # -- what a dead node or process left ---------------------------------------------------------------
    def _recovered(self) -> list[sa.ColumnElement]:
        """What recovery reads of a run it resolves: where it was, what it is, and what its outcome
        in a result backend would need (is its value kept, since when is this attempt open)."""
        r, b = self.tables.runs, self.tables.batches
        keeps = sa.select(b.c.results).where(b.c.id == r.c.batch_id).scalar_subquery()
        return [r.c.id, r.c.status, r.c.node, r.c.task_name, r.c.options, r.c.batch_id, r.c.queue, r.c.retries,
                r.c.reset_at, keeps.label("keeps_results")]

    def left_by(self, node: str, *, pid: int | None = None, started_before: datetime | None = None,
                limit: int = 500) -> list[sa.Row]:
        """Open runs that name ``node`` (with ``pid``: only those that pool process claimed)."""
        r = self.tables.runs
        where = [r.c.status.in_(_OPEN)]
        if pid is None:
            where.append(sa.or_(r.c.node == node, r.c.node.startswith(f"{node}/", autoescape=True)))
        else:
            where.append(sa.or_(r.c.node == f"{node}/{pid}", r.c.node.startswith(f"{node}/{pid}/", autoescape=True)))
        if started_before is not None:
            where.append(r.c.started_at < started_before)
        q = sa.select(*self._recovered()).where(*where).limit(limit)
        with self.engine.connect() as conn:
            return list(conn.execute(q))

    def claimed_by_dead_processes(self, node: str, live: set[int], before: datetime, limit: int = 500) -> list[sa.Row]:
        """RUNNING runs claimed by a pool process of ``node`` that is not among its live pids
        (claimed before the heartbeat that reported them, so a newly forked process is not mistaken)."""
        r = self.tables.runs
        q = (sa.select(*self._recovered())
             .where(r.c.status == int(RunStatus.RUNNING), r.c.node.startswith(f"{node}/", autoescape=True),
                    r.c.claimed_at < before)
             .limit(limit))
        with self.engine.connect() as conn:
            rows = list(conn.execute(q))
        return [row for row in rows if int(row.node.split("/")[1]) not in live]

    def hand_back_runs(self, run_ids: Sequence[str], *, left_by: str | None = None, unpublish: bool = False) -> int:
        """Open runs whose holder is gone and that Celery would deliver again: PENDING, no node.
        With ``unpublish`` (their message is lost) they wait in the outbox: the relay publishes them.

        Only runs still as recovery saw them change: still named by the gone node ``left_by``, or
        (without it) still waiting with no node. A run a worker claimed meanwhile is left alone:
        handing it back would publish it again while it runs."""
        r = self.tables.runs
        if not run_ids:
            return 0
        # a RETRYING run's lost message was its next attempt: the run is published again as that attempt
        values: dict = {"status": int(RunStatus.PENDING), "node": None,
                        "retries": sa.case((r.c.status == int(RunStatus.RETRYING), r.c.retries + 1),
                                           else_=r.c.retries)}
        if left_by is None:
            still = sa.and_(r.c.status.in_(_WAITING), r.c.node.is_(None))
        else:
            still = sa.or_(r.c.node == left_by, r.c.node.startswith(f"{left_by}/", autoescape=True))
        if unpublish:  # published again as the run's own message, which any delivery may claim
            values.update(published=False, publication_id=None, replaced=None)
        with self.engine.begin() as conn:
            return conn.execute(sa.update(r).where(r.c.id.in_(list(run_ids)), r.c.status.in_(_OPEN), still)
                                .values(**values)).rowcount

    def stranded(self, limit: int) -> list[sa.Row]:
        """Waiting runs (PENDING, RETRYING) of CANCELLED batches. A cancel leaves a running run alone;
        if it comes back to waiting (its worker died and it was handed back, its message was lost)
        nothing publishes it again, since its batch is cancelled: it is the cancel's to finish."""
        r, b = self.tables.runs, self.tables.batches
        q = (sa.select(r.c.id, r.c.retries).join(b, b.c.id == r.c.batch_id)
             .where(r.c.status.in_(_WAITING), b.c.status == int(BatchStatus.CANCELLED)).limit(limit))
        with self.engine.connect() as conn:
            return list(conn.execute(q))

    def unstarted_continuations(self, older_than: datetime, limit: int) -> list[sa.Row]:
        """Continuations published before ``older_than`` that no delivery has claimed yet."""
        c = self.tables.continuations
        q = (sa.select(c.c.id, c.c.task_name, c.c.options)
             .where(c.c.status == int(ContinuationStatus.DISPATCHED), c.c.claimed_by.is_(None),
                    c.c.dispatched_at < older_than)
             .order_by(c.c.dispatched_at).limit(limit))
        with self.engine.connect() as conn:
            return list(conn.execute(q))

    def redue(self, continuation_ids: Sequence[str]) -> int:
        """Continuations whose message is lost go back to the outbox (DUE, no lease): the relay publishes them."""
        c = self.tables.continuations
        if not continuation_ids:
            return 0
        with self.engine.begin() as conn:
            return conn.execute(sa.update(c).where(c.c.id.in_(list(continuation_ids)),
                                                   c.c.status == int(ContinuationStatus.DISPATCHED),
                                                   c.c.claimed_by.is_(None))
                                .values(status=int(ContinuationStatus.DUE), publication_id=None)).rowcount

    def unmarked(self, older_than: datetime, limit: int, after: tuple[datetime, str] | None) -> list[sa.Row]:
        """Published runs that no node holds or runs, created before ``older_than``: the candidates for
        a lost message, in ``(created_at, id)`` order after the cursor. (Only a STARTED batch has
        published open runs: a waiting stage's runs are unpublished, a finished batch has none open.)
        Read along the open-runs index in creation order, whatever the planner's statistics say."""
        r = self.tables.runs
        q = (sa.select(*self._recovered(), r.c.created_at, r.c.replaced)
             .where(r.c.status < int(RunStatus.COMPLETED), r.c.status != int(RunStatus.RUNNING),
                    r.c.node.is_(None), sa.func.coalesce(r.c.replaced, "") != "canvas", r.c.created_at < older_than,
                    sa.or_(r.c.published, r.c.status == int(RunStatus.RETRYING)))
             .order_by(r.c.created_at, r.c.id).limit(limit))
        if after is not None:
            q = q.where(sa.or_(r.c.created_at > after[0], sa.and_(r.c.created_at == after[0], r.c.id > after[1])))
        with self.engine.connect() as conn:
            return list(conn.execute(q))
