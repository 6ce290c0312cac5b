"""``retry_failed``: the failed runs of a subtree published again, counters moved back with them,
finished batches re-opened, continuations at most once each. On the session's real worker (prefork,
Redis, PostgreSQL); through the API, the CLI and the dashboard.
"""

from __future__ import annotations

import re

import pytest

from celery_batches import BatchClosedError, BatchNotFoundError, BatchStatus, RunStatus
from celery_batches.dashboard import create_app
from tests.helpers import (WAIT, Local, celery, count, counters, csrf_from, drain, eventually, needs, tag, text,
                           with_continuations)

pytestmark = needs("postgres", "redis", "worker")


def failed_then_fixed(proj, name: str = "retry", **kwargs):
    """A batch that finishes FAILED: one job completes, two fail until ``flag`` is set."""
    flag = tag("flag")
    with proj.batches.batch(name, **kwargs) as b:
        b.enqueue(proj.add, 1, 2)
        b.enqueue(proj.fail_unless, flag)
        b.enqueue(proj.fail_unless, flag)
        keys = with_continuations(b, proj)
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.FAILED, 3, 1, 2, 0)
    return b.id, flag, keys


def test_retry_after_a_failed_finish_fires_on_success_and_not_on_failure_again(proj, worker):
    batch_id, flag, keys = failed_then_fixed(proj)
    drain(proj)
    assert [count(proj, keys[k]) for k in ("success", "failure", "complete")] == [0, 1, 1]
    proj.r.set(flag, 1)

    assert proj.batches.retry_failed(batch_id) == 2
    done = proj.batches.wait(batch_id, timeout=WAIT)
    assert counters(done) == (BatchStatus.COMPLETED, 3, 3, 0, 0)
    assert [j.status for j in proj.batches.get_batch_jobs(batch_id)] == [RunStatus.COMPLETED] * 3
    drain(proj)
    # on_success did not fire before and fires now; on_failure and on_complete fired once, never again
    assert [count(proj, keys[k]) for k in ("success", "failure", "complete")] == [1, 1, 1]
    assert proj.batches.retry_failed(batch_id) == 0  # nothing failed any more


def test_retrying_a_nested_batch_reopens_it_and_its_ancestors(proj, worker):
    flag, parent_key, child_key = tag("flag"), tag("parent"), tag("child")
    with proj.batches.batch("parent") as b:
        b.enqueue(proj.add, 1, 1)
        with b.batch("child") as child:
            child.enqueue(proj.fail_unless, flag)
            child.on_success(proj.record, child_key)
        b.on_success(proj.record, parent_key)
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.FAILED, 2, 1, 1, 0)
    proj.r.set(flag, 1)

    assert proj.batches.retry_failed(child.id) == 1  # the child's own id: its parent re-opens too
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.COMPLETED, 2, 2, 0, 0)
    assert counters(proj.batches.get_batch(child.id)) == (BatchStatus.COMPLETED, 1, 1, 0, 0)
    drain(proj)
    assert (count(proj, child_key), count(proj, parent_key)) == (1, 1)


def test_retry_while_the_batch_still_runs(proj, worker, nowhere):
    flag = tag("flag")
    with proj.batches.batch("running") as b:
        b.enqueue(proj.fail_unless, flag)
        b.enqueue(proj.noop.s("never").set(queue=nowhere))  # keeps the batch open
    eventually(lambda: proj.batches.get_batch(b.id).failed_jobs == 1, "the failure to be counted")
    proj.r.set(flag, 1)
    assert proj.batches.retry_failed(b.id) == 1
    eventually(lambda: proj.batches.get_batch(b.id).completed_jobs == 1, "the retried job to complete")
    batch = proj.batches.get_batch(b.id)
    assert (batch.status, batch.failed_jobs, batch.pending_jobs) == (BatchStatus.STARTED, 0, 1)
    proj.batches.cancel_batch(b.id)
    with pytest.raises(BatchClosedError):
        proj.batches.retry_failed(b.id)
    with pytest.raises(BatchNotFoundError):
        proj.batches.retry_failed("9b0c2b55-8e43-4b1e-9a61-000000000000")


def test_retry_from_the_cli_and_the_dashboard(proj, worker):
    batch_id, flag, _ = failed_then_fixed(proj, "retry-ui")
    client = Local(create_app(proj.batches))
    html = text(client.get(f"/batches/{batch_id}"))
    assert 'id="retry-failed"' in html and 'id="cancel-batch"' not in html
    token = csrf_from(html)
    assert client.post(f"/batches/{batch_id}/retry").status_code == 403  # no CSRF token
    assert client.post(f"/api/batches/{batch_id}/retry").status_code == 403
    assert proj.batches.get_batch(batch_id).failed_jobs == 2  # nothing happened

    done = client.post(f"/batches/{batch_id}/retry", data={"csrf_token": token})  # still failing: fails again
    assert done.status_code == 303 and done.headers["Location"] == f"/batches/{batch_id}?notice=retried&runs=2"
    assert "2 failed job(s) published again." in text(client.get(done.headers["Location"]))
    assert counters(proj.batches.wait(batch_id, timeout=WAIT)) == (BatchStatus.FAILED, 3, 1, 2, 0)

    out = celery("retry", batch_id)  # still failing: fails once more
    assert out.returncode == 0 and out.stdout.strip() == "retried 2 run(s)"
    assert counters(proj.batches.wait(batch_id, timeout=WAIT)) == (BatchStatus.FAILED, 3, 1, 2, 0)

    proj.r.set(flag, 1)
    csrf = client.get("/api/csrf").get_json()
    api = client.post(f"/api/batches/{batch_id}/retry", headers={csrf["header"]: csrf["csrf_token"]})
    assert api.status_code == 200 and api.get_json()["retried_runs"] == 2
    assert counters(proj.batches.wait(batch_id, timeout=WAIT)) == (BatchStatus.COMPLETED, 3, 3, 0, 0)
    assert 'id="retry-failed"' not in text(client.get(f"/batches/{batch_id}"))
    assert re.search(r"no batch with id", celery("retry", "9b0c2b55-8e43-4b1e-9a61-000000000000").stderr)
