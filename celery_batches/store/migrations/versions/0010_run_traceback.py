"""``runs.traceback``: a failed run's traceback (text, at most ``batches_traceback_max_chars``
characters, its end kept), written by the transaction that records the failure.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade(prefix: str) -> None:
    op.add_column(f"{prefix}runs", sa.Column("traceback", sa.Text, nullable=True))


def downgrade(prefix: str) -> None:
    op.drop_column(f"{prefix}runs", "traceback")
