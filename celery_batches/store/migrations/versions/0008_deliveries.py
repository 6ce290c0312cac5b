"""What deliveries need to be told apart: ``runs.reset_at`` (when ``retry_failed`` put the run back:
an outcome a result backend dated earlier belongs to an earlier attempt), ``runs.replaced`` (its task
replaced itself: only the replacement may claim it; "message" or "canvas", whether the replacement's
first message has the run's id) and ``batch_continuations.retries`` (the attempt of a continuation's
claim: a continuation's retry claims it again).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade(prefix: str) -> None:
    p = prefix
    op.add_column(f"{p}runs", sa.Column("reset_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(f"{p}runs", sa.Column("replaced", sa.String(16), nullable=True))
    op.add_column(f"{p}batch_continuations", sa.Column("retries", sa.Integer, nullable=True))


def downgrade(prefix: str) -> None:
    p = prefix
    op.drop_column(f"{p}batch_continuations", "retries")
    op.drop_column(f"{p}runs", "replaced")
    op.drop_column(f"{p}runs", "reset_at")
