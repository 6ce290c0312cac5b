"""Dashboard response times on a large registry: N batches and 10·N runs in PostgreSQL (N = 100,000 or 1,000,000).

Fills a registry under its own table prefix (``cbdash_``) with ``INSERT ... SELECT generate_series``
(once; later runs reuse it unless ``--refill``), then times every page and API endpoint through the
WSGI application with Werkzeug's test client: the server time of a request, without a network.

    python benchmarks/dashboard.py [--batches 100000] [--repeat 9] [--refill] [--drop]

The registry (table prefix ``cbdash_<N/1000>k_``, or BENCH_DASHBOARD_PREFIX) holds, for ``--batches N``
(at least 1,002):

* ``big-import``: one batch of N jobs, 60% done (1% of them failed), the rest pending;
* N - 1 more batches of 9 jobs each: 80% top-level, 20% nested under them (some two levels
  deep), plus one 1,000-batch tree (a 10-ary tree four levels deep) under ``tree-root``; about 2%
  FAILED, 2% CANCELLED, the newest 100 STARTED, the rest COMPLETED; names ``order-N``,
  ``import-N`` and ``report-N``; created one every 25 s (N = 100,000: over the last 29 days);
* an ``on_success`` continuation on every tenth batch.

Needs PostgreSQL (127.0.0.1:5432, database ``test``; override with BENCH_DATABASE_URL) and Redis
for the revoke broadcast of the cancel endpoint (BENCH_REDIS_URL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from celery import Celery  # noqa: E402
from werkzeug.test import Client  # noqa: E402

from celery_batches import BatchStatus, Batches, RunStatus, metrics  # noqa: E402
from celery_batches.dashboard import create_app  # noqa: E402
from celery_batches.store import drop_schema  # noqa: E402

env = os.environ.get
JOBS_EACH = 9
TREE = 1_000  # the last 1,000 batches form a 10-ary tree under the one before them
LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


def bid(n: str) -> str:
    """The deterministic id of batch number ``n`` (an SQL expression)."""
    return f"md5('cbdash-b' || ({n}))::uuid"


def fill_statements(BATCHES: int) -> list[str]:  # noqa: N803  (reads as the constant it is)
    """The statements that fill a registry of ``BATCHES`` batches (the big one has as many jobs)."""
    BIG_JOBS, TREE_ROOT = BATCHES, BATCHES - TREE  # noqa: N806
    return [
    # batches: parent, status and counters are derived from the number n
    f"""
    INSERT INTO {{batches}} (id, name, parent_id, status, total_jobs, completed_jobs, failed_jobs, cancelled_jobs,
                            created_by, created_at, completed_at, expires_at, antecedent_id, continue_when)
    SELECT {bid('n')},
           CASE WHEN n = 1 THEN 'big-import' WHEN n = {TREE_ROOT} THEN 'tree-root'
                WHEN n % 3 = 0 THEN 'order-' || n WHEN n % 3 = 1 THEN 'import-' || n ELSE 'report-' || n END,
           CASE WHEN n = {TREE_ROOT} THEN NULL
                WHEN n > {TREE_ROOT} THEN {bid(f'{TREE_ROOT} + (n - {TREE_ROOT + 1}) / 10')}
                WHEN n % 25 = 0 THEN {bid('n - 5')}
                WHEN n % 5 = 0 THEN {bid('n - 1')} END,
           s.status, 0, 0, 0, 0, 'bench',
           now() - ({BATCHES} - n) * interval '25 seconds',
           CASE WHEN s.status >= 2 THEN now() - ({BATCHES} - n) * interval '25 seconds' + interval '20 seconds' END,
           CASE WHEN s.status >= 2 THEN now() + interval '7 days' END, NULL, NULL
    FROM generate_series(1, {BATCHES}) AS n,
         LATERAL (SELECT CASE WHEN n = 1 OR n > {BATCHES - 100} OR n BETWEEN {TREE_ROOT} AND {TREE_ROOT + 10} THEN 1
                              WHEN n % 50 = 7 THEN 3 WHEN n % 50 = 13 THEN 4 ELSE 2 END AS status) AS s
    """,
    # the big batch: 100,000 jobs, 60% finished, every 100th job failed
    f"""
    INSERT INTO {{runs}} (id, batch_id, position, status, task_name, args, kwargs, queue, options, created_at,
                         started_at, finished_at, error, retries, published)
    SELECT gen_random_uuid(), {bid('1')}, p,
           CASE WHEN p >= {BIG_JOBS * 6 // 10} THEN 0 WHEN p % 100 = 99 THEN 4 ELSE 3 END,
           'shop.tasks.import_row', '[' || p || ', "row"]', '{{{{"source": "s3://bucket/big.csv"}}}}', NULL, NULL,
           now() - interval '1 hour',
           CASE WHEN p < {BIG_JOBS * 6 // 10} THEN now() - interval '1 hour' + p * interval '30 ms' END,
           CASE WHEN p < {BIG_JOBS * 6 // 10} THEN now() - interval '1 hour' + p * interval '30 ms'
                                                   + interval '25 ms' END,
           CASE WHEN p < {BIG_JOBS * 6 // 10} AND p % 100 = 99 THEN 'ValueError: row ' || p || ' is invalid' END,
           0, true
    FROM generate_series(0, {BIG_JOBS - 1}) AS p
    """,
    # every other batch: 9 jobs, their statuses matching the batch's
    f"""
    INSERT INTO {{runs}} (id, batch_id, position, status, task_name, args, kwargs, queue, options, created_at,
                         started_at, finished_at, error, retries, published, node)
    SELECT gen_random_uuid(), b.id, p,
           CASE b.status WHEN 1 THEN CASE WHEN p < 4 THEN 3 WHEN p = 4 THEN 1 ELSE 0 END
                         WHEN 3 THEN CASE WHEN p = 0 THEN 4 ELSE 3 END
                         WHEN 4 THEN CASE WHEN p < 2 THEN 3 ELSE 5 END ELSE 3 END,
           'shop.tasks.step_' || p, '[' || p || ']', '{{{{}}}}', 'default', NULL, b.created_at,
           CASE WHEN b.status <> 1 OR p <= 4 THEN b.created_at + interval '1 second' END,
           CASE WHEN b.status <> 1 OR p < 4 THEN b.created_at + interval '2 seconds' END,
           CASE WHEN b.status = 3 AND p = 0 THEN 'RuntimeError: step failed' END, 0, true,
           CASE WHEN b.status = 1 AND p = 4 THEN 'bench@host/' || (b.id::text < '8') END  -- claimed, as running is
    FROM {{batches}} b, generate_series(0, {JOBS_EACH - 1}) AS p
    WHERE b.id <> {bid('1')}
    """,
    "INSERT INTO {batch_jobs} (batch_id, position, run_id) SELECT batch_id, position, id FROM {runs}",
    # counters: direct jobs per outcome, plus each child batch once it finished
    """
    UPDATE {batches} b SET total_jobs = j.total + coalesce(k.n, 0), completed_jobs = j.c + coalesce(k.c, 0),
                          failed_jobs = j.f + coalesce(k.f, 0), cancelled_jobs = j.x + coalesce(k.x, 0)
    FROM (SELECT batch_id, count(*) AS total, count(*) FILTER (WHERE status = 3) AS c,
                 count(*) FILTER (WHERE status = 4) AS f, count(*) FILTER (WHERE status = 5) AS x
          FROM {runs} GROUP BY batch_id) j
    LEFT JOIN (SELECT parent_id, count(*) AS n, count(*) FILTER (WHERE status = 2) AS c,
                      count(*) FILTER (WHERE status = 3) AS f, count(*) FILTER (WHERE status = 4) AS x
               FROM {batches} WHERE parent_id IS NOT NULL GROUP BY parent_id) k ON k.parent_id = j.batch_id
    WHERE b.id = j.batch_id
    """,
    """
    INSERT INTO {continuations} (id, batch_id, kind, position, task_name, args, kwargs, options, status, due_at,
                                 dispatched_at)
    SELECT gen_random_uuid(), id, 'success', 0, 'shop.tasks.notify', '["done"]', '{{}}', NULL,
           CASE status WHEN 2 THEN 2 WHEN 1 THEN 0 ELSE 3 END,
           CASE WHEN status = 2 THEN completed_at END, CASE WHEN status = 2 THEN completed_at END
    FROM {batches} WHERE parent_id IS NULL AND (hashtext(name) % 10) = 0
    """,
    ]


def tables(batches: Batches) -> dict[str, str]:
    t = batches.transitions.tables
    return {"batches": t.batches.name, "runs": t.runs.name, "batch_jobs": t.batch_jobs.name,
            "continuations": t.continuations.name}


def registry_tables(batches: Batches) -> list[str]:
    """Every table of the registry (its schema as of the latest migration), version table aside."""
    return [t.name for t in batches.transitions.tables.metadata.sorted_tables]


def fill(batches: Batches, n: int, refill: bool) -> None:
    names = tables(batches)
    with batches.engine.connect() as conn:
        have = conn.scalar(sa.text(f"SELECT count(*) FROM {names['batches']}"))
    if have >= n and not refill:
        print(f"reusing the registry under prefix {batches.settings.table_prefix!r} ({have:,} batches); "
              "--refill to rebuild it")
        return
    t0 = time.perf_counter()
    with batches.engine.begin() as conn:
        # every table of the registry at once: PostgreSQL refuses to truncate a table another one
        # references unless that one is truncated with it (batch_tags, migration 0004, references
        # batches), and a refill starts from an empty registry (no publications, leases or nodes)
        conn.execute(sa.text(f"TRUNCATE {', '.join(registry_tables(batches))}"))
        for statement in fill_statements(n):
            conn.execute(sa.text(statement.format(**names)))
    with batches.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for name in names.values():
            conn.execute(sa.text(f"VACUUM ANALYZE {name}"))
        counts = {k: conn.scalar(sa.text(f"SELECT count(*) FROM {v}")) for k, v in names.items()}
    print(f"filled in {time.perf_counter() - t0:.1f} s: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))


def cancel_targets(batches: Batches, n: int) -> list[str]:
    """Fresh STARTED batches of 100 pending (unpublished) jobs, one per cancel request."""
    names = tables(batches)
    ids = []
    with batches.engine.begin() as conn:
        for _ in range(n):
            batch_id = conn.scalar(sa.text(
                f"INSERT INTO {names['batches']} (id, name, status, total_jobs, completed_jobs, failed_jobs, "
                "cancelled_jobs, created_at) VALUES (gen_random_uuid(), 'cancel-me', 1, 100, 0, 0, 0, "
                "now() - interval '30 days') RETURNING id"))
            conn.execute(sa.text(
                f"INSERT INTO {names['runs']} (id, batch_id, position, status, task_name, args, kwargs, created_at, "
                "retries, published) SELECT gen_random_uuid(), :b, p, 0, 'shop.tasks.noop', '[]', '{}', now(), 0, "
                "false FROM generate_series(0, 99) p"), {"b": batch_id})
            conn.execute(sa.text(f"INSERT INTO {names['batch_jobs']} SELECT batch_id, position, id "
                                 f"FROM {names['runs']} WHERE batch_id = :b"), {"b": batch_id})
            ids.append(str(batch_id))
    return ids


def timed(call, repeat: int) -> tuple[float, float, int]:
    status = 0
    for _ in range(2):  # warm the plan cache and the connection pool
        status = call().status_code
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        response = call()
        samples.append((time.perf_counter() - t0) * 1000)
        status = response.status_code
    return statistics.median(samples), max(samples), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100_000, help="batches in the registry (runs: ten times as many)")
    parser.add_argument("--repeat", type=int, default=9, help="timed requests per endpoint (median reported)")
    parser.add_argument("--refill", action="store_true", help="rebuild the registry even if it is there")
    parser.add_argument("--drop", action="store_true", help="drop the benchmark tables at the end")
    args = parser.parse_args()
    if args.batches < TREE + 2:
        parser.error(f"--batches must be at least {TREE + 2:,}: the big batch, the tree's root and its "
                     f"{TREE:,} batches")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    n = args.batches
    prefix = env("BENCH_DASHBOARD_PREFIX", f"cbdash_{n // 1000}k_")
    app = Celery("dashbench", broker=env("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8"), set_as_current=False)
    batches = Batches(app, database_url=env("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
                      table_prefix=prefix, relay_interval=0)
    batches.migrate()
    fill(batches, n, args.refill)
    batches.tallies.compact()  # what a worker's relay does every minute: the fill's triggers left a long ledger

    with batches.engine.connect() as conn:
        ids = {k: str(conn.scalar(sa.text(f"SELECT {bid(str(k))}"))) for k in (1, n - TREE, n - 50, n // 2)}
    big, tree, small, middle = ids[1], ids[n - TREE], ids[n - 50], ids[n // 2]
    jobs, half = f"{n:,} jobs", f"{n // 2:,}th"
    client = Client(create_app(batches))
    get = lambda url: lambda: client.get(url, environ_base=LOCAL)  # noqa: E731

    cases = [
        ("batches page, newest", get("/")),
        (f"batches page, older than the {half}", get(f"/?before={middle}")),
        ("batches page, status=failed", get("/?status=failed")),
        ("batches page, status=started", get("/?status=started")),
        ("batches page, name search 'order-9999' (matches)", get("/?q=order-9999")),
        ("batches page, name search 'no-such-name' (no match)", get("/?q=no-such-name")),
        (f"batch page, {jobs}, first page", get(f"/batches/{big}")),
        (f"batch page, {jobs}, last page", get(f"/batches/{big}?start={n - 100}")),
        (f"batch page, {jobs}, failed only", get(f"/batches/{big}?status=failed")),
        (f"batch page, {jobs}, failed, page 5", get(f"/batches/{big}?status=failed&start={n * 49 // 100}")),
        (f"batch page, {jobs}, pending only", get(f"/batches/{big}?status=pending")),
        (f"batch page, {jobs}, failed after 60% (none)", get(f"/batches/{big}?status=failed&start={n * 6 // 10}")),
        (f"batch page, {jobs}, running only (none)", get(f"/batches/{big}?status=running")),
        ("batch page, 1,000-batch tree", get(f"/batches/{tree}")),
        ("batch page, small nested batch", get(f"/batches/{small}")),
        ("GET /metrics (Prometheus)", get("/metrics")),
        ("GET /api/batches", get("/api/batches")),
        ("GET /api/batches?status=completed&q=report", get("/api/batches?status=completed&q=report")),
        (f"GET /api/batches?before=<{half}>", get(f"/api/batches?before={middle}")),
        (f"GET /api/batches/<{jobs}>", get(f"/api/batches/{big}")),
        ("GET /api/batches/<1,000-batch tree>", get(f"/api/batches/{tree}")),
        (f"GET /api/batches/<id>/jobs ({jobs})", get(f"/api/batches/{big}/jobs")),
        (f"GET /api/batches/<id>/jobs?after={n - 1000}", get(f"/api/batches/{big}/jobs?after={n - 1000}")),
        ("GET /api/batches/<id>/jobs?status=failed", get(f"/api/batches/{big}/jobs?status=failed")),
    ]
    targets = cancel_targets(batches, args.repeat + 2)
    token_client = Client(create_app(batches, api_token="benchmark-token-0123456789"))
    cancels = iter(targets)
    cases.append(("POST /api/batches/<id>/cancel (100 pending jobs)",
                  lambda: token_client.post(f"/api/batches/{next(cancels)}/cancel", environ_base=LOCAL,
                                            headers={"X-Batches-Token": "benchmark-token-0123456789"})))

    print(f"\n{'request':<66} {'median ms':>9} {'max ms':>8}  status")
    for label, call in cases:
        median, worst, status = timed(call, args.repeat)
        print(f"{label:<66} {median:9.1f} {worst:8.1f}  {status}")

    # what the maintained counts save: the same numbers by scanning, and whether they agree
    names = tables(batches)
    t0 = time.perf_counter()
    with batches.engine.connect() as conn:
        scanned = {"batches": dict(conn.execute(sa.text(f"SELECT status, count(*) FROM {names['batches']} "
                                                        "GROUP BY status")).all()),
                   "runs": dict(conn.execute(sa.text(f"SELECT status, count(*) FROM {names['runs']} "
                                                     "GROUP BY status")).all())}
    scan_ms = (time.perf_counter() - t0) * 1000
    snap = metrics.snapshot(batches)
    agree = all(getattr(snap, kind) == {s.name.lower(): scanned[kind].get(int(s), 0) for s in enum}
                for kind, enum in (("batches", BatchStatus), ("runs", RunStatus)))
    print(f"\nbatches and runs by status counted by a scan: {scan_ms:.0f} ms; /metrics agrees with it: {agree}")

    if args.drop:
        drop_schema(batches.engine, prefix)
        print(f"dropped the tables under prefix {prefix!r}")


if __name__ == "__main__":
    main()
