"""`celery -A tests.proj batches …` driven as a real command in a subprocess, and in-process through
click's CliRunner where a test checks outputs and exit codes rather than Celery's command line."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid
from contextlib import nullcontext
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from celery_batches import BatchStatus
from celery_batches.cli import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE
from tests.helpers import ROOT, celery, eventually, needs


def run(proj: Any, *args: str) -> Any:
    """``celery -A tests.proj batches <args>`` in this process (click's CliRunner): a Result with
    ``exit_code``, ``stdout`` and ``stderr``."""
    from celery.bin.base import CLIContext
    from click.testing import CliRunner

    from celery_batches.cli import batches

    return CliRunner().invoke(batches, list(args), obj=CLIContext(app=proj.app, no_color=True, workdir=None))


def as_json(result: Any, code: int = EXIT_OK) -> Any:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


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
    assert refused.returncode == EXIT_USAGE and "must be USER:PASSWORD" in refused.stderr
    assert "no-colon" not in refused.stderr  # the value is not echoed
    refused = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.proj", "batches", "dashboard", "--port",
                              "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == EXIT_USAGE and "must be USER:PASSWORD" in refused.stderr
    nothing = subprocess.run([sys.executable, "-m", "celery_batches.dashboard"], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             capture_output=True, text=True, timeout=60)
    assert nothing.returncode == EXIT_USAGE and "give --app" in nothing.stderr


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
    assert celery("wait", stuck.id, "--timeout", "1").returncode == EXIT_TIMEOUT == 4
    unknown = celery("wait", str(uuid.uuid4()))
    assert unknown.returncode == EXIT_NOT_FOUND == 3 and "no batch with id" in unknown.stderr
    assert celery("wait", "not-a-uuid").returncode == EXIT_USAGE == 2  # malformed id: a usage error
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


@needs("postgres", "redis", "worker")
def test_every_command_prints_json_and_exits_with_its_documented_code(proj, worker, nowhere):
    """0 done / COMPLETED, 1 FAILED or CANCELLED, 2 usage, 3 no such batch, 4 timeout; --json on
    every command; `jobs` prints the jobs of GET /api/batches/<id>/jobs."""
    from werkzeug.test import Client

    from celery_batches.dashboard import create_app
    from celery_batches.store.migrate import head_revision

    name = f"cli-codes-{uuid.uuid4().hex[:8]}"
    with proj.batches.batch(f"{name}-ok") as ok:
        ok.enqueue(proj.add, 1, 2)
    with proj.batches.batch(f"{name}-bad") as bad:
        bad.enqueue(proj.add, 2, 2)
        bad.enqueue(proj.fail, message="first line\nsecond line")
        bad.enqueue(proj.add, 3, 3)
        bad.enqueue(proj.fail)
    with proj.batches.batch(f"{name}-stuck") as stuck:
        stuck.enqueue(proj.noop.s().set(queue=nowhere))
    proj.batches.wait(ok.id, timeout=60)
    proj.batches.wait(bad.id, timeout=60)

    assert as_json(run(proj, "migrate", "--json")) == {
        "database": proj.batches.engine.url.render_as_string(hide_password=True), "revision": head_revision()}
    assert [x["id"] for x in as_json(run(proj, "list", "--name", name, "--json"))] == [stuck.id, bad.id, ok.id]
    assert as_json(run(proj, "show", bad.id, "--json"))["batch"]["status"] == "FAILED"  # show: 0 whatever the status

    done = as_json(run(proj, "wait", ok.id, "--json"))
    assert done["batch"]["status"] == "COMPLETED" and done["timed_out"] is False and done["batch"]["id"] == ok.id
    failed = as_json(run(proj, "wait", bad.id, "--json"), EXIT_FAILED)
    assert failed["batch"]["status"] == "FAILED" and failed["batch"]["failed_jobs"] == 2
    late = as_json(run(proj, "wait", stuck.id, "--timeout", "0.1", "--interval", "0.05", "--json"), EXIT_TIMEOUT)
    assert late["batch"]["status"] == "STARTED" and late["timed_out"] is True
    assert "STARTED" in run(proj, "wait", stuck.id, "--timeout", "0").stdout

    # jobs: enqueue order, --status in any case, --limit/--offset, the API's shape
    client = Client(create_app(proj.batches))
    api = client.get(f"/api/batches/{bad.id}/jobs?status=failed", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert api.status_code == 200
    listed = as_json(run(proj, "jobs", bad.id, "--status", "failed", "--json"))
    assert listed == api.get_json()["jobs"] and [j["position"] for j in listed] == [1, 3]
    assert as_json(run(proj, "jobs", bad.id, "--status", "FAILED", "--json")) == listed
    every = as_json(run(proj, "jobs", bad.id, "--json"))
    assert [(j["task_name"], j["status"]) for j in every] == [
        ("tests.proj.add", "COMPLETED"), ("tests.proj.fail", "FAILED"), ("tests.proj.add", "COMPLETED"),
        ("tests.proj.fail", "FAILED")]
    assert as_json(run(proj, "jobs", bad.id, "--limit", "2", "--offset", "1", "--json")) == every[1:3]
    assert as_json(run(proj, "jobs", bad.id, "--status", "failed", "--offset", "1", "--json")) == listed[1:]
    assert as_json(run(proj, "jobs", bad.id, "--status", "cancelled", "--json")) == []
    table = run(proj, "jobs", bad.id, "--status", "failed")
    assert table.exit_code == EXIT_OK and table.stdout.count("\n") == 3  # a header and two jobs
    first_line = listed[0]["error"].strip().splitlines()[0]
    assert listed[0]["id"] in table.stdout and first_line[:40] in table.stdout and "second line" not in table.stdout

    # cancel: 0, also for a batch that had already finished; a cancelled batch's wait: 1; its retry refused: 1
    assert as_json(run(proj, "cancel", stuck.id, "--json")) == {
        "batch_id": stuck.id, "cancelled_runs": 1, "batch_status": "CANCELLED"}
    assert as_json(run(proj, "cancel", stuck.id, "--json")) == {
        "batch_id": stuck.id, "cancelled_runs": 0, "batch_status": "CANCELLED"}
    assert as_json(run(proj, "wait", stuck.id, "--json"), EXIT_FAILED)["batch"]["status"] == "CANCELLED"
    refused = run(proj, "retry", stuck.id, "--json")
    assert refused.exit_code == EXIT_FAILED and "was cancelled" in refused.stderr and refused.stdout == ""
    retried = as_json(run(proj, "retry", bad.id, "--json"))  # re-opened, and the worker may fail them again at once
    assert retried.pop("batch_status") in ("STARTED", "FAILED") and retried == {"batch_id": bad.id, "retried_runs": 2}
    assert set(as_json(run(proj, "purge", "--json"))) == {"deleted_batches"}

    # 3: no such batch, for every command that takes one
    unknown = str(uuid.uuid4())
    for args in (["show", unknown], ["wait", unknown], ["cancel", unknown], ["retry", unknown], ["jobs", unknown],
                 ["list", "--parent", unknown], ["show", unknown, "--json"], ["jobs", unknown, "--json"]):
        out = run(proj, *args)
        assert out.exit_code == EXIT_NOT_FOUND and f"no batch with id {unknown}" in out.stderr, args
        assert out.stdout == "", args
    # 2: usage errors (click's own code)
    for args in (["show", "not-a-uuid"], ["wait", "not-a-uuid"], ["cancel", "nope"], ["retry", "nope"],
                 ["jobs", "nope"], ["jobs", ok.id, "--status", "sleeping"], ["jobs", ok.id, "--limit", "-1"],
                 ["wait", ok.id, "--timeout", "-1"], ["wait", ok.id, "--interval", "0"], ["list", "--status", "x"],
                 ["list", "--parent", "nope"], ["purge", "--force"], ["show"], ["no-such-command"]):
        assert run(proj, *args).exit_code == EXIT_USAGE, args
    proj.batches.wait(bad.id, timeout=60)


@needs("postgres", "redis")
def test_wait_says_when_the_batch_was_purged_while_it_waited(proj, nowhere):
    """`wait` on an unfinished batch that purge deletes meanwhile: a message and exit 3, not a crash.
    The batch is made expired and purged in one transaction (the registry's purge, on that
    transaction's connection), so `wait` reads it either unfinished or gone, never finished."""
    name = f"cli-purged-{uuid.uuid4().hex[:8]}"
    with proj.batches.batch(name) as b:
        b.enqueue(proj.noop.s().set(queue=nowhere))
        with b.batch(f"{name}-inner") as inner:
            inner.enqueue(proj.noop.s().set(queue=nowhere))
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.proj", "batches", "wait", b.id,
                             "--interval", "0.1"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline().strip() == name  # the progress bar's label: it is in its loop
        trees, tables = copy.copy(proj.batches.trees), proj.batches.transitions.tables
        with proj.batches.engine.begin() as conn:
            trees.engine = type("OneConnection", (), {"begin": lambda self: nullcontext(conn)})()
            past = datetime.now(timezone.utc) - timedelta(days=1)
            conn.execute(sa.update(tables.batches).where(tables.batches.c.id == b.id)
                         .values(status=int(BatchStatus.COMPLETED), expires_at=past))
            assert trees.purge_expired(datetime.now(timezone.utc)) >= 2  # the batch and its nested batch
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == EXIT_NOT_FOUND, (out, err)
    assert f"batch {b.id} no longer exists: it was purged while waiting" in err and "Traceback" not in err
    assert proj.batches.get_batch(b.id) is None and proj.batches.get_batch(inner.id) is None
