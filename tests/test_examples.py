"""The examples run as a user would: embedded (no services) and on Redis + PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from tests.helpers import ROOT, eventually, needs, worker_argv

# what the script prints, and what its continuation prints (in the worker's output)
EXPECTED = {
    "order_pipeline": (["batch process-order-123: COMPLETED, total=4 completed=4 failed=0 cancelled=0",
                        "nested payment-processing: COMPLETED, 2/2 completed"], "order 123 is complete (on_success)"),
    "etl": (["extract: COMPLETED 3/3 sources; load: COMPLETED 3/3 tables"], "nightly loaded every table"),
    "crawler": (["crawl: COMPLETED, 7/7 pages"], "crawled all of example.org"),
    "web_order": (["COMPLETED (2/2); the continuation marked the order 'paid'",
                   "after the rollback the order row is gone and the batch is gone"], None),
}


def run_example(name: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py")], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in EXPECTED[name][0]:
        assert line in out.stdout, out.stdout
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_embedded(name, tmp_path):
    """README command 1's path: SQLite file in the working directory, in-memory broker, in-process worker."""
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "CELERY_BATCHES_DATABASE_URL")}
    out = run_example(name, tmp_path, env)
    assert (tmp_path / "celery_batches.sqlite3").exists()
    continuation = EXPECTED[name][1]
    if continuation:  # the in-process worker prints it, exactly once
        assert out.stdout.count(continuation) == 1, out.stdout
    if name == "order_pipeline":
        assert "on_failure" not in out.stdout


@needs("postgres", "redis", "worker")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_on_redis_and_postgresql(name, fresh_database_url, tmp_path):
    # the test Redis, in a database of its own
    broker = urllib.parse.urlsplit(os.environ["TEST_REDIS_URL"])._replace(path="/10").geturl()
    env = dict(os.environ, PYTHONPATH=str(ROOT), CELERY_BROKER_URL=broker,
               CELERY_BATCHES_DATABASE_URL=fresh_database_url)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(worker_argv(f"examples.{name}", f"examples-{name}"), cwd=ROOT,
                              env=dict(env, CELERY_EXAMPLE_QUEUE=f"examples-{name}"), stdout=log.open("wb"),
                              stderr=subprocess.STDOUT)
    try:
        run_example(name, tmp_path, dict(env, CELERY_EXAMPLE_QUEUE=f"examples-{name}"))
        if EXPECTED[name][1]:  # the continuation runs in the worker, right after the batch finished
            eventually(lambda: EXPECTED[name][1] in log.read_text(), "the continuation's output", 30)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    output = log.read_text()
    assert "succeeded" in output
    if EXPECTED[name][1]:
        assert output.count(EXPECTED[name][1]) == 1, output[-3000:]
