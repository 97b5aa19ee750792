"""Read queries for the CLI, returning plain typed objects (no ORM instances escape).

Every query is shaped for a fleet of 10,000 nodes and tens of millions of metric rows:
metrics are read newest first through the ``(node_id, metric_time)`` index with a
``LIMIT``; per-node lookups go through the unique keys. The SQL is plain text, one
definition per query for SQLite and PostgreSQL alike, run by a
:class:`~mqfleet.store.reader.StoreReader` (``sqlite3`` or psycopg, never SQLAlchemy:
``import sqlalchemy`` alone would cost a read command more than its query). It names
the tables and columns of ``mqfleet.store.models``; tests/store/test_queries.py runs
every query on databases built by the real migrations, on both backends. Database errors
become :class:`~mqfleet.errors.StoreError` with a one-line message.

The rows are frozen :class:`msgspec.Struct` classes, not dataclasses: 10,000 of them are
built in under a millisecond (a frozen dataclass takes ~12 ms), and ``msgspec.json``
encodes them, times included, without building a dict per row.
"""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 - msgspec reads the field types at run time
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

import msgspec

from mqfleet.errors import StoreError, UnknownCommandError, UnknownNodeError
from mqfleet.store.reader import utc_value

if TYPE_CHECKING:
    from collections.abc import Iterable

    from mqfleet.store.reader import StoreReader

__all__ = [
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
    "metrics_sql",
    "nodes_by_id",
]

#: Bound parameters per ``IN (...)`` list: far below SQLite's and PostgreSQL's limits.
_IN_CHUNK: Final = 500

_T = TypeVar("_T")


class NodeRow(msgspec.Struct, frozen=True, gc=False):
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


class MetricRow(msgspec.Struct, frozen=True, gc=False):
    """One metrics sample."""

    node_id: str
    metric_time: datetime
    cpu_usage: float | None
    memory_usage: float | None
    disk_usage: float | None
    load_average: float | None


class NodeDetail(msgspec.Struct, frozen=True):
    """A node, its newest sample and how much the store holds about it."""

    node: NodeRow
    latest_metric: MetricRow | None
    #: Samples whose ``metric_time`` falls in the window the caller asked about.
    recent_metric_count: int
    #: Number of commands per status (only statuses that occur).
    command_counts: dict[str, int] = msgspec.field(default_factory=dict)


class CommandRow(msgspec.Struct, frozen=True, gc=False):
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


class CommandDetail(msgspec.Struct, frozen=True):
    """One command with its full result (output included), if any."""

    command: CommandRow
    has_result: bool
    stdout: str | None
    stderr: str | None
    stdout_truncated: bool
    stderr_truncated: bool
    result_created_at: datetime | None


# -- the SQL ------------------------------------------------------------------------
# Placeholders are "%s" (psycopg's); the SQLite reader turns them into "?". Columns are
# listed in the order of the row dataclasses' fields.
_NODE_COLUMNS: Final = (
    "node_id, hostname, ip_address, os_info, status, status_reason, "
    "last_heartbeat, registered_at, updated_at, session, interval_s, agent_version"
)
_METRIC_COLUMNS: Final = "node_id, metric_time, cpu_usage, memory_usage, disk_usage, load_average"
# command_results.command_id is unique, so the outer join adds no rows.
_COMMANDS_FROM: Final = (
    "SELECT c.command_id, c.target_node_id, c.command_text, c.status, c.created_at,"
    " c.started_at, c.completed_at, c.expires_at, c.timeout_s, c.issuer, c.batch_id,"
    " r.exit_code, r.execution_time_ms, r.error{extra}"
    " FROM commands AS c LEFT OUTER JOIN command_results AS r"
    " ON r.command_id = c.command_id"
)
_RESULT_COLUMNS: Final = (
    ", r.id, r.stdout, r.stderr, r.stdout_truncated, r.stderr_truncated, r.created_at"
)

_NODES_SQL: Final = f"SELECT {_NODE_COLUMNS} FROM nodes{{where}} ORDER BY node_id"  # noqa: S608 - constant SQL
_NODE_SQL: Final = f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id = %s"  # noqa: S608
_NODES_IN_SQL: Final = f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id IN ({{marks}})"  # noqa: S608
_METRICS_SQL: Final = (
    f"SELECT {_METRIC_COLUMNS} FROM node_metrics WHERE node_id = %s{{since}}"  # noqa: S608
    " ORDER BY metric_time DESC LIMIT %s"
)
# A range count on the (node_id, metric_time) index: bounded by the window.
_METRIC_COUNT_SQL: Final = (
    "SELECT count(*) FROM node_metrics WHERE node_id = %s AND metric_time >= %s"
)
_COMMAND_COUNTS_SQL: Final = (
    "SELECT status, count(*) FROM commands WHERE target_node_id = %s GROUP BY status"
)
_COMMANDS_SQL: Final = (
    _COMMANDS_FROM.format(extra="") + "{where} ORDER BY c.created_at DESC, c.id DESC LIMIT %s"
)
_COMMAND_SQL: Final = _COMMANDS_FROM.format(extra=_RESULT_COLUMNS) + " WHERE c.command_id = %s"


def metrics_sql(*, since: bool) -> str:
    """Return the SQL of a node's samples, newest first (parameters: node, [since], limit).

    Public for the test that checks its plan walks ``idx_node_metrics_time``.
    """
    return _METRICS_SQL.format(since=" AND metric_time >= %s" if since else "")


def _where(conditions: list[str]) -> str:
    return " WHERE " + " AND ".join(conditions) if conditions else ""


# -- rows -----------------------------------------------------------------------------
def _not_null(value: Any) -> NoReturn:  # noqa: ANN401 - a DB-API value
    raise StoreError(f"a NOT NULL time column holds NULL ({value!r})")


def _aware(value: Any) -> datetime:  # noqa: ANN401 - a DB-API value
    when = utc_value(value)
    if when is None:
        _not_null(value)
    return when


# These run once per row (10,000 for `mqfleet nodes`): positional arguments in field
# order, and the two NOT NULL times of a node checked inline rather than by _aware.
def _node(row: tuple[Any, ...]) -> NodeRow:
    registered, updated = utc_value(row[7]), utc_value(row[8])
    if registered is None or updated is None:
        _not_null(None)
    return NodeRow(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        utc_value(row[6]),
        registered,
        updated,
        int(row[9]),
        row[10],
        row[11],
    )


def _metric(row: tuple[Any, ...]) -> MetricRow:
    return MetricRow(row[0], _aware(row[1]), row[2], row[3], row[4], row[5])


def _command(row: tuple[Any, ...]) -> CommandRow:
    return CommandRow(
        command_id=row[0],
        target_node_id=row[1],
        command_text=row[2],
        status=row[3],
        created_at=_aware(row[4]),
        started_at=utc_value(row[5]),
        completed_at=utc_value(row[6]),
        expires_at=utc_value(row[7]),
        timeout_s=row[8],
        issuer=row[9],
        batch_id=row[10],
        exit_code=row[11],
        execution_time_ms=row[12],
        error=row[13],
    )


# -- queries --------------------------------------------------------------------------
def list_nodes(reader: StoreReader, *, status: str | None = None) -> list[NodeRow]:
    """Every node (optionally only those with ``status``), ordered by node id."""
    if status is None:
        rows = reader.fetch_all(_NODES_SQL.format(where=""))
    else:
        rows = reader.fetch_all(_NODES_SQL.format(where=_where(["status = %s"])), [status])
    return [_node(row) for row in rows]


def _chunks(items: list[_T], size: int) -> Iterable[list[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def nodes_by_id(reader: StoreReader, node_ids: Iterable[str]) -> dict[str, NodeRow]:
    """Return the stored nodes among ``node_ids`` by id (unknown ids are absent)."""
    wanted = sorted(set(node_ids))
    found: dict[str, NodeRow] = {}
    for chunk in _chunks(wanted, _IN_CHUNK):
        sql = _NODES_IN_SQL.format(marks=", ".join(["%s"] * len(chunk)))
        found.update((node.node_id, node) for node in map(_node, reader.fetch_all(sql, chunk)))
    return found


def match_nodes(reader: StoreReader, pattern: str) -> list[NodeRow]:
    """Nodes whose id matches the shell glob ``pattern`` (``*``, ``?``, ``[...]``)."""
    # Globs are matched in Python, the same on every backend: SQL LIKE has no [...] and
    # escapes differ per backend, and 10,000 short rows are read in milliseconds.
    import fnmatch  # noqa: PLC0415 - only `run --match` needs it

    return [node for node in list_nodes(reader) if fnmatch.fnmatchcase(node.node_id, pattern)]


def get_node(reader: StoreReader, node_id: str, *, metrics_since: datetime) -> NodeDetail:
    """One node with its newest sample, samples since ``metrics_since`` and command counts."""
    row = reader.fetch_one(_NODE_SQL, [node_id])
    if row is None:
        raise UnknownNodeError([node_id])
    latest = reader.fetch_one(metrics_sql(since=False), [node_id, 1])
    recent = reader.fetch_one(_METRIC_COUNT_SQL, [node_id, reader.bind_time(metrics_since)])
    counts = reader.fetch_all(_COMMAND_COUNTS_SQL, [node_id])
    return NodeDetail(
        node=_node(row),
        latest_metric=_metric(latest) if latest is not None else None,
        recent_metric_count=int(recent[0]) if recent is not None else 0,
        command_counts={str(status): int(n) for status, n in counts},
    )


def list_metrics(
    reader: StoreReader, node_id: str, *, since: datetime | None = None, limit: int = 100
) -> list[MetricRow]:
    """Return a node's samples, newest first, at most ``limit``, none before ``since``."""
    if reader.fetch_one(_NODE_SQL, [node_id]) is None:
        raise UnknownNodeError([node_id])
    if since is None:
        rows = reader.fetch_all(metrics_sql(since=False), [node_id, limit])
    else:
        rows = reader.fetch_all(metrics_sql(since=True), [node_id, reader.bind_time(since), limit])
    return [_metric(row) for row in rows]


def list_commands(
    reader: StoreReader,
    *,
    node_id: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    batch_id: str | None = None,
    limit: int = 50,
) -> list[CommandRow]:
    """Commands, newest first, filtered by node, status, age and batch."""
    conditions: list[str] = []
    params: list[object] = []
    for condition, value in (
        ("c.target_node_id = %s", node_id),
        ("c.status = %s", status),
        ("c.created_at >= %s", reader.bind_time(since) if since is not None else None),
        ("c.batch_id = %s", batch_id),
    ):
        if value is not None:
            conditions.append(condition)
            params.append(value)
    rows = reader.fetch_all(_COMMANDS_SQL.format(where=_where(conditions)), [*params, limit])
    return [_command(row) for row in rows]


def get_command(reader: StoreReader, command_id: str) -> CommandDetail:
    """One command with its full result; :class:`UnknownCommandError` if never recorded."""
    row = reader.fetch_one(_COMMAND_SQL, [command_id])
    if row is None:
        raise UnknownCommandError(command_id)
    result_id, stdout, stderr, stdout_truncated, stderr_truncated, result_created_at = row[14:]
    return CommandDetail(
        command=_command(row),
        has_result=result_id is not None,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=bool(stdout_truncated),
        stderr_truncated=bool(stderr_truncated),
        result_created_at=utc_value(result_created_at),
    )
