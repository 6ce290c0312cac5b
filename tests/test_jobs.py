"""Failures keep their story: a failed run's traceback (``runs.traceback``, bounded by
``batches_traceback_max_chars``), ``Batches.retry_run`` (one failed run published again, as
``retry_failed`` does it), and the dashboard's job page and its API (``/runs/<id>``,
``/api/runs/<id>``, ``POST /api/runs/<id>/retry``). On real workers (prefork, Redis, PostgreSQL).
"""

from __future__ import annotations

import asyncio

import pytest

from celery_batches import (BatchClosedError, BatchStatus, InvalidBatchError, RunNotFoundError, RunStatus)
from celery_batches.dashboard import create_app
from celery_batches.store.rows import TRACEBACK_CUT, traceback_text
from tests.helpers import (WAIT, Local, count, counters, csrf_from, drain, eventually, needs, tag, text,
                           with_continuations)

UNKNOWN = "9b0c2b55-8e43-4b1e-9a61-000000000000"


def failed_runs(proj, batch_id: str) -> list:
    return [j for j in proj.batches.get_batch_jobs(batch_id) if j.status == RunStatus.FAILED]


# -- the traceback -----------------------------------------------------------------------------------

def test_traceback_text_keeps_the_end_within_the_bound():
    text = "".join(f"  File \"x.py\", line {i}, in frame{i}\n" for i in range(100)) + "ValueError: boom\n"
    assert traceback_text(text, 0) is None and traceback_text(None, 100) is None
    assert traceback_text(text, len(text)) == text
    cut = traceback_text(text, 300)
    assert len(cut) == 300 and cut.startswith(TRACEBACK_CUT) and cut.endswith("ValueError: boom\n")
    assert traceback_text(text, 10) == text[-10:]


@needs("postgres", "redis", "worker")
def test_a_failed_run_keeps_its_traceback_a_completed_one_has_none(proj, worker):
    with proj.batches.batch("traceback") as b:
        b.enqueue(proj.add, 1, 2)
        b.enqueue(proj.fail, message="kept with its traceback")
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.FAILED, 2, 1, 1, 0)
    done, failed = proj.batches.get_batch_jobs(b.id)
    assert done.traceback is None
    assert failed.error == "ValueError: kept with its traceback"  # the one-line error, as before
    assert failed.traceback.startswith("Traceback (most recent call last):")
    assert "in fail\n" in failed.traceback and failed.traceback.rstrip().endswith(
        "ValueError: kept with its traceback")
    assert proj.batches.get_run(failed.id) == failed


@needs("postgres", "redis", "worker")
def test_a_run_that_retried_keeps_its_last_attempts_traceback(proj, worker):
    key = tag("attempts")
    with proj.batches.batch("traceback-retries") as b:
        b.enqueue(proj.always_retry, key)
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.FAILED
    (run,) = proj.batches.get_batch_jobs(b.id)
    assert int(proj.r.get(key)) == 3 and run.retries == 2
    assert run.error == "RuntimeError: still broken"
    assert "in always_retry" in run.traceback and run.traceback.rstrip().endswith("RuntimeError: still broken")


@needs("postgres", "redis", "worker")
def test_the_traceback_is_cut_at_the_setting_and_not_kept_with_0(proj, start_worker):
    kept = {}
    for limit in ("200", "0"):
        w = start_worker(TEST_TRACEBACK_MAX_CHARS=limit)
        with proj.batches.batch(f"traceback-{limit}") as b:
            b.enqueue(proj.fail.s(message="cut or not").set(queue=w.queue))
        assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.FAILED
        (run,) = proj.batches.get_batch_jobs(b.id)
        assert run.error == "ValueError: cut or not"  # the error is kept whatever the setting
        kept[limit] = run.traceback
        w.stop()
    assert len(kept["200"]) == 200 and kept["200"].startswith(TRACEBACK_CUT)
    assert kept["200"].rstrip().endswith("ValueError: cut or not")
    assert kept["0"] is None


# -- retry_run -----------------------------------------------------------------------------------------

@needs("postgres", "redis", "worker")
def test_retry_run_reruns_one_job_counters_and_continuations_as_retry_failed(proj, worker):
    flag = tag("flag")
    with proj.batches.batch("retry-run") as b:
        b.enqueue(proj.add, 1, 2)
        b.enqueue(proj.fail_unless, flag)
        b.enqueue(proj.fail_unless, flag)
        keys = with_continuations(b, proj)
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.FAILED, 3, 1, 2, 0)
    drain(proj)
    assert [count(proj, keys[k]) for k in ("success", "failure", "complete")] == [0, 1, 1]
    first, second = failed_runs(proj, b.id)
    assert "in fail_unless" in first.traceback
    proj.r.set(flag, 1)

    assert proj.batches.retry_run(first.id) == b.id
    batch = proj.batches.get_batch(b.id)  # re-opened at once, its failure un-counted
    assert (batch.status, batch.failed_jobs) == (BatchStatus.STARTED, 1)
    # the other failed run is still failed: the batch finishes FAILED again, and nothing fires twice
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.FAILED, 3, 2, 1, 0)
    again = proj.batches.get_run(first.id)
    assert (again.status, again.error, again.traceback) == (RunStatus.COMPLETED, None, None)
    assert proj.batches.get_run(second.id).status == RunStatus.FAILED
    drain(proj)
    assert [count(proj, keys[k]) for k in ("success", "failure", "complete")] == [0, 1, 1]

    assert proj.batches.retry_run(second.id) == b.id
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.COMPLETED, 3, 3, 0, 0)
    drain(proj)
    # on_success did not fire before and fires now; on_failure and on_complete fired once, never again
    assert [count(proj, keys[k]) for k in ("success", "failure", "complete")] == [1, 1, 1]


@needs("postgres", "redis", "worker")
def test_retry_run_reopens_a_nested_batch_and_its_parent(proj, worker):
    flag = tag("flag")
    with proj.batches.batch("retry-run-parent") as b:
        b.enqueue(proj.add, 1, 1)
        with b.batch("child") as child:
            child.enqueue(proj.fail_unless, flag)
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.FAILED, 2, 1, 1, 0)
    proj.r.set(flag, 1)
    (run,) = failed_runs(proj, child.id)
    assert proj.batches.retry_run(run.id) == child.id
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.COMPLETED, 2, 2, 0, 0)
    assert counters(proj.batches.get_batch(child.id)) == (BatchStatus.COMPLETED, 1, 1, 0, 0)


@needs("postgres", "redis", "worker")
def test_retry_run_errors(proj, worker, nowhere):
    with pytest.raises(RunNotFoundError, match="no job run with id"):
        proj.batches.retry_run(UNKNOWN)
    with pytest.raises(InvalidBatchError, match="not a run id"):
        proj.batches.retry_run("not-a-uuid")
    with pytest.raises(RunNotFoundError):  # the async twin, in a worker thread
        asyncio.run(proj.batches.aretry_run(UNKNOWN))
    assert proj.batches.get_run(UNKNOWN) is None and proj.batches.get_run("not-a-uuid") is None
    with proj.batches.batch("retry-run-errors") as b:
        b.enqueue(proj.add, 1, 1)
        b.enqueue(proj.fail)
        b.enqueue(proj.noop.s("never").set(queue=nowhere))  # keeps the batch open
    eventually(lambda: counters(proj.batches.get_batch(b.id))[2:4] == (1, 1), "the two outcomes to be counted")
    done, failed, pending = proj.batches.get_batch_jobs(b.id)
    for run in (done, pending):
        with pytest.raises(InvalidBatchError, match="only a FAILED run can be retried"):
            proj.batches.retry_run(run.id)
    proj.batches.cancel_batch(b.id)
    with pytest.raises(BatchClosedError):
        proj.batches.retry_run(failed.id)
    assert proj.batches.get_run(failed.id).status == RunStatus.FAILED


# -- the dashboard -------------------------------------------------------------------------------------

@needs("postgres", "redis", "worker")
def test_the_job_page_and_its_api(proj, worker):
    flag = tag("flag")
    with proj.batches.batch("job-page") as b:
        b.enqueue(proj.add, 1, 2)
        b.enqueue(proj.fail_unless, flag, tag="<b>x</b>")
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.FAILED
    done, failed = proj.batches.get_batch_jobs(b.id)
    client = Local(create_app(proj.batches))

    batch_html = text(client.get(f"/batches/{b.id}"))
    assert f'href="/runs/{failed.id}"' in batch_html and f'href="/runs/{done.id}"' in batch_html
    html = text(client.get(f"/runs/{failed.id}"))
    assert '<pre class="traceback" id="traceback">' in html and "in fail_unless" in html
    assert 'id="retry-run"' in html and f'href="/batches/{b.id}"' in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html  # arguments escaped
    assert 'id="retry-run"' not in text(client.get(f"/runs/{done.id}"))
    assert client.get(f"/runs/{UNKNOWN}").status_code == 404
    assert client.get("/runs/not-a-uuid").status_code == 404

    data = client.get(f"/api/runs/{failed.id}").get_json()
    assert data["id"] == failed.id and data["status"] == "FAILED" and data["task_name"] == "tests.proj.fail_unless"
    assert data["args"] == [flag] and data["kwargs"] == {"tag": "<b>x</b>"}
    assert data["error"] == f"ValueError: {flag} is not set yet" and "in fail_unless" in data["traceback"]
    assert data["batch"] == {"id": b.id, "name": "job-page", "status": "FAILED", "url": f"/batches/{b.id}"}
    assert data["url"] == f"/runs/{failed.id}"
    job = client.get(f"/api/batches/{b.id}/jobs").get_json()["jobs"][1]
    assert {k: v for k, v in data.items() if k not in ("batch", "traceback", "url")} == job  # the job shape, plus
    assert client.get(f"/api/runs/{UNKNOWN}").get_json() == {"error": "No job with this id.", "status": 404}


@needs("postgres", "redis", "worker")
def test_retry_a_job_from_the_dashboard(proj, worker):
    flag = tag("flag")
    with proj.batches.batch("job-retry") as b:
        b.enqueue(proj.add, 1, 2)
        b.enqueue(proj.fail_unless, flag)
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.FAILED
    done, failed = proj.batches.get_batch_jobs(b.id)
    client = Local(create_app(proj.batches))
    token = csrf_from(text(client.get(f"/runs/{failed.id}")))

    assert client.post(f"/runs/{failed.id}/retry").status_code == 403  # no CSRF token
    assert client.post(f"/api/runs/{failed.id}/retry").status_code == 403
    header = client.get("/api/csrf").get_json()["header"]
    assert client.post(f"/api/runs/{failed.id}/retry", headers={header: "0" * 64}).status_code == 403
    assert proj.batches.get_batch(b.id).failed_jobs == 1  # nothing happened

    read_only = Local(create_app(proj.batches, read_only=True))
    assert 'id="retry-run"' not in text(read_only.get(f"/runs/{failed.id}"))
    csrf = read_only.get("/api/csrf").get_json()
    assert read_only.post(f"/api/runs/{failed.id}/retry", headers={csrf["header"]: csrf["csrf_token"]}).status_code == 403

    page = client.post(f"/runs/{failed.id}/retry", data={"csrf_token": token})  # still failing: fails again
    assert page.status_code == 303 and page.headers["Location"] == f"/runs/{failed.id}?notice=retried"
    assert "The job was published again." in text(client.get(page.headers["Location"]))
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.FAILED, 2, 1, 1, 0)

    proj.r.set(flag, 1)
    csrf = client.get("/api/csrf").get_json()
    headers = {csrf["header"]: csrf["csrf_token"]}
    api = client.post(f"/api/runs/{failed.id}/retry", headers=headers)
    assert api.status_code == 200
    answer = api.get_json()
    assert (answer["run_id"], answer["batch_id"]) == (failed.id, b.id)
    assert answer["run_status"] in ("PENDING", "RUNNING", "COMPLETED")  # the worker may be quick
    assert answer["batch_status"] in ("STARTED", "COMPLETED")
    assert counters(proj.batches.wait(b.id, timeout=WAIT)) == (BatchStatus.COMPLETED, 2, 2, 0, 0)

    not_failed = client.post(f"/api/runs/{failed.id}/retry", headers=headers)
    assert not_failed.status_code == 409 and not_failed.get_json()["error"] == "the job is not FAILED"
    assert not_failed.get_json()["run_status"] == "COMPLETED"
    assert client.post(f"/api/runs/{UNKNOWN}/retry", headers=headers).status_code == 404
    html = client.post(f"/runs/{done.id}/retry", data={"csrf_token": token})
    assert html.headers["Location"] == f"/runs/{done.id}?notice=not-failed"


@needs("postgres", "redis", "worker")
def test_retrying_a_job_of_a_cancelled_batch_is_a_conflict(proj, worker, nowhere):
    with proj.batches.batch("job-cancelled") as b:
        b.enqueue(proj.fail)
        b.enqueue(proj.noop.s("never").set(queue=nowhere))
    eventually(lambda: proj.batches.get_batch(b.id).failed_jobs == 1, "the failure to be counted")
    proj.batches.cancel_batch(b.id)
    (failed,) = failed_runs(proj, b.id)
    client = Local(create_app(proj.batches))
    assert 'id="retry-run"' not in text(client.get(f"/runs/{failed.id}"))
    csrf = client.get("/api/csrf").get_json()
    refused = client.post(f"/api/runs/{failed.id}/retry", headers={csrf["header"]: csrf["csrf_token"]})
    assert refused.status_code == 409
    assert refused.get_json() == {"run_id": failed.id, "run_status": "FAILED", "batch_id": b.id,
                                  "batch_status": "CANCELLED", "error": "its batch was cancelled", "status": 409}
