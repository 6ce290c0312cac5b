"""Publish leases and the relay's lease row; worker liveness (nodes, the node of a run);
continuations remember their first start and a refusal.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UUID = sa.Uuid(as_uuid=False)
TS = sa.DateTime(timezone=True)


def upgrade(prefix: str) -> None:
    p = prefix
    op.add_column(f"{p}runs", sa.Column("publication_id", UUID, nullable=True))
    op.add_column(f"{p}runs", sa.Column("node", sa.String(255), nullable=True))
    op.add_column(f"{p}runs", sa.Column("claimed_at", TS, nullable=True))
    op.create_index(f"ix_{p}runs_node", f"{p}runs", ["node"],
                    postgresql_where=sa.text("status < 3 AND node IS NOT NULL"),
                    sqlite_where=sa.text("status < 3 AND node IS NOT NULL"))
    op.create_table(
        f"{p}nodes",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("pids", sa.Text, nullable=True),
    )
    for column in (sa.Column("publication_id", UUID, nullable=True), sa.Column("started_at", TS, nullable=True),
                   sa.Column("claimed_by", UUID, nullable=True), sa.Column("error", sa.Text, nullable=True)):
        op.add_column(f"{p}batch_continuations", column)
    op.create_table(
        f"{p}publications",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_index(f"ix_{p}publications_expires", f"{p}publications", ["expires_at"])
    op.create_table(
        f"{p}leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )


def downgrade(prefix: str) -> None:
    p = prefix
    op.drop_table(f"{p}leases")
    op.drop_table(f"{p}publications")
    for column in ("error", "claimed_by", "started_at", "publication_id"):
        op.drop_column(f"{p}batch_continuations", column)
    op.drop_table(f"{p}nodes")
    op.drop_index(f"ix_{p}runs_node", f"{p}runs")
    op.drop_column(f"{p}runs", "claimed_at")
    op.drop_column(f"{p}runs", "node")
    op.drop_column(f"{p}runs", "publication_id")
