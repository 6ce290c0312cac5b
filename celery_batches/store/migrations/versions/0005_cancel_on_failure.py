"""Fail-fast batches: ``cancel_on_failure`` (NULL in rows written before: off).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade(prefix: str) -> None:
    op.add_column(f"{prefix}batches", sa.Column("cancel_on_failure", sa.Boolean, nullable=True))


def downgrade(prefix: str) -> None:
    op.drop_column(f"{prefix}batches", "cancel_on_failure")
