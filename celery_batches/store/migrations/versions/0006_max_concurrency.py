"""A window of running jobs per batch: ``batches.max_concurrency``, and ``runs.held`` for the jobs
waiting behind it (unpublished until a finishing job releases them), indexed by batch and position.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade(prefix: str) -> None:
    p = prefix
    op.add_column(f"{p}batches", sa.Column("max_concurrency", sa.Integer, nullable=True))
    op.add_column(f"{p}runs", sa.Column("held", sa.Boolean, nullable=True))
    op.create_index(f"ix_{p}runs_held", f"{p}runs", ["batch_id", "position"],
                    postgresql_where=sa.text("held"), sqlite_where=sa.text("held"))


def downgrade(prefix: str) -> None:
    p = prefix
    op.drop_index(f"ix_{p}runs_held", f"{p}runs")
    op.drop_column(f"{p}runs", "held")
    op.drop_column(f"{p}batches", "max_concurrency")
