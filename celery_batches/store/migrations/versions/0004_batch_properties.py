"""A batch's description, properties (a JSON object) and tags, and the tag index the lists filter on.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UUID = sa.Uuid(as_uuid=False)


def upgrade(prefix: str) -> None:
    p = prefix
    op.add_column(f"{p}batches", sa.Column("description", sa.Text, nullable=True))
    op.add_column(f"{p}batches", sa.Column("properties", sa.Text, nullable=True))
    op.add_column(f"{p}batches", sa.Column("tags", sa.Text, nullable=True))
    op.create_table(
        f"{p}batch_tags",
        sa.Column("tag", sa.String(64), primary_key=True),
        sa.Column("batch_id", UUID, sa.ForeignKey(f"{p}batches.id"), primary_key=True),
    )
    op.create_index(f"ix_{p}batch_tags_batch", f"{p}batch_tags", ["batch_id"])


def downgrade(prefix: str) -> None:
    p = prefix
    op.drop_index(f"ix_{p}batch_tags_batch", f"{p}batch_tags")
    op.drop_table(f"{p}batch_tags")
    for name in ("tags", "properties", "description"):
        op.drop_column(f"{p}batches", name)
