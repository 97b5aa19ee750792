"""``kill -9`` of the collector mid-stream loses nothing and duplicates nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

import pytest

from mqfleet.protocol import decode_collector_status, utc_now

from .conftest import TOPICS, MqttPeer, birth, make_peer, metric, rows, wait_until

if TYPE_CHECKING:
    from pathlib import Path

    import sqlalchemy as sa

    from mqfleet.localbroker import LocalBroker

pytestmark = pytest.mark.integration

RUN_COLLECTOR = """
import asyncio, logging
from mqfleet.collector import run_collector
from mqfleet.settings import load_settings
logging.basicConfig(level=logging.INFO)
asyncio.run(run_collector(load_settings()))
"""
TOTAL = 9000


def spawn_collector(broker: LocalBroker, url: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MQFLEET_BROKER_URL": broker.url, "MQFLEET_DATABASE_URL": url}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", RUN_COLLECTOR], env=env, stdout=log, stderr=log
        )


async def wait_collector_online(mqtt: MqttPeer, since: float) -> None:
    def online_since() -> bool:
        for msg in mqtt.messages():
            status = decode_collector_status(msg.payload)
            if status.status == "online" and status.ts and status.ts.timestamp() >= since:
                return True
        return False

    await wait_until(online_since, what="collector online")


def metric_count(db: sa.Engine) -> int:
    return int(rows(db, "SELECT count(*) FROM node_metrics")[0][0])


async def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    mosquitto: LocalBroker, migrated_url: str, mqtt: MqttPeer, db: sa.Engine, tmp_path: Path
) -> None:
    mqtt.subscribe(TOPICS.collector_status())
    log_path = tmp_path / "collector.log"
    start = utc_now().timestamp() - 1
    proc = spawn_collector(mosquitto, migrated_url, log_path)
    fast: MqttPeer | None = None
    try:
        await wait_collector_online(mqtt, start)
        mqtt.publish(TOPICS.status("k-1"), birth("k-1", 1), retain=True)
        fast = make_peer(mosquitto, max_inflight=1000)

        def publish_stream() -> None:
            # Several nodes, full speed: the kill lands while batches are in flight.
            for seq in range(TOTAL // 3):
                for node in ("k-1", "k-2", "k-3"):
                    fast.client.publish(TOPICS.metrics(node), metric(node, 1, seq), qos=1)
            fast.publish(TOPICS.status("k-1"), birth("k-1", 1, os_info="last"))

        publisher = threading.Thread(target=publish_stream)
        publisher.start()
        # Kill it three times while the stream flows; each restart resumes the session.
        for threshold in (300, TOTAL // 3, TOTAL // 2):
            await wait_until(lambda t=threshold: metric_count(db) >= t, what="ingest under way")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if threshold == 300:
                assert metric_count(db) < TOTAL, "the kill must land mid-stream"
            proc = spawn_collector(mosquitto, migrated_url, log_path)
        await wait_until(lambda: not publisher.is_alive(), what="publisher done")
        publisher.join()
        await wait_until(lambda: metric_count(db) >= TOTAL, what="every metric stored")
        await wait_until(
            lambda: rows(db, "SELECT os_info FROM nodes WHERE node_id = 'k-1'")[0][0] == "last",
            what="last status stored",
        )
        counts = rows(
            db, "SELECT node_id, count(*), count(DISTINCT seq) FROM node_metrics GROUP BY node_id"
        )
        assert sorted(tuple(r) for r in counts) == [
            ("k-1", TOTAL // 3, TOTAL // 3),
            ("k-2", TOTAL // 3, TOTAL // 3),
            ("k-3", TOTAL // 3, TOTAL // 3),
        ]
        assert metric_count(db) == TOTAL
    finally:
        if fast is not None:
            fast.client.disconnect()
            fast.client.loop_stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
