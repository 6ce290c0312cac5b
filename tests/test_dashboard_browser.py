"""The dashboard in a real headless Chromium (Playwright), served over HTTP while the real worker runs batches.

Skipped locally when Playwright or Chromium is missing; fails in CI (``CI=true``). Playwright
never downloads a browser here: it drives the system Chromium (``/usr/bin/chromium``, or the
``CHROMIUM`` environment variable). The test saves the screenshots used in ``docs/dashboard.md``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
from werkzeug.serving import make_server

from celery_batches import BatchStatus
from celery_batches.dashboard import create_app
from celery_batches.models import ContinuationStatus
from tests.helpers import ROOT, eventually, needs, unavailable

pytestmark = [*needs("postgres", "redis", "worker", "browser"), pytest.mark.timeout(180)]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = ROOT / "docs" / "_static"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture
def server(proj):
    """The dashboard on a free local port, served by Werkzeug in a thread; refreshes every 0.3 s."""
    httpd = make_server("127.0.0.1", 0, create_app(proj.batches, refresh_interval=0.3), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, name="dashboard", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(10)
    httpd.server_close()


def test_watch_a_batch_run_open_it_and_cancel_another(proj, worker, browser, server, nowhere):
    t = uuid.uuid4().hex[:8]
    with proj.batches.batch(f"sync-customers-{t}", created_by="cron") as failed:
        failed.enqueue(proj.noop)
        failed.enqueue(proj.fail)
    with proj.batches.batch(f"reindex-search-{t}", created_by="admin") as doomed:
        for i in range(5):
            doomed.enqueue(proj.noop.s(f"never-{t}-{i}").set(queue=nowhere))
    with proj.batches.batch(f"nightly-import-{t}", created_by="scheduler") as running:
        for _ in range(14):
            running.enqueue(proj.sleep_then.s(0.3))
        with running.batch(f"thumbnails-{t}") as thumbs:
            for _ in range(4):
                thumbs.enqueue(proj.sleep_then.s(0.3))
        running.on_success(proj.record, f"imported-{t}")
    total = 15  # 14 jobs and one child batch

    page = browser.new_page(viewport={"width": 1280, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server}/?q={t}")
    assert page.title() == "Celery batches"
    row = page.locator(f'tr[data-batch-id="{running.id}"]')
    assert row.locator("td.name a").inner_text() == f"nightly-import-{t}"
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads instead of refreshing in place

    # watch the progress move: the live refresh swaps the table while the worker runs the batch
    seen, screenshot_taken = [], False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # status first, counts second: a refresh landing in between can only make the counts newer
        status = page.locator(f'tr[data-batch-id="{running.id}"]').get_attribute("data-status")
        counts = page.locator(f'tr[data-batch-id="{running.id}"] .counts')
        completed = int(counts.get_attribute("data-completed"))
        if not seen or seen[-1] != completed:
            seen.append(completed)
        if 0 < completed < total and not screenshot_taken:
            page.screenshot(path=str(SCREENSHOTS / "dashboard.png"))
            screenshot_taken = True
        if status == "COMPLETED":
            break
        time.sleep(0.05)
    assert seen[-1] == total and seen == sorted(seen), seen
    assert any(0 < value < total for value in seen), f"no intermediate progress seen: {seen}"
    assert page.evaluate("window.__sameDocument") is True
    assert page.locator(f'tr[data-batch-id="{running.id}"] .badge').inner_text() == "completed"
    assert page.locator(f'tr[data-batch-id="{failed.id}"] .badge').inner_text() == "failed"
    assert screenshot_taken

    # open the finished batch: counters, tree with its roll-up, jobs
    # (the continuation is flagged dispatched just after the batch's commit, by whoever published it)
    eventually(lambda: [c.status for c in proj.batches.get_continuations(running.id)]
               == [ContinuationStatus.DISPATCHED], "the continuation to be dispatched", 30)
    page.locator(f'tr[data-batch-id="{running.id}"] td.name a').click()
    page.wait_for_url(f"**/batches/{running.id}")
    assert page.locator('[data-field="completed"]').inner_text() == str(total)
    assert page.locator('[data-field="pending"]').inner_text() == "0"
    assert "Whole subtree: 2 batch(es), 18 job(s)" in page.locator(".rollup").inner_text()
    assert page.locator(f'.tree tr[data-batch-id="{thumbs.id}"] .badge').inner_text() == "completed"
    assert page.locator("table.jobs tbody tr").count() == 14
    assert page.locator("table.continuations .badge").inner_text() == "dispatched"
    assert page.locator("#cancel-batch").count() == 0
    page.screenshot(path=str(SCREENSHOTS / "dashboard-batch.png"), full_page=True)

    # cancel the other batch with its button (and the confirmation dialog)
    page.goto(f"{server}/?q={t}")
    page.locator(f'tr[data-batch-id="{doomed.id}"] td.name a').click()
    page.wait_for_url(f"**/batches/{doomed.id}")
    assert page.locator("table.jobs .badge.r-pending").count() == 5
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel-batch").click()
    page.wait_for_url(f"**/batches/{doomed.id}?notice=cancelled&runs=5")
    assert page.locator(".notice").inner_text() == "Batch cancelled: 5 pending job(s) cancelled."
    assert page.locator("h1 .badge").inner_text() == "cancelled"
    assert page.locator("table.jobs .badge.r-cancelled").count() == 5
    assert page.locator("#cancel-batch").count() == 0
    assert proj.batches.get_batch(doomed.id).status == BatchStatus.CANCELLED

    # dismissing the confirmation cancels nothing
    with proj.batches.batch(f"keep-me-{t}") as kept:
        kept.enqueue(proj.noop.s().set(queue=nowhere))
    page.goto(f"{server}/batches/{kept.id}")
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.locator("#cancel-batch").click()
    time.sleep(0.3)
    assert proj.batches.get_batch(kept.id).status == BatchStatus.STARTED
    proj.batches.cancel_batch(kept.id)

    assert errors == []
    page.close()


def test_retry_failed_from_the_batch_page(proj, worker, browser, server):
    """The "Retry failed" button publishes the failed jobs again; the page then follows the batch to COMPLETED."""
    flag = f"flag-{uuid.uuid4().hex[:8]}"
    with proj.batches.batch(f"charge-cards-{flag}") as b:
        b.enqueue(proj.noop)
        b.enqueue(proj.fail_unless, flag)
    assert proj.batches.wait(b.id, timeout=60).status == BatchStatus.FAILED
    proj.r.set(flag, 1)

    page = browser.new_page(viewport={"width": 1280, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server}/batches/{b.id}")
    assert page.locator("h1 .badge").inner_text() == "failed"
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#retry-failed").click()
    page.wait_for_url(f"**/batches/{b.id}?notice=retried&runs=1")
    assert page.locator(".notice").inner_text() == "1 failed job(s) published again."
    deadline = time.monotonic() + 60
    while page.locator("h1 .badge").inner_text() != "completed" and time.monotonic() < deadline:
        time.sleep(0.1)  # the live refresh swaps the page in place
    assert page.locator("h1 .badge").inner_text() == "completed"
    assert page.locator("#retry-failed").count() == 0
    assert proj.batches.get_batch(b.id).completed_jobs == 2
    assert errors == []
    page.close()


def test_open_a_failed_job_see_its_traceback_and_retry_it(proj, worker, browser, server):
    """A failed job's row links to its page: the traceback in a <pre>, and a Retry button that publishes
    it again; the page then follows the job to COMPLETED."""
    flag = f"flag-{uuid.uuid4().hex[:8]}"
    with proj.batches.batch(f"resize-images-{flag}") as b:
        b.enqueue(proj.noop)
        b.enqueue(proj.fail_unless, flag)
    assert proj.batches.wait(b.id, timeout=60).status == BatchStatus.FAILED
    proj.r.set(flag, 1)

    page = browser.new_page(viewport={"width": 1280, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server}/batches/{b.id}")
    page.locator('tr[data-status="FAILED"] a.job-link').click()
    run_id = proj.batches.get_batch_jobs(b.id)[1].id
    page.wait_for_url(f"**/runs/{run_id}")
    assert page.locator("#run-status").inner_text() == "failed"
    traceback = page.locator("pre#traceback").inner_text()
    assert "in fail_unless" in traceback and "is not set yet" in traceback
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#retry-run").click()
    page.wait_for_url(f"**/runs/{run_id}?notice=retried")
    assert page.locator(".notice").inner_text() == "The job was published again."
    deadline = time.monotonic() + 60
    while page.locator("#run-status").inner_text() != "completed" and time.monotonic() < deadline:
        time.sleep(0.1)  # the live refresh swaps the page in place
    assert page.locator("#run-status").inner_text() == "completed"
    assert page.locator("#retry-run").count() == 0 and page.locator("#traceback").count() == 0
    page.locator("a.batch-link").first.click()
    page.wait_for_url(f"**/batches/{b.id}")
    assert proj.batches.wait(b.id, timeout=60).status == BatchStatus.COMPLETED
    assert errors == []
    page.close()
