"""``celery -A proj batches …``: the command group, plugged in through the ``celery.commands`` entry point."""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import asdict
from typing import Any

import click

from .api import Batches
from .models import Batch, BatchStatus

__all__ = ["batches"]


def _service(ctx: click.Context) -> Batches:
    app = ctx.obj.app if ctx.obj is not None else None
    service = getattr(app, "celery_batches", None)
    if not isinstance(service, Batches):
        raise click.UsageError(
            "no celery_batches.Batches found for this app: run `celery -A proj batches ...` with the "
            "module that creates both the Celery app and Batches(app)")
    return service


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, BatchStatus):
        return value.name
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "name") and hasattr(value, "value"):  # other enums
        return value.name
    return value


def _batch_dict(batch: Batch) -> dict[str, Any]:
    data = _jsonable(asdict(batch))
    data.update(pending_jobs=batch.pending_jobs, progress=round(batch.progress, 4))
    return data


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@click.group(name="batches")
@click.pass_context
def batches(ctx: click.Context) -> None:
    """Atomic batches: inspect, wait for, cancel and purge them."""


@batches.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create or upgrade the registry schema (idempotent)."""
    service = _service(ctx)
    service.migrate()
    click.echo(f"registry schema is up to date ({service.engine.url.render_as_string(hide_password=True)})")


@batches.command(name="list")
@click.option("--status", type=click.Choice([s.name for s in BatchStatus], case_sensitive=False))
@click.option("--name", help="substring of the batch name")
@click.option("--parent", "parent_id", help="list the children of this batch")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(0))
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0))
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@click.pass_context
def list_(ctx: click.Context, status: str | None, name: str | None, parent_id: str | None, limit: int,
          offset: int, as_json: bool) -> None:
    """List batches, newest first (top-level unless --parent)."""
    rows = _service(ctx).list_batches(status=BatchStatus[status.upper()] if status else None,
                                      parent_id=parent_id, name=name, limit=limit, offset=offset)
    if as_json:
        click.echo(json.dumps([_batch_dict(b) for b in rows], indent=2))
        return
    click.echo(f"{'id':36}  {'name':30}  {'status':9}  {'done':>11}  {'failed':>6}  {'cancelled':>9}  created")
    for b in rows:
        click.echo(f"{b.id:36}  {b.name[:30]:30}  {b.status.name:9}  {b.total_jobs - b.pending_jobs:>5}/{b.total_jobs:<5}"
                   f"  {b.failed_jobs:>6}  {b.cancelled_jobs:>9}  {_when(b.created_at)}")


@batches.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@click.pass_context
def show(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Show a batch: counters, the nested tree, continuations."""
    service = _service(ctx)
    batch = _get(service, batch_id)

    def tree(b: Batch) -> dict[str, Any]:
        node = _batch_dict(b)
        node["children"] = [tree(c) for c in _children(service, b.id)]
        return node

    data = tree(batch)
    data["continuations"] = [_jsonable(asdict(c)) for c in service.get_continuations(batch.id)]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return

    def render(node: dict[str, Any], depth: int) -> None:
        pad = "  " * depth
        click.echo(f"{pad}{node['name']} [{node['status']}] {node['id']}")
        click.echo(f"{pad}  total {node['total_jobs']}  completed {node['completed_jobs']}  failed "
                   f"{node['failed_jobs']}  cancelled {node['cancelled_jobs']}  pending {node['pending_jobs']}"
                   f"  ({node['progress']:.0%})")
        for child in node["children"]:
            render(child, depth + 1)

    render(data, 0)
    click.echo(f"created {_when(batch.created_at)}  finished {_when(batch.completed_at)}  "
               f"expires {_when(batch.expires_at)}")
    for c in data["continuations"]:
        click.echo(f"on_{c['kind'].lower()}: {c['task_name']} [{c['status']}]")


def _children(service: Batches, batch_id: str) -> list[Batch]:
    out, offset = [], 0
    while page := service.list_batches(parent_id=batch_id, limit=500, offset=offset):
        out += page
        offset += len(page)
    return out


def _get(service: Batches, batch_id: str) -> Batch:
    try:
        uuid.UUID(batch_id)
    except ValueError:  # a usage error, not an unknown batch
        raise click.BadParameter(f"{batch_id!r} is not a batch id (a UUID)", param_hint="BATCH_ID") from None
    batch = service.get_batch(batch_id)
    if batch is None:
        raise click.ClickException(f"no batch with id {batch_id}")
    return batch


@batches.command()
@click.argument("batch_id")
@click.option("--timeout", type=float, default=None, help="give up after this many seconds (exit 2)")
@click.option("--interval", type=float, default=0.5, show_default=True)
@click.pass_context
def wait(ctx: click.Context, batch_id: str, timeout: float | None, interval: float) -> None:
    """Show a live progress bar until the batch finishes; exit 0 if COMPLETED, 1 otherwise."""
    service = _service(ctx)
    batch = _get(service, batch_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    with click.progressbar(length=max(batch.total_jobs, 1), label=batch.name, file=sys.stderr,
                           show_pos=True) as bar:
        shown = 0
        while True:
            batch = service.get_batch(batch_id)
            assert batch is not None
            bar.length = max(batch.total_jobs, 1)
            done = batch.total_jobs - batch.pending_jobs
            bar.update(done - shown)
            shown = done
            if batch.is_finished or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(interval)
    click.echo(f"{batch.name}: {batch.status.name} (completed {batch.completed_jobs}, failed {batch.failed_jobs}, "
               f"cancelled {batch.cancelled_jobs} of {batch.total_jobs})")
    if not batch.is_finished:
        ctx.exit(2)
    ctx.exit(0 if batch.status == BatchStatus.COMPLETED else 1)


@batches.command()
@click.argument("batch_id")
@click.pass_context
def cancel(ctx: click.Context, batch_id: str) -> None:
    """Cancel a batch and its whole subtree."""
    service = _service(ctx)
    _get(service, batch_id)
    click.echo(f"cancelled {service.cancel_batch(batch_id)} run(s)")


@batches.command()
@click.pass_context
def purge(ctx: click.Context) -> None:
    """Delete expired finished batches with their whole tree."""
    click.echo(f"deleted {_service(ctx).purge_expired()} batch(es)")


@batches.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=5555, show_default=True, type=int)
@click.option("--prefix", default="", help="serve under this path prefix, e.g. /batches")
@click.option("--read-only", is_flag=True, help="hide and refuse the Cancel action")
@click.option("--basic-auth", metavar="USER:PASSWORD", envvar="CELERY_BATCHES_DASHBOARD_AUTH",
              help="require HTTP basic auth (or set CELERY_BATCHES_DASHBOARD_AUTH)")
@click.pass_context
def dashboard(ctx: click.Context, host: str, port: int, prefix: str, read_only: bool, basic_auth: str | None) -> None:
    """Serve the web dashboard (local requests only unless --basic-auth is given)."""
    import logging

    from .dashboard.__main__ import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(_service(ctx), host=host, port=port, prefix=prefix, read_only=read_only, credentials=basic_auth)
