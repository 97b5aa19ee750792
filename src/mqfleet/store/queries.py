"""Read queries for the CLI, returning plain typed objects (no ORM instances escape).

Every query is shaped for a fleet of 10,000 nodes and tens of millions of metric rows:
metrics are read newest first through the ``(node_id, metric_time)`` index with a
``LIMIT``; per-node lookups go through the unique keys. Database errors become
:class:`~mqfleet.errors.StoreError` with a one-line message.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from mqfleet.errors import StoreError, UnknownCommandError, UnknownNodeError
from mqfleet.store.types import UTCDateTime

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from datetime import datetime

    from sqlalchemy.engine import Connection, Engine, Row

__all__ = [
    "READ_TABLES",
    "CommandDetail",
    "CommandRow",
    "MetricRow",
    "NodeDetail",
    "NodeRow",
    "get_command",
    "get_node",
    "list_commands",
    "list_metrics",
    "list_nodes",
    "match_nodes",
    "nodes_by_id",
]

# The columns these queries read, as SQLAlchemy Core "lightweight" tables with the same
# names and types as the tables of ``mqfleet.store.models``. Not those tables themselves:
# importing the models loads SQLModel and the ORM, which costs every CLI read command a
# few hundred milliseconds of start-up. tests/store/test_queries.py checks they match.
_NODES: Final = sa.table(
    "nodes",
    sa.column("node_id", sa.String(64)),
    sa.column("hostname", sa.String(255)),
    sa.column("ip_address", sa.String(45)),
    sa.column("os_info", sa.String(255)),
    sa.column("status", sa.String(20)),
    sa.column("status_reason", sa.String(255)),
    sa.column("last_heartbeat", UTCDateTime()),
    sa.column("registered_at", UTCDateTime()),
    sa.column("updated_at", UTCDateTime()),
    sa.column("session", sa.BigInteger()),
    sa.column("interval_s", sa.Float()),
    sa.column("agent_version", sa.String(64)),
)
_METRICS: Final = sa.table(
    "node_metrics",
    sa.column("node_id", sa.String(64)),
    sa.column("metric_time", UTCDateTime()),
    sa.column("cpu_usage", sa.Float()),
    sa.column("memory_usage", sa.Float()),
    sa.column("disk_usage", sa.Float()),
    sa.column("load_average", sa.Float()),
)
_COMMANDS: Final = sa.table(
    "commands",
    sa.column("id", sa.Integer()),
    sa.column("command_id", sa.String(64)),
    sa.column("target_node_id", sa.String(64)),
    sa.column("command_text", sa.Text()),
    sa.column("status", sa.String(20)),
    sa.column("created_at", UTCDateTime()),
    sa.column("started_at", UTCDateTime()),
    sa.column("completed_at", UTCDateTime()),
    sa.column("expires_at", UTCDateTime()),
    sa.column("timeout_s", sa.Float()),
    sa.column("issuer", sa.String(255)),
    sa.column("batch_id", sa.String(64)),
)
_RESULTS: Final = sa.table(
    "command_results",
    sa.column("id", sa.Integer()),
    sa.column("command_id", sa.String(64)),
    sa.column("stdout", sa.Text()),
    sa.column("stderr", sa.Text()),
    sa.column("exit_code", sa.Integer()),
    sa.column("execution_time_ms", sa.Integer()),
    sa.column("created_at", UTCDateTime()),
    sa.column("error", sa.Text()),
    sa.column("stdout_truncated", sa.Boolean()),
    sa.column("stderr_truncated", sa.Boolean()),
)
#: The lightweight tables above, by name (for the test that compares them to the models).
READ_TABLES: Final = {t.name: t for t in (_NODES, _METRICS, _COMMANDS, _RESULTS)}

#: Bound parameters per ``IN (...)`` list: far below SQLite's and PostgreSQL's limits.
_IN_CHUNK: Final = 500

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node as stored by the collector."""

    node_id: str
    hostname: str
    ip_address: str
    os_info: str | None
    status: str
    status_reason: str | None
    last_heartbeat: datetime | None
    registered_at: datetime
    updated_at: datetime
    session: int
    interval_s: float | None
    agent_version: str | None


@dataclass(frozen=True, slots=True)
class MetricRow:
    """One metrics sample."""

    node_id: str
    metric_time: datetime
    cpu_usage: float | None
    memory_usage: float | None
    disk_usage: float | None
    load_average: float | None


@dataclass(frozen=True, slots=True)
class NodeDetail:
    """A node, its newest sample and how much the store holds about it."""

    node: NodeRow
    latest_metric: MetricRow | None
    #: Samples whose ``metric_time`` falls in the window the caller asked about.
    recent_metric_count: int
    #: Number of commands per status (only statuses that occur).
    command_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CommandRow:
    """One command with the headline of its result."""

    command_id: str
    target_node_id: str
    command_text: str
    status: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None
    timeout_s: float | None
    issuer: str | None
    batch_id: str | None
    exit_code: int | None
    execution_time_ms: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class CommandDetail:
    """One command with its full result (output included), if any."""

    command: CommandRow
    has_result: bool
    stdout: str | None
    stderr: str | None
    stdout_truncated: bool
    stderr_truncated: bool
    result_created_at: datetime | None


def _describe(exc: SQLAlchemyError) -> str:
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    """Open a connection whose database errors surface as one-line StoreErrors."""
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            yield conn
    except (sa.exc.ProgrammingError, sa.exc.OperationalError) as exc:
        reason = _describe(exc)
        missing_table = isinstance(exc, sa.exc.ProgrammingError) or "no such table" in reason
        if missing_table and ("does not exist" in reason or "no such table" in reason):
            msg = f"database {where} has no mqfleet tables: run 'mqfleet db upgrade'"
            raise StoreError(msg) from exc
        raise StoreError(f"cannot read database {where}: {reason}") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read database {where}: {_describe(exc)}") from exc


def _node(row: Row[tuple[object, ...]]) -> NodeRow:
    m = row._mapping  # noqa: SLF001 - the public accessor of a Row's columns by name
    return NodeRow(
        node_id=m["node_id"],
        hostname=m["hostname"],
        ip_address=m["ip_address"],
        os_info=m["os_info"],
        status=m["status"],
        status_reason=m["status_reason"],
        last_heartbeat=m["last_heartbeat"],
        registered_at=m["registered_at"],
        updated_at=m["updated_at"],
        session=int(m["session"]),
        interval_s=m["interval_s"],
        agent_version=m["agent_version"],
    )


def _metric(row: Row[tuple[object, ...]]) -> MetricRow:
    m = row._mapping  # noqa: SLF001 - see _node
    return MetricRow(
        node_id=m["node_id"],
        metric_time=m["metric_time"],
        cpu_usage=m["cpu_usage"],
        memory_usage=m["memory_usage"],
        disk_usage=m["disk_usage"],
        load_average=m["load_average"],
    )


def _command(row: Row[tuple[object, ...]]) -> CommandRow:
    m = row._mapping  # noqa: SLF001 - see _node
    return CommandRow(
        command_id=m["command_id"],
        target_node_id=m["target_node_id"],
        command_text=m["command_text"],
        status=m["status"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        completed_at=m["completed_at"],
        expires_at=m["expires_at"],
        timeout_s=m["timeout_s"],
        issuer=m["issuer"],
        batch_id=m["batch_id"],
        exit_code=m["exit_code"],
        execution_time_ms=m["execution_time_ms"],
        error=m["error"],
    )


_NODE_COLUMNS: Final = [
    _NODES.c[name]
    for name in (
        "node_id", "hostname", "ip_address", "os_info", "status", "status_reason",
        "last_heartbeat", "registered_at", "updated_at", "session", "interval_s", "agent_version",
    )
]  # fmt: skip
_METRIC_COLUMNS: Final = [
    _METRICS.c[name]
    for name in (
        "node_id", "metric_time", "cpu_usage", "memory_usage", "disk_usage", "load_average",
    )
]  # fmt: skip
_COMMAND_COLUMNS: Final = [
    *(
        _COMMANDS.c[name]
        for name in (
            "command_id", "target_node_id", "command_text", "status", "created_at", "started_at",
            "completed_at", "expires_at", "timeout_s", "issuer", "batch_id",
        )
    ),
    _RESULTS.c.exit_code,
    _RESULTS.c.execution_time_ms,
    _RESULTS.c.error,
]  # fmt: skip


def list_nodes(engine: Engine, *, status: str | None = None) -> list[NodeRow]:
    """Every node (optionally only those with ``status``), ordered by node id."""
    query = sa.select(*_NODE_COLUMNS).order_by(_NODES.c.node_id)
    if status is not None:
        query = query.where(_NODES.c.status == status)
    with _reading(engine) as conn:
        return [_node(row) for row in conn.execute(query)]


def _chunks(items: list[_T], size: int) -> Iterable[list[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def nodes_by_id(engine: Engine, node_ids: Iterable[str]) -> dict[str, NodeRow]:
    """Return the stored nodes among ``node_ids`` by id (unknown ids are absent)."""
    wanted = sorted(set(node_ids))
    found: dict[str, NodeRow] = {}
    with _reading(engine) as conn:
        for chunk in _chunks(wanted, _IN_CHUNK):
            query = sa.select(*_NODE_COLUMNS).where(_NODES.c.node_id.in_(chunk))
            found.update((node.node_id, node) for node in map(_node, conn.execute(query)))
    return found


def match_nodes(engine: Engine, pattern: str) -> list[NodeRow]:
    """Nodes whose id matches the shell glob ``pattern`` (``*``, ``?``, ``[...]``)."""
    # Globs are matched in Python: SQL LIKE has no [...] and escapes differ per backend,
    # and 10,000 short rows are read in milliseconds.
    return [node for node in list_nodes(engine) if fnmatch.fnmatchcase(node.node_id, pattern)]


def get_node(engine: Engine, node_id: str, *, metrics_since: datetime) -> NodeDetail:
    """One node with its newest sample, samples since ``metrics_since`` and command counts."""
    with _reading(engine) as conn:
        row = conn.execute(sa.select(*_NODE_COLUMNS).where(_NODES.c.node_id == node_id)).first()
        if row is None:
            raise UnknownNodeError([node_id])
        latest = conn.execute(
            sa.select(*_METRIC_COLUMNS)
            .where(_METRICS.c.node_id == node_id)
            .order_by(_METRICS.c.metric_time.desc())
            .limit(1)
        ).first()
        # A range count on the (node_id, metric_time) index: bounded by the window.
        recent = conn.execute(
            sa.select(sa.func.count())
            .select_from(_METRICS)
            .where(_METRICS.c.node_id == node_id, _METRICS.c.metric_time >= metrics_since)
        ).scalar_one()
        counts = conn.execute(
            sa.select(_COMMANDS.c.status, sa.func.count())
            .where(_COMMANDS.c.target_node_id == node_id)
            .group_by(_COMMANDS.c.status)
        ).all()
    return NodeDetail(
        node=_node(row),
        latest_metric=_metric(latest) if latest is not None else None,
        recent_metric_count=int(recent),
        command_counts={str(status): int(n) for status, n in counts},
    )


def list_metrics(
    engine: Engine, node_id: str, *, since: datetime | None = None, limit: int = 100
) -> list[MetricRow]:
    """Return a node's samples, newest first, at most ``limit``, none before ``since``."""
    query = (
        sa.select(*_METRIC_COLUMNS)
        .where(_METRICS.c.node_id == node_id)
        .order_by(_METRICS.c.metric_time.desc())
        .limit(limit)
    )
    if since is not None:
        query = query.where(_METRICS.c.metric_time >= since)
    with _reading(engine) as conn:
        known = conn.execute(sa.select(_NODES.c.node_id).where(_NODES.c.node_id == node_id)).first()
        if known is None:
            raise UnknownNodeError([node_id])
        return [_metric(row) for row in conn.execute(query)]


def _commands_query() -> sa.Select[tuple[object, ...]]:
    # command_results.command_id is unique, so the outer join adds no rows.
    joined = _COMMANDS.outerjoin(_RESULTS, _RESULTS.c.command_id == _COMMANDS.c.command_id)
    return sa.select(*_COMMAND_COLUMNS).select_from(joined)


def list_commands(
    engine: Engine,
    *,
    node_id: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    batch_id: str | None = None,
    limit: int = 50,
) -> list[CommandRow]:
    """Commands, newest first, filtered by node, status, age and batch."""
    query = _commands_query().order_by(_COMMANDS.c.created_at.desc(), _COMMANDS.c.id.desc())
    if node_id is not None:
        query = query.where(_COMMANDS.c.target_node_id == node_id)
    if status is not None:
        query = query.where(_COMMANDS.c.status == status)
    if since is not None:
        query = query.where(_COMMANDS.c.created_at >= since)
    if batch_id is not None:
        query = query.where(_COMMANDS.c.batch_id == batch_id)
    with _reading(engine) as conn:
        return [_command(row) for row in conn.execute(query.limit(limit))]


def get_command(engine: Engine, command_id: str) -> CommandDetail:
    """One command with its full result; :class:`UnknownCommandError` if never recorded."""
    query = _commands_query().add_columns(
        _RESULTS.c.id.label("result_id"),
        _RESULTS.c.stdout,
        _RESULTS.c.stderr,
        _RESULTS.c.stdout_truncated,
        _RESULTS.c.stderr_truncated,
        _RESULTS.c.created_at.label("result_created_at"),
    )
    with _reading(engine) as conn:
        row = conn.execute(query.where(_COMMANDS.c.command_id == command_id)).first()
    if row is None:
        raise UnknownCommandError(command_id)
    m = row._mapping  # noqa: SLF001 - see _node
    return CommandDetail(
        command=_command(row),
        has_result=m["result_id"] is not None,
        stdout=m["stdout"],
        stderr=m["stderr"],
        stdout_truncated=bool(m["stdout_truncated"]),
        stderr_truncated=bool(m["stderr_truncated"]),
        result_created_at=m["result_created_at"],
    )
