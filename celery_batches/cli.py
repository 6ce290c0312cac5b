"""``celery -A proj batches …``: the command group, plugged in through the ``celery.commands`` entry point.

``celery -A proj batches dashboard`` takes the options of the dashboard's one launcher
(:mod:`celery_batches.dashboard.launcher`). ``--json`` prints the shapes of
:mod:`celery_batches.serialize`, the same as the dashboard's JSON API.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from . import serialize
from .api import Batches
from .dashboard.launcher import dashboard_options, serve_dashboard
from .errors import BatchClosedError
from .models import Batch, BatchStatus, canonical_id
from .settings import PAGE_SIZE, SHOW_TREE_LIMIT
from .store import pages

__all__ = ["batches"]

JSON_INDENT = 2  # --json output is indented for people; scripts parse it the same


def _service(ctx: click.Context) -> Batches:
    app = ctx.obj.app if ctx.obj is not None else None
    service = Batches.for_app(app)
    if service is None:
        raise click.UsageError(
            "no celery_batches.Batches found for this app: run `celery -A proj batches ...` with the "
            "module that creates both the Celery app and Batches(app)")
    return service


def _batch_id(value: str, hint: str) -> str:
    """A batch id given on the command line, normalised; a malformed one is a usage error."""
    found = canonical_id(value)
    if found is None:
        raise click.BadParameter(f"{value!r} is not a batch id (a UUID)", param_hint=hint)
    return found


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=JSON_INDENT, default=str))  # a result may hold a date


def _when(value: Any) -> str:
    return serialize.when(value, empty="-")


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
@click.option("--tag", help="only batches with this tag")
@click.option("--limit", default=PAGE_SIZE, show_default=True, type=click.IntRange(0))
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0))
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@click.pass_context
def list_(ctx: click.Context, status: str | None, name: str | None, parent_id: str | None, tag: str | None,
          limit: int, offset: int, as_json: bool) -> None:
    """List batches, newest first (top-level unless --parent)."""
    service = _service(ctx)
    rows = pages.batch_rows(service.transitions, status=BatchStatus[status.upper()] if status else None, name=name,
                            parent_id=_batch_id(parent_id, "--parent") if parent_id else None, tag=tag,
                            limit=limit, offset=offset)
    if as_json:
        _echo_json([serialize.batch_json(row) for row in rows])
        return
    click.echo(f"{'id':36}  {'name':30}  {'status':9}  {'done':>11}  {'failed':>6}  {'cancelled':>9}  created")
    for b in (row.batch for row in rows):
        done = b.total_jobs - b.pending_jobs
        click.echo(f"{b.id:36}  {b.name[:30]:30}  {b.status.name:9}  {done:>5}/{b.total_jobs:<5}"
                   f"  {b.failed_jobs:>6}  {b.cancelled_jobs:>9}  {_when(b.created_at)}")


@batches.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@click.pass_context
def show(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Show a batch: counters, the nested tree, continuations."""
    service = _service(ctx)
    detail = pages.batch_detail(service.transitions, _batch_id(batch_id, "BATCH_ID"), tree_limit=SHOW_TREE_LIMIT)
    if detail is None:
        raise click.ClickException(f"no batch with id {batch_id}")
    if as_json:
        data = serialize.detail_json(detail)
        if detail.row.batch.results:  # each unit's result, in order
            data["results"] = serialize.results_json(service.get_results(detail.row.batch.id))
        _echo_json(data)
        return
    for node in detail.tree:  # depth-first, the batch itself first
        pad, u = "  " * node.depth, node.units
        click.echo(f"{pad}{node.name} [{node.status.name}] {node.id}")
        click.echo(f"{pad}  total {u.total}  completed {u.completed}  failed {u.failed}  cancelled {u.cancelled}"
                   f"  pending {u.pending}  ({u.progress:.0%})")
    if detail.tree_truncated:
        click.echo(f"… and {detail.root.subtree_batches - len(detail.tree)} more batch(es) in the subtree")
    batch = detail.row.batch
    click.echo(f"created {_when(batch.created_at)}  finished {_when(batch.completed_at)}  "
               f"expires {_when(batch.expires_at)}")
    if batch.description:
        click.echo(f"description: {batch.description}")
    if batch.tags:
        click.echo(f"tags: {', '.join(batch.tags)}")
    if batch.properties:
        click.echo(f"properties: {json.dumps(batch.properties, ensure_ascii=False, sort_keys=True)}")
    if batch.cancel_on_failure:
        click.echo("cancel_on_failure: its first failed unit cancels the rest")
    if batch.max_concurrency:
        click.echo(f"max_concurrency: {batch.max_concurrency} job(s) at once")
    if batch.results:
        click.echo("results: kept for its continuations (show --json lists them)")
    for c in detail.continuations:
        click.echo(f"on_{c.kind.lower()}: {c.task_name} [{c.status.name}]")


def _get(service: Batches, batch_id: str) -> Batch:
    batch = service.get_batch(_batch_id(batch_id, "BATCH_ID"))
    if batch is None:
        raise click.ClickException(f"no batch with id {batch_id}")
    return batch


@batches.command()
@click.argument("batch_id")
@click.option("--timeout", type=float, default=None, help="give up after this many seconds (exit 2)")
@click.option("--interval", type=float, default=None, help="seconds between two reads (default: the batches_wait_interval setting)")
@click.pass_context
def wait(ctx: click.Context, batch_id: str, timeout: float | None, interval: float | None) -> None:
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
            time.sleep(service.settings.wait_interval if interval is None else interval)
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
    _act(ctx, batch_id, "cancelled", Batches.cancel_batch)


@batches.command()
@click.argument("batch_id")
@click.pass_context
def retry(ctx: click.Context, batch_id: str) -> None:
    """Publish the failed jobs of a batch and its subtree again."""
    _act(ctx, batch_id, "retried", Batches.retry_failed)


def _act(ctx: click.Context, batch_id: str, done: str, action: Any) -> None:
    """Run ``action`` on an existing batch and say how many runs it touched; a closed batch is a usage error."""
    service = _service(ctx)
    _get(service, batch_id)
    try:
        click.echo(f"{done} {action(service, batch_id)} run(s)")
    except BatchClosedError as exc:
        raise click.ClickException(str(exc)) from None


@batches.command()
@click.pass_context
def purge(ctx: click.Context) -> None:
    """Delete expired finished batches with their whole tree."""
    click.echo(f"deleted {_service(ctx).purge_expired()} batch(es)")


# -- the dashboard ---------------------------------------------------------------------------------

@batches.command()
@dashboard_options
@click.pass_context
def dashboard(ctx: click.Context, **options: Any) -> None:
    """Serve the web dashboard (local requests only unless --basic-auth is given)."""
    serve_dashboard(_service(ctx), **options)
