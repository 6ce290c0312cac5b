"""The chaos soak (benchmarks/chaos.py) as a test: short runs across the deployment matrix that must
find nothing wrong.

Each cell starts its own broker (a private Redis, or a private RabbitMQ virtual host), workers,
producers and, for the PgBouncer cells, a private PgBouncer, and injects the faults itself; this
test only runs it and asserts a clean exit. Four cells cover every value of each axis twice (broker
x database path x Celery profile, pairwise); ``CHAOS_CELLS=all`` runs all eight. Faults go on for a
minute in the cells on PostgreSQL directly and a minute and a half in those through PgBouncer
(``CHAOS_MINUTES`` sets one length for all); ``CHAOS_SETTLE_TIMEOUT`` (default 420) is how long the
batches may then take to finish.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, needs, unavailable

#: minutes of faults per cell: the PgBouncer cells (which settle faster) get more
MINUTES = {"direct": float(os.environ.get("CHAOS_MINUTES", "1")),
           "pgbouncer": float(os.environ.get("CHAOS_MINUTES", "1.5"))}
SETTLE = float(os.environ.get("CHAOS_SETTLE_TIMEOUT", "420"))
SEED = 20240531  # fixed, so a failure in CI can be replayed with the same shapes and fault sequence
# faults + settling + starting and stopping workers, checking and cleaning up
BUDGET = max(MINUTES.values()) * 60 + SETTLE + 300
PAIRWISE = [("redis", "direct", "defaults"), ("redis", "pgbouncer", "acks-late"),
            ("rabbitmq", "direct", "acks-late"), ("rabbitmq", "pgbouncer", "defaults")]
CELLS = (list(itertools.product(("redis", "rabbitmq"), ("direct", "pgbouncer"), ("defaults", "acks-late")))
         if os.environ.get("CHAOS_CELLS") == "all" else PAIRWISE)


@pytest.mark.slow
@needs("postgres", "redis", "worker")
@pytest.mark.timeout(BUDGET + 60)
@pytest.mark.parametrize(("broker", "database", "profile"), [
    pytest.param(*cell, id="-".join(cell), marks=needs("rabbitmq") if cell[0] == "rabbitmq" else ()) for cell in CELLS])
def test_chaos_soak(services: None, broker: str, database: str, profile: str) -> None:
    """Never stuck, never doubled, exact counters, continuations exactly once, under chaos."""
    tools = {"redis-server": shutil.which("redis-server")}
    if broker == "rabbitmq":
        tools["rabbitmqctl"] = shutil.which("rabbitmqctl")
    if database == "pgbouncer":
        tools["pgbouncer"] = shutil.which("pgbouncer") or (os.path.exists("/usr/sbin/pgbouncer") or None)
    if missing := [name for name, found in tools.items() if not found]:
        unavailable(f"the soak needs {', '.join(missing)}")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--minutes", f"{MINUTES[database]:g}",
           "--seed", str(SEED), "--settle-timeout", f"{SETTLE:g}", "--broker", broker, "--database", database,
           "--profile", profile]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        stdout, stderr = proc.communicate(timeout=BUDGET)
    finally:
        if proc.poll() is None:  # SIGTERM lets the soak stop its workers and drop its tables
            proc.terminate()
            stdout, stderr = proc.communicate(timeout=120)
    print(stdout)
    print(stderr[-20000:], file=sys.stderr)
    assert proc.returncode == 0, f"the chaos soak found violations (exit {proc.returncode}); see its table above"
