"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-29 21:33:26.028595
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mqfleet.store.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("ip_address", sa.String(length=45), nullable=False),
        sa.Column("os_info", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=20), server_default="offline", nullable=False),
        sa.Column("last_heartbeat", UTCDateTime(), nullable=True),
        sa.Column("registered_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("session", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("status_reason", sa.String(length=255), nullable=True),
        sa.Column("interval_s", sa.Float(), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
        sa.UniqueConstraint("node_id", name=op.f("uq_nodes_node_id")),
    )
    op.create_table(
        "commands",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("command_id", sa.String(length=64), nullable=False),
        sa.Column("command_text", sa.Text(), nullable=False),
        sa.Column("target_node_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="pending", nullable=False),
        sa.Column("created_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("timeout_s", sa.Float(), nullable=True),
        sa.Column("issuer", sa.String(length=255), nullable=True),
        sa.Column("batch_id", sa.String(length=64), nullable=True),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["target_node_id"],
            ["nodes.node_id"],
            name=op.f("fk_commands_target_node_id_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commands")),
        sa.UniqueConstraint("command_id", name=op.f("uq_commands_command_id")),
    )
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_commands_batch_id"), ["batch_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_commands_target_node_id"), ["target_node_id"], unique=False
        )

    op.create_table(
        "node_metrics",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("metric_time", UTCDateTime(), nullable=False),
        sa.Column("cpu_usage", sa.Float(), nullable=True),
        sa.Column("memory_usage", sa.Float(), nullable=True),
        sa.Column("disk_usage", sa.Float(), nullable=True),
        sa.Column("load_average", sa.Float(), nullable=True),
        sa.Column("created_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("session", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["nodes.node_id"],
            name=op.f("fk_node_metrics_node_id_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_metrics")),
        sa.UniqueConstraint("node_id", "session", "seq", name="uq_node_metrics_sample"),
    )
    with op.batch_alter_table("node_metrics", schema=None) as batch_op:
        batch_op.create_index("idx_node_metrics_time", ["node_id", "metric_time"], unique=False)

    op.create_table(
        "command_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("command_id", sa.String(length=64), nullable=False),
        sa.Column("stdout", sa.Text(), nullable=True),
        sa.Column("stderr", sa.Text(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("execution_time_ms", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("stdout_truncated", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("stderr_truncated", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.ForeignKeyConstraint(
            ["command_id"],
            ["commands.command_id"],
            name=op.f("fk_command_results_command_id_commands"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_command_results")),
        sa.UniqueConstraint("command_id", name=op.f("uq_command_results_command_id")),
    )


def downgrade() -> None:

    op.drop_table("command_results")
    with op.batch_alter_table("node_metrics", schema=None) as batch_op:
        batch_op.drop_index("idx_node_metrics_time")

    op.drop_table("node_metrics")
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_commands_target_node_id"))
        batch_op.drop_index(batch_op.f("ix_commands_batch_id"))

    op.drop_table("commands")
    op.drop_table("nodes")
