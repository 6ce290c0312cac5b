"""The chaos soak (benchmarks/chaos.py) as a test: a short run that must find nothing wrong.

It starts its own broker, workers and producers and injects the faults itself; this test only
runs it and asserts a clean exit. ``CHAOS_MINUTES`` (default 2) sets how long faults are injected,
``CHAOS_SETTLE_TIMEOUT`` (default 600) how long the batches may then take to finish.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, unavailable

MINUTES = float(os.environ.get("CHAOS_MINUTES", "2"))
SETTLE = float(os.environ.get("CHAOS_SETTLE_TIMEOUT", "600"))
SEED = 20240531  # fixed, so a failure in CI can be replayed with the same shapes and fault sequence
# faults + settling + starting and stopping workers, checking and cleaning up
BUDGET = MINUTES * 60 + SETTLE + 300


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(BUDGET + 60)
def test_chaos_soak(services: None) -> None:
    """Never stuck, never doubled, exact counters, continuations exactly once, under chaos."""
    if shutil.which("redis-server") is None:  # the soak runs (and restarts) a broker of its own
        unavailable("redis-server is not on PATH")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--minutes", f"{MINUTES:g}",
           "--seed", str(SEED), "--settle-timeout", f"{SETTLE:g}"]
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
