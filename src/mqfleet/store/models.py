"""SQLModel tables: the product's data model (names fixed by the product design).

``nodes``, ``node_metrics``, ``commands`` and ``command_results`` keep the columns,
defaults, unique keys, the ``(node_id, metric_time)`` index and the cascading foreign
keys of the design. Columns added for features are marked "added:" with the reason.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from mqfleet.store.types import UTCDateTime

__all__ = ["Command", "CommandResult", "Node", "NodeMetric", "UTCDateTime", "metadata"]


# Stable constraint names, so Alembic migrations can refer to them on every backend.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _ts(*, nullable: bool = True, default_now: bool = False, index: bool = False) -> Any:  # noqa: ANN401 - SQLModel's Field returns Any
    kwargs: dict[str, Any] = {"nullable": nullable, "index": index}
    if default_now:
        kwargs["server_default"] = sa.func.now()
    return Field(
        default_factory=_utc_now if default_now else lambda: None,
        sa_type=UTCDateTime,
        sa_column_kwargs=kwargs,
    )


class Node(SQLModel, table=True):
    """One node of the fleet, registered by its first birth (or metric)."""

    __tablename__: ClassVar[str] = "nodes"

    id: int | None = Field(default=None, primary_key=True)
    node_id: str = Field(max_length=64, unique=True, nullable=False)
    hostname: str = Field(max_length=255, nullable=False)
    ip_address: str = Field(max_length=45, nullable=False)
    os_info: str | None = Field(default=None, max_length=255)
    status: str = Field(
        default="offline", max_length=20, sa_column_kwargs={"server_default": "offline"}
    )
    last_heartbeat: datetime | None = _ts()
    registered_at: datetime = _ts(nullable=False, default_now=True)
    updated_at: datetime = _ts(nullable=False, default_now=True)
    # added: the node's current connection number; older status is stale (see PROTOCOL.md).
    session: int = Field(default=0, sa_type=sa.BigInteger, sa_column_kwargs={"server_default": "0"})
    # added: why the node is offline/error ("connection lost", "heartbeat timeout", ...).
    status_reason: str | None = Field(default=None, max_length=255)
    # added: the node's metrics interval, to detect silence (3 x interval).
    interval_s: float | None = Field(default=None)
    # added: agent version from the birth message.
    agent_version: str | None = Field(default=None, max_length=64)


class NodeMetric(SQLModel, table=True):
    """One metrics sample of one node."""

    __tablename__: ClassVar[str] = "node_metrics"
    __table_args__ = (
        sa.Index("idx_node_metrics_time", "node_id", "metric_time"),
        # added: QoS 1 may deliver a sample twice; (node, session, seq) names it once.
        sa.UniqueConstraint("node_id", "session", "seq", name="uq_node_metrics_sample"),
    )

    # 10,000 nodes at 10 s make 2.6 billion rows a month: past a 32-bit key.
    # SQLite's rowid is already 64-bit and only "INTEGER PRIMARY KEY" aliases it.
    id: int | None = Field(
        default=None,
        primary_key=True,
        sa_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
    )
    node_id: str = Field(
        max_length=64,
        nullable=False,
        sa_type=sa.String(64),
        sa_column_args=[sa.ForeignKey("nodes.node_id", ondelete="CASCADE")],
    )
    metric_time: datetime = _ts(nullable=False)
    cpu_usage: float | None = None
    memory_usage: float | None = None
    disk_usage: float | None = None
    load_average: float | None = None
    created_at: datetime = _ts(nullable=False, default_now=True)
    # added: the agent connection and sequence number that produced the sample.
    session: int = Field(default=0, sa_type=sa.BigInteger)
    seq: int = Field(default=0, sa_type=sa.BigInteger)


class Command(SQLModel, table=True):
    """A shell command for one node, as published on its command topic."""

    __tablename__: ClassVar[str] = "commands"

    id: int | None = Field(default=None, primary_key=True)
    command_id: str = Field(max_length=64, unique=True, nullable=False)
    command_text: str = Field(sa_type=sa.Text, nullable=False)
    target_node_id: str = Field(
        max_length=64,
        nullable=False,
        sa_type=sa.String(64),
        sa_column_args=[sa.ForeignKey("nodes.node_id", ondelete="CASCADE")],
        index=True,
    )
    status: str = Field(
        default="pending", max_length=20, sa_column_kwargs={"server_default": "pending"}
    )
    created_at: datetime = _ts(nullable=False, default_now=True)
    started_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()
    # added: when an undelivered command stops being worth running.
    expires_at: datetime | None = _ts()
    # added: the run's time limit on the node.
    timeout_s: float | None = None
    # added: who issued it, and the batch it was issued in (one `run` over many nodes).
    issuer: str | None = Field(default=None, max_length=255)
    batch_id: str | None = Field(default=None, max_length=64, index=True)
    # added: the exact payload, republished unchanged to nodes that were offline.
    payload: str | None = Field(default=None, sa_type=sa.Text)


class CommandResult(SQLModel, table=True):
    """The final result of a command: exactly one row per command."""

    __tablename__: ClassVar[str] = "command_results"

    id: int | None = Field(default=None, primary_key=True)
    command_id: str = Field(
        max_length=64,
        nullable=False,
        sa_type=sa.String(64),
        sa_column_args=[sa.ForeignKey("commands.command_id", ondelete="CASCADE")],
        # added: unique, so a redelivered result can never make a second row.
        unique=True,
    )
    stdout: str | None = Field(default=None, sa_type=sa.Text)
    stderr: str | None = Field(default=None, sa_type=sa.Text)
    exit_code: int | None = None
    execution_time_ms: int | None = None
    created_at: datetime = _ts(nullable=False, default_now=True)
    # added: why a command failed without an exit code (refused, expired, agent restarted).
    error: str | None = Field(default=None, sa_type=sa.Text)
    # added: whether the agent cut the output to its per-stream limit.
    stdout_truncated: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    stderr_truncated: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})


metadata = SQLModel.metadata
