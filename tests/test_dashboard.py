"""The dashboard over HTTP (Werkzeug's test client): every page and endpoint, and the security rules.

Most tests run on the session's PostgreSQL registry (the ``proj`` fixture); jobs meant to stay
PENDING go to a queue no worker consumes. Tests that need finished jobs use the real worker.
``test_sqlite_registry`` runs the pages on an embedded SQLite registry.
"""

from __future__ import annotations

import hmac
import logging
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from html import unescape

import pytest
import sqlalchemy as sa
from celery import Celery
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

from celery_batches import Batches, BatchStatus, RunStatus
from celery_batches.dashboard import create_app
from celery_batches.dashboard.launcher import find_batches
from celery_batches.models import ContinuationStatus
from tests.helpers import LOCAL, ROOT, WAIT, Local, csrf_from, eventually, needs, pending_batch, text, unique_name

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(proj):
    return Local(create_app(proj.batches))


def run_counts(proj, batch_ids: list[str]) -> dict[str, int]:
    r = proj.batches.transitions.tables.runs
    with proj.batches.engine.connect() as conn:
        rows = conn.execute(sa.select(r.c.status, sa.func.count()).where(r.c.batch_id.in_(batch_ids))
                            .group_by(r.c.status)).all()
    counts = {RunStatus(s).name.lower(): n for s, n in rows}
    total = sum(counts.values())
    done = {k: counts.get(k, 0) for k in ("completed", "failed", "cancelled")}
    return dict(total=total, pending=total - sum(done.values()), **done)


def subtree_ids(proj, batch_id: str) -> list[str]:
    ids, frontier = [batch_id], [batch_id]
    while frontier:
        frontier = [b.id for parent in frontier for b in proj.batches.list_batches(parent_id=parent, limit=1000)]
        ids += frontier
    return ids


# -- pages and API on PostgreSQL -------------------------------------------------------------------

@needs("postgres", "redis")
def test_batches_page_lists_newest_first_with_progress_and_children(proj, client, nowhere):
    t = unique_name("listing")
    first = pending_batch(proj, nowhere, f"{t}-first", jobs=2)
    with proj.batches.batch(f"{t}-second", created_by="checkout") as b:
        b.enqueue(proj.noop.s().set(queue=nowhere))
        with b.batch(f"{t}-child") as child:
            child.enqueue(proj.noop.s().set(queue=nowhere))
    response = client.get(f"/?q={t}")
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = text(response)
    rows = re.findall(r'<tr data-batch-id="([0-9a-f-]+)" data-status="(\w+)">', html)
    assert rows == [(b.id, "STARTED"), (first, "STARTED")]  # newest first, top-level only
    assert f"{t}-child" not in html
    row = html[html.index(f'data-batch-id="{b.id}"'):html.index(f'data-batch-id="{first}"')]
    assert 'data-total="2" data-completed="0" data-failed="0"' in row and 'data-pending="2"' in row
    assert "by checkout" in row and '<td class="num">1</td>' in row  # created_by, children count
    assert "<svg class=\"bar\"" in row and "<time datetime=" in row
    assert 'data-unfinished="true"' in html and '<meta http-equiv="refresh"' in html  # live while running
    # the JSON twin
    data = client.get(f"/api/batches?q={t}").get_json()
    assert [x["id"] for x in data["batches"]] == [b.id, first]
    top = data["batches"][0]
    assert (top["status"], top["total_jobs"], top["pending_jobs"], top["children"], top["created_by"]) == (
        "STARTED", 2, 2, 1, "checkout")
    assert top["url"] == f"/batches/{b.id}" and top["created_at"].endswith("+00:00")
    children = client.get(f"/api/batches?parent={b.id}").get_json()["batches"]
    assert [(c["name"], c["parent_id"]) for c in children] == [(f"{t}-child", b.id)]


@needs("postgres", "redis")
def test_batches_page_filters_by_status_and_name_and_paginates_both_ways(proj, nowhere):
    t = unique_name("paging")
    ids = [pending_batch(proj, nowhere, f"{t}-{i}", jobs=1) for i in range(5)]  # ids[4] is the newest
    proj.batches.cancel_batch(ids[1])
    client = Local(create_app(proj.batches, page_size=2))

    html = text(client.get(f"/?q={t.upper()}"))  # case-insensitive substring
    assert re.findall(r'data-batch-id="([0-9a-f-]+)"', html) == [ids[4], ids[3]]
    older = unescape(re.search(r'<a rel="next" href="([^"]+)"', html).group(1))
    assert older.startswith("/?") and f"before={ids[3]}" in older and "rel=\"prev\"" not in html
    html = text(client.get(older))
    assert re.findall(r'data-batch-id="([0-9a-f-]+)"', html) == [ids[2], ids[1]]
    newer = unescape(re.search(r'<a rel="prev" href="([^"]+)"', html).group(1))
    assert re.findall(r'data-batch-id="([0-9a-f-]+)"', text(client.get(newer))) == [ids[4], ids[3]]
    html = text(client.get(unescape(re.search(r'<a rel="next" href="([^"]+)"', html).group(1))))
    assert re.findall(r'data-batch-id="([0-9a-f-]+)"', html) == [ids[0]] and 'rel="next"' not in html

    cancelled = text(client.get(f"/?q={t}&status=cancelled"))
    assert re.findall(r'data-batch-id="([0-9a-f-]+)" data-status="(\w+)"', cancelled) == [(ids[1], "CANCELLED")]
    assert '<option value="cancelled" selected>' in cancelled
    assert "No batches match these filters" in text(client.get("/?q=no-such-batch-" + t))

    # the API walks the same pages through its next/previous links
    seen, url = [], f"/api/batches?q={t}&limit=2"
    while url:
        data = client.get(url).get_json()
        seen += [b["id"] for b in data["batches"]]
        url = data["next"]
    assert seen == ids[::-1]
    back = client.get(f"/api/batches?q={t}&limit=2&before={ids[2]}").get_json()
    assert [b["id"] for b in back["batches"]] == [ids[1], ids[0]] and back["next"] is None
    assert [b["id"] for b in client.get(back["previous"]).get_json()["batches"]] == [ids[3], ids[2]]
    assert [b["id"] for b in client.get(f"/api/batches?q={t}&status=4").get_json()["batches"]] == [ids[1]]


@needs("postgres", "redis", "worker")
def test_batch_page_tree_roll_up_matches_the_runs(proj, worker, client):
    t = unique_name("tree")
    with proj.batches.batch(f"{t}-root") as b:
        b.enqueue(proj.noop)
        b.enqueue(proj.fail)
        with b.batch(f"{t}-a") as a:
            a.enqueue(proj.noop)
            a.enqueue(proj.noop)
            with a.batch(f"{t}-a1") as a1:
                a1.enqueue(proj.fail)
                a1.enqueue(proj.noop)
        with b.batch(f"{t}-b") as c:
            c.enqueue(proj.noop)
    done = proj.batches.wait(b.id, timeout=WAIT)
    assert done.status == BatchStatus.FAILED

    data = client.get(f"/api/batches/{b.id}").get_json()
    assert data["subtree"] == dict(run_counts(proj, subtree_ids(proj, b.id)), batches=4)
    assert data["subtree"] == {"total": 7, "completed": 5, "failed": 2, "cancelled": 0, "pending": 0, "batches": 4}
    assert data["jobs"] == {"total": 2, "completed": 1, "failed": 1, "cancelled": 0, "pending": 0}
    tree = {n["name"]: n for n in data["tree"]}
    assert [n["name"] for n in data["tree"]] == [f"{t}-root", f"{t}-a", f"{t}-a1", f"{t}-b"]  # depth-first
    assert [n["depth"] for n in data["tree"]] == [0, 1, 2, 1] and data["tree_truncated"] is False
    for entry in data["tree"]:  # every level's roll-up is the runs of its subtree
        assert entry["subtree_jobs"] == run_counts(proj, subtree_ids(proj, entry["id"])), entry["name"]
    assert tree[f"{t}-a"]["units"] == {"total": 3, "completed": 2, "failed": 1, "cancelled": 0, "pending": 0}
    assert tree[f"{t}-a"]["subtree_batches"] == 2

    html = text(client.get(f"/batches/{b.id}"))
    assert "Whole subtree: <strong>4</strong> batch(es), <strong>7</strong> job(s)" in html
    for name in (f"{t}-a", f"{t}-a1", f"{t}-b"):
        assert f">{name}</a>" in html
    assert html.count('class="badge r-failed"') == 1 and "this member fails on purpose" in html
    assert 'data-unfinished="false"' in html and 'http-equiv="refresh"' not in html  # finished: no refresh
    assert 'id="cancel-batch"' not in html  # nothing to cancel

    child = text(client.get(f"/batches/{tree[f'{t}-a1']['id']}"))  # breadcrumb and parent link
    assert re.search(rf'<a href="/batches/{b.id}">{t}-root</a>\s*› <a href="/batches/{tree[f"{t}-a"]["id"]}">', child)
    assert f'<dt>parent</dt><dd><a href="/batches/{tree[f"{t}-a"]["id"]}">{t}-a</a>' in child


@needs("postgres", "redis")
def test_a_cancelled_subtree_rolls_up_like_its_runs(proj, client, nowhere):
    t = unique_name("cancelled-tree")
    with proj.batches.batch(f"{t}-root") as b:
        b.enqueue(proj.noop.s().set(queue=nowhere))
        with b.batch(f"{t}-child") as c:
            c.enqueue(proj.noop.s().set(queue=nowhere))
            c.enqueue(proj.noop.s().set(queue=nowhere))
    proj.batches.cancel_batch(c.id)  # the child only: one cancelled unit of the parent
    data = client.get(f"/api/batches/{b.id}").get_json()
    assert data["subtree"] == dict(run_counts(proj, [b.id, c.id]), batches=2)
    assert data["subtree"] == {"total": 3, "completed": 0, "failed": 0, "cancelled": 2, "pending": 1, "batches": 2}
    assert data["batch"]["cancelled_jobs"] == 1 and data["jobs"]["pending"] == 1


@needs("postgres", "redis")
def test_jobs_are_paginated_on_position_and_filterable(proj, client, nowhere):
    t = unique_name("jobs")
    with proj.batches.batch(t) as b:
        for i in range(250):
            b.enqueue(proj.add.s(i, 1).set(queue=nowhere))
    html = text(client.get(f"/batches/{b.id}"))
    assert re.findall(r'<td class="num">(\d+)</td>\s*<td><span class="badge r-pending">', html)[:2] == ["0", "1"]
    assert html.count("data-run-id=") == 100 and "page 1 of 3" in html
    assert f'href="/batches/{b.id}?start=200#jobs">Last »</a>' in html
    last = text(client.get(f"/batches/{b.id}?start=200"))
    assert last.count("data-run-id=") == 50 and "page 3 of 3" in last and 'rel="next"' not in last
    prev = unescape(re.search(r'<a rel="prev" href="([^"]+)"', last).group(1))
    assert prev == f"/batches/{b.id}?before=200#jobs"
    assert "page 2 of 3" in text(client.get(prev.split("#")[0]))
    assert "<code class=\"args\">[249, 1]</code>" in last and "tests.proj.add" in last

    url, positions = f"/api/batches/{b.id}/jobs?limit=100", []
    while url:
        data = client.get(url).get_json()
        positions += [j["position"] for j in data["jobs"]]
        url = data["next"]
    assert positions == list(range(250))
    page = client.get(f"/api/batches/{b.id}/jobs?after=99&limit=2").get_json()
    job = page["jobs"][0]
    assert (job["position"], job["status"], job["task_name"], job["args"], job["kwargs"], job["queue"]) == (
        100, "PENDING", "tests.proj.add", [100, 1], {}, nowhere)
    assert page["previous"] == f"/api/batches/{b.id}/jobs?limit=2&before=100"
    assert [j["position"] for j in client.get(page["previous"]).get_json()["jobs"]] == [98, 99]

    proj.batches.cancel_batch(b.id)
    cancelled = client.get(f"/api/batches/{b.id}/jobs?status=cancelled&limit=500").get_json()["jobs"]
    assert len(cancelled) == 250 and all(j["error"] == "cancelled" for j in cancelled)
    assert client.get(f"/api/batches/{b.id}/jobs?status=failed").get_json() == {"jobs": [], "next": None,
                                                                                "previous": None}
    assert "No failed jobs" in text(client.get(f"/batches/{b.id}?status=failed"))


@needs("postgres", "redis", "worker")
def test_failed_filter_on_a_batch_run_by_the_worker(proj, worker, client):
    t = unique_name("failed")
    with proj.batches.batch(t) as b:
        for i in range(12):
            b.enqueue(proj.fail if i % 4 == 1 else proj.noop)
    proj.batches.wait(b.id, timeout=WAIT)
    html = text(client.get(f"/batches/{b.id}?status=failed"))
    rows = re.findall(r'<tr data-run-id="[0-9a-f-]+" data-status="(\w+)">\s*<td class="num">(\d+)</td>', html)
    assert rows == [("FAILED", "1"), ("FAILED", "5"), ("FAILED", "9")]
    assert 'class="current">failed' in html and "fails on purpose" in html
    jobs = client.get(f"/api/batches/{b.id}/jobs?status=failed&limit=2").get_json()
    assert [j["position"] for j in jobs["jobs"]] == [1, 5] and jobs["jobs"][0]["started_at"]
    assert jobs["jobs"][0]["duration"] is not None and jobs["jobs"][0]["duration"] >= 0
    assert [j["position"] for j in client.get(jobs["next"]).get_json()["jobs"]] == [9]
    everything = text(client.get(f"/batches/{b.id}"))
    assert everything.count("data-run-id=") == 12 and re.search(r'<td class="num">\d+ ms</td>', everything)


@needs("postgres", "redis")
def test_continuations_and_continue_with_links(proj, client, nowhere):
    t = unique_name("stages")
    with proj.batches.batch(f"{t}-first") as b:
        b.enqueue(proj.noop.s().set(queue=nowhere))
        b.on_success(proj.record, "never")
        b.on_failure("tests.proj.record", "never-either")
    second = proj.batches.continue_batch_with(
        b.id, f"{t}-second", lambda s: s.enqueue(proj.noop.s().set(queue=nowhere)), when="complete")
    first = client.get(f"/api/batches/{b.id}").get_json()
    assert first["successors"] == [{"id": second, "name": f"{t}-second", "status": "CREATED",
                                    "continue_when": "complete"}]
    assert [(c["kind"], c["task_name"], c["args"], c["status"]) for c in first["continuations"]] == [
        ("success", "tests.proj.record", ["never"], "WAITING"),
        ("failure", "tests.proj.record", ["never-either"], "WAITING")]
    html = text(client.get(f"/batches/{b.id}"))
    assert f'<a class="successor" href="/batches/{second}">{t}-second</a>' in html
    assert html.count('class="badge c-waiting"') == 2
    stage = client.get(f"/api/batches/{second}").get_json()
    assert stage["antecedent"] == {"id": b.id, "name": f"{t}-first", "status": "STARTED"}
    assert stage["batch"]["antecedent_id"] == b.id and stage["batch"]["continue_when"] == "complete"
    assert f'<a class="antecedent" href="/batches/{b.id}">{t}-first</a>' in text(client.get(f"/batches/{second}"))
    assert 'data-unfinished="true"' in text(client.get(f"/batches/{second}"))

    client.post(f"/batches/{b.id}/cancel", data={"csrf_token": csrf_from(html)})
    after = client.get(f"/api/batches/{b.id}").get_json()
    assert {c["status"] for c in after["continuations"]} == {ContinuationStatus.SKIPPED.name}
    assert after["successors"][0]["status"] == "CANCELLED"
    assert html.count("c-skipped") == 0 and text(client.get(f"/batches/{b.id}")).count('class="badge c-skipped"') == 2


@needs("postgres", "redis")
def test_an_empty_batch_shows_the_progress_of_the_model(proj, client, nowhere):
    """Batch.progress is the one definition: an empty batch is 100% once finished, 0% while it waits."""
    from celery_batches.store import pages

    t = unique_name("empty")
    with proj.batches.batch(f"{t}-done") as done:
        pass
    antecedent = pending_batch(proj, nowhere, f"{t}-first", jobs=1)
    waiting = proj.batches.continue_batch_with(antecedent, f"{t}-waiting", lambda stage: None)
    for batch_id, expected in ((done.id, 1.0), (waiting, 0.0)):
        batch = proj.batches.get_batch(batch_id)
        assert batch.total_jobs == 0 and batch.is_finished == (expected == 1.0) and batch.progress == expected
        detail = pages.batch_detail(proj.batches.transitions, batch_id)
        assert detail.row.units.progress == detail.root.units.progress == expected
        assert client.get(f"/api/batches/{batch_id}").get_json()["batch"]["progress"] == expected
        assert [x["progress"] for x in client.get(f"/api/batches?q={batch.name}").get_json()["batches"]] == [expected]
        html = text(client.get(f"/batches/{batch_id}"))
        assert f'<span class="label">progress</span><span class="value">{expected:.0%}</span>' in html, batch.name
    proj.batches.cancel_batch(antecedent)


# -- actions and CSRF ------------------------------------------------------------------------------

@needs("postgres", "redis")
def test_cancel_button_needs_the_csrf_token_of_its_cookie(proj, client, nowhere):
    batch_id = pending_batch(proj, nowhere, unique_name("cancel-form"), jobs=4)
    page = client.get(f"/batches/{batch_id}")
    cookie = page.headers["Set-Cookie"]
    assert "celery_batches_csrf=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    html = text(page)
    token = csrf_from(html)
    assert f'<form class="action" method="post" action="/batches/{batch_id}/cancel"' in html

    assert client.post(f"/batches/{batch_id}/cancel").status_code == 403  # no token
    assert client.post(f"/batches/{batch_id}/cancel", data={"csrf_token": "0" * 64}).status_code == 403
    stranger = Local(create_app(proj.batches))  # the right token without its cookie
    assert stranger.post(f"/batches/{batch_id}/cancel", data={"csrf_token": token}).status_code == 403
    other_app = Local(create_app(proj.batches))  # another secret: the token does not verify
    other_app.get("/")
    assert other_app.post(f"/batches/{batch_id}/cancel", data={"csrf_token": token}).status_code == 403
    assert client.post(f"/batches/{batch_id}/cancel", data={"csrf_token": token},
                       headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.post(f"/batches/{batch_id}/cancel", data={"csrf_token": token},
                       headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.get(f"/batches/{batch_id}/cancel").status_code == 405
    assert proj.batches.get_batch(batch_id).status == BatchStatus.STARTED  # nothing happened yet

    done = client.post(f"/batches/{batch_id}/cancel", data={"csrf_token": token},
                       headers={"Origin": "http://localhost"})
    assert done.status_code == 303
    assert done.headers["Location"] == f"/batches/{batch_id}?notice=cancelled&runs=4"
    assert proj.batches.get_batch(batch_id).status == BatchStatus.CANCELLED
    html = text(client.get(done.headers["Location"]))
    assert "Batch cancelled: 4 pending job(s) cancelled." in html and 'id="cancel-batch"' not in html
    again = client.post(f"/batches/{batch_id}/cancel", data={"csrf_token": token})
    assert again.headers["Location"] == f"/batches/{batch_id}?notice=finished"


@needs("postgres", "redis")
def test_cancel_api_with_csrf_header_or_api_token(proj, nowhere):
    client = Local(create_app(proj.batches))
    batch_id = pending_batch(proj, nowhere, unique_name("cancel-api"), jobs=3)
    assert client.post(f"/api/batches/{batch_id}/cancel").get_json()["status"] == 403
    token = client.get("/api/csrf").get_json()["csrf_token"]
    response = client.post(f"/api/batches/{batch_id}/cancel", headers={"X-CSRF-Token": token})
    assert response.status_code == 200
    assert response.get_json() == {"cancelled_runs": 3, "batch_status": "CANCELLED"}
    again = client.post(f"/api/batches/{batch_id}/cancel", headers={"X-CSRF-Token": token})
    assert again.status_code == 409 and again.get_json()["batch_status"] == "CANCELLED"

    scripted = Local(create_app(proj.batches, api_token="s3cret-token-for-scripts"), use_cookies=False)
    other = pending_batch(proj, nowhere, unique_name("cancel-token"), jobs=2)
    assert scripted.post(f"/api/batches/{other}/cancel", headers={"X-Batches-Token": "wrong"}).status_code == 403
    response = scripted.post(f"/api/batches/{other}/cancel", headers={"X-Batches-Token": "s3cret-token-for-scripts"})
    assert response.status_code == 200 and response.get_json()["cancelled_runs"] == 2
    unknown = scripted.post(f"/api/batches/{uuid.uuid4()}/cancel",
                            headers={"X-Batches-Token": "s3cret-token-for-scripts"})
    assert unknown.status_code == 404 and unknown.get_json()["error"] == "No batch with this id."
    with pytest.raises(ValueError):
        create_app(proj.batches, api_token="short")


@needs("postgres", "redis")
def test_read_only_hides_and_refuses_actions(proj, nowhere):
    client = Local(create_app(proj.batches, read_only=True))
    batch_id = pending_batch(proj, nowhere, unique_name("read-only"), jobs=1)
    html = text(client.get(f"/batches/{batch_id}"))
    assert 'id="cancel-batch"' not in html and "csrf_token" not in html and "read-only" in html
    token = client.get("/api/csrf").get_json()["csrf_token"]
    assert client.post(f"/batches/{batch_id}/cancel", data={"csrf_token": token}).status_code == 403
    refused = client.post(f"/api/batches/{batch_id}/cancel", headers={"X-CSRF-Token": token})
    assert refused.status_code == 403 and refused.get_json()["error"] == "This dashboard is read-only."
    assert proj.batches.get_batch(batch_id).status == BatchStatus.STARTED


# -- access rules ----------------------------------------------------------------------------------

@needs("postgres", "redis")
def test_only_local_requests_by_default(proj):
    app = create_app(proj.batches)
    anyone = Client(app)
    for url in ("/", "/api/batches", "/static/dashboard.css", f"/batches/{uuid.uuid4()}"):
        response = anyone.get(url, environ_base={"REMOTE_ADDR": "203.0.113.9"})
        assert response.status_code == 403, url
    assert anyone.get("/api/batches", environ_base={"REMOTE_ADDR": "10.1.2.3"}).get_json()["status"] == 403
    assert anyone.get("/").status_code == 403  # no REMOTE_ADDR at all
    assert anyone.get("/", environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 200
    assert anyone.get("/", environ_base={"REMOTE_ADDR": "::1"}, headers={"Host": "[::1]:5580"}).status_code == 200
    other_loopback = {"REMOTE_ADDR": "127.0.0.2"}
    assert anyone.get("/", environ_base=other_loopback, headers={"Host": "127.0.0.1:80"}).status_code == 200
    # a local reverse proxy forwarding someone else, and DNS rebinding (a foreign Host on loopback)
    assert anyone.get("/", environ_base=LOCAL, headers={"X-Forwarded-For": "198.51.100.7"}).status_code == 403
    assert anyone.get("/", environ_base=LOCAL, headers={"Host": "attacker.example"}).status_code == 403


@needs("postgres", "redis")
def test_authorize_callable_and_basic_auth(proj):
    def authorize(request):
        return request.headers.get("X-User") == "ops"

    gated = Client(create_app(proj.batches, authorize=authorize))
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    assert gated.get("/", environ_base=remote, headers={"X-User": "ops"}).status_code == 200
    assert gated.get("/", environ_base=remote, headers={"X-User": "eve"}).status_code == 403
    assert gated.get("/", environ_base=LOCAL).status_code == 403  # authorize decides, even locally

    protected = Client(create_app(proj.batches, basic_auth=("admin", "pa:ss")))
    challenge = protected.get("/", environ_base=remote)
    assert challenge.status_code == 401 and challenge.headers["WWW-Authenticate"].startswith("Basic ")
    assert protected.get("/", environ_base=remote, auth=("admin", "wrong")).status_code == 401
    assert protected.get("/api/batches", environ_base=remote, auth=("admin", "wrong")).get_json()["status"] == 401
    assert protected.get("/", environ_base=remote, auth=("admin", "pa:ss")).status_code == 200
    both = Client(create_app(proj.batches, basic_auth=("admin", "pw"), authorize=authorize))
    assert both.get("/", environ_base=remote, auth=("admin", "pw")).status_code == 403
    assert both.get("/", environ_base=remote, auth=("admin", "pw"), headers={"X-User": "ops"}).status_code == 200
    with pytest.raises(ValueError):
        create_app(proj.batches, basic_auth=("admin", ""))


@needs("postgres", "redis")
def test_basic_auth_compares_the_password_even_when_the_user_name_is_wrong(proj, monkeypatch):
    """Comparing the password only after the user name matched answers faster for a wrong name:
    the timing tells an attacker which user name is right."""
    import celery_batches.dashboard.security as dashboard_security

    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(dashboard_security.hmac, "compare_digest", spy)
    protected = Client(create_app(proj.batches, basic_auth=("admin", "s3cret")))
    for auth in (("intruder", "guess"), ("admin", "guess"), None):
        compared.clear()
        assert protected.get("/", environ_base={"REMOTE_ADDR": "203.0.113.9"}, auth=auth).status_code == 401
        assert compared == [b"admin", b"s3cret"], auth


@needs("postgres", "redis")
def test_user_supplied_text_is_escaped(proj, client, nowhere):
    evil = "<script>alert(1)</script>"
    with proj.batches.batch(evil, created_by='"><img src=x onerror=alert(2)>') as b:
        b.enqueue(proj.noop.s("<b>bold</b>").set(queue=nowhere))
        b.on_success(proj.record, "<i>x</i>")
    for url in (f"/?q={evil}", f"/batches/{b.id}", "/?q=%3Cscript%3E"):
        html = text(client.get(url))
        assert evil not in html and "<img src=x" not in html and "<b>bold</b>" not in html, url
    html = text(client.get(f"/batches/{b.id}"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&#34;&gt;&lt;img src=x" in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "&lt;i&gt;x&lt;/i&gt;" in html
    assert 'value="&lt;script&gt;alert(1)&lt;/script&gt;"' in text(client.get(f"/?q={evil}"))
    response = client.get(f"/batches/{b.id}")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff" and response.headers["X-Frame-Options"] == "DENY"
    assert client.get(f"/api/batches/{b.id}").get_json()["batch"]["name"] == evil  # JSON is data, not markup


@needs("postgres", "redis")
def test_unknown_or_malformed_ids_and_parameters(proj, client):
    missing = uuid.uuid4()
    for url in (f"/batches/{missing}", "/batches/not-a-uuid", "/batches/123", f"/batches/{missing}/x", "/nope",
                "/static/../app.py", "/static/missing.css"):
        response = client.get(url)
        assert response.status_code == 404 and "Traceback" not in text(response), url
    for url in (f"/api/batches/{missing}", f"/api/batches/{missing}/jobs", "/api/batches/not-a-uuid",
                "/api/batches/not-a-uuid/jobs"):
        response = client.get(url)
        assert response.status_code == 404 and response.mimetype == "application/json", url
    token = client.get("/api/csrf").get_json()["csrf_token"]
    assert client.post(f"/api/batches/{missing}/cancel", headers={"X-CSRF-Token": token}).status_code == 404
    assert client.post(f"/batches/{missing}/cancel", data={"csrf_token": token}).status_code == 404
    for url in ("/?status=bogus", "/?before=nope", "/api/batches?limit=0", "/api/batches?limit=x",
                "/api/batches?limit=501", "/api/batches?parent=zzz", f"/api/batches/{missing}/jobs?after=-1",
                "/api/batches?status=running"):
        response = client.get(url)
        assert response.status_code == 400 and "Traceback" not in text(response), url
    assert client.get(f"/?before={missing}").status_code == 200  # an unknown cursor reads the newest page


def test_an_internal_error_is_logged_not_shown(tmp_path, caplog):
    app = Celery(f"dash_{uuid.uuid4().hex[:8]}", broker="memory://", set_as_current=False)
    batches = Batches(app, database_url=f"sqlite:///{tmp_path}/never-migrated.sqlite3", relay_interval=0)
    client = Local(create_app(batches))
    with caplog.at_level(logging.ERROR, logger="celery_batches.dashboard"):
        page = client.get("/")
        api = client.get("/api/batches")
    assert page.status_code == 500 and api.status_code == 500
    for body in (text(page), text(api)):
        assert "Traceback" not in body and "sqlite" not in body.lower() and "no such table" not in body
    assert "Internal error" in text(page) and api.get_json() == {
        "error": "Internal error. It has been logged on the server.", "status": 500}
    assert any(r.exc_info and "no such table" in str(r.exc_info[1]) for r in caplog.records)
    batches.engine.dispose()


@needs("postgres", "redis")
def test_a_failing_view_answers_a_generic_500(proj, client, monkeypatch, caplog):
    from celery_batches.store import pages

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail: password=hunter2")

    monkeypatch.setattr(pages, "batch_detail", broken)
    with caplog.at_level(logging.ERROR, logger="celery_batches.dashboard"):
        page = client.get(f"/batches/{uuid.uuid4()}")
        api = client.get(f"/api/batches/{uuid.uuid4()}")
    for response in (page, api):
        assert response.status_code == 500
        assert "hunter2" not in text(response) and "RuntimeError" not in text(response)
        assert "Traceback" not in text(response)
    assert sum("hunter2" in str(r.exc_info[1]) for r in caplog.records if r.exc_info) == 2


# -- deployment ------------------------------------------------------------------------------------

@needs("postgres", "redis")
def test_mounted_under_a_path_prefix(proj, nowhere):
    dashboard = create_app(proj.batches)
    site = DispatcherMiddleware(lambda environ, start: [], {"/ops/batches": dashboard})
    client = Local(site)
    batch_id = pending_batch(proj, nowhere, unique_name("mounted"), jobs=1)
    html = text(client.get("/ops/batches/"))
    assert f'href="/ops/batches/batches/{batch_id}"' in html
    assert re.search(r'href="/ops/batches/static/dashboard\.css\?v=[0-9a-f]{16}"', html)
    assert re.search(r'src="/ops/batches/static/dashboard\.js\?v=[0-9a-f]{16}"', html)
    assert client.get("/ops/batches/static/dashboard.js").status_code == 200
    page = client.get(f"/ops/batches/batches/{batch_id}")
    assert "Path=/ops/batches/" in page.headers["Set-Cookie"]
    assert f'action="/ops/batches/batches/{batch_id}/cancel"' in text(page)
    done = client.post(f"/ops/batches/batches/{batch_id}/cancel", data={"csrf_token": csrf_from(text(page))})
    assert done.headers["Location"] == f"/ops/batches/batches/{batch_id}?notice=cancelled&runs=1"
    data = client.get(f"/ops/batches/api/batches?q={proj.batches.get_batch(batch_id).name}").get_json()
    assert data["batches"][0]["url"] == f"/ops/batches/batches/{batch_id}"


@needs("postgres", "redis")
def test_static_assets(client):
    css = client.get("/static/dashboard.css")
    assert css.status_code == 200 and css.mimetype == "text/css" and "max-age=300" in css.headers["Cache-Control"]
    html = text(client.get("/"))
    js_url = re.search(r'src="(/static/dashboard\.js\?v=[0-9a-f]+)"', html).group(1)
    js = client.get(js_url)
    assert js.mimetype == "text/javascript" and "immutable" in js.headers["Cache-Control"]
    assert client.get("/static/dashboard.css", headers={"If-None-Match": css.headers["ETag"]}).status_code == 304


def test_sqlite_registry(tmp_path):
    app = Celery(f"dash_{uuid.uuid4().hex[:8]}", broker="memory://", set_as_current=False)
    app.conf.worker_enable_remote_control = False
    batches = Batches(app, database_url=f"sqlite:///{tmp_path}/registry.sqlite3", relay_interval=0)
    batches.migrate()

    @app.task(name="dash.step", shared=False)
    def step(*args, **kwargs):
        pass

    with batches.batch("sqlite-root", created_by="embedded") as b:
        for i in range(120):
            b.enqueue(step, i, key="v")
        with b.batch("sqlite-child") as c:
            c.enqueue(step, "c")
            with c.batch("sqlite-grandchild") as g:
                g.enqueue(step, "g")
                g.enqueue(step, "g2")
        b.on_complete(step, "after")
    client = Local(create_app(batches))
    html = text(client.get("/?q=sqlite"))
    assert re.findall(r'data-batch-id="([0-9a-f-]+)"', html) == [b.id]
    detail = client.get(f"/api/batches/{b.id}").get_json()
    assert detail["subtree"] == {"total": 123, "completed": 0, "failed": 0, "cancelled": 0, "pending": 123,
                                 "batches": 3}
    assert [n["name"] for n in detail["tree"]] == ["sqlite-root", "sqlite-child", "sqlite-grandchild"]
    page = text(client.get(f"/batches/{b.id}"))
    assert "page 1 of 2" in page and page.count("data-run-id=") == 100
    jobs = client.get(f"/api/batches/{b.id}/jobs?after=110").get_json()["jobs"]
    assert [j["position"] for j in jobs] == list(range(111, 120)) and jobs[0]["kwargs"] == {"key": "v"}
    assert client.get(f"/batches/{g.id}").status_code == 200
    token = client.get("/api/csrf").get_json()["csrf_token"]
    cancelled = client.post(f"/api/batches/{b.id}/cancel", headers={"X-CSRF-Token": token}).get_json()
    assert cancelled == {"cancelled_runs": 123, "batch_status": "CANCELLED"}
    detail = client.get(f"/api/batches/{b.id}").get_json()
    assert detail["subtree"]["cancelled"] == 123 and detail["batch"]["cancelled_jobs"] == 121
    assert client.get("/?status=cancelled").status_code == 200
    batches.engine.dispose()


@needs("postgres", "redis")
def test_entry_point_finds_the_batches_of_an_app(proj):
    assert find_batches("tests.proj", None) is proj.batches
    assert find_batches("tests.proj:app", None) is proj.batches
    assert find_batches("tests.proj.app", None) is proj.batches
    assert find_batches(None, "tests.proj:batches") is proj.batches
    with pytest.raises(SystemExit, match="not a celery_batches.Batches"):
        find_batches(None, "tests.proj:app")
    with pytest.raises(SystemExit, match="give --app"):
        find_batches(None, None)


@needs("postgres", "redis")
def test_python_m_serves_the_dashboard(proj):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "celery_batches.dashboard", "--app", "tests.proj.app",
                             "--port", str(port), "--prefix", "/batches"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def answer():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/batches/api/batches?limit=1", timeout=2) as r:
                    return r.status, r.read()
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.1)
                return None

        status, body = eventually(answer, "the dashboard server to answer", 30)
        assert status == 200 and body.startswith(b'{"batches":')
    finally:
        proc.terminate()
        proc.wait(10)
