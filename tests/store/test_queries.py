from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from msgspec.structs import fields
from sqlmodel import Session, col, select

from mqfleet.errors import StoreError, UnknownCommandError, UnknownNodeError
from mqfleet.store.engine import create_store_engine
from mqfleet.store.models import Command, CommandResult, Node, NodeMetric
from mqfleet.store.queries import (
    CommandDetail,
    CommandRow,
    MetricRow,
    NodeRow,
    get_command,
    get_node,
    list_commands,
    list_metrics,
    list_nodes,
    match_nodes,
    metrics_sql,
    nodes_by_id,
)
from mqfleet.store.reader import StoreReader, open_reader

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def reader(migrated_url: str) -> Iterator[StoreReader]:
    """The test fleet, written through the SQLModel tables into a migrated database."""
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
                    started_at=NOW - timedelta(minutes=5, microseconds=123_456) if i < 2 else None,
                    completed_at=NOW - timedelta(minutes=4, microseconds=7) if i < 2 else None,
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
    engine.dispose()
    with open_reader(migrated_url) as reader:
        yield reader


def test_list_nodes_all_and_by_status(reader: StoreReader) -> None:
    nodes = list_nodes(reader)
    assert [n.node_id for n in nodes] == ["db-1", "web-0", "web-1", "web-2"]
    web1 = nodes[2]
    assert web1.status == "offline"
    assert web1.status_reason == "connection lost"
    assert web1.last_heartbeat == NOW - timedelta(seconds=1)
    assert web1.last_heartbeat.tzinfo is not None
    assert [n.node_id for n in list_nodes(reader, status="online")] == ["web-0", "web-2"]


def test_nodes_by_id_and_glob(reader: StoreReader) -> None:
    found = nodes_by_id(reader, ["web-1", "nope", "db-1"])
    assert sorted(found) == ["db-1", "web-1"]
    assert [n.node_id for n in match_nodes(reader, "web-*")] == ["web-0", "web-1", "web-2"]
    assert [n.node_id for n in match_nodes(reader, "web-[02]")] == ["web-0", "web-2"]
    assert match_nodes(reader, "WEB-*") == []


def test_get_node_with_latest_metric_and_counts(reader: StoreReader) -> None:
    detail = get_node(reader, "web-0", metrics_since=NOW - timedelta(minutes=30))
    assert detail.node.hostname == "host0"
    assert detail.latest_metric is not None
    assert detail.latest_metric.metric_time == NOW
    assert detail.latest_metric.cpu_usage == 0.0
    assert detail.recent_metric_count == 31
    assert detail.command_counts == {"success": 1, "failed": 1}
    empty = get_node(reader, "db-1", metrics_since=NOW)
    assert empty.latest_metric is None
    assert empty.command_counts == {}
    with pytest.raises(UnknownNodeError, match="ghost"):
        get_node(reader, "ghost", metrics_since=NOW)


def test_metrics_newest_first_with_since_and_limit(reader: StoreReader) -> None:
    rows = list_metrics(reader, "web-0", limit=5)
    assert [r.metric_time for r in rows] == [NOW - timedelta(minutes=m) for m in range(5)]
    recent = list_metrics(reader, "web-0", since=NOW - timedelta(minutes=9, seconds=30), limit=100)
    assert len(recent) == 10
    assert list_metrics(reader, "db-1") == []
    with pytest.raises(UnknownNodeError):
        list_metrics(reader, "ghost")


def test_commands_filters_newest_first(reader: StoreReader) -> None:
    rows = list_commands(reader)
    assert [c.command_id for c in rows] == ["c2", "c1", "c0"]
    assert rows[1].exit_code == 3
    assert rows[0].exit_code is None
    assert [c.command_id for c in list_commands(reader, node_id="web-0")] == ["c1", "c0"]
    assert [c.command_id for c in list_commands(reader, status="pending")] == ["c2"]
    assert [c.command_id for c in list_commands(reader, batch_id="b1", limit=1)] == ["c1"]
    since = NOW - timedelta(minutes=8, seconds=30)
    assert [c.command_id for c in list_commands(reader, since=since)] == ["c2"]


def test_get_command_with_and_without_result(reader: StoreReader) -> None:
    done = get_command(reader, "c1")
    assert done.has_result
    assert done.command.status == "failed"
    assert done.stderr == "boom"
    assert done.stderr_truncated
    assert not done.stdout_truncated
    assert done.command.issuer == "alice@laptop"
    pending = get_command(reader, "c2")
    assert not pending.has_result
    assert pending.stdout is None
    with pytest.raises(UnknownCommandError):
        get_command(reader, "nope")


def test_every_field_reads_back_what_the_models_wrote(
    reader: StoreReader, migrated_url: str
) -> None:
    # The raw SQL names the models' tables and columns itself: every field of every row
    # type must come back equal to the model attribute it stands for, on both backends
    # (types, NULLs, aware UTC datetimes with their microseconds).
    engine = create_store_engine(migrated_url)
    try:
        with Session(engine) as session:
            nodes = session.exec(select(Node).order_by(col(Node.node_id))).all()
            metric = session.exec(
                select(NodeMetric).order_by(col(NodeMetric.metric_time).desc())
            ).first()
            commands = {c.command_id: c for c in session.exec(select(Command)).all()}
            results = {r.command_id: r for r in session.exec(select(CommandResult)).all()}
    finally:
        engine.dispose()

    def same(row: object, *models: object, renamed: dict[str, str] | None = None) -> None:
        for f in fields(row):  # type: ignore[arg-type]
            name = (renamed or {}).get(f.name, f.name)
            model = next((m for m in models if hasattr(m, name)), None)
            if model is None:
                continue
            assert getattr(row, f.name) == getattr(model, name), f.name
            if isinstance(getattr(row, f.name), datetime):
                assert getattr(row, f.name).tzinfo is UTC, f.name

    rows = list_nodes(reader)
    assert len(rows) == len(nodes) == 4
    for row, node in zip(rows, nodes, strict=True):
        assert {f.name for f in fields(NodeRow)} <= set(Node.model_fields)
        same(row, node)
    latest = list_metrics(reader, "web-0", limit=1)[0]
    assert {f.name for f in fields(MetricRow)} <= set(NodeMetric.model_fields)
    same(latest, metric)
    listed = {c.command_id: c for c in list_commands(reader)}
    assert listed.keys() == commands.keys()
    for command_id, command in commands.items():
        result = results.get(command_id)
        same(listed[command_id], command, *([result] if result else []))
        detail = get_command(reader, command_id)
        assert detail.command == listed[command_id]
        assert detail.has_result is (result is not None)
        if result is not None:
            same(detail, result, renamed={"result_created_at": "created_at"})
            assert result.created_at.microsecond != 0  # set by the model's default
    command_fields = {f.name for f in fields(CommandRow)}
    result_fields = {f.name for f in fields(CommandDetail)} - {"command", "has_result"}
    assert command_fields <= set(Command.model_fields) | set(CommandResult.model_fields)
    assert result_fields - {"result_created_at"} <= set(CommandResult.model_fields)


def test_database_defaults_and_session_time_zone_read_as_utc(
    reader: StoreReader, migrated_url: str
) -> None:
    # Rows the database filled in itself (CURRENT_TIMESTAMP on SQLite has no microseconds)
    # and a PostgreSQL session in another time zone still read as aware UTC.
    engine = create_store_engine(migrated_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO nodes (node_id, hostname, ip_address) VALUES ('raw', 'h', '::1')"
            )
            # Read back through the model's UTCDateTime: what SQLAlchemy makes of it.
            stored = conn.execute(
                select(Node.registered_at).where(Node.node_id == "raw")
            ).scalar_one()
    finally:
        engine.dispose()
    if reader.backend == "postgresql":
        reader._conn.execute("SET TIME ZONE 'Asia/Kathmandu'")  # type: ignore[attr-defined]
    raw = nodes_by_id(reader, ["raw"])["raw"]
    assert raw.registered_at.tzinfo is UTC
    assert raw.registered_at == stored
    assert abs(raw.registered_at - datetime.now(UTC)) < timedelta(minutes=5)
    web1 = nodes_by_id(reader, ["web-1"])["web-1"]
    assert web1.last_heartbeat == NOW - timedelta(seconds=1)
    assert web1.last_heartbeat is not None
    assert web1.last_heartbeat.tzinfo is UTC


def test_many_ids_are_read_in_chunks(reader: StoreReader) -> None:
    wanted = [f"ghost-{i}" for i in range(1200)] + ["web-2", "db-1"]
    assert sorted(nodes_by_id(reader, wanted)) == ["db-1", "web-2"]


def test_naive_datetimes_are_refused(reader: StoreReader) -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        list_metrics(reader, "web-0", since=datetime(2026, 1, 1))  # noqa: DTZ001 - the point


def test_metrics_query_uses_the_node_time_index(reader: StoreReader) -> None:
    # The plan of the very SQL list_metrics runs must walk idx_node_metrics_time, never
    # scan 10 million rows.
    since = reader.bind_time(NOW - timedelta(hours=1))
    for sql, params in ((metrics_sql(since=False), ["web-0", 10]),
                        (metrics_sql(since=True), ["web-0", since, 10])):  # fmt: skip
        if reader.backend == "sqlite":
            plan = reader.fetch_all("EXPLAIN QUERY PLAN " + sql, params)
        else:
            reader._conn.execute("SET enable_seqscan = off")  # type: ignore[attr-defined]
            plan = reader.fetch_all("EXPLAIN " + sql, params)
        assert "idx_node_metrics_time" in " ".join(str(row) for row in plan)


def test_missing_tables_say_how_to_fix(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        with engine.connect():
            pass  # an empty database (on SQLite: an empty file)
    finally:
        engine.dispose()
    with open_reader(database_url) as reader, pytest.raises(StoreError) as caught:
        list_nodes(reader)
    assert "has no mqfleet tables: run 'mqfleet db upgrade'" in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


def test_an_older_schema_says_how_to_fix(migrated_url: str) -> None:
    engine = create_store_engine(migrated_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE nodes DROP COLUMN agent_version")
    finally:
        engine.dispose()
    with open_reader(migrated_url) as reader, pytest.raises(StoreError) as caught:
        list_nodes(reader)
    assert "older mqfleet schema" in str(caught.value)
    assert "agent_version" in str(caught.value)
    assert "run 'mqfleet db upgrade'" in str(caught.value)


def test_a_missing_sqlite_file_is_reported_and_never_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "fleet.db"
    with pytest.raises(StoreError, match="does not exist yet"), open_reader(f"sqlite:///{path}"):
        pass
    assert not path.exists()
    assert not path.parent.exists()


def test_sqlite_reader_waits_for_the_writer_lock(sqlite_url: str) -> None:
    # Like store/engine.py's connections: a busy database is waited for, not an error.
    from mqfleet.store.reader import SQLITE_BUSY_TIMEOUT_MS  # noqa: PLC0415

    engine = create_store_engine(sqlite_url)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()
    with open_reader(sqlite_url) as reader:
        timeout = reader.fetch_one("PRAGMA busy_timeout")
    assert timeout == (SQLITE_BUSY_TIMEOUT_MS,)


def test_unreachable_database_is_a_store_error() -> None:
    url = "postgresql+psycopg://nobody:secret@127.0.0.1:1/none"
    with pytest.raises(StoreError) as caught, open_reader(url, connect_timeout_s=2):
        pass
    message = str(caught.value)
    assert message.startswith(
        "cannot read database postgresql+psycopg://nobody:***@127.0.0.1:1/none: "
    )
    assert "secret" not in message
    assert len(message.splitlines()) == 1


def test_read_queries_do_not_load_sqlmodel() -> None:
    # What keeps `mqfleet nodes` and `mqfleet run` fast to start (issue 5, target 6).
    code = "import sys, mqfleet.store.queries; print('sqlmodel' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
