"""The README's first command and the example's Redis + PostgreSQL mode, run as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "order_pipeline.py"


def test_order_pipeline_embedded(tmp_path):
    """No services: SQLite file in the working directory, in-memory broker, in-process worker."""
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "CELERY_BATCHES_DATABASE_URL")}
    out = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "batch process-order-123: COMPLETED, total=4 completed=4 failed=0 cancelled=0" in out.stdout
    assert "nested payment-processing: COMPLETED, 2/2 completed" in out.stdout
    assert out.stdout.count("order 123 is complete (on_success)") == 1
    assert "on_failure" not in out.stdout
    assert (tmp_path / "celery_batches.sqlite3").exists()


@pytest.mark.integration
def test_order_pipeline_on_redis_and_postgresql(services, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CELERY_BROKER_URL="redis://127.0.0.1:6379/10",
               CELERY_BATCHES_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "examples.order_pipeline", "worker",
                               "-P", "prefork", "-c", "2", "-l", "INFO", "--without-gossip", "--without-mingle",
                               "--without-heartbeat"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        out = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "postgresql" in out.stdout
        assert "COMPLETED, total=4 completed=4 failed=0 cancelled=0" in out.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    assert "shop.complete_order" in (tmp_path / "worker.log").read_text()
