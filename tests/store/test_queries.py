from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from mqfleet.errors import StoreError, UnknownCommandError, UnknownNodeError
from mqfleet.store.engine import create_store_engine
from mqfleet.store.models import Command, CommandResult, Node, NodeMetric
from mqfleet.store.queries import (
    get_command,
    get_node,
    list_commands,
    list_metrics,
    list_nodes,
    match_nodes,
    nodes_by_id,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = create_store_engine(migrated_url)
    with Session(engine) as session:
        for i, status in enumerate(["online", "offline", "online", "error"]):
            session.add(
                Node(
                    node_id=f"web-{i}" if i < 3 else "db-1",
                    hostname=f"host{i}",
                    ip_address=f"10.0.0.{i}",
                    os_info="Linux 6.1",
                    status=status,
                    status_reason="connection lost" if status == "offline" else None,
                    last_heartbeat=NOW - timedelta(seconds=i),
                    registered_at=NOW - timedelta(days=1),
                    updated_at=NOW,
                    session=i + 1,
                    interval_s=10.0,
                    agent_version="0.1.0",
                )
            )
        session.commit()
        for minute in range(120):
            session.add(
                NodeMetric(
                    node_id="web-0",
                    metric_time=NOW - timedelta(minutes=minute),
                    cpu_usage=float(minute % 100),
                    memory_usage=50.0,
                    disk_usage=60.0,
                    load_average=0.5,
                    session=1,
                    seq=minute,
                )
            )
        for i, status in enumerate(["success", "failed", "pending"]):
            session.add(
                Command(
                    command_id=f"c{i}",
                    command_text=f"echo {i}",
                    target_node_id="web-0" if i < 2 else "web-1",
                    status=status,
                    created_at=NOW - timedelta(minutes=10 - i),
                    expires_at=NOW + timedelta(minutes=10),
                    timeout_s=60.0,
                    issuer="alice@laptop",
                    batch_id="b1" if i < 2 else "b2",
                )
            )
        session.commit()
        session.add(
            CommandResult(
                command_id="c0", stdout="0\n", stderr="", exit_code=0, execution_time_ms=12
            )
        )
        session.add(
            CommandResult(
                command_id="c1",
                stdout="",
                stderr="boom",
                exit_code=3,
                execution_time_ms=5,
                stderr_truncated=True,
            )
        )
        session.commit()
    try:
        yield engine
    finally:
        engine.dispose()


def test_list_nodes_all_and_by_status(engine: Engine) -> None:
    nodes = list_nodes(engine)
    assert [n.node_id for n in nodes] == ["db-1", "web-0", "web-1", "web-2"]
    web1 = nodes[2]
    assert web1.status == "offline"
    assert web1.status_reason == "connection lost"
    assert web1.last_heartbeat == NOW - timedelta(seconds=1)
    assert web1.last_heartbeat.tzinfo is not None
    assert [n.node_id for n in list_nodes(engine, status="online")] == ["web-0", "web-2"]


def test_nodes_by_id_and_glob(engine: Engine) -> None:
    found = nodes_by_id(engine, ["web-1", "nope", "db-1"])
    assert sorted(found) == ["db-1", "web-1"]
    assert [n.node_id for n in match_nodes(engine, "web-*")] == ["web-0", "web-1", "web-2"]
    assert [n.node_id for n in match_nodes(engine, "web-[02]")] == ["web-0", "web-2"]
    assert match_nodes(engine, "WEB-*") == []


def test_get_node_with_latest_metric_and_counts(engine: Engine) -> None:
    detail = get_node(engine, "web-0", metrics_since=NOW - timedelta(minutes=30))
    assert detail.node.hostname == "host0"
    assert detail.latest_metric is not None
    assert detail.latest_metric.metric_time == NOW
    assert detail.latest_metric.cpu_usage == 0.0
    assert detail.recent_metric_count == 31
    assert detail.command_counts == {"success": 1, "failed": 1}
    empty = get_node(engine, "db-1", metrics_since=NOW)
    assert empty.latest_metric is None
    assert empty.command_counts == {}
    with pytest.raises(UnknownNodeError, match="ghost"):
        get_node(engine, "ghost", metrics_since=NOW)


def test_metrics_newest_first_with_since_and_limit(engine: Engine) -> None:
    rows = list_metrics(engine, "web-0", limit=5)
    assert [r.metric_time for r in rows] == [NOW - timedelta(minutes=m) for m in range(5)]
    recent = list_metrics(engine, "web-0", since=NOW - timedelta(minutes=9, seconds=30), limit=100)
    assert len(recent) == 10
    assert list_metrics(engine, "db-1") == []
    with pytest.raises(UnknownNodeError):
        list_metrics(engine, "ghost")


def test_commands_filters_newest_first(engine: Engine) -> None:
    rows = list_commands(engine)
    assert [c.command_id for c in rows] == ["c2", "c1", "c0"]
    assert rows[1].exit_code == 3
    assert rows[0].exit_code is None
    assert [c.command_id for c in list_commands(engine, node_id="web-0")] == ["c1", "c0"]
    assert [c.command_id for c in list_commands(engine, status="pending")] == ["c2"]
    assert [c.command_id for c in list_commands(engine, batch_id="b1", limit=1)] == ["c1"]
    since = NOW - timedelta(minutes=8, seconds=30)
    assert [c.command_id for c in list_commands(engine, since=since)] == ["c2"]


def test_get_command_with_and_without_result(engine: Engine) -> None:
    done = get_command(engine, "c1")
    assert done.has_result
    assert done.command.status == "failed"
    assert done.stderr == "boom"
    assert done.stderr_truncated
    assert not done.stdout_truncated
    assert done.command.issuer == "alice@laptop"
    pending = get_command(engine, "c2")
    assert not pending.has_result
    assert pending.stdout is None
    with pytest.raises(UnknownCommandError):
        get_command(engine, "nope")


def test_metrics_query_uses_the_node_time_index(engine: Engine) -> None:
    # The plan must walk idx_node_metrics_time, never scan 10 million rows.
    dialect = engine.dialect.name
    explain = "EXPLAIN QUERY PLAN " if dialect == "sqlite" else "EXPLAIN "
    query = sa.text(
        explain  # noqa: S608 - constant SQL, no input
        + "SELECT * FROM node_metrics WHERE node_id = 'web-0' ORDER BY metric_time DESC LIMIT 10"
    )
    with engine.connect() as conn:
        if dialect == "postgresql":
            conn.execute(sa.text("SET enable_seqscan = off"))
        plan = " ".join(str(row) for row in conn.execute(query))
    assert "idx_node_metrics_time" in plan


def test_missing_tables_say_how_to_fix(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        with pytest.raises(StoreError, match="mqfleet db upgrade"):
            list_nodes(engine)
    finally:
        engine.dispose()


def test_unreachable_database_is_a_store_error() -> None:
    engine = create_store_engine(
        "postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2}
    )
    try:
        with pytest.raises(StoreError, match="cannot read database"):
            list_nodes(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", ["nodes", "node_metrics", "commands", "command_results"])
def test_read_tables_match_the_models(name: str) -> None:
    # The read queries use lightweight Core tables (no SQLModel import for the CLI):
    # every column they name must exist in the model with the same kind of type.
    from mqfleet.store.models import metadata  # noqa: PLC0415 - the source of truth
    from mqfleet.store.queries import READ_TABLES  # noqa: PLC0415
    from mqfleet.store.types import UTCDateTime  # noqa: PLC0415

    model = metadata.tables[name]
    for column in READ_TABLES[name].columns:
        assert column.name in model.columns, f"{name}.{column.name} is not in the model"
        expected = model.columns[column.name].type
        if isinstance(expected, UTCDateTime):
            assert isinstance(column.type, UTCDateTime), f"{name}.{column.name}"
        else:
            assert column.type._type_affinity is expected._type_affinity, f"{name}.{column.name}"
            assert getattr(column.type, "length", None) == getattr(expected, "length", None)


def test_read_queries_do_not_load_sqlmodel() -> None:
    # What keeps `mqfleet nodes` and `mqfleet run` fast to start (issue 5, target 6).
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = "import sys, mqfleet.store.queries; print('sqlmodel' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
