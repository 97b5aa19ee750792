"""Status and metrics ingest against a real mosquitto and SQLite/PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from mqfleet.collector import Collector
from mqfleet.collector.writer import HEARTBEAT_TIMEOUT, UNKNOWN_IP
from mqfleet.protocol import decode_collector_status, utc_now
from mqfleet.store.models import metadata

from .conftest import (
    TOPICS,
    MqttPeer,
    StartCollector,
    birth,
    metric,
    offline,
    rows,
    table_rows,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from mqfleet.settings import Settings

pytestmark = pytest.mark.integration


def node_row(db: sa.Engine, node_id: str) -> sa.Row | None:
    found = table_rows(db, "nodes", node_id=node_id)
    return found[0] if found else None


async def test_birth_registers_node_with_its_fields(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    await start_collector()
    before = utc_now()
    mqtt.publish(TOPICS.status("web-1"), birth("web-1", 3, interval_s=5.0), retain=True)

    row = await wait_until(lambda: node_row(db, "web-1"), what="node registered")
    assert row.hostname == "web-1.example"
    assert row.ip_address == "10.0.0.7"
    assert row.os_info == "Linux 6.1"
    assert row.status == "online"
    assert row.session == 3
    assert row.interval_s == 5.0
    assert row.agent_version == "0.1.0"
    assert row.status_reason is None
    node = row.last_heartbeat
    assert before - timedelta(seconds=1) <= node <= utc_now()
    assert (row.registered_at) <= (row.updated_at)


async def test_later_birth_updates_but_keeps_registration(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    await start_collector()
    mqtt.publish(TOPICS.status("web-1"), birth("web-1", 1))
    first = await wait_until(lambda: node_row(db, "web-1"), what="node registered")

    mqtt.publish(
        TOPICS.status("web-1"),
        birth("web-1", 2, hostname="web-1.new", ip_address="10.0.0.8", os_info="Linux 6.6"),
    )
    row = await wait_until(
        lambda: (r := node_row(db, "web-1")) is not None and r.session == 2 and r,
        what="second birth applied",
    )
    assert (row.hostname, row.ip_address, row.os_info) == ("web-1.new", "10.0.0.8", "Linux 6.6")
    assert row.registered_at == first.registered_at
    assert (row.updated_at) >= (first.updated_at)


async def test_status_of_an_older_session_is_ignored(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector()
    mqtt.publish(TOPICS.status("web-1"), birth("web-1", 5))
    await wait_until(lambda: node_row(db, "web-1"), what="node registered")

    # The old connection's Will arrives after the new birth: it must not win.
    mqtt.publish(TOPICS.status("web-1"), offline("web-1", 4))
    mqtt.publish(TOPICS.status("web-1"), offline("web-1", 5, reason="shutdown"))
    row = await wait_until(
        lambda: (r := node_row(db, "web-1")) is not None and r.status == "offline" and r,
        what="current session's offline applied",
    )
    assert row.session == 5
    assert row.status_reason == "shutdown"
    assert collector.stats.statuses == 3
    assert collector.stats.invalid == 0


async def test_metrics_land_with_their_values(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    await start_collector()
    mqtt.publish(TOPICS.status("db-1"), birth("db-1", 1))
    ts = datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
    mqtt.publish(
        TOPICS.metrics("db-1"),
        metric(
            "db-1", 1, 0, ts=ts, cpu_usage=99.5, memory_usage=1.25, disk_usage=0, load_average=7
        ),
    )
    found = await wait_until(lambda: table_rows(db, "node_metrics", node_id="db-1"), what="metric")
    assert len(found) == 1
    m = found[0]
    assert (m.metric_time) == ts
    assert (m.cpu_usage, m.memory_usage, m.disk_usage, m.load_average) == (99.5, 1.25, 0.0, 7.0)
    assert (m.session, m.seq) == (1, 0)


async def test_metrics_of_an_unknown_node_register_it(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    await start_collector()
    mqtt.publish(TOPICS.metrics("edge-9"), metric("edge-9", 4, 0))
    row = await wait_until(lambda: node_row(db, "edge-9"), what="node from metrics")
    assert (row.hostname, row.ip_address, row.status, row.session) == (
        "edge-9",
        UNKNOWN_IP,
        "online",
        4,
    )
    await wait_until(
        lambda: rows(db, "SELECT 1 FROM node_metrics WHERE node_id = 'edge-9'"), what="metric"
    )
    # Its birth later fills in what only the birth knows.
    mqtt.publish(TOPICS.status("edge-9"), birth("edge-9", 4))
    await wait_until(
        lambda: (r := node_row(db, "edge-9")) is not None and r.hostname == "edge-9.example",
        what="birth fills the node in",
    )


async def test_duplicate_metric_is_stored_once(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector()
    payload = metric("db-1", 1, 7)
    # A QoS 1 redelivery is the same payload again; so is a replayed agent backlog.
    for _ in range(3):
        mqtt.publish(TOPICS.metrics("db-1"), payload)
    mqtt.publish(TOPICS.metrics("db-1"), metric("db-1", 1, 8))
    await wait_until(lambda: collector.stats.metrics >= 4, what="all four processed")
    found = rows(db, "SELECT seq FROM node_metrics ORDER BY seq")
    assert [r.seq for r in found] == [7, 8]


async def test_garbage_on_every_topic_is_counted_and_skipped(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector()
    good_metric = json.loads(metric("ok-1", 1, 0))
    garbage = [
        (TOPICS.metrics("ok-1"), b"{not json"),
        (TOPICS.metrics("ok-1"), b"\xff\xfe binary"),
        (TOPICS.metrics("ok-1"), json.dumps({**good_metric, "cpu_usage": "high"}).encode()),
        (TOPICS.metrics("ok-1"), json.dumps({**good_metric, "cpu_usage": 250}).encode()),
        (TOPICS.metrics("ok-1"), json.dumps({**good_metric, "surprise": 1}).encode()),
        (TOPICS.metrics("ok-1"), json.dumps({**good_metric, "node_id": "other"}).encode()),
        (TOPICS.metrics("ok-1"), b"{" + b" " * 20000 + b"}"),  # oversized
        (
            "fleet/v1/nodes/bad$id/metrics",
            json.dumps({**good_metric, "node_id": "bad$id"}).encode(),
        ),
        ("fleet/v1/nodes/" + "x" * 65 + "/status", birth("ok-1", 1)),
        (TOPICS.status("ok-1"), b"[]"),
        (TOPICS.status("ok-1"), json.dumps({"node_id": "ok-1", "status": "online"}).encode()),
        (TOPICS.commands("ok-1"), b"null"),
        (TOPICS.commands("ok-1"), json.dumps({"command_id": "c1", "node_id": "ok-1"}).encode()),
        ("fleet/v1/nodes/ok-1/results/c1", b'{"status": "done"}'),
        ("fleet/v1/nodes/ok-1/results/bad+", b"{}"),  # not a topic anyone may publish
        ("fleet/v1/nodes/ok-1/results/c1", json.dumps({"v": 1}).encode()),
    ]
    expected_invalid = 0
    for topic, payload in garbage:
        if "+" in topic:
            continue  # a wildcard in a publish topic is refused by the broker itself
        mqtt.publish(topic, payload)
        expected_invalid += 1
    mqtt.publish(TOPICS.status("ok-1"), birth("ok-1", 1))
    mqtt.publish(TOPICS.metrics("ok-1"), metric("ok-1", 1, 1))

    await wait_until(
        lambda: rows(db, "SELECT 1 FROM node_metrics WHERE node_id = 'ok-1'"), what="good metric"
    )
    await wait_until(lambda: collector.stats.invalid >= expected_invalid, what="garbage counted")
    assert collector.stats.invalid == expected_invalid
    assert [r.node_id for r in rows(db, "SELECT node_id FROM nodes")] == ["ok-1"]
    assert len(rows(db, "SELECT 1 FROM node_metrics")) == 1
    # Still alive and still storing.
    mqtt.publish(TOPICS.metrics("ok-1"), metric("ok-1", 1, 2))
    await wait_until(
        lambda: len(rows(db, "SELECT 1 FROM node_metrics")) == 2, what="storing after garbage"
    )


async def test_silent_node_is_marked_offline(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector(staleness_check_s=0.1)
    mqtt.publish(TOPICS.status("hung-1"), birth("hung-1", 1, interval_s=0.2))
    mqtt.publish(TOPICS.status("chatty-1"), birth("chatty-1", 1, interval_s=60))
    row = await wait_until(
        lambda: (r := node_row(db, "hung-1")) is not None and r.status == "offline" and r,
        what="heartbeat timeout",
    )
    assert row.status_reason == HEARTBEAT_TIMEOUT
    assert node_row(db, "chatty-1").status == "online"
    # The counter moves once the commit is back on the loop, a moment after the row.
    await wait_until(lambda: collector.stats.stale >= 1, what="stale node counted")

    # It was only silent: fresh metrics of the same session bring it back.
    mqtt.publish(TOPICS.metrics("hung-1"), metric("hung-1", 1, 0))
    await wait_until(
        lambda: (r := node_row(db, "hung-1")) is not None and r.status == "online",
        what="revived by its metrics",
    )


async def test_old_metrics_are_pruned(start_collector: StartCollector, db: sa.Engine) -> None:
    now = utc_now()
    with db.begin() as conn:
        conn.execute(
            sa.insert(metadata.tables["nodes"]).values(
                node_id="old-1", hostname="h", ip_address="i", registered_at=now, updated_at=now
            )
        )
        conn.execute(
            sa.insert(metadata.tables["node_metrics"]),
            [
                {
                    "node_id": "old-1",
                    "metric_time": now - timedelta(days=age),
                    "created_at": now,
                    "session": 1,
                    "seq": i,
                }
                for i, age in enumerate([40, 31, 2, 0])
            ],
        )
    collector = await start_collector(retention_days=30)
    await wait_until(lambda: collector.stats.pruned == 2, what="pruned")
    assert [r.seq for r in rows(db, "SELECT seq FROM node_metrics ORDER BY seq")] == [2, 3]


async def test_collector_announces_itself_and_says_goodbye(
    collector_settings: Callable[..., Settings], mqtt: MqttPeer
) -> None:
    collector = Collector(collector_settings())
    task = asyncio.create_task(collector.run())
    await wait_until(collector.ready.is_set, what="collector ready")
    mqtt.subscribe(TOPICS.collector_status())
    await wait_until(mqtt.messages, what="retained collector birth")
    assert decode_collector_status(mqtt.messages()[0].payload).status == "online"

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    last = await wait_until(
        lambda: len(mqtt.messages()) > 1 and mqtt.messages()[-1], what="collector offline"
    )
    status = decode_collector_status(last.payload)
    assert (status.status, status.reason) == ("offline", "shutdown")
