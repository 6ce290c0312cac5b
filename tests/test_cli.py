"""`celery -A tests.proj batches …` driven as a real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from celery_batches import BatchStatus
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def celery(*args: str, app: str | None = "tests.proj", timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "celery"] + (["-A", app] if app else []) + ["batches", *args]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=timeout)


def test_refuses_without_an_app(proj):
    out = celery("list", app=None)
    assert out.returncode == 2 and "no celery_batches.Batches found" in out.stderr


def test_migrate_list_and_show(proj, worker):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    with proj.batches.batch(name) as b:
        b.enqueue(proj.add, 1, 2)
        with b.batch("inner") as inner:
            inner.enqueue(proj.add, 3, 4)
        b.on_success(proj.record, f"cli:{b.id}")
    proj.batches.wait(b.id, timeout=60)
    assert celery("migrate").returncode == 0

    listed = json.loads(celery("list", "--name", name, "--json").stdout)
    assert [(x["id"], x["status"], x["total_jobs"], x["completed_jobs"]) for x in listed] == [
        (b.id, "COMPLETED", 2, 2)]
    table = celery("list", "--name", name, "--status", "completed")
    assert table.returncode == 0 and b.id in table.stdout and "COMPLETED" in table.stdout
    assert b.id not in celery("list", "--name", name, "--status", "failed").stdout

    shown = json.loads(celery("show", b.id, "--json").stdout)
    assert shown["children"][0]["id"] == inner.id and shown["children"][0]["completed_jobs"] == 1
    assert [(c["kind"], c["status"]) for c in shown["continuations"]] == [("SUCCESS", "DISPATCHED")]
    text = celery("show", b.id).stdout
    assert "inner [COMPLETED]" in text and "on_success: tests.proj.record [DISPATCHED]" in text


def test_wait_exit_status(proj, worker):
    with proj.batches.batch("cli-ok") as ok:
        ok.enqueue(proj.add, 1, 1)
    with proj.batches.batch("cli-fails") as bad:
        bad.enqueue(proj.fail)
    with proj.batches.batch("cli-stuck") as stuck:  # a queue nobody consumes: never finishes
        stuck.enqueue(proj.noop.s().set(queue=f"nobody-{uuid.uuid4().hex}"))
    done = celery("wait", ok.id, "--timeout", "60")
    assert done.returncode == 0 and "COMPLETED" in done.stdout
    failed = celery("wait", bad.id, "--timeout", "60")
    assert failed.returncode == 1 and "FAILED" in failed.stdout
    assert celery("wait", stuck.id, "--timeout", "1").returncode == 2
    assert celery("wait", str(uuid.uuid4())).returncode == 1  # unknown batch: an error
    assert celery("wait", "not-a-uuid").returncode == 2  # malformed id: a usage error
    proj.batches.cancel_batch(stuck.id)


def test_cancel_and_purge(proj):
    with proj.batches.batch("cli-cancel") as b:  # nobody consumes the queue: every run stays pending
        for _ in range(3):
            b.enqueue(proj.noop.s().set(queue=f"nobody-{uuid.uuid4().hex}"))
    out = celery("cancel", b.id)
    assert out.returncode == 0 and "cancelled 3 run(s)" in out.stdout
    assert proj.batches.get_batch(b.id).status == BatchStatus.CANCELLED
    purged = celery("purge")
    assert purged.returncode == 0 and purged.stdout.startswith("deleted ")


def test_dashboard_command_serves_the_dashboard(proj, tmp_path):
    import socket
    import urllib.request

    from tests.conftest import eventually

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with proj.batches.batch(f"cli-dash-{uuid.uuid4().hex[:6]}") as b:
        pass
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.proj", "batches", "dashboard", "--port",
                             str(port)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def fetch():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/batches/{b.id}", timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                return None

        data = eventually(fetch, "the dashboard to answer", 30, 0.2)
        assert data["batch"]["id"] == b.id and data["batch"]["status"] == "COMPLETED"
    finally:
        proc.terminate()
        proc.wait(10)
