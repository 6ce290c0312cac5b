"""``batch_continuations.immutable``: a continuation given as an immutable signature (``.si()``),
which, as a chord body given that way, receives no results list even in a ``results=True`` batch.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade(prefix: str) -> None:
    op.add_column(f"{prefix}batch_continuations",
                  sa.Column("immutable", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade(prefix: str) -> None:
    op.drop_column(f"{prefix}batch_continuations", "immutable")
