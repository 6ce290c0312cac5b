"""Indexes for registries of millions: a batch's RETRYING, FAILED and CANCELLED jobs in enqueue
order (only those: the writes every job makes — its insert, its claim, its completion — add no
entry), and (where the ``pg_trgm`` extension can be had) batch names by trigram, for the
dashboard's name search.

Revision ID: 0003
Revises: 0002
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

log = logging.getLogger(__name__)


def upgrade(prefix: str) -> None:
    p = prefix
    op.create_index(f"ix_{p}runs_batch_status", f"{p}runs", ["batch_id", "status", "position"],
                    postgresql_where=sa.text("status IN (2, 4, 5)"), sqlite_where=sa.text("status IN (2, 4, 5)"))
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    try:
        with bind.begin_nested():  # a refusal must not undo the rest of the upgrade
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except sa.exc.DBAPIError as exc:
        log.warning("celery_batches: pg_trgm is not available (%s); name search reads every batch instead "
                    "of a trigram index", str(exc).splitlines()[0])
        return
    bind.exec_driver_sql(f'CREATE INDEX "ix_{p}batches_name_trgm" ON "{p}batches" '
                         "USING gin (name gin_trgm_ops)")  # serves ILIKE, as SQLAlchemy writes icontains


def downgrade(prefix: str) -> None:
    p = prefix
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f'DROP INDEX IF EXISTS "ix_{p}batches_name_trgm"')
    op.drop_index(f"ix_{p}runs_batch_status", f"{p}runs")
