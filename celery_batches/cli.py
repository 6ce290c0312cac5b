"""``celery -A proj batches …``: the command group, plugged in through the ``celery.commands`` entry point.

``celery -A proj batches dashboard`` takes the options of the dashboard's one launcher
(:mod:`celery_batches.dashboard.launcher`). ``--json`` (every command but ``dashboard``) prints the
shapes of :mod:`celery_batches.serialize`, the same as the dashboard's JSON API. The exit codes are
the ``EXIT_*`` constants below (docs/cli.md lists them); errors go to standard error as text.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import click

from . import serialize
from .api import Batches
from .dashboard.launcher import dashboard_options, serve_dashboard
from .errors import BatchClosedError
from .models import Batch, BatchStatus, RunStatus, canonical_id
from .settings import JOBS_PAGE_SIZE, MAX_LIMIT, PAGE_SIZE, SHOW_TREE_LIMIT
from .store import pages
from .store.migrate import schema_revision

__all__ = ["EXIT_FAILED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_USAGE", "NotFound", "batches"]

EXIT_OK = 0  # done; for ``wait``: the batch COMPLETED
EXIT_FAILED = 1  # ``wait``: the batch FAILED or was CANCELLED; ``retry``: refused, the batch was cancelled
EXIT_USAGE = 2  # a usage error: a bad option or argument, a malformed id, no Batches for the app (click's own code)
EXIT_NOT_FOUND = 3  # no batch has that id (or it was purged while ``wait`` waited)
EXIT_TIMEOUT = 4  # ``wait --timeout``: the batch had not finished in time
assert EXIT_USAGE == click.UsageError.exit_code

JSON_INDENT = 2  # --json output is indented for people; scripts parse it the same
ERROR_LINE_CHARS = 60  # how much of a job's error's first line the ``jobs`` table shows


class NotFound(click.ClickException):
    """No batch has the given id: exit 3."""

    exit_code = EXIT_NOT_FOUND


class Refused(click.ClickException):
    """The batch's state refuses the action (``retry`` of a cancelled batch): exit 1."""

    exit_code = EXIT_FAILED


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


def json_option(command: Callable) -> Callable:
    """``--json`` (as ``as_json``): print the command's serialize shape instead of text."""
    return click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")(command)


@click.group(name="batches")
@click.pass_context
def batches(ctx: click.Context) -> None:
    """Atomic batches: inspect, wait for, cancel, retry and purge them.

    Exit codes: 0 done (wait: COMPLETED), 1 FAILED or CANCELLED, 2 usage error, 3 no such batch,
    4 timeout (wait --timeout).
    """


@batches.command()
@json_option
@click.pass_context
def migrate(ctx: click.Context, as_json: bool) -> None:
    """Create or upgrade the registry schema (idempotent)."""
    service = _service(ctx)
    service.migrate()
    database = service.engine.url.render_as_string(hide_password=True)
    if as_json:
        _echo_json(serialize.migrate_json(database, schema_revision(service.engine, service.settings.table_prefix)))
        return
    click.echo(f"registry schema is up to date ({database})")


@batches.command(name="list")
@click.option("--status", type=click.Choice([s.name for s in BatchStatus], case_sensitive=False))
@click.option("--name", help="substring of the batch name")
@click.option("--parent", "parent_id", help="list the children of this batch")
@click.option("--tag", help="only batches with this tag")
@click.option("--limit", default=PAGE_SIZE, show_default=True, type=click.IntRange(0))
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0))
@json_option
@click.pass_context
def list_(ctx: click.Context, status: str | None, name: str | None, parent_id: str | None, tag: str | None,
          limit: int, offset: int, as_json: bool) -> None:
    """List batches, newest first.

    Top-level batches, or the children of --parent (an unknown one exits 3).
    """
    service = _service(ctx)
    if parent_id is not None:
        parent_id = _get(service, parent_id, "--parent").id
    rows = pages.batch_rows(service.transitions, status=BatchStatus[status.upper()] if status else None, name=name,
                            parent_id=parent_id, tag=tag, limit=limit, offset=offset)
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
@json_option
@click.pass_context
def show(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Show a batch: counters, the nested tree, continuations.

    Exit 0 whatever its status (wait reports the outcome).
    """
    service = _service(ctx)
    detail = pages.batch_detail(service.transitions, _batch_id(batch_id, "BATCH_ID"), tree_limit=SHOW_TREE_LIMIT)
    if detail is None:
        raise NotFound(f"no batch with id {batch_id}")
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


@batches.command()
@click.argument("batch_id")
@click.option("--status", type=click.Choice([s.name for s in RunStatus], case_sensitive=False),
              help="only the jobs in this status, e.g. failed")
@click.option("--limit", default=JOBS_PAGE_SIZE, show_default=True, type=click.IntRange(0, MAX_LIMIT))
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0))
@json_option
@click.pass_context
def jobs(ctx: click.Context, batch_id: str, status: str | None, limit: int, offset: int, as_json: bool) -> None:
    """List a batch's direct jobs in enqueue order.

    The jobs of GET /api/batches/<id>/jobs; --offset skips that many matching jobs.
    """
    service = _service(ctx)
    batch = _get(service, batch_id)
    rows = pages.job_rows(service.transitions, batch.id, status=RunStatus[status.upper()] if status else None,
                          limit=limit, offset=offset)
    if as_json:
        _echo_json([serialize.job_json(job) for job in rows])
        return
    click.echo(f"{'run id':36}  {'task':30}  {'status':9}  {'retries':>7}  {'started':19}  {'finished':19}  error")
    for job in rows:
        error = (job.error or "").strip().splitlines()
        click.echo(f"{job.id:36}  {job.task_name[-30:]:30}  {job.status.name:9}  {job.retries:>7}  "
                   f"{_when(job.started_at):19}  {_when(job.finished_at):19}  {error[0][:ERROR_LINE_CHARS] if error else ''}")


def _get(service: Batches, batch_id: str, hint: str = "BATCH_ID") -> Batch:
    """The batch with this id; a malformed id is a usage error (exit 2), an unknown one exits 3."""
    batch = service.get_batch(_batch_id(batch_id, hint))
    if batch is None:
        raise NotFound(f"no batch with id {batch_id}")
    return batch


@batches.command()
@click.argument("batch_id")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help=f"give up after this many seconds (exit {EXIT_TIMEOUT})")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=None,
              help="seconds between two reads (default: the batches_wait_interval setting)")
@json_option
@click.pass_context
def wait(ctx: click.Context, batch_id: str, timeout: float | None, interval: float | None, as_json: bool) -> None:
    """Show a live progress bar until the batch finishes.

    Exit 0 if it COMPLETED, 1 if it FAILED or was CANCELLED, 3 if there is no such batch (or it was
    purged while waiting), 4 if --timeout passed first.
    """
    service = _service(ctx)
    batch = _get(service, batch_id)
    batch_id = batch.id
    deadline = None if timeout is None else time.monotonic() + timeout
    with click.progressbar(length=max(batch.total_jobs, 1), label=batch.name, file=sys.stderr,
                           show_pos=True) as bar:
        shown = 0
        while True:
            found = service.get_batch(batch_id)
            if found is None:
                raise NotFound(f"batch {batch_id} no longer exists: it was purged while waiting")
            batch = found
            bar.length = max(batch.total_jobs, 1)
            done = batch.total_jobs - batch.pending_jobs
            bar.update(done - shown)
            shown = done
            if batch.is_finished or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(service.settings.wait_interval if interval is None else interval)
    if as_json:
        row = pages.batch_row(service.transitions, batch_id)
        if row is None:
            raise NotFound(f"batch {batch_id} no longer exists: it was purged while waiting")
        batch = row.batch
        _echo_json(serialize.wait_json(row, timed_out=not batch.is_finished))
    else:
        click.echo(f"{batch.name}: {batch.status.name} (completed {batch.completed_jobs}, failed "
                   f"{batch.failed_jobs}, cancelled {batch.cancelled_jobs} of {batch.total_jobs})")
    if not batch.is_finished:
        ctx.exit(EXIT_TIMEOUT)
    ctx.exit(EXIT_OK if batch.status == BatchStatus.COMPLETED else EXIT_FAILED)


@batches.command()
@click.argument("batch_id")
@json_option
@click.pass_context
def cancel(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Cancel a batch and its whole subtree.

    A batch that had already finished has nothing to cancel: exit 0 all the same.
    """
    service = _service(ctx)
    batch_id = _get(service, batch_id).id
    runs = service.cancel_batch(batch_id)
    if as_json:
        after = service.get_batch(batch_id)
        _echo_json(serialize.cancel_json(batch_id, runs, after.status if after is not None else None))
    else:
        click.echo(f"cancelled {runs} run(s)")


@batches.command()
@click.argument("batch_id")
@json_option
@click.pass_context
def retry(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Publish the failed jobs of a batch and its subtree again.

    Exit 1 if the batch (or one above it) was cancelled.
    """
    service = _service(ctx)
    batch_id = _get(service, batch_id).id
    try:
        runs = service.retry_failed(batch_id)
    except BatchClosedError:
        raise Refused(f"batch {batch_id} (or one above it) was cancelled: its failed jobs are not retried") from None
    if as_json:
        after = service.get_batch(batch_id)
        _echo_json(serialize.retry_json(batch_id, runs, after.status if after is not None else None))
    else:
        click.echo(f"retried {runs} run(s)")


@batches.command()
@json_option
@click.pass_context
def purge(ctx: click.Context, as_json: bool) -> None:
    """Delete expired finished batches with their whole tree."""
    deleted = _service(ctx).purge_expired()
    if as_json:
        _echo_json(serialize.purge_json(deleted))
    else:
        click.echo(f"deleted {deleted} batch(es)")


@batches.command()
@json_option
@click.pass_context
def metrics(ctx: click.Context, as_json: bool) -> None:
    """Print the Prometheus metrics (as the dashboard's /metrics serves them)."""
    from . import metrics as prometheus

    service = _service(ctx)
    if as_json:
        _echo_json(serialize.metrics_json(prometheus.snapshot(service)))
        return
    try:
        click.echo(prometheus.render(service).decode(), nl=False)
    except prometheus.MetricsUnavailable as exc:
        raise click.UsageError(str(exc)) from None


# -- the dashboard ---------------------------------------------------------------------------------

@batches.command()
@dashboard_options
@click.pass_context
def dashboard(ctx: click.Context, **options: Any) -> None:
    """Serve the web dashboard (local requests only unless --basic-auth is given)."""
    serve_dashboard(_service(ctx), **options)
