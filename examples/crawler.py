"""A job that adds jobs to its own batch: a crawler discovering pages as it goes.

    python examples/crawler.py

Each ``crawl`` job "fetches" a page and adds the links it finds to its own batch with
``add_jobs_to_batch(current_batch_id(), ...)``. The batch cannot finish while a member is still
running, so it completes exactly once, after the last page, and its continuation runs once.
"""

from __future__ import annotations

import sys

from celery_batches import Batches, BatchStatus, current_batch_id

try:
    from examples.embedded import continuation_ran, make_app, start_worker, wait_for_continuation
except ImportError:  # run as a script from the examples folder
    from embedded import continuation_ran, make_app, start_worker, wait_for_continuation

app = make_app("crawler")
batches = Batches(app)
# a tiny site: page -> the pages it links to
SITE = {"/": ["/a", "/b"], "/a": ["/a/1", "/a/2"], "/b": ["/b/1"], "/a/1": [], "/a/2": ["/a/2/x"],
        "/b/1": [], "/a/2/x": []}


@batches.task(name="crawler.crawl")
def crawl(path: str) -> None:
    links = SITE[path]  # pretend to fetch and parse the page
    if links:
        batches.add_jobs_to_batch(current_batch_id(), lambda b: [b.enqueue(crawl, link) for link in links])


@app.task(name="crawler.done")
def done(site: str) -> None:
    print(f"  -> continuation: crawled all of {site}", flush=True)
    continuation_ran.set()


def main() -> int:
    batches.migrate()
    start_worker(app)
    with batches.batch("crawl-example.org") as b:
        b.enqueue(crawl, "/")
        b.on_complete(done, "example.org")
    batch = batches.wait(b.id, timeout=60)
    wait_for_continuation()
    pages = sorted(job.args[0] for job in batches.get_batch_jobs(b.id))
    print(f"crawl: {batch.status.name}, {batch.completed_jobs}/{batch.total_jobs} pages: {', '.join(pages)}")
    return 0 if batch.status == BatchStatus.COMPLETED and len(pages) == len(SITE) else 1


if __name__ == "__main__":
    sys.exit(main())
