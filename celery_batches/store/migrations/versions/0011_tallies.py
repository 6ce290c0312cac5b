"""``tallies``: the metrics' ledger of maintained counts, and the triggers on ``batches`` that keep it
(store/tallies.py), filled from the batches already there; ``samples``: the relay's minute by minute
record of them, for the dashboard's charts.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

from celery_batches.store.tallies import create_triggers, drop_triggers

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade(prefix: str) -> None:
    op.create_table(
        f"{prefix}tallies",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    op.create_index(f"ix_{prefix}tallies_name", f"{prefix}tallies", ["name", "n"])
    create_triggers(op.get_bind(), prefix)
    op.create_table(
        f"{prefix}samples",
        sa.Column("at", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("finished", sa.BigInteger, nullable=False),
        sa.Column("durations", sa.Text, nullable=False),
    )


def downgrade(prefix: str) -> None:
    op.drop_table(f"{prefix}samples")
    drop_triggers(op.get_bind(), prefix)
    op.drop_table(f"{prefix}tallies")
