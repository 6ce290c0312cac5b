"""Prometheus metrics (design.md section 7): the registry's maintained counts (store/tallies.py),
parsed with ``prometheus_client``'s own parser and checked against a count of the registry's rows
after every kind of change: create, nest, run, retry, fail, cancel (with a run still running),
retry_failed re-opening a batch, an empty batch, purge, compaction, and a migration over a
registry that already had batches. On PostgreSQL and the embedded SQLite; served at the
dashboard's ``/metrics`` and by ``celery -A proj batches metrics``; the recovery counter counted
from a real worker killed under a batch (tests/test_recovery.py).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from celery_batches import Batches, BatchStatus, RunStatus, metrics
from celery_batches.dashboard import create_app
from celery_batches.store import RunEvent, migrate, utcnow
from celery_batches.store.tallies import DURATION_BUCKETS, RECOVERY
from tests.helpers import WAIT, counters, eventually, needs, private_registry

LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


def noop() -> None:
    """The jobs of these tests' apps (registered on each app only: a shared task joins every app made later)."""


def parsed(text: str) -> dict[str, dict[tuple, float]]:
    """Every sample of the exposition, by sample name and sorted labels."""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def by_status(samples: dict, name: str) -> dict[str, int]:
    return {dict(labels)["status"]: int(value) for labels, value in samples[name].items()}


def counted(batches: Batches) -> tuple[dict[str, int], dict[str, int]]:
    """Batches and runs by status, counted row by row: what the metrics must say."""
    t = batches.transitions.tables
    with batches.engine.connect() as conn:
        b = dict(conn.execute(sa.select(t.batches.c.status, sa.func.count()).group_by(t.batches.c.status)).all())
        r = dict(conn.execute(sa.select(t.runs.c.status, sa.func.count()).group_by(t.runs.c.status)).all())
    return ({s.name.lower(): b.get(int(s), 0) for s in BatchStatus},
            {s.name.lower(): r.get(int(s), 0) for s in RunStatus})


def agree(batches: Batches) -> dict:
    """Assert that the metrics say what the rows say; the parsed samples."""
    samples = parsed(metrics.render(batches).decode())
    want_batches, want_runs = counted(batches)
    assert by_status(samples, "celery_batches_batches") == want_batches
    assert by_status(samples, "celery_batches_runs") == want_runs
    return samples


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs("postgres"))])
def registry(request, tmp_path) -> Any:
    """A Batches of its own (no relay; an in-memory broker) on the embedded SQLite or on PostgreSQL."""
    app = Celery(f"metrics_{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.task(name="tests.metrics.noop", shared=False)(noop)
    if request.param == "postgres":
        request.getfixturevalue("services")
    if request.param == "sqlite":
        batches = Batches(app, database_url=f"sqlite:///{tmp_path / 'registry.sqlite3'}", relay_interval=0)
        batches.migrate()
        yield batches
        batches.engine.dispose()
    else:
        with private_registry(app, "cbt_me") as batches:
            yield batches


def ids(batches: Batches, batch_id: str) -> list[str]:
    return [j.id for j in batches.get_batch_jobs(batch_id)]


def events(batches: Batches, *evs: RunEvent) -> None:
    batches.transitions.apply_events(list(evs))


def test_the_metrics_count_what_the_registry_holds_through_every_kind_of_change(registry):
    started = time.monotonic()
    noop = registry.app.signature("tests.metrics.noop")
    samples = agree(registry)
    assert by_status(samples, "celery_batches_batches") == dict.fromkeys(["created", "started", "completed", "failed",
                                                                          "cancelled"], 0)
    with registry.batch("parent") as parent:
        for _ in range(5):
            parent.enqueue(noop)
        child_id = parent.add_batch("child", lambda c: [c.enqueue(noop) for _ in range(3)])
    agree(registry)
    jobs, child_jobs = ids(registry, parent.id), ids(registry, child_id)
    events(registry, *(RunEvent(j, RunStatus.RUNNING, node="n1/1") for j in jobs[:3]),
           RunEvent(jobs[3], RunStatus.RETRYING, retries=1))
    samples = agree(registry)
    assert by_status(samples, "celery_batches_runs")["running"] == 3
    events(registry, RunEvent(child_jobs[0], RunStatus.COMPLETED), RunEvent(child_jobs[1], RunStatus.COMPLETED),
           RunEvent(child_jobs[2], RunStatus.FAILED, error="boom"))  # the child finishes FAILED, counted in parent
    agree(registry)
    events(registry, RunEvent(jobs[0], RunStatus.COMPLETED), RunEvent(jobs[1], RunStatus.COMPLETED))
    agree(registry)
    assert registry.cancel_batch(parent.id) == 2  # the pending and the retrying run; one still runs
    samples = agree(registry)
    assert by_status(samples, "celery_batches_runs")["running"] == 1
    events(registry, RunEvent(jobs[2], RunStatus.COMPLETED))  # ends in its cancelled batch
    agree(registry)

    with registry.batch("retried") as b:
        b.enqueue(noop)
        b.enqueue(noop)
    first, second = ids(registry, b.id)
    events(registry, RunEvent(first, RunStatus.FAILED, error="x"), RunEvent(second, RunStatus.COMPLETED))
    agree(registry)
    assert registry.retry_failed(b.id) == 1  # FAILED -> STARTED again
    agree(registry)
    events(registry, RunEvent(first, RunStatus.COMPLETED))
    with registry.batch("empty"):
        pass
    samples = agree(registry)
    # top-level batches observed as they finished: parent (cancelled), retried (twice: it re-opened), empty
    assert samples["celery_batches_batch_duration_seconds_count"][()] == 4
    buckets = {dict(labels)["le"]: v for labels, v in samples["celery_batches_batch_duration_seconds_bucket"].items()}
    assert list(buckets) == [str(le) for le in DURATION_BUCKETS] + ["+Inf"]
    counts = list(buckets.values())
    assert counts == sorted(counts) and buckets["+Inf"] == 4  # cumulative
    took = time.monotonic() - started  # each batch lived within the test: in the first bucket that holds that
    assert buckets[str(next(le for le in DURATION_BUCKETS if le >= took))] == 4
    assert 0 <= samples["celery_batches_batch_duration_seconds_sum"][()] <= 4 * took

    registry.tallies.compact()
    with registry.engine.connect() as conn:
        rows = conn.execute(sa.select(registry.transitions.tables.tallies.c.name)).scalars().all()
    assert len(rows) == len(set(rows)), "compaction leaves one row per name"
    agree(registry)

    t = registry.transitions.tables
    with registry.engine.begin() as conn:  # everything expired: purge deletes whole trees
        conn.execute(sa.update(t.batches).where(t.batches.c.status >= int(BatchStatus.COMPLETED))
                     .values(expires_at=utcnow() - timedelta(days=1)))
    finished = metrics.snapshot(registry).finished_total
    assert finished == sum(counted(registry)[1][s] for s in ("completed", "failed", "cancelled"))
    assert registry.purge_expired() == 4
    assert metrics.snapshot(registry).finished_total == finished  # the jobs-finished total keeps purged jobs
    samples = agree(registry)
    assert sum(by_status(samples, "celery_batches_batches").values()) == 0
    assert samples["celery_batches_batch_duration_seconds_count"][()] == 4  # a counter: purge takes nothing back


def test_the_outbox_gauges_and_the_recovery_counter(registry):
    noop = registry.app.signature("tests.metrics.noop")
    with registry.batch("windowed", max_concurrency=1) as b:
        for _ in range(3):
            b.enqueue(noop)
    samples = parsed(metrics.render(registry).decode())
    assert samples["celery_batches_unpublished_runs"][()] == 0  # one published, two held: not a backlog
    t = registry.transitions.tables
    with registry.engine.begin() as conn:  # as a producer that died between commit and publish leaves them
        conn.execute(sa.update(t.runs).where(t.runs.c.held.isnot(True)).values(
            published=False, created_at=utcnow() - timedelta(seconds=90)))
    samples = parsed(metrics.render(registry).decode())
    assert samples["celery_batches_unpublished_runs"][()] == 1
    assert 89 < samples["celery_batches_oldest_unpublished_seconds"][()] < 90 + WAIT
    assert samples["celery_batches_continuations_due"][()] == 0
    assert {dict(labels)["how"] for labels in samples["celery_batches_runs_recovered_total"]} == set(RECOVERY)
    registry.tallies.recovered({"worker_lost": 2, "handed_back": 1})
    registry.tallies.recovered({"worker_lost": 1})
    registry.tallies.compact()
    recovered = {dict(labels)["how"]: v for labels, v in
                 parsed(metrics.render(registry).decode())["celery_batches_runs_recovered_total"].items()}
    assert recovered == dict(dict.fromkeys(RECOVERY, 0), worker_lost=3, handed_back=1)


def test_the_dashboard_serves_metrics_under_its_access_rules(registry):
    with registry.batch("served") as b:
        b.enqueue(registry.app.signature("tests.metrics.noop"))
    from werkzeug.test import Client

    response = Client(create_app(registry)).get("/metrics", environ_base=LOCAL)
    assert response.status_code == 200 and response.content_type == metrics.CONTENT_TYPE
    assert by_status(parsed(response.get_data(as_text=True)), "celery_batches_runs")["pending"] == 1
    far = {"REMOTE_ADDR": "203.0.113.9"}
    assert Client(create_app(registry)).get("/metrics", environ_base=far).status_code == 403
    guarded = Client(create_app(registry, basic_auth=("prometheus", "scrape-secret")))
    assert guarded.get("/metrics", environ_base=far).status_code == 401
    scraped = guarded.get("/metrics", environ_base=far, auth=("prometheus", "scrape-secret"))
    assert scraped.status_code == 200 and "celery_batches_runs" in scraped.get_data(as_text=True)


@needs("postgres")
def test_a_migration_counts_the_batches_already_there(services):
    """Upgrading a registry that has batches: the ledger starts from what is there."""
    app = Celery(f"metrics_{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.task(name="tests.metrics.noop", shared=False)(noop)
    with private_registry(app, "cbt_mm", migrate=False) as batches:
        migrate(batches.engine, batches.settings.table_prefix, revision="0010")
        with batches.engine.begin() as conn:  # batches of the old schema, as its code wrote them
            t = batches.transitions.tables
            now = utcnow()
            rows = [dict(id=str(uuid.uuid4()), name=f"old-{i}", status=s, total_jobs=0, completed_jobs=0,
                         failed_jobs=0, cancelled_jobs=0, created_at=now - timedelta(seconds=40),
                         completed_at=now if s >= 2 else None) for i, s in enumerate([1, 2, 2, 3])]
            conn.execute(sa.insert(t.batches), rows)
        migrate(batches.engine, batches.settings.table_prefix)
        samples = agree(batches)
        assert by_status(samples, "celery_batches_batches") == dict(created=0, started=1, completed=2, failed=1,
                                                                    cancelled=0)
        buckets = samples["celery_batches_batch_duration_seconds_bucket"]
        assert buckets[(("le", "60"),)] == 3 and buckets[(("le", "30"),)] == 0  # 40 s each


@needs("postgres", "redis", "worker")
def test_a_batch_run_by_a_real_worker_is_counted(proj, worker):
    before = metrics.snapshot(proj.batches)
    with proj.batches.batch("metrics-real") as b:
        for i in range(4):
            b.enqueue(proj.add, i, i)
        b.enqueue(proj.fail, message="counted")
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.FAILED, 5, 4, 1, 0)

    def settled() -> Any:  # the session worker may still be finishing an earlier test's jobs
        samples = parsed(metrics.render(proj.batches).decode())
        return samples if (by_status(samples, "celery_batches_batches"),
                           by_status(samples, "celery_batches_runs")) == counted(proj.batches) else None

    samples = eventually(settled, "the metrics to agree with the registry", WAIT)
    assert samples["celery_batches_batch_duration_seconds_count"][()] >= before.duration_count + 1
    # the worker's relay records the minute's totals for the charts
    eventually(lambda: proj.batches.tallies.history(utcnow() - timedelta(minutes=2)), "a relay's minute sample", WAIT)


def test_the_cli_prints_the_metrics_and_their_json(registry):
    from celery.bin.base import CLIContext
    from click.testing import CliRunner

    from celery_batches.cli import EXIT_OK, batches as cli

    with registry.batch("cli") as b:
        b.enqueue(registry.app.signature("tests.metrics.noop"))
    ctx = CLIContext(app=registry.app, no_color=True, workdir=None)
    text = CliRunner().invoke(cli, ["metrics"], obj=ctx)
    assert text.exit_code == EXIT_OK, text.output
    assert by_status(parsed(text.output), "celery_batches_runs")["pending"] == 1
    data = CliRunner().invoke(cli, ["metrics", "--json"], obj=ctx)
    assert data.exit_code == EXIT_OK, data.output
    snap = json.loads(data.output)
    assert snap["runs"]["pending"] == 1 and snap["batches"]["started"] == 1
    assert snap["duration_buckets"][-1] == ["+Inf", 0]


def test_the_batches_page_opens_with_the_summary_strip(registry):
    """Batches by status, jobs waiting and running, the unpublished backlog: the metrics' numbers."""
    import re

    from werkzeug.test import Client

    noop = registry.app.signature("tests.metrics.noop")
    with registry.batch("open") as b:
        for _ in range(3):
            b.enqueue(noop)
    with registry.batch("done") as done:
        done.enqueue(noop)
    first, *_ = ids(registry, b.id)
    events(registry, RunEvent(first, RunStatus.RUNNING, node="n1/1"), RunEvent(ids(registry, done.id)[0],
                                                                               RunStatus.COMPLETED))
    html = Client(create_app(registry)).get("/", environ_base=LOCAL).get_data(as_text=True)
    shown = {m[0]: m[1] for m in re.findall(r'data-stat="([\w-]+)"><dt>.*?</dt><dd>(\d+)', html)}
    want_batches, want_runs = counted(registry)
    assert shown == {**{f"batches-{s}": str(n) for s, n in want_batches.items()},
                     "runs-waiting": str(want_runs["pending"] + want_runs["retrying"]),
                     "runs-running": str(want_runs["running"]), "unpublished": "0"}
    assert shown["batches-started"] == "1" and shown["batches-completed"] == "1" and shown["runs-running"] == "1"


# -- the charts of the last day ----------------------------------------------------------------------

def test_quantiles_are_estimated_within_a_bucket_as_histogram_quantile_does():
    from celery_batches.dashboard.charts import quantile

    n = len(DURATION_BUCKETS) + 1
    cumulative = lambda **at: [next((v for le, v in sorted(at.items(), key=lambda kv: -int(kv[0][1:]))  # noqa: E731
                                     if int(le[1:]) <= bound), 0) for bound in (*DURATION_BUCKETS, 10**9)]
    # 10 batches between 5 s and 15 s, 10 more between 60 s and 300 s
    hist = cumulative(b15=10, b60=10, b300=20)
    assert len(hist) == n and hist[-1] == 20
    assert quantile(0.5, hist) == 15.0  # the 10th of 20 is the top of the 5-15 s bucket
    assert quantile(0.25, hist) == 10.0  # half way into it
    assert quantile(0.95, hist) == 60 + 240 * 0.9  # 19th of 20: 90% into the 60-300 s bucket
    assert quantile(0.5, [0] * n) == 0.0
    assert quantile(0.99, [0] * (n - 1) + [3]) == float(DURATION_BUCKETS[-1])  # all beyond a day


def test_the_batches_page_charts_the_last_day_from_the_relays_samples(registry):
    """Samples written a minute apart around finished jobs: the chart counts exactly those jobs,
    and the hour's durations; with no samples it says so instead of drawing nothing."""
    import re

    from werkzeug.test import Client

    client = Client(create_app(registry))

    def chart(name: str) -> dict:
        html = client.get("/", environ_base=LOCAL).get_data(as_text=True)
        figure = re.search(rf'<figure data-chart="{name}" (.*?)</figure>', html, re.S).group(0)
        return {"attrs": dict(re.findall(r'data-(\w+)="(\d+)"', figure)), "html": figure}

    assert "no samples yet" in chart("finished")["html"]
    noop = registry.app.signature("tests.metrics.noop")
    now = utcnow()
    with registry.batch("before") as old:
        old.enqueue(noop)
    events(registry, RunEvent(ids(registry, old.id)[0], RunStatus.COMPLETED))  # before the first sample: not counted
    assert registry.tallies.sample(now - timedelta(minutes=70))
    assert not registry.tallies.sample(now - timedelta(minutes=70))  # once a minute
    with registry.batch("charted") as b:
        for _ in range(3):
            b.enqueue(noop)
    events(registry, *(RunEvent(j, RunStatus.COMPLETED) for j in ids(registry, b.id)))
    assert registry.tallies.sample(now - timedelta(minutes=2))
    with registry.batch("later") as later:
        later.enqueue(noop)
        later.enqueue(noop)
    events(registry, RunEvent(ids(registry, later.id)[0], RunStatus.FAILED, error="x"))
    assert registry.tallies.sample(now)
    finished = chart("finished")
    assert finished["attrs"]["total"] == "4" and "<polyline" in finished["html"]  # 3 completed, then 1 failed
    durations = chart("durations")
    # "charted" finished within the hour of the -2 min sample (or the one before, at -70 min, if an hour
    # boundary fell between): at least one hour with a p50 drawn
    assert int(durations["attrs"]["hours"]) >= 1 and 'class="p50"' in durations["html"]


def test_compaction_folds_a_burst_of_deltas_and_keeps_every_sum(registry):
    """A burst (what the triggers of a bulk creation write): folded into one row per name, the sums
    kept; on PostgreSQL the ledger is vacuumed at once (past TALLY_VACUUM_ROWS) so reads stay an
    index-only scan."""
    from celery_batches.settings import TALLY_VACUUM_ROWS

    burst = TALLY_VACUUM_ROWS + 1
    with registry.engine.begin() as conn:
        conn.execute(sa.insert(registry.transitions.tables.tallies),
                     [{"name": "recovered:worker_lost", "n": 1}] * burst)
    assert registry.tallies.compact() == burst
    with registry.engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(registry.transitions.tables.tallies)) == 1
    assert metrics.snapshot(registry).recovered["worker_lost"] == burst
    assert registry.tallies.compact() == 1  # the folded row, folded again into itself
    assert metrics.snapshot(registry).recovered["worker_lost"] == burst
