"""Every setting of celery_batches, with its default, in one place.

A setting is read, in order of precedence, from the keyword argument given to
:class:`~celery_batches.Batches` (``Batches(app, flush_interval=0.1)``), from the
Celery app's configuration under the ``batches_`` prefix (``app.conf.batches_flush_interval``),
then from the default below. The database URL also reads the environment variable
``CELERY_BATCHES_DATABASE_URL``, then, in a configured Django project, Django's ``default``
database, before falling back to the embedded SQLite default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Callable, Mapping

from .errors import InvalidBatchError

__all__ = ["Settings", "DEFAULT_DATABASE_URL", "DATABASE_URL_ENV", "ERROR_CHARS", "OWED_FLAG_LEASES", "PUBLISH_DEFERRALS", "PURGE_CHUNK",
           "RELAY_PASS_TTL", "RELAY_STEP", "REVOKE_CHUNK",
           "LEASE_PRUNE_AGE", "TALLY_COMPACT_INTERVAL", "TALLY_VACUUM_ROWS", "SAMPLES_KEPT", "PUBLISH_NESTING", "PAGE_SIZE", "JOBS_PAGE_SIZE", "TREE_LIMIT", "SUCCESSORS_LIMIT", "MAX_ANCESTORS", "IDS_PER_STATEMENT", "MAX_NAME", "MAX_TAG", "MAX_DESCRIPTION", "SHOW_TREE_LIMIT", "MAX_LIMIT", "TEXT_CHARS", "SEARCH_CHARS", "INT_ARG_DIGITS", "MIN_API_TOKEN_CHARS"]

DEFAULT_DATABASE_URL = "sqlite:///celery_batches.sqlite3"
DATABASE_URL_ENV = "CELERY_BATCHES_DATABASE_URL"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")

# Fixed limits: they bound the work of one step, not what happens, so they are not settings.
#: runs and continuations one relay step takes over; open runs one reconciler step reads
RELAY_STEP = 500
#: seconds a relay pass holds its lease, renewed between its steps: a node that dies mid-pass blocks the
#: others this long at most (passes that overlap after a longer step do no harm: each step's writes are
#: conditional, and what the relay publishes it holds under a publish lease first)
RELAY_PASS_TTL = 30.0
#: characters of an exception's text kept as a run's error
ERROR_CHARS = 4000
#: run ids per revoke broadcast when a batch is cancelled
REVOKE_CHUNK = 1000
#: top-level batch trees deleted per transaction by ``purge_expired``
PURGE_CHUNK = 100
#: times a publisher puts off a message that fails with a connection error while the broker answers
#: (it waits one publish lease each time); at the next such failure it counts as refused
PUBLISH_DEFERRALS = 2
#: publish leases a publisher keeps trying, in the background, to write the published flags it owes
#: once its lease lapsed (the registry was away): the relay waits one lease after a registry outage
#: before taking lapsed rows over, so a publisher that outlived the outage flags first
OWED_FLAG_LEASES = 10
#: seconds a lapsed publish lease is kept before the relay deletes it
LEASE_PRUNE_AGE = 3600.0
#: seconds between two foldings of the metrics' ledger (store/tallies.py) by the relay
TALLY_COMPACT_INTERVAL = 60.0
#: rows folded by one compaction past which PostgreSQL's ledger is vacuumed at once (a burst of deltas)
TALLY_VACUUM_ROWS = 10_000
#: how long the relay's minute samples (the dashboard's charts of the last day) are kept
SAMPLES_KEPT = timedelta(days=2)
#: how deep a publication publishes, in turn, what its refused messages made due (their batches'
#: continuations); anything deeper is left to the relay
PUBLISH_NESTING = 16
#: batches per list page unless the caller says otherwise
PAGE_SIZE = 50
#: jobs per page of a batch unless the caller says otherwise
JOBS_PAGE_SIZE = 100
#: most batches of a subtree read for a batch page (roll-ups always count all of them)
TREE_LIMIT = 200
#: most continue-with stages listed for one batch
SUCCESSORS_LIMIT = 100
#: how far up the parent chain a breadcrumb walks (guards against a cycle)
MAX_ANCESTORS = 1000
#: ids bound in one statement at most (PostgreSQL takes 65,535 parameters, SQLite 32,766)
IDS_PER_STATEMENT = 5000
#: longest batch name accepted (characters)
MAX_NAME = 255
#: longest tag accepted (characters)
MAX_TAG = 64
#: longest batch description accepted (characters)
MAX_DESCRIPTION = 10_000
#: most batches of a subtree `show` prints (the rest is counted, not listed)
SHOW_TREE_LIMIT = 10_000
#: most batches or jobs one API page may ask for (``limit``)
MAX_LIMIT = 500
#: args, kwargs and errors in the HTML jobs table
TEXT_CHARS = 300
#: a name search is cut to this length (the longest batch name)
SEARCH_CHARS = 255
#: a numeric parameter (position, limit) longer than this is a 400, not a huge query
INT_ARG_DIGITS = 10
#: shortest api_token accepted
MIN_API_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    """SQLAlchemy URL of the registry, e.g. ``postgresql+psycopg://user@host/db``."""

    table_prefix: str = "celery_batches_"
    """Prefix of every table name; a plain SQL identifier (letters, digits, underscore)."""

    expires: timedelta = timedelta(days=7)
    """How long a finished batch is kept: ``expires_at = completed_at + expires``."""

    flush_interval: float = 0.2
    """Seconds a worker process may hold run transitions before committing them as one group.

    Larger groups cost fewer round trips per task; counters and continuations lag by up to this much."""

    flush_max: int = 500
    """Run transitions that make a worker process commit its group at once."""

    write_retry_max_delay: float = 5.0
    """Longest pause, in seconds, between retries of a registry write that failed."""

    relay_interval: float = 5.0
    """Seconds between two passes of the worker's relay and reconciler thread (0 turns it off)."""

    publish_lease: float = 30.0
    """Seconds a publisher holds what its transaction made publishable, renewed before every chunk it sends.

    The relay publishes a run or continuation only once its lease has lapsed (the publisher died,
    or the broker was down), so a live publisher is never doubled. Keep it above the time one
    chunk takes to send, and the clocks of producers and workers within a fraction of it."""

    publish_chunk: int = 1000
    """Messages a publisher sends between two lease renewals and published-flag writes."""

    bulk_publish: bool = True
    """Send a chunk of messages in one write on Redis and RabbitMQ (``publishing/wire.py``), each a copy of the
    message ``send_task`` makes for the first of its shape, where the installed kombu, py-amqp and
    redis-py are versions it was proven on. False: every message through ``send_task`` and kombu's
    own publish, one by one (slower, nothing else changes)."""

    heartbeat_interval: float = 5.0
    """Seconds between two heartbeats of a worker node (its row in the registry, with its live pool pids)."""

    node_timeout: float = 60.0
    """Seconds without a heartbeat after which a node is gone: its open runs are resolved
    (FAILED "worker lost" where Celery would not run them again, handed back where it would)."""

    lost_after: float = 60.0
    """Age, in seconds, after which a published run that no worker holds is looked for in the broker
    (Redis); a run whose message is in no queue and no worker's hands at two looks is published again."""

    recovery_batch: int = 5000
    """Runs one recovery step (gone nodes, dead pool processes, lost messages) handles per relay pass."""

    probe_scan_limit: int = 50_000
    """Messages per queue the lost-message search reads at most; a longer queue is not searched."""

    reconcile_grace: float = 60.0
    """Age, in seconds, after which an unfinished run is checked against the result backend."""

    run_timeout: float | None = None
    """Seconds after which a run with no recorded outcome is marked FAILED by the reconciler (None: never)."""

    result_max_bytes: int = 1 << 20
    """Largest return value, in bytes of its JSON, a ``results=True`` batch keeps for a job; a job
    returning more (or something JSON cannot hold) is recorded FAILED with the reason."""

    traceback_max_chars: int = 20_000
    """Characters of a failed run's traceback kept in the registry (``runs.traceback``, shown on the
    dashboard's job page); a longer one keeps its end, where the raising frame and the exception are.
    0: no traceback is kept (the run's one-line ``error`` always is)."""

    wait_interval: float = 0.2
    """Seconds between two registry reads in :meth:`Batches.wait`."""

    engine_options: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for :func:`sqlalchemy.create_engine` (pool size and so on)."""

    prepared_statements: bool = False
    """Let psycopg prepare the statements a connection runs often, on the PostgreSQL server.

    Off by default, so the registry works through PgBouncer in transaction pooling mode, which
    before 1.21 cannot carry a prepared statement from one transaction to the next. Turn it on
    where PostgreSQL is reached directly, in session pooling mode, or through PgBouncer 1.21 or
    later with ``max_prepared_statements`` set (docs/deploying.md)."""

    def __post_init__(self) -> None:
        if not _IDENTIFIER.match(self.table_prefix):
            raise InvalidBatchError(
                f"table_prefix {self.table_prefix!r} is not a plain SQL identifier "
                "(letters, digits and underscores, not starting with a digit, at most 40 characters)"
            )
        if isinstance(self.expires, (int, float)):
            object.__setattr__(self, "expires", timedelta(seconds=self.expires))
        if self.flush_interval < 0 or self.flush_max < 1:
            raise InvalidBatchError("flush_interval must be >= 0 and flush_max >= 1")
        if min(self.heartbeat_interval, self.node_timeout, self.lost_after) <= 0 or self.recovery_batch < 1:
            raise InvalidBatchError("heartbeat_interval, node_timeout and lost_after must be > 0, recovery_batch >= 1")
        if self.node_timeout <= 2 * self.heartbeat_interval:
            raise InvalidBatchError("node_timeout must be more than twice heartbeat_interval")
        if self.result_max_bytes < 1:
            raise InvalidBatchError("result_max_bytes must be >= 1")
        if self.traceback_max_chars < 0:
            raise InvalidBatchError("traceback_max_chars must be >= 0 (0 keeps no traceback)")
        if self.publish_lease <= 0 or self.publish_chunk < 1:
            raise InvalidBatchError("publish_lease must be > 0 and publish_chunk >= 1")

    @classmethod
    def resolve(cls, conf: Mapping[str, Any] | None, overrides: Mapping[str, Any], *,
                project_url: Callable[[], str | None] = lambda: None) -> "Settings":
        """Merge keyword arguments, ``app.conf.batches_*`` and defaults (see the module docstring);
        ``project_url()``: the database of the project the app lives in (Django's default one), if any."""
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown celery_batches setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name in names:
            if overrides.get(name) is not None:
                values[name] = overrides[name]
            elif conf is not None and conf.get(f"batches_{name}") is not None:
                values[name] = conf.get(f"batches_{name}")
        if "database_url" not in values and os.environ.get(DATABASE_URL_ENV):
            values["database_url"] = os.environ[DATABASE_URL_ENV]
        if "database_url" not in values and (url := project_url()) is not None:
            values["database_url"] = url
        return cls(**values)
