"""Command recording, forward-only status, one result per command, redelivery, expiry."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest

from mqfleet.collector.writer import EXPIRED_ERROR
from mqfleet.protocol import utc_now

from .conftest import (
    TOPICS,
    MqttPeer,
    StartCollector,
    birth,
    command,
    finished,
    offline,
    started,
    table_rows,
    wait_until,
)

if TYPE_CHECKING:
    import sqlalchemy as sa

pytestmark = pytest.mark.integration


def command_row(db: sa.Engine, command_id: str) -> Any:
    found = table_rows(db, "commands", command_id=command_id)
    return found[0] if found else None


def result_rows(db: sa.Engine, command_id: str) -> list[Any]:
    return table_rows(db, "command_results", command_id=command_id)


async def node_online(mqtt: MqttPeer, db: sa.Engine, node_id: str, session: int = 1) -> None:
    mqtt.publish(TOPICS.status(node_id), birth(node_id, session))
    await wait_until(
        lambda: (r := table_rows(db, "nodes", node_id=node_id)) and r[0].session == session,
        what=f"{node_id} session {session}",
    )


async def test_command_is_recorded_pending_with_its_payload(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector()
    await node_online(mqtt, db, "web-1")
    command_id, payload = command("web-1", command_text="uptime && df -h", timeout_s=30)
    mqtt.publish(TOPICS.commands("web-1"), payload)
    mqtt.publish(TOPICS.commands("web-1"), payload)  # a QoS 1 duplicate

    row = await wait_until(lambda: command_row(db, command_id), what="command recorded")
    assert row.status == "pending"
    assert row.command_text == "uptime && df -h"
    assert row.target_node_id == "web-1"
    assert row.timeout_s == 30
    assert row.issuer == "alice@ops"
    assert row.batch_id == "batch-1"
    assert row.payload.encode() == payload
    assert row.expires_at > row.created_at
    await wait_until(lambda: collector.stats.commands == 2, what="duplicate processed")
    assert len(table_rows(db, "commands")) == 1


async def test_results_move_a_command_forward_to_one_result(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector()
    await node_online(mqtt, db, "web-1")
    command_id, payload = command("web-1")
    mqtt.publish(TOPICS.commands("web-1"), payload)
    await wait_until(lambda: command_row(db, command_id), what="command recorded")

    t0 = utc_now()
    mqtt.publish(TOPICS.result("web-1", command_id), started("web-1", command_id, t0))
    await wait_until(
        lambda: command_row(db, command_id).status == "running", what="command running"
    )
    assert command_row(db, command_id).started_at == t0

    final = finished(
        "web-1",
        command_id,
        status="failed",
        started_at=t0,
        completed_at=t0 + timedelta(seconds=3),
        exit_code=2,
        stdout="out\x00put",
        stderr="boom",
        execution_time_ms=3000,
        stdout_truncated=True,
        error=None,
    )
    mqtt.publish(TOPICS.result("web-1", command_id), final)
    mqtt.publish(TOPICS.result("web-1", command_id), final)  # duplicate
    # A different final for the same command must not replace the first either.
    mqtt.publish(TOPICS.result("web-1", command_id), finished("web-1", command_id))
    # Nor may a late "running" move it back.
    mqtt.publish(TOPICS.result("web-1", command_id), started("web-1", command_id))
    await wait_until(lambda: collector.stats.results == 5, what="all results processed")

    row = command_row(db, command_id)
    assert row.status == "failed"
    assert row.started_at == t0
    assert row.completed_at == t0 + timedelta(seconds=3)
    results = result_rows(db, command_id)
    assert len(results) == 1
    res = results[0]
    assert (res.exit_code, res.stderr, res.execution_time_ms) == (2, "boom", 3000)
    assert res.stdout == "out\ufffdput"  # NUL cannot be stored in PostgreSQL text
    assert (res.stdout_truncated, res.stderr_truncated, res.error) == (True, False, None)
    assert collector.stats.invalid == 0


async def test_final_before_running_is_stored_right(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector()
    await node_online(mqtt, db, "web-1")
    command_id, payload = command("web-1")
    mqtt.publish(TOPICS.commands("web-1"), payload)
    await wait_until(lambda: command_row(db, command_id), what="command recorded")

    t0 = utc_now()
    mqtt.publish(
        TOPICS.result("web-1", command_id),
        finished("web-1", command_id, status="timeout", started_at=t0, error="timed out"),
    )
    mqtt.publish(TOPICS.result("web-1", command_id), started("web-1", command_id, t0))
    await wait_until(lambda: collector.stats.results == 2, what="both results processed")
    row = command_row(db, command_id)
    assert row.status == "timeout"
    assert row.started_at == t0
    assert row.completed_at is not None
    assert [r.error for r in result_rows(db, command_id)] == ["timed out"]


async def test_result_before_command_is_completed_by_the_command(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector()
    await node_online(mqtt, db, "web-1")
    command_id, payload = command("web-1", command_text="hostname")
    t0 = utc_now()
    mqtt.publish(TOPICS.result("web-1", command_id), started("web-1", command_id, t0))
    mqtt.publish(TOPICS.result("web-1", command_id), finished("web-1", command_id, started_at=t0))
    await wait_until(lambda: collector.stats.results == 2, what="results processed")
    assert command_row(db, command_id).status == "success"

    mqtt.publish(TOPICS.commands("web-1"), payload)
    row = await wait_until(
        lambda: (r := command_row(db, command_id)) is not None and r.payload is not None and r,
        what="command fills in the placeholder",
    )
    assert row.status == "success"  # never back to pending
    assert row.command_text == "hostname"
    assert row.issuer == "alice@ops"
    assert row.started_at == t0
    assert len(result_rows(db, command_id)) == 1


async def test_command_for_an_unknown_node_is_skipped(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector()
    command_id, payload = command("ghost-1")
    mqtt.publish(TOPICS.commands("ghost-1"), payload)
    mqtt.publish(TOPICS.result("ghost-1", command_id), finished("ghost-1", command_id))
    await wait_until(lambda: collector.stats.skipped == 2, what="both skipped")
    assert table_rows(db, "commands") == []
    # Still working.
    await node_online(mqtt, db, "web-1")


async def test_pending_command_is_republished_unchanged_when_its_node_returns(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector()
    await node_online(mqtt, db, "edge-1", session=4)
    mqtt.publish(TOPICS.status("edge-1"), offline("edge-1", 4))
    command_id, payload = command("edge-1")
    done_id, done_payload = command("edge-1")
    expired_id, expired_payload = command("edge-1", expires_in=timedelta(seconds=-1))
    for p in (payload, done_payload, expired_payload):
        mqtt.publish(TOPICS.commands("edge-1"), p)
    mqtt.publish(TOPICS.result("edge-1", done_id), finished("edge-1", done_id))
    await wait_until(lambda: command_row(db, done_id), what="commands recorded")
    await wait_until(
        lambda: command_row(db, expired_id).status == "timeout", what="expired one timed out"
    )

    # The node's agent comes back: same session (a retained replay) redelivers nothing,
    # a new session gets exactly the pending, unexpired command.
    mqtt.subscribe(TOPICS.commands("edge-1"))
    mqtt.publish(TOPICS.status("edge-1"), birth("edge-1", 5))
    got = await wait_until(mqtt.messages, what="republished command")
    await wait_until(lambda: collector.stats.republished == 1, what="republish counted")
    assert len(got) == 1
    assert got[0].payload == payload
    assert not got[0].retain
    assert 0 < got[0].properties.MessageExpiryInterval <= 600
    assert command_row(db, command_id).status == "pending"

    # The same session again (e.g. its birth redelivered) does not republish.
    mqtt.publish(TOPICS.status("edge-1"), birth("edge-1", 5))
    await wait_until(lambda: collector.stats.statuses >= 4, what="repeat birth processed")
    assert collector.stats.republished == 1


async def test_undelivered_command_times_out_at_expiry(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    collector = await start_collector(expiry_check_s=0.1)
    await node_online(mqtt, db, "edge-1")
    mqtt.publish(TOPICS.status("edge-1"), offline("edge-1", 1))
    command_id, payload = command("edge-1", expires_in=timedelta(seconds=1))
    mqtt.publish(TOPICS.commands("edge-1"), payload)
    await wait_until(lambda: command_row(db, command_id), what="command recorded")
    assert command_row(db, command_id).status == "pending"

    row = await wait_until(
        lambda: (r := command_row(db, command_id)).status == "timeout" and r, what="expiry"
    )
    assert row.completed_at >= row.expires_at
    results = result_rows(db, command_id)
    assert [(r.error, r.exit_code) for r in results] == [(EXPIRED_ERROR, None)]
    # A result that straggles in later changes nothing: terminal is terminal.
    mqtt.publish(TOPICS.result("edge-1", command_id), finished("edge-1", command_id))
    await wait_until(lambda: collector.stats.results == 1, what="late result processed")
    assert command_row(db, command_id).status == "timeout"
    assert len(result_rows(db, command_id)) == 1
