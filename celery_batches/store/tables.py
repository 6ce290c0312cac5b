"""The registry schema in SQLAlchemy Core. Table names carry a configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from ..models import ContinuationStatus, RunStatus

__all__ = ["OPTIONAL_INDEXES", "Tables", "build_tables"]

UUID = sa.Uuid(as_uuid=False)
TIMESTAMP = sa.DateTime(timezone=True)
#: partial-index conditions, from the enums: an open run (not yet final), a continuation waiting to be published
OPEN_BELOW = int(RunStatus.COMPLETED)
#: indexes the migrations add only where the database can have them (not declared below: nothing
#: depends on them but speed): batch names by trigram, where the ``pg_trgm`` extension is available
OPTIONAL_INDEXES = ("batches_name_trgm",)
DUE = int(ContinuationStatus.DUE)
#: run statuses few runs are in, indexed per batch for the dashboard's status filter
RARE = (RunStatus.RETRYING, RunStatus.FAILED, RunStatus.CANCELLED)


@dataclass(frozen=True)
class Tables:
    metadata: sa.MetaData
    batches: sa.Table
    runs: sa.Table
    batch_jobs: sa.Table
    batch_tags: sa.Table
    continuations: sa.Table
    publications: sa.Table
    leases: sa.Table
    nodes: sa.Table
    tallies: sa.Table
    samples: sa.Table
    prefix: str


def _partial_index(name: str, columns: str | tuple[str, ...], where: str) -> sa.Index:
    """An index of the rows matching ``where`` only (PostgreSQL and SQLite both have them)."""
    columns = (columns,) if isinstance(columns, str) else columns
    return sa.Index(name, *columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where))


def build_tables(prefix: str) -> Tables:
    """Describe the registry's tables for one prefix (this must match the latest migration)."""
    # tests/test_migrations.py checks this against a migrated database. No client-side defaults:
    # the migrations give no server default, and COPY (how runs are inserted on PostgreSQL) would skip them.
    md = sa.MetaData()
    batches = sa.Table(
        f"{prefix}batches",
        md,
        sa.Column("id", UUID, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("parent_id", UUID, sa.ForeignKey(f"{prefix}batches.id"), nullable=True),
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("total_jobs", sa.Integer, nullable=False),
        sa.Column("completed_jobs", sa.Integer, nullable=False),
        sa.Column("failed_jobs", sa.Integer, nullable=False),
        sa.Column("cancelled_jobs", sa.Integer, nullable=False),
        sa.Column("created_by", sa.String(255), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("completed_at", TIMESTAMP, nullable=True),
        sa.Column("expires_at", TIMESTAMP, nullable=True),
        # continue-with: this batch waits (CREATED) for `antecedent_id` to finish with `continue_when`
        sa.Column("antecedent_id", UUID, sa.ForeignKey(f"{prefix}batches.id"), nullable=True),
        sa.Column("continue_when", sa.String(16), nullable=True),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("properties", sa.Text, nullable=True),  # a JSON object
        sa.Column("tags", sa.Text, nullable=True),  # a JSON list, as given (batch_tags is what filters)
        sa.Column("cancel_on_failure", sa.Boolean, nullable=True),  # its first failed unit cancels the rest
        sa.Column("max_concurrency", sa.Integer, nullable=True),  # at most this many direct jobs in flight
        sa.Column("results", sa.Boolean, nullable=True),  # its jobs' return values are kept (and passed on)
        sa.Column("unit_position", sa.Integer, nullable=True),  # a nested batch's place among its parent's units
        sa.Index(f"ix_{prefix}batches_parent", "parent_id"),
        sa.Index(f"ix_{prefix}batches_created", "created_at"),
        sa.Index(f"ix_{prefix}batches_status_created", "status", "created_at"),
        sa.Index(f"ix_{prefix}batches_antecedent", "antecedent_id"),
        sa.Index(f"ix_{prefix}batches_expires", "expires_at"),
    )
    runs = sa.Table(
        f"{prefix}runs",
        md,
        sa.Column("id", UUID, primary_key=True),  # = the Celery task id
        sa.Column("batch_id", UUID, sa.ForeignKey(f"{prefix}batches.id"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),  # enqueue order within the batch
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("task_name", sa.String(255), nullable=False),
        sa.Column("args", sa.Text, nullable=False),  # kombu JSON
        sa.Column("kwargs", sa.Text, nullable=False),  # kombu JSON
        sa.Column("queue", sa.String(255), nullable=True),
        sa.Column("options", sa.Text, nullable=True),  # kombu JSON of apply_async options
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("published", sa.Boolean, nullable=False),
        # who publishes this run, and until when (a row of `publications`): the relay waits for it to lapse
        sa.Column("publication_id", UUID, nullable=True),
        # the worker node holding (``<node>``) or running (``<node>/<pid>``) this run, while it is open
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("claimed_at", TIMESTAMP, nullable=True),  # when its current delivery claimed it
        # waiting behind its batch's max_concurrency window: unpublished until a finishing job releases it
        sa.Column("held", sa.Boolean, nullable=True),
        sa.Column("result", sa.Text, nullable=True),  # its return value as JSON (a results=True batch's job)
        # when retry_failed put it back: an outcome a result backend dated earlier is an earlier attempt's
        sa.Column("reset_at", TIMESTAMP, nullable=True),
        # its task replaced itself (Task.replace): from then on its messages are the replacement's, which
        # only the replacement (and its retries) claims, and which are Celery's, not ours to publish again.
        # "message": the replacement's message has the run's id; "canvas": a canvas reaches it later (no
        # message of the id is anywhere until then: the lost-message search waits)
        sa.Column("replaced", sa.String(16), nullable=True),
        # a FAILED run's traceback (its last attempt's), at most ``traceback_max_chars``, its end kept
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Index(f"ix_{prefix}runs_batch", "batch_id", "position", unique=True),
        # a batch's jobs in a rare status, in enqueue order (the dashboard's "failed only" of a huge
        # batch); only those statuses: every job's insert, claim and completion add no entry (one of
        # every status but COMPLETED cost each claim 17% and each commit 30% more, measured)
        _partial_index(f"ix_{prefix}runs_batch_status", ("batch_id", "status", "position"),
                       f"status IN ({', '.join(str(int(s)) for s in RARE)})"),
        # the outbox and the reconciler only look at the few rows that are not done yet
        _partial_index(f"ix_{prefix}runs_unpublished", "created_at", "NOT published"),
        # only the runs a node holds or runs: "no node" is not worth an index entry
        _partial_index(f"ix_{prefix}runs_node", "node", f"status < {OPEN_BELOW} AND node IS NOT NULL"),
        _partial_index(f"ix_{prefix}runs_open", "created_at", f"status < {OPEN_BELOW}"),
        _partial_index(f"ix_{prefix}runs_held", ("batch_id", "position"), "held"),  # the next to release
    )
    # one row per tag of a batch: the lists' tag filter (a batch's tags are also in batches.tags)
    batch_tags = sa.Table(
        f"{prefix}batch_tags",
        md,
        sa.Column("tag", sa.String(64), primary_key=True),
        sa.Column("batch_id", UUID, sa.ForeignKey(f"{prefix}batches.id"), primary_key=True),
        sa.Index(f"ix_{prefix}batch_tags_batch", "batch_id"),
    )
    batch_jobs = sa.Table(
        f"{prefix}batch_jobs",
        md,
        sa.Column("batch_id", UUID, sa.ForeignKey(f"{prefix}batches.id"), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("run_id", UUID, sa.ForeignKey(f"{prefix}runs.id"), nullable=False, unique=True),
    )
    continuations = sa.Table(
        f"{prefix}batch_continuations",
        md,
        sa.Column("id", UUID, primary_key=True),  # = the Celery task id it is published with
        sa.Column("batch_id", UUID, sa.ForeignKey(f"{prefix}batches.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("task_name", sa.String(255), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("kwargs", sa.Text, nullable=False),
        sa.Column("options", sa.Text, nullable=True),
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("due_at", TIMESTAMP, nullable=True),
        sa.Column("dispatched_at", TIMESTAMP, nullable=True),
        sa.Column("publication_id", UUID, nullable=True),
        # set by the first delivery a @batches.task continuation runs: a second delivery is skipped
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("claimed_by", UUID, nullable=True),  # the delivery that claimed it (repeatable by that one)
        # given as an immutable signature (.si()): gets no results list, as an immutable chord body
        sa.Column("immutable", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("retries", sa.Integer, nullable=True),  # the attempt that claimed it (a retry claims it again)
        sa.Column("error", sa.Text, nullable=True),  # why it could not be published (status FAILED)
        sa.Index(f"ix_{prefix}continuations_batch", "batch_id"),
        _partial_index(f"ix_{prefix}continuations_due", "due_at", f"status = {DUE}"),
    )
    # A publisher's lease on what its transaction made publishable: renewed before every chunk it
    # publishes; the relay only takes runs and continuations whose lease has lapsed.
    publications = sa.Table(
        f"{prefix}publications",
        md,
        sa.Column("id", UUID, primary_key=True),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.Index(f"ix_{prefix}publications_expires", "expires_at"),
    )
    # Named leases (the relay's election): a row, not a session lock, so it works through any pooler and on SQLite.
    leases = sa.Table(
        f"{prefix}leases",
        md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
    )
    # One row per live worker node (a worker process incarnation): its heartbeat and live pool pids.
    nodes = sa.Table(
        f"{prefix}nodes",
        md,
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=False),
        sa.Column("pids", sa.Text, nullable=True),
    )
    # The metrics' ledger of signed deltas (store/tallies.py): written by triggers on ``batches`` and by
    # recovery, folded into one row per name by compaction. No key: writers only append, never wait.
    tallies = sa.Table(
        f"{prefix}tallies",
        md,
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
        # a read sums it by an index-only scan: fast even when a burst of deltas (a bulk creation) left
        # the heap long and compaction and VACUUM have emptied it
        sa.Index(f"ix_{prefix}tallies_name", "name", "n"),
    )
    # One row a minute, written by the relay: the metrics' running totals then, for the dashboard's
    # charts over the last day (jobs finished per minute, batch durations by hour). Kept two days.
    samples = sa.Table(
        f"{prefix}samples",
        md,
        sa.Column("at", TIMESTAMP, primary_key=True),  # the minute, truncated
        sa.Column("finished", sa.BigInteger, nullable=False),  # jobs that reached a final status, ever
        sa.Column("durations", sa.Text, nullable=False),  # JSON: the duration histogram's cumulative counts
    )
    return Tables(md, batches, runs, batch_jobs, batch_tags, continuations, publications, leases, nodes, tallies,
                  samples, prefix)
