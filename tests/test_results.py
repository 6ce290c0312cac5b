"""``results=True``: each job's return value kept in the registry by the transaction that records its
end, and every continuation given the list, in unit order, as its first argument (a chord body's
call), with no result backend read. On the session's real worker (prefork, Redis, PostgreSQL); the
SQLite path in ``test_embedded.py``.
"""

from __future__ import annotations

import json
import uuid

import pytest

from celery_batches import BatchNotFoundError, BatchStatus, InvalidBatchError, RunStatus
from celery_batches.dashboard import create_app
from tests.helpers import WAIT, Local, celery, drain, eventually, needs, row_counts, tag, text

pytestmark = needs("postgres", "redis")


def got(proj, key: str) -> list:
    """What the ``remember`` continuation stored under ``key``, once per run."""
    return [json.loads(item) for item in proj.r.lrange(key, 0, -1)]


def remembered(proj, key: str) -> list:
    """``got``, once the continuation ran and the queue drained (so a second run would show)."""
    eventually(lambda: got(proj, key), f"continuation {key}", WAIT)
    drain(proj)
    return got(proj, key)


@needs("worker")
def test_a_thousand_results_reach_every_continuation_in_unit_order(proj, worker):
    success, complete = tag("success"), tag("complete")
    with proj.batches.batch("thousand", results=True) as b:
        ids = [b.enqueue(proj.add, i, i) for i in range(1000)]
        b.on_success(proj.remember, success)
        b.on_complete(proj.remember, complete)
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.COMPLETED
    expected = [2 * i for i in range(1000)]
    assert remembered(proj, success) == [expected] and remembered(proj, complete) == [expected]
    results = proj.batches.get_results(b.id)
    assert [r.run_id for r in results] == ids
    assert [r.value for r in results] == expected
    assert {(r.status, r.error) for r in results} == {(RunStatus.COMPLETED, None)}


@needs("worker")
def test_nested_batches_added_jobs_and_retries_keep_their_places(proj, worker):
    flag, success, attempts = tag("flag"), tag("success"), tag("attempts")
    with proj.batches.batch("nested-results", results=True) as b:
        b.enqueue(proj.gate, flag, "gate")
        b.enqueue(proj.add, 1, 1)
        with b.batch("child") as child:
            child.enqueue(proj.add, 2, 2)
            child.enqueue(proj.flaky, attempts, 2)  # retried twice, then returns "ok"
            with child.batch("grandchild") as grandchild:
                grandchild.enqueue(proj.add, 3, 3)
        b.enqueue(proj.add, 4, 4)
        b.on_success(proj.remember, success)
    # added while the gate holds the batch open: after the units it had
    with proj.batches.reopen(b.id) as more:
        with more.batch("added-child") as added:
            added.enqueue(proj.add, 5, 5)
        more.enqueue(proj.add, 6, 6)
    proj.r.set(flag, 1)
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.COMPLETED
    expected = ["gate", 2, [4, "ok", [6]], 8, [10], 12]
    assert remembered(proj, success) == [expected]
    assert int(proj.r.get(attempts)) == 3
    results = proj.batches.get_results(b.id)
    nested = results[2]
    assert isinstance(nested.status, BatchStatus) and nested.status == BatchStatus.COMPLETED
    assert proj.batches.get_batch(nested.run_id).name == "child"
    assert [r.value for r in nested.value[:2]] == [4, "ok"]


@needs("worker")
def test_a_failed_member_is_none_and_the_first_failure_sees_the_results_so_far(proj, worker):
    flag, first, complete, failure = tag("flag"), tag("first"), tag("complete"), tag("failure")
    with proj.batches.batch("with-a-failure", results=True) as b:
        b.enqueue(proj.add, 1, 1)
        bad = b.enqueue(proj.fail)
        b.enqueue(proj.gate, flag, "late")
        b.on_first_failure(proj.remember, first)
        b.on_complete(proj.remember, complete)
        b.on_failure(proj.remember, failure)
    eventually(lambda: got(proj, first), "the first-failure continuation to run", WAIT)
    [seen] = got(proj, first)
    assert seen[1:] == [None, None]  # the failed job, and the gated one not finished yet
    proj.r.set(flag, 1)
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.FAILED
    assert remembered(proj, complete) == remembered(proj, failure) == [[2, None, "late"]]
    assert len(got(proj, first)) == 1
    failed = proj.batches.get_results(b.id)[1]
    assert (failed.run_id, failed.status, failed.value) == (bad, RunStatus.FAILED, None)
    assert "this member fails on purpose" in failed.error


@needs("worker")
def test_a_result_too_large_or_not_json_fails_its_run(proj, worker):
    complete = tag("complete")
    limit = 1 << 20  # the default result_max_bytes
    with proj.batches.batch("unkeepable", results=True) as b:
        b.enqueue(proj.returns, "x", limit - 2)  # its JSON (with quotes) is exactly the limit
        big = b.enqueue(proj.returns, "x", limit - 1)
        odd = b.enqueue(proj.returns_a_set)
        b.on_complete(proj.remember, complete)
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert (done.status, done.completed_jobs, done.failed_jobs) == (BatchStatus.FAILED, 1, 2)
    assert remembered(proj, complete) == [["x" * (limit - 2), None, None]]
    errors = {r.run_id: r.error for r in proj.batches.get_results(b.id)}
    assert f"its JSON is {limit + 1} bytes, more than result_max_bytes ({limit})" in errors[big]
    assert "a set is not JSON serializable" in errors[odd]


@needs("worker")
def test_retry_failed_gives_the_new_results_to_on_success(proj, worker):
    flag, failure, success = tag("flag"), tag("failure"), tag("success")
    with proj.batches.batch("results-retry", results=True) as b:
        b.enqueue(proj.add, 1, 1)
        b.enqueue(proj.fail_unless, flag)
        b.on_failure(proj.remember, failure)
        b.on_success(proj.remember, success)
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.FAILED
    proj.r.set(flag, 1)
    assert proj.batches.retry_failed(b.id) == 1
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.COMPLETED
    assert remembered(proj, failure) == [[2, None]]
    assert remembered(proj, success) == [[2, "ok"]]


def test_bad_input_is_refused_and_nothing_is_written(proj):
    name = f"bad-results-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidBatchError, match="results must be True or False"):
        with proj.batches.batch(name, results="yes") as b:
            b.enqueue(proj.add, 1, 1)
    assert set(row_counts(proj.batches, name=name).values()) == {0}
    with proj.batches.batch(name) as b:
        b.enqueue(proj.add, 1, 1)
    with pytest.raises(InvalidBatchError, match="create it with results=True"):
        proj.batches.get_results(b.id)
    with pytest.raises(BatchNotFoundError):
        proj.batches.get_results(str(uuid.uuid4()))


@needs("worker")
def test_results_in_show_json_the_batch_page_and_the_jobs_api(proj, worker):
    with proj.batches.batch("results-ui", results=True) as b:
        b.enqueue(proj.add, 20, 22)
        b.enqueue(proj.returns, {"when": "2026-12-02", "n": [1, 2]})
    proj.batches.wait(b.id, timeout=WAIT)
    out = celery("show", b.id, "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["batch"]["results"] is True
    assert [(r["status"], r["value"]) for r in shown["results"]] == [
        ("COMPLETED", 42), ("COMPLETED", {"when": "2026-12-02", "n": [1, 2]})]
    client = Local(create_app(proj.batches))
    html = text(client.get(f"/batches/{b.id}"))
    assert "<th>Result</th>" in html and "<code>42</code>" in html
    jobs = client.get(f"/api/batches/{b.id}/jobs").get_json()
    assert [j["result"] for j in jobs["jobs"]] == [42, {"when": "2026-12-02", "n": [1, 2]}]
    plain = proj.batches.batch("no-results")
    with plain as p:
        p.enqueue(proj.add, 1, 1)
    proj.batches.wait(p.id, timeout=WAIT)
    assert "<th>Result</th>" not in text(client.get(f"/batches/{p.id}"))
    assert "results" not in json.loads(celery("show", p.id, "--json").stdout)


@needs("worker")
def test_a_continue_with_stage_keeps_results_too(proj, worker):
    success = tag("success")
    with proj.batches.batch("first-stage") as b:
        b.enqueue(proj.add, 1, 1)

    def stage(s):
        s.enqueue(proj.add, 2, 3)
        s.on_success(proj.remember, success)

    second = proj.batches.continue_batch_with(b.id, "second-stage", stage, results=True)
    assert proj.batches.wait(second, timeout=WAIT).status == BatchStatus.COMPLETED
    assert remembered(proj, success) == [[5]]
    assert proj.batches.get_batch(second).results and not proj.batches.get_batch(b.id).results


@needs("worker")
def test_an_immutable_continuation_gets_no_results_as_an_immutable_chord_body(proj, worker):
    given, mutable = tag("given"), tag("mutable")
    with proj.batches.batch("immutable-body", results=True) as b:
        b.enqueue(proj.add, 1, 1)
        b.on_success(proj.remember.si(["as given"], given))  # a chord's notify.si(...) body
        b.on_complete(proj.remember.s(mutable))
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.COMPLETED
    assert remembered(proj, given) == [["as given"]] and remembered(proj, mutable) == [[2]]


@needs("worker")
def test_a_chain_continuation_gives_the_results_to_its_first_task(proj, worker):
    key = tag("chained")
    with proj.batches.batch("chain-body", results=True) as b:
        for i in range(1, 4):
            b.enqueue(proj.add, i, i)
        b.on_success(proj.total.s() | proj.remember.s(key))  # remember(total([2, 4, 6]), key)
    assert proj.batches.wait(b.id, timeout=WAIT).status == BatchStatus.COMPLETED
    assert remembered(proj, key) == [12]
