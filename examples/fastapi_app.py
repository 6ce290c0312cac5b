"""A FastAPI producer: each request creates a batch with ``async with batches.abatch(...)`` and another
reads it with ``aget_batch`` (or waits for it with ``await_batch``), without blocking the event loop.

    pip install fastapi uvicorn
    CELERY_BROKER_URL=redis://127.0.0.1:6379/0 \\
    CELERY_BATCHES_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/test \\
        celery -A examples.fastapi_app worker -l INFO             # in one terminal, the same variables
    uvicorn examples.fastapi_app:api                               # in another
    curl -X POST localhost:8000/imports -H 'content-type: application/json' -d '{"name": "q3", "rows": ["a", "b"]}'
    curl 'localhost:8000/imports/<batch_id>?wait=30'

Without ``CELERY_BROKER_URL`` it runs embedded (SQLite registry, in-memory broker, a worker thread
started with the app). ``make_api`` builds the same app on any ``Batches`` and tasks (the tests use
their own).
"""

from __future__ import annotations

import asyncio
import gc
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from celery import Task
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from celery_batches import Batch, Batches, BatchNotFoundError, InvalidBatchError

try:
    from examples.embedded import EMBEDDED, make_app, start_worker
except ImportError:  # run from the examples folder
    from embedded import EMBEDDED, make_app, start_worker


class ImportRequest(BaseModel):
    name: str
    rows: list[str]


def batch_json(batch: Batch) -> dict[str, Any]:
    return {"id": batch.id, "name": batch.name, "status": batch.status.name, "total": batch.total_jobs,
            "completed": batch.completed_jobs, "failed": batch.failed_jobs, "progress": batch.progress,
            "finished": batch.is_finished}


def make_api(batches: Batches, parse_row: Task | str, import_done: Task | str, *, lifespan: Any = None) -> FastAPI:
    """The app: ``POST /imports`` creates a batch (one job a row, ``import_done`` once all completed);
    ``GET /imports/{id}`` reads it, ``?wait=S`` waits up to S seconds for it to finish."""
    api = FastAPI(title="imports", lifespan=lifespan)

    @api.post("/imports", status_code=201)
    async def create_import(request: ImportRequest) -> dict[str, Any]:
        try:
            async with batches.abatch(f"import-{request.name}", tags=["import"]) as b:  # written when the block exits
                for i, row in enumerate(request.rows, 1):
                    b.enqueue(parse_row, row)
                    if i % 1000 == 0:
                        await asyncio.sleep(0)  # a big import lets other requests in (docs/asyncio.md)
                b.on_success(import_done, b.id)
        except InvalidBatchError as exc:  # nothing was written
            raise HTTPException(422, str(exc)) from None
        return {"batch_id": b.id}

    @api.get("/imports/{batch_id}")
    async def read_import(batch_id: str, wait: float = 0.0) -> dict[str, Any]:
        try:
            batch = await batches.await_batch(batch_id, timeout=wait) if wait > 0 else await batches.aget_batch(batch_id)
        except TimeoutError:  # not finished yet: say where it is
            batch = await batches.aget_batch(batch_id)
        except (BatchNotFoundError, InvalidBatchError):
            batch = None
        if batch is None:
            raise HTTPException(404, f"no batch {batch_id}")
        return batch_json(batch)

    return api


app = make_app("imports")
batches = Batches(app)


@batches.task(name="imports.parse_row")
def parse_row(row: str) -> int:
    """Pretend to parse and store one row."""
    return len(row)


@app.task(name="imports.import_done")
def import_done(batch_id: str) -> None:
    """The continuation: runs once, when every row of the import completed."""
    print(f"import {batch_id} done", flush=True)


@asynccontextmanager
async def _startup(_: FastAPI) -> AsyncIterator[None]:
    if EMBEDDED:  # no services: the schema and a worker thread in this process
        await asyncio.to_thread(batches.migrate)
        start_worker(app)
    gc.collect()
    gc.freeze()  # what start-up left is never scanned again: no 100 ms full collections (docs/asyncio.md)
    yield


api = make_api(batches, parse_row, import_done, lifespan=_startup)
