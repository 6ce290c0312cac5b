"""`celery -A tests.proj batches …` driven as a real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid


from celery_batches import BatchStatus
from tests.helpers import ROOT, celery, eventually, needs


def test_refuses_without_an_app():
    out = celery("list", app=None)
    assert out.returncode == 2 and "no celery_batches.Batches found" in out.stderr


def test_the_batches_of_an_app_are_found_from_the_app_alone(tmp_path):
    """How the CLI and the dashboard find the Batches: ``Batches.for_app``, nothing hidden on the app."""
    from celery import Celery

    from celery_batches import Batches

    app, other = Celery("found", set_as_current=False), Celery("other", set_as_current=False)
    batches = Batches(app, database_url=f"sqlite:///{tmp_path / 'r.sqlite3'}")
    assert Batches.for_app(app) is batches
    assert Batches.for_app(other) is None and Batches.for_app("not an app") is None
    assert not hasattr(app, "celery_batches")


@needs("postgres", "redis", "worker")
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

    shown = json.loads(celery("show", b.id, "--json").stdout)  # the shape of GET /api/batches/<id>
    assert shown["batch"]["id"] == b.id and [n["depth"] for n in shown["tree"]] == [0, 1]
    assert shown["tree"][1]["id"] == inner.id and shown["tree"][1]["units"]["completed"] == 1
    assert [(c["kind"], c["status"]) for c in shown["continuations"]] == [("success", "DISPATCHED")]
    text = celery("show", b.id).stdout
    assert "inner [COMPLETED]" in text and "on_success: tests.proj.record [DISPATCHED]" in text


@needs("postgres", "redis")
def test_json_is_the_shape_of_the_dashboard_api(proj, nowhere):
    """`list --json` prints the batches of GET /api/batches, `show --json` GET /api/batches/<id>,
    both without the dashboard's url links; and `show` counts an empty batch like Batch.progress."""
    from werkzeug.test import Client

    from celery_batches.dashboard import create_app

    name = f"cli-shape-{uuid.uuid4().hex[:8]}"
    with proj.batches.batch(name, created_by="cli") as b:
        b.enqueue(proj.add.s(1, 2).set(queue=nowhere))
        with b.batch(f"{name}-inner") as inner:
            inner.enqueue(proj.noop.s().set(queue=nowhere))
        b.on_success(proj.record, "never")
    stage = proj.batches.continue_batch_with(b.id, f"{name}-stage", lambda s: None, when="complete")
    with proj.batches.batch(f"{name}-empty") as empty:
        pass
    client = Client(create_app(proj.batches))
    local = {"REMOTE_ADDR": "127.0.0.1"}

    def api(url: str) -> dict:
        response = client.get(url, environ_base=local)
        assert response.status_code == 200, url
        return response.get_json()

    listed = api(f"/api/batches?q={name}")["batches"]
    assert {x.pop("url") for x in listed} == {f"/batches/{x['id']}" for x in listed}
    assert [x["id"] for x in listed] == [empty.id, stage, b.id]
    assert json.loads(celery("list", "--name", name, "--json").stdout) == listed
    children = api(f"/api/batches?parent={b.id}")["batches"]
    assert [x.pop("url") for x in children] == [f"/batches/{inner.id}"]
    assert json.loads(celery("list", "--parent", b.id, "--json").stdout) == children
    for batch_id in (b.id, stage, empty.id):
        detail = api(f"/api/batches/{batch_id}")
        assert detail["batch"].pop("url") == f"/batches/{batch_id}"
        assert json.loads(celery("show", batch_id, "--json").stdout) == detail
    assert "(100%)" in celery("show", empty.id).stdout and "(0%)" in celery("show", stage).stdout
    bad = celery("list", "--parent", "not-a-uuid")
    assert bad.returncode == 2 and "not a batch id" in bad.stderr
    proj.batches.cancel_batch(b.id)


@needs("postgres", "redis")
def test_both_dashboard_launchers_take_the_documented_options(proj):
    module = subprocess.run([sys.executable, "-m", "celery_batches.dashboard", "--help"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    command = celery("dashboard", "--help")
    for out in (module, command):
        assert out.returncode == 0, out.stderr
        for option in ("--host", "--port", "--prefix", "--read-only", "--basic-auth", "CELERY_BATCHES_DASHBOARD_AUTH"):
            assert option in out.stdout, (option, out.stdout)
    assert "--app" in module.stdout and "--batches" in module.stdout
    # credentials from the environment are checked before anything is served, by either launcher
    env = dict(os.environ, PYTHONPATH=str(ROOT), CELERY_BATCHES_DASHBOARD_AUTH="no-colon")
    refused = subprocess.run([sys.executable, "-m", "celery_batches.dashboard", "--app", "tests.proj", "--port", "0"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--basic-auth must be USER:PASSWORD" in refused.stderr
    refused = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.proj", "batches", "dashboard", "--port",
                              "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--basic-auth must be USER:PASSWORD" in refused.stderr


@needs("postgres", "redis", "worker")
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


@needs("postgres", "redis")
def test_cancel_and_purge(proj):
    with proj.batches.batch("cli-cancel") as b:  # nobody consumes the queue: every run stays pending
        for _ in range(3):
            b.enqueue(proj.noop.s().set(queue=f"nobody-{uuid.uuid4().hex}"))
    out = celery("cancel", b.id)
    assert out.returncode == 0 and "cancelled 3 run(s)" in out.stdout
    assert proj.batches.get_batch(b.id).status == BatchStatus.CANCELLED
    purged = celery("purge")
    assert purged.returncode == 0 and purged.stdout.startswith("deleted ")


@needs("postgres", "redis")
def test_dashboard_command_serves_the_dashboard(proj, tmp_path):
    import socket
    import urllib.request

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
