"""Initial registry schema: batches, runs, batch_jobs, batch_continuations.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UUID = sa.Uuid(as_uuid=False)
TS = sa.DateTime(timezone=True)


def upgrade(prefix: str) -> None:
    p = prefix
    op.create_table(
        f"{p}batches",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("parent_id", UUID, sa.ForeignKey(f"{p}batches.id"), nullable=True),
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("total_jobs", sa.Integer, nullable=False),
        sa.Column("completed_jobs", sa.Integer, nullable=False),
        sa.Column("failed_jobs", sa.Integer, nullable=False),
        sa.Column("cancelled_jobs", sa.Integer, nullable=False),
        sa.Column("created_by", sa.String(255), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("antecedent_id", UUID, sa.ForeignKey(f"{p}batches.id"), nullable=True),
        sa.Column("continue_when", sa.String(16), nullable=True),
    )
    op.create_index(f"ix_{p}batches_parent", f"{p}batches", ["parent_id"])
    op.create_index(f"ix_{p}batches_created", f"{p}batches", ["created_at"])
    op.create_index(f"ix_{p}batches_status_created", f"{p}batches", ["status", "created_at"])
    op.create_index(f"ix_{p}batches_antecedent", f"{p}batches", ["antecedent_id"])
    op.create_index(f"ix_{p}batches_expires", f"{p}batches", ["expires_at"])

    op.create_table(
        f"{p}runs",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("batch_id", UUID, sa.ForeignKey(f"{p}batches.id"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("task_name", sa.String(255), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("kwargs", sa.Text, nullable=False),
        sa.Column("queue", sa.String(255), nullable=True),
        sa.Column("options", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("published", sa.Boolean, nullable=False),
    )
    op.create_index(f"ix_{p}runs_batch", f"{p}runs", ["batch_id", "position"], unique=True)
    op.create_index(
        f"ix_{p}runs_unpublished", f"{p}runs", ["created_at"],
        postgresql_where=sa.text("NOT published"), sqlite_where=sa.text("NOT published"),
    )
    op.create_index(
        f"ix_{p}runs_open", f"{p}runs", ["created_at"],
        postgresql_where=sa.text("status < 3"), sqlite_where=sa.text("status < 3"),
    )

    op.create_table(
        f"{p}batch_jobs",
        sa.Column("batch_id", UUID, sa.ForeignKey(f"{p}batches.id"), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("run_id", UUID, sa.ForeignKey(f"{p}runs.id"), nullable=False, unique=True),
    )

    op.create_table(
        f"{p}batch_continuations",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("batch_id", UUID, sa.ForeignKey(f"{p}batches.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("task_name", sa.String(255), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("kwargs", sa.Text, nullable=False),
        sa.Column("options", sa.Text, nullable=True),
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("due_at", TS, nullable=True),
        sa.Column("dispatched_at", TS, nullable=True),
    )
    op.create_index(f"ix_{p}continuations_batch", f"{p}batch_continuations", ["batch_id"])
    op.create_index(
        f"ix_{p}continuations_due", f"{p}batch_continuations", ["due_at"],
        postgresql_where=sa.text("status = 1"), sqlite_where=sa.text("status = 1"),
    )


def downgrade(prefix: str) -> None:
    for table in ("batch_continuations", "batch_jobs", "runs", "batches"):
        op.drop_table(f"{prefix}{table}")
