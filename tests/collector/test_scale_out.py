"""Several collectors on one PostgreSQL database: every message stored once, no job twice.

Metrics and results reach one member of the shared-subscription group each; status and
commands reach every collector, whose conditional writes let exactly one of them advance
a session (and redeliver), expire a command or mark a node stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from mqfleet.collector import Collector
from mqfleet.protocol import utc_now
from mqfleet.security import COLLECTOR_ACCOUNT

from .conftest import (
    TOPICS,
    MqttPeer,
    StartCollector,
    birth,
    command,
    finished,
    make_peer,
    metric,
    offline,
    online_since,
    rows,
    table_rows,
    wait_until,
)

if TYPE_CHECKING:
    from pathlib import Path

    import sqlalchemy as sa

    from mqfleet.localbroker import LocalBroker

# Several collectors are supported on PostgreSQL only (SQLite: one collector).
pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("database_url", ["postgres"], indirect=True),
]

GROUP = "collectors"


async def two_collectors(start_collector: StartCollector) -> tuple[Collector, Collector]:
    first = await start_collector(collector_id="collector-a", collector_group=GROUP)
    second = await start_collector(collector_id="collector-b", collector_group=GROUP)
    return first, second


def metric_count(db: sa.Engine) -> int:
    return int(rows(db, "SELECT count(*) FROM node_metrics")[0][0])


async def test_a_group_shares_metrics_out_and_stores_each_once(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    first, second = await two_collectors(start_collector)
    mqtt.publish(TOPICS.status("s-1"), birth("s-1", 1), retain=True)
    for seq in range(200):
        mqtt.publish(TOPICS.metrics("s-1"), metric("s-1", 1, seq))

    await wait_until(lambda: metric_count(db) == 200, what="every metric stored")
    await wait_until(lambda: first.stats.metrics + second.stats.metrics >= 200, what="counted")
    # Shared out, not copied: each collector stored a part, together each sample once.
    assert first.stats.metrics > 0
    assert second.stats.metrics > 0
    assert first.stats.metrics + second.stats.metrics == 200
    # Status is not shared: both collectors saw the birth.
    await wait_until(lambda: first.stats.statuses and second.stats.statuses, what="births")


async def test_a_returning_node_gets_its_pending_command_once(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine, mosquitto: LocalBroker
) -> None:
    first, second = await two_collectors(start_collector)
    mqtt.publish(TOPICS.status("r-1"), birth("r-1", 1))
    mqtt.publish(TOPICS.status("r-1"), offline("r-1", 1))
    await wait_until(
        lambda: (r := table_rows(db, "nodes", node_id="r-1")) and r[0].status == "offline",
        what="node offline",
    )
    watcher = make_peer(mosquitto)
    _PEERS.append(watcher)
    watcher.subscribe(TOPICS.commands("r-1"))
    command_id, payload = command("r-1")
    mqtt.publish(TOPICS.commands("r-1"), payload)
    await wait_until(lambda: table_rows(db, "commands", command_id=command_id), what="recorded")

    mqtt.publish(TOPICS.status("r-1"), birth("r-1", 2))
    # Both collectors apply the new birth; exactly one advances the session.
    await wait_until(
        lambda: first.stats.statuses >= 3 and second.stats.statuses >= 3, what="both saw it"
    )
    await wait_until(lambda: len(watcher.messages()) >= 2, what="the republished command")
    assert first.stats.republished + second.stats.republished == 1
    assert [m.payload for m in watcher.messages()] == [payload, payload]
    assert table_rows(db, "nodes", node_id="r-1")[0].session == 2


async def test_expiry_and_staleness_happen_once(
    start_collector: StartCollector, mqtt: MqttPeer, db: sa.Engine
) -> None:
    first, second = await two_collectors(start_collector)
    mqtt.publish(TOPICS.status("e-1"), birth("e-1", 1))
    mqtt.publish(TOPICS.status("e-1"), offline("e-1", 1))
    mqtt.publish(TOPICS.status("quiet-1"), birth("quiet-1", 1, interval_s=0.2))
    await wait_until(
        lambda: (r := table_rows(db, "nodes", node_id="e-1")) and r[0].status == "offline",
        what="node offline",
    )
    command_id, payload = command("e-1", expires_in=timedelta(seconds=0.5))
    mqtt.publish(TOPICS.commands("e-1"), payload)

    await wait_until(
        lambda: (
            (r := table_rows(db, "commands", command_id=command_id)) and r[0].status == "timeout"
        ),
        what="command expired",
    )
    await wait_until(lambda: first.stats.expired + second.stats.expired >= 1, what="counted")
    await wait_until(lambda: first.stats.stale + second.stats.stale >= 1, what="stale counted")
    # Give both collectors' periodic loops (every 0.1 s) several more rounds.
    await asyncio.sleep(1.0)
    assert first.stats.expired + second.stats.expired == 1
    assert len(table_rows(db, "command_results", command_id=command_id)) == 1
    assert first.stats.stale + second.stats.stale == 1


_PEERS: list[MqttPeer] = []


@pytest.fixture(autouse=True)
def _close_peers() -> Iterator[None]:
    yield
    while _PEERS:
        peer = _PEERS.pop()
        peer.client.disconnect()
        peer.client.loop_stop()


async def test_the_fleet_acl_lets_a_collector_group_subscribe(
    secure_mosquitto: Any, migrated_url: str, db: sa.Engine, make_settings: Any
) -> None:
    # Mosquitto checks a "$share/..." subscription against the ACL: the collector
    # account's "read fleet/v1/#" must cover it, or the group would hear nothing.
    secure_mosquitto.provision("acl-1")
    collector = Collector(
        make_settings(
            broker_url=secure_mosquitto.url_for(COLLECTOR_ACCOUNT),
            database_url=migrated_url,
            collector_id="collector-secure",
            collector_group=GROUP,
        )
    )
    task = asyncio.create_task(collector.run())
    agent = Client(
        CallbackAPIVersion.VERSION2, client_id="acl-1", protocol=MQTTProtocolVersion.MQTTv5
    )
    agent.username_pw_set("acl-1", secure_mosquitto.tokens["acl-1"])
    try:
        await wait_until(lambda: collector.ready.is_set() or task.done(), what="subscribed")
        assert not task.done()
        agent.connect(secure_mosquitto.host, secure_mosquitto.port)
        agent.loop_start()
        agent.publish(TOPICS.status("acl-1"), birth("acl-1", 1), qos=1).wait_for_publish(10)
        agent.publish(TOPICS.metrics("acl-1"), metric("acl-1", 1, 0), qos=1).wait_for_publish(10)
        await wait_until(lambda: metric_count(db) == 1, what="metric stored through the group")
    finally:
        agent.disconnect()
        agent.loop_stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- SIGKILL of one collector of two, real processes ---------------------------------
RUN_COLLECTOR = """
import asyncio, logging
from mqfleet.collector import run_collector
from mqfleet.settings import load_settings
logging.basicConfig(level=logging.INFO)
asyncio.run(run_collector(load_settings()))
"""
NODES = ("k-1", "k-2", "k-3")
SAMPLES_PER_NODE = 2000
COMMANDS = 300


def spawn_collector(
    broker: LocalBroker, url: str, collector_id: str, log_path: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MQFLEET_BROKER_URL": broker.url,
        "MQFLEET_DATABASE_URL": url,
        "MQFLEET_COLLECTOR_ID": collector_id,
        "MQFLEET_COLLECTOR_GROUP": GROUP,
    }
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", RUN_COLLECTOR], env=env, stdout=log, stderr=log
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_sigkill_of_one_collector_of_two_loses_and_duplicates_nothing(
    mosquitto: LocalBroker, migrated_url: str, mqtt: MqttPeer, db: sa.Engine, tmp_path: Path
) -> None:
    mqtt.subscribe(TOPICS.collector_status())
    start = utc_now().timestamp() - 1
    procs = {
        name: spawn_collector(mosquitto, migrated_url, name, tmp_path / f"{name}.log")
        for name in ("collector-a", "collector-b")
    }
    fast = make_peer(mosquitto, max_inflight=1000)
    try:
        for name in procs:
            await wait_until(lambda n=name: online_since(mqtt, n, start), what=f"{name} online")
        for node in NODES:
            mqtt.publish(TOPICS.status(node), birth(node, 1), retain=True)
        await wait_until(
            lambda: len(rows(db, "SELECT 1 FROM nodes")) == len(NODES), what="nodes registered"
        )
        command_ids = [str(uuid.uuid4()) for _ in range(COMMANDS)]

        def publish_stream() -> None:
            # Metrics and command results interleaved, full speed, from several nodes.
            for seq in range(SAMPLES_PER_NODE):
                for node in NODES:
                    fast.client.publish(TOPICS.metrics(node), metric(node, 1, seq), qos=1)
                if seq < COMMANDS:
                    node = NODES[seq % len(NODES)]
                    command_id = command_ids[seq]
                    _, payload = command(node, command_id=command_id)
                    fast.client.publish(TOPICS.commands(node), payload, qos=1)
                    fast.client.publish(
                        TOPICS.result(node, command_id), finished(node, command_id), qos=1
                    )
            fast.publish(TOPICS.status("k-1"), birth("k-1", 1, os_info="last"))

        publisher = threading.Thread(target=publish_stream)
        publisher.start()
        await wait_until(lambda: metric_count(db) >= 300, what="ingest under way")
        procs["collector-a"].send_signal(signal.SIGKILL)
        procs["collector-a"].wait()
        at_kill = metric_count(db)
        total = SAMPLES_PER_NODE * len(NODES)
        assert at_kill < total, "the kill must land mid-stream"
        # The survivor keeps storing its share on its own...
        await wait_until(lambda: metric_count(db) >= at_kill + 300, what="survivor storing")
        await wait_until(lambda: not publisher.is_alive(), what="publisher done")
        publisher.join()
        # ...and the dead one's share waits in its session at the broker until it is
        # restarted under the same collector_id (systemd/compose restart policies).
        restarted = utc_now().timestamp() - 1
        procs["collector-a"] = spawn_collector(
            mosquitto, migrated_url, "collector-a", tmp_path / "collector-a.log"
        )
        await wait_until(lambda: online_since(mqtt, "collector-a", restarted), what="back")
        await wait_until(lambda: metric_count(db) >= total, what="every metric stored")
        await wait_until(
            lambda: rows(db, "SELECT count(*) FROM command_results")[0][0] >= COMMANDS,
            what="every result stored",
        )
        await wait_until(
            lambda: rows(db, "SELECT os_info FROM nodes WHERE node_id = 'k-1'")[0][0] == "last",
            what="last status stored",
        )
        counts = rows(
            db, "SELECT node_id, count(*), count(DISTINCT seq) FROM node_metrics GROUP BY node_id"
        )
        assert sorted(tuple(r) for r in counts) == [
            (node, SAMPLES_PER_NODE, SAMPLES_PER_NODE) for node in NODES
        ]
        results = rows(db, "SELECT count(*), count(DISTINCT command_id) FROM command_results")
        assert tuple(results[0]) == (COMMANDS, COMMANDS)
        statuses = rows(db, "SELECT status, count(*) FROM commands GROUP BY status")
        assert [tuple(r) for r in statuses] == [("success", COMMANDS)]
        log_a = (tmp_path / "collector-a.log").read_text()
        log_b = (tmp_path / "collector-b.log").read_text()
        assert "shared-subscription group 'collectors'" in log_a
        assert "Traceback" not in log_a + log_b
    finally:
        fast.client.disconnect()
        fast.client.loop_stop()
        for proc in procs.values():
            stop(proc)
