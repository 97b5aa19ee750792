"""How many metrics per second one collector commits to SQLite.

Queues N metrics for the collector's persistent session while it is down (so the
publisher does not compete for the CPU during the measurement), then starts the collector
and times how long it takes to commit them all. Usage:

    .venv/bin/python bench/collector_ingest.py [N] [NODES]
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from mqfleet.collector import Collector
from mqfleet.localbroker import LocalBroker
from mqfleet.protocol import MetricsReport, encode, utc_now
from mqfleet.settings import load_settings

if TYPE_CHECKING:
    from collections.abc import Callable


def publish_backlog(port: int, total: int, nodes: int, topics_of: object) -> float:
    """Publish ``total`` QoS 1 metrics from ``nodes`` nodes; return messages/s."""
    client = Client(
        CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.max_inflight_messages_set(2000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    now = utc_now()
    started = time.perf_counter()
    info = None
    for seq in range(total // nodes):
        for n in range(nodes):
            node = f"bench-{n:05d}"
            payload = encode(
                MetricsReport(
                    node_id=node,
                    session=1,
                    seq=seq,
                    ts=now,
                    cpu_usage=12.5,
                    memory_usage=40.0,
                    disk_usage=70.0,
                    load_average=0.5,
                )
            )
            info = client.publish(topics_of.metrics(node), payload, qos=1)  # type: ignore[attr-defined]
        if seq % 20 == 19:
            # paho's message ids wrap at 65535: never have that many outstanding.
            info.wait_for_publish(600)
    if info is not None:
        info.wait_for_publish(600)
    rate = total / (time.perf_counter() - started)
    client.disconnect()
    client.loop_stop()
    return rate


async def wait_for(condition: Callable[[], bool], task: asyncio.Task[None]) -> None:
    """Poll ``condition`` every 10 ms; raise what ``task`` raised if it ends first."""
    # Counters are plain attributes with no event to await: poll them.
    while True:
        if condition():
            return
        if task.done():
            task.result()
            raise RuntimeError("collector stopped early")
        await asyncio.sleep(0.01)


async def main(total: int, nodes: int) -> None:
    """Queue ``total`` metrics from ``nodes`` nodes, then time one collector draining them."""
    with tempfile.TemporaryDirectory() as tmp:
        # Open mode: this measures ingest, not authentication.
        broker = LocalBroker(data_dir=Path(tmp) / "mosquitto", auth=False)
        broker.start()
        try:
            url = f"sqlite:///{tmp}/bench.db"
            settings = load_settings(broker_url=broker.url, database_url=url)
            # First run: create the persistent session and the schema, then stop.
            first = Collector(settings)
            task = asyncio.create_task(first.run())
            await wait_for(first.ready.is_set, task)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

            pub_rate = publish_backlog(broker.port, total, nodes, settings.topics)
            print(f"queued {total} metrics from {nodes} nodes at {pub_rate:,.0f}/s")

            collector = Collector(settings)
            task = asyncio.create_task(collector.run())
            await wait_for(collector.ready.is_set, task)
            started = time.perf_counter()
            await wait_for(lambda: collector.stats.metrics >= total, task)
            elapsed = time.perf_counter() - started
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            engine = sa.create_engine(url)
            with engine.connect() as conn:
                stored = conn.execute(sa.text("SELECT count(*) FROM node_metrics")).scalar_one()
            engine.dispose()
            print(
                f"collector committed {stored} rows in {elapsed:.2f}s: "
                f"{total / elapsed:,.0f} metrics/s ({collector.stats.batches} batches, "
                f"{total / max(collector.stats.batches, 1):,.0f} rows/batch)"
            )
        finally:
            broker.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    asyncio.run(main(n, k))
