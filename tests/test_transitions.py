"""The registry's PostgreSQL statements and their portable twins must agree, case for case.

PostgreSQL applies a group of run transitions in two array statements (``unnest``) and claims a
run with one hand-written statement; other databases (SQLite) use SQLAlchemy statements with the
same conditions. Each scenario runs through both on the same real PostgreSQL and the runs must
end up identical: a drift in either shows here.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from celery_batches import RunStatus
from celery_batches.store import RunEvent
from tests.helpers import needs, nowhere_signature

pytestmark = needs("postgres", "redis")

P, R, T, C, F = RunStatus.PENDING, RunStatus.RUNNING, RunStatus.RETRYING, RunStatus.COMPLETED, RunStatus.FAILED

#: each scenario: the groups of events one run receives, in commit order (a group is one apply)
SCENARIOS = {
    "runs then completes in one group": [[(R, 0, "n/1"), (C, 0, None)]],
    "runs then completes in two groups": [[(R, 0, "n/1")], [(C, 0, None)]],
    "a retry clears the node; its next attempt runs": [[(R, 0, "n/1")], [(T, 0, None)], [(R, 1, "n/2")]],
    "RUNNING never follows RETRYING within one attempt": [[(R, 0, "n/1"), (T, 0, None)], [(R, 0, "n/3")]],
    "an earlier attempt's RUNNING arrives late": [[(R, 1, "n/2")], [(R, 0, "n/1")]],
    "the first final event wins": [[(F, 0, None)], [(C, 0, None)]],
    "two finals in one group: the first": [[(C, 0, None), (F, 0, None)]],
    "progress after final changes nothing": [[(C, 0, None)], [(R, 1, "n/9"), (T, 1, None)]],
    "a final event of a later attempt keeps the higher retries": [[(R, 2, "n/1")], [(F, 1, None)]],
    "a RUNNING without a node keeps the claim's": [[(R, 0, "n/1")], [(R, 0, None)]],
}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=list(SCENARIOS))
def test_postgresql_and_portable_paths_agree(pg_registry, scenario):
    ends, base = [], time.time()
    for portable in (False, True):
        with pg_registry.batch(f"{scenario} (portable={portable})") as b:
            run = b.enqueue(nowhere_signature(pg_registry))
        at = base
        for group in SCENARIOS[scenario]:
            events = []
            for status, retries, node in group:
                at += 1
                events.append(RunEvent(run, status, retries, f"{status.name} error" if status == F else None,
                                       at=at, node=node, traceback=f"{status.name} traceback\x00" if status == F else None))
            pg_registry.transitions.apply_events(events, portable=portable)
        ends.append(_row(pg_registry, run))
    assert ends[0] == ends[1], f"{scenario}: PostgreSQL path {ends[0]} != portable path {ends[1]}"
    assert ends[0]["status"] != int(P), "the scenario changed nothing; it tests nothing"


def _row(batches, run_id: str) -> dict:
    r = batches.transitions.tables.runs
    with batches.engine.connect() as conn:
        row = conn.execute(sa.select(r.c.status, r.c.retries, r.c.node, r.c.started_at, r.c.finished_at,
                                     r.c.claimed_at, r.c.error, r.c.traceback).where(r.c.id == run_id)).one()
    return dict(row._mapping)


#: each claim scenario: what the run went through before, then the claim (retries, node) whose result is compared
CLAIMS = {
    "a pending run": ([], (0, "n/1/a")),
    "a retrying run's next attempt": ([(R, 0, "n/1/a"), (T, 0, None)], (1, "n/2/b")),
    "a running run, another delivery": ([(R, 0, "n/1/a")], (0, "n/2/b")),
    "a running run, the same delivery again": ([(R, 0, "n/1/a")], (0, "n/1/a")),
    "a running run, a later attempt": ([(R, 0, "n/1/a")], (1, "n/2/b")),
    "a finished run": ([(C, 0, None)], (0, "n/2/b")),
}


@pytest.mark.parametrize("scenario", CLAIMS, ids=list(CLAIMS))
def test_postgresql_and_portable_claims_agree(pg_registry, scenario):
    from celery_batches.store import utcnow

    before, (retries, node) = CLAIMS[scenario]
    ends, at = [], utcnow()
    for portable in (False, True):
        with pg_registry.batch(f"claim: {scenario} (portable={portable})") as b:
            run = b.enqueue(nowhere_signature(pg_registry))
        for status, attempt, owner in before:
            pg_registry.transitions.apply_events([RunEvent(run, status, attempt, at=at.timestamp(), node=owner)])
        claim = pg_registry.liveness.claim(run, retries, node, at, portable=portable)
        ends.append(((claim.claimed, claim.run_status, claim.batch_status), _row(pg_registry, run)))
    assert ends[0] == ends[1], f"{scenario}: PostgreSQL claim {ends[0]} != portable claim {ends[1]}"


@pytest.mark.parametrize("keeps", [True, False], ids=["results batch", "plain batch"])
def test_a_result_is_kept_only_for_a_results_batch_on_both_paths(pg_registry, keeps):
    """A COMPLETED event may carry a value (recovery reads it from a result backend for any run);
    only a ``results=True`` batch's run keeps it, on the PostgreSQL and the portable path alike."""
    kept = []
    for portable in (False, True):
        with pg_registry.batch(f"result kept={keeps} (portable={portable})", results=keeps) as b:
            run = b.enqueue(nowhere_signature(pg_registry))
        pg_registry.transitions.apply_events([RunEvent(run, C, 0, result='{"n": 1}')], portable=portable)
        r = pg_registry.transitions.tables.runs
        with pg_registry.engine.connect() as conn:
            kept.append(conn.scalar(sa.select(r.c.result).where(r.c.id == run)))
    assert kept == (['{"n": 1}'] * 2 if keeps else [None, None])
