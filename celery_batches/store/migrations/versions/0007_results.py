"""Results to continuations: ``batches.results`` (kept for this batch), ``batches.unit_position``
(a nested batch's place among its parent's units, for the results' order) and ``runs.result``
(a job's return value, JSON).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade(prefix: str) -> None:
    p = prefix
    op.add_column(f"{p}batches", sa.Column("results", sa.Boolean, nullable=True))
    op.add_column(f"{p}batches", sa.Column("unit_position", sa.Integer, nullable=True))
    op.add_column(f"{p}runs", sa.Column("result", sa.Text, nullable=True))


def downgrade(prefix: str) -> None:
    p = prefix
    op.drop_column(f"{p}runs", "result")
    op.drop_column(f"{p}batches", "unit_position")
    op.drop_column(f"{p}batches", "results")
