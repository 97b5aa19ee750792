"""The writer's bulk metrics insert stores exactly what SQLAlchemy's Core insert stored.

The collector binds metrics itself and hands them straight to the driver (its hottest
path: SQLite's executemany of tuples, one array per column on PostgreSQL). Rows it
writes must read back the same as rows written the old way,
``conn.execute(insert(...).on_conflict_do_nothing(...), dicts)`` through UTCDateTime:
as raw driver values, through SQLModel, and through the CLI's reader.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from mqfleet.collector.writer import Inbound, StoreWriter
from mqfleet.protocol import MetricsReport, decode_metrics, encode, utc_now
from mqfleet.store.models import NodeMetric, metadata
from mqfleet.store.queries import MetricRow, list_metrics
from mqfleet.store.reader import open_reader

from .conftest import TOPICS, rows

pytestmark = pytest.mark.integration

FAST = "fast-1"
CORE = "core-1"
METRICS = metadata.tables["node_metrics"]
NODES = metadata.tables["nodes"]
RAW_COLUMNS = "metric_time, cpu_usage, memory_usage, disk_usage, load_average, session, seq"

# Times in other zones, at the microsecond edges, before year 1000; floats that are
# integers, bounds, and need all 17 digits; sessions and seqs past 32 bits.
SAMPLES: list[dict[str, Any]] = [
    {"ts": datetime(2026, 11, 30, 12, 0, tzinfo=UTC), "cpu_usage": 0.0, "load_average": 0.0},
    {"ts": datetime(2026, 11, 30, 12, 0, 0, 999_999, tzinfo=UTC), "cpu_usage": 100.0},
    {"ts": datetime(2026, 11, 30, 17, 45, 1, 5, tzinfo=ZoneInfo("Asia/Kathmandu"))},
    {"ts": datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=-3))), "cpu_usage": 7},
    {"ts": datetime(5, 1, 2, 3, 4, 5, tzinfo=UTC), "memory_usage": 12.345678901234567},
    {"ts": datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), "load_average": 1e300},
    {"ts": datetime(2026, 11, 30, 12, 0, 0, 1, tzinfo=UTC), "session": 2**53 + 1},
    {"ts": datetime(2026, 11, 30, 12, 0, 0, 2, tzinfo=UTC), "seq": 2**62, "session": 2**62},
]


def reports(node_id: str) -> list[MetricsReport]:
    """The samples as the collector sees them: encoded by an agent, decoded off the wire."""
    out = []
    for seq, sample in enumerate(SAMPLES):
        values: dict[str, Any] = {
            "node_id": node_id,
            "session": 1,
            "seq": seq,
            "cpu_usage": 12.5,
            "memory_usage": 40.0,
            "disk_usage": 70.25,
            "load_average": 0.5,
        }
        values.update(sample)
        out.append(decode_metrics(encode(MetricsReport(**values))))
    return out


def write_fast(engine: sa.Engine) -> None:
    """Through the collector's writer, as one batch."""
    writer = StoreWriter(engine, topics=TOPICS, default_interval_s=10.0)
    batch = [
        Inbound(TOPICS.metrics(FAST), encode(report), mid, 1, False, time.time(), 1)  # noqa: FBT003 - positional as paho's thread builds it
        for mid, report in enumerate(reports(FAST), start=1)
    ]
    outcome = writer.write_batch(batch)
    assert (outcome.metrics, outcome.invalid) == (len(SAMPLES), 0)


def write_core(engine: sa.Engine) -> None:
    """The way the writer inserted metrics before: Core insert, dict rows, UTCDateTime."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    now = utc_now()
    with engine.begin() as conn:
        conn.execute(
            sa.insert(NODES).values(
                node_id=CORE,
                hostname=CORE,
                ip_address="unknown",
                status="online",
                session=1,
                registered_at=now,
                updated_at=now,
            )
        )
        conn.execute(
            dialect.insert(METRICS).on_conflict_do_nothing(
                index_elements=["node_id", "session", "seq"]
            ),
            [
                {
                    "node_id": report.node_id,
                    "metric_time": report.ts,
                    "cpu_usage": report.cpu_usage,
                    "memory_usage": report.memory_usage,
                    "disk_usage": report.disk_usage,
                    "load_average": report.load_average,
                    "session": report.session,
                    "seq": report.seq,
                }
                for report in reports(CORE)
            ],
        )


@pytest.fixture
def written(db: sa.Engine) -> tuple[datetime, datetime]:
    """Both ways into the test database; the time window of the writes."""
    before = utc_now()
    write_core(db)
    write_fast(db)
    return before, utc_now()


def raw(db: sa.Engine, node_id: str, columns: str = RAW_COLUMNS) -> list[tuple[Any, ...]]:
    # text(): the driver's own values, no SQLAlchemy type processing on the way out.
    sql = f"select {columns} from node_metrics where node_id = :n order by seq, session"  # noqa: S608 - constant columns
    return [tuple(row) for row in rows(db, sql, n=node_id)]


def test_raw_stored_values_are_identical(db: sa.Engine, written: object) -> None:
    del written
    fast = raw(db, FAST)
    assert len(fast) == len(SAMPLES)
    assert fast == raw(db, CORE)
    if db.dialect.name == "sqlite":
        # The very text UTCDateTime stores, which SQLite compares as strings.
        assert fast[0][0] == "2026-11-30 12:00:00.000000"
        assert fast[4][0] == "0005-01-02 03:04:05.000000"


def test_created_at_is_stored_as_core_stored_it(
    db: sa.Engine, written: tuple[datetime, datetime]
) -> None:
    fast = [row[0] for row in raw(db, FAST, "created_at")]
    core = [row[0] for row in raw(db, CORE, "created_at")]
    assert {type(value) for value in fast} == {type(value) for value in core}
    if db.dialect.name == "sqlite":
        # The Python default's naive UTC text with microseconds, not CURRENT_TIMESTAMP.
        pattern = re.compile(r"\A\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\Z")
        assert all(pattern.match(value) for value in fast + core)
    before, after = written
    with Session(db) as session:
        stored = session.exec(select(NodeMetric).where(NodeMetric.node_id == FAST)).all()
    assert all(before <= row.created_at <= after for row in stored)
    assert all(row.created_at.tzinfo is UTC for row in stored)


def sqlmodel_rows(db: sa.Engine, node_id: str) -> list[dict[str, Any]]:
    """A node's samples as SQLModel objects (UTCDateTime on the way out), as dicts."""
    with Session(db) as session:
        found = session.exec(
            select(NodeMetric)
            .where(NodeMetric.node_id == node_id)
            .order_by(col(NodeMetric.seq), col(NodeMetric.session))
        ).all()
        return [row.model_dump(exclude={"id", "node_id", "created_at"}) for row in found]


def test_sqlmodel_reads_identical_rows(db: sa.Engine, written: object) -> None:
    del written
    fast = sqlmodel_rows(db, FAST)
    assert fast == sqlmodel_rows(db, CORE)
    expected = reports(FAST)
    assert [row["metric_time"] for row in fast] == [report.ts for report in expected]
    assert all(row["metric_time"].tzinfo is UTC for row in fast)
    assert [(row["session"], row["seq"]) for row in fast] == [
        (report.session, report.seq) for report in expected
    ]


def values(found: list[MetricRow]) -> list[tuple[Any, ...]]:
    """What the CLI shows of each sample but its node."""
    return [
        (m.metric_time, m.cpu_usage, m.memory_usage, m.disk_usage, m.load_average) for m in found
    ]


def test_cli_reader_reads_identical_rows(migrated_url: str, db: sa.Engine, written: object) -> None:
    del db, written
    since = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)  # a bound equal to a stored time
    with open_reader(migrated_url) as reader:
        fast = list_metrics(reader, FAST, limit=100)
        core = list_metrics(reader, CORE, limit=100)
        fast_since = list_metrics(reader, FAST, since=since, limit=100)
        core_since = list_metrics(reader, CORE, since=since, limit=100)
    assert len(fast) == len(SAMPLES)
    assert values(fast) == values(core)
    assert values(fast_since) == values(core_since)
    assert len(fast_since) == sum(report.ts >= since for report in reports(FAST))


def test_redelivered_metrics_are_stored_once(db: sa.Engine, written: object) -> None:
    del written
    write_fast(db)  # the same batch again, as after a retry or a QoS 1 redelivery
    assert raw(db, FAST) == raw(db, CORE)


def test_a_sample_twice_in_one_batch_is_stored_once(db: sa.Engine) -> None:
    # QoS 1 may deliver a sample again before its first copy was committed: both
    # copies then land in the same batch, which is one statement on PostgreSQL.
    first, second = reports(FAST)[:2]
    writer = StoreWriter(db, topics=TOPICS, default_interval_s=10.0)
    batch = [
        Inbound(TOPICS.metrics(FAST), encode(report), mid, 1, False, time.time(), 1)  # noqa: FBT003 - positional as paho's thread builds it
        for mid, report in enumerate([first, second, first, first], start=1)
    ]
    assert writer.write_batch(batch).invalid == 0
    assert [row[-1] for row in raw(db, FAST)] == [first.seq, second.seq]
