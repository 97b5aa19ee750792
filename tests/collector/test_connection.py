"""The collector's broker connection: restarts and bad credentials."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from typing import TYPE_CHECKING

import pytest

from mqfleet.collector import Collector
from mqfleet.errors import AuthenticationError
from mqfleet.localbroker import LocalBroker, find_broker_config

from .conftest import TOPICS, StartCollector, make_peer, metric, rows, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    import sqlalchemy as sa

    from mqfleet.settings import Settings

    from .conftest import MqttPeer

pytestmark = pytest.mark.integration


async def test_broker_restart_loses_no_metric(
    start_collector: StartCollector, mqtt: MqttPeer, mosquitto: LocalBroker, db: sa.Engine
) -> None:
    collector = await start_collector()
    for seq in range(50):
        mqtt.publish(TOPICS.metrics("r-1"), metric("r-1", 1, seq))
    await wait_until(lambda: collector.stats.metrics >= 50, what="first half")

    mosquitto.restart()
    await wait_until(collector.ready.is_set, what="collector reconnected")
    peer = make_peer(mosquitto)
    try:
        for seq in range(50, 100):
            peer.publish(TOPICS.metrics("r-1"), metric("r-1", 1, seq))
    finally:
        peer.client.disconnect()
        peer.client.loop_stop()
    await wait_until(
        lambda: rows(db, "SELECT count(*) FROM node_metrics")[0][0] == 100, what="all stored"
    )


async def test_collector_waits_for_the_broker_and_stops_at_once_without_one(
    collector_settings: Callable[..., Settings],
    mosquitto: LocalBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its own network thread retries with backoff while the broker is down, connects
    # when it is back, and a stop while the broker is gone again does not wait for it.
    mosquitto.stop()
    caplog.set_level(logging.WARNING, logger="mqfleet.collector")
    collector = Collector(collector_settings())
    task = asyncio.create_task(collector.run())
    try:
        await wait_until(lambda: "cannot reach broker" in caplog.text, what="a retry logged")
        mosquitto.start()
        await wait_until(collector.ready.is_set, what="connected once the broker is up")
        mosquitto.stop()
        await wait_until(lambda: not collector.ready.is_set(), what="the loss noticed")
    finally:
        task.cancel()
        async with asyncio.timeout(5):  # well under the 10 s shutdown allowance
            with pytest.raises(asyncio.CancelledError):
                await task
    mosquitto.start()  # for the fixture's teardown


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker that knows one account, collector:right."""
    data_dir = tmp_path / "auth-broker"
    data_dir.mkdir()
    # LocalBroker points a shipped password_file line at data_dir/passwd; a config
    # without one gets it added here.
    passwd = data_dir / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "collector", "right"],
        check=True,
        capture_output=True,
    )
    passwd.chmod(0o600)
    shipped = find_broker_config().read_text().splitlines()
    has_password_file = any(line.split()[:1] == ["password_file"] for line in shipped)
    extra = "" if has_password_file else f"password_file {passwd}\n"
    broker = LocalBroker(data_dir=data_dir, extra_config=extra)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_bad_credentials_stop_the_collector(
    password_broker: LocalBroker, migrated_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        broker_url=f"mqtt://collector:wrong@127.0.0.1:{password_broker.port}",
        database_url=migrated_url,
    )
    async with asyncio.timeout(20):
        with pytest.raises(AuthenticationError, match="refused"):
            await Collector(settings).run()
