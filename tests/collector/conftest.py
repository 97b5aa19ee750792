"""Fixtures for collector tests: a running collector, a plain MQTT client, the database.

The tests play the agents and the CLI with a plain paho client publishing protocol
payloads, so the collector is tested on its own against a real mosquitto and real
SQLite/PostgreSQL databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTMessage
from paho.mqtt.enums import MQTTProtocolVersion

from mqfleet.collector import Collector
from mqfleet.protocol import (
    CommandFinished,
    CommandRequest,
    CommandStarted,
    MetricsReport,
    StatusReport,
    Topics,
    decode_collector_status,
    encode,
    utc_now,
)
from mqfleet.store.engine import create_store_engine
from mqfleet.store.models import metadata

if TYPE_CHECKING:
    from mqfleet.localbroker import LocalBroker
    from mqfleet.settings import Settings

TOPICS = Topics()
DEADLINE_S = 20.0


async def wait_until(
    predicate: Callable[[], Any], *, within: float = DEADLINE_S, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy (no fixed sleeps)."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class MqttPeer:
    """A plain MQTT client that plays agents and the CLI."""

    client: Client
    received: list[MQTTMessage] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_args: done.set()
        self.client.subscribe(topic_filter, qos=1)
        assert done.wait(10), "no SUBACK"

    def messages(self) -> list[MQTTMessage]:
        with self._lock:
            return list(self.received)


def online_since(mqtt: MqttPeer, collector_id: str, since: float) -> bool:
    """Whether ``collector_id`` published its online status at or after ``since``."""
    for msg in mqtt.messages():
        if msg.topic != TOPICS.collector_status():
            continue
        status = decode_collector_status(msg.payload)
        if (
            status.collector_id == collector_id
            and status.status == "online"
            and status.ts is not None
            and status.ts.timestamp() >= since
        ):
            return True
    return False


def make_peer(broker: LocalBroker, *, max_inflight: int = 20) -> MqttPeer:
    """A connected plain MQTT 5 client (call ``client.disconnect``/``loop_stop`` after)."""
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"test-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    peer = MqttPeer(client)

    def on_message(_c: Client, _u: object, msg: MQTTMessage) -> None:
        with peer._lock:
            peer.received.append(msg)

    client.on_message = on_message
    client.max_inflight_messages_set(max_inflight)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return peer


@pytest.fixture
def mqtt(mosquitto: LocalBroker) -> Iterator[MqttPeer]:
    """A connected plain MQTT client."""
    peer = make_peer(mosquitto)
    try:
        yield peer
    finally:
        peer.client.disconnect()
        peer.client.loop_stop()


@pytest.fixture
def db(migrated_url: str) -> Iterator[sa.Engine]:
    """An engine on the test database, for assertions."""
    engine = create_store_engine(migrated_url)
    try:
        yield engine
    finally:
        engine.dispose()


def rows(engine: sa.Engine, sql: str, **params: Any) -> list[sa.Row[Any]]:
    """Run a query and return all rows."""
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params).all())


def table_rows(engine: sa.Engine, table: str, **where: Any) -> list[sa.Row[Any]]:
    """Rows of ``table`` matching ``where``, typed by the models (aware datetimes)."""
    t = metadata.tables[table]
    query = sa.select(t).where(*(t.c[k] == v for k, v in where.items())).order_by(t.c.id)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


StartCollector = Callable[..., Awaitable[Collector]]


@pytest.fixture
def collector_settings(
    mosquitto: LocalBroker, migrated_url: str, make_settings: Callable[..., Settings]
) -> Callable[..., Settings]:
    """Settings for a collector on the test broker and database."""

    def factory(**overrides: Any) -> Settings:
        overrides.setdefault("broker_url", mosquitto.url)
        overrides.setdefault("database_url", migrated_url)
        return make_settings(**overrides)

    return factory


@pytest.fixture
async def start_collector(
    collector_settings: Callable[..., Settings],
) -> AsyncIterator[StartCollector]:
    """Start collectors in this test's event loop; they are cancelled at the end."""
    running: list[asyncio.Task[None]] = []

    async def start(
        *,
        staleness_check_s: float = 0.1,
        expiry_check_s: float = 0.1,
        retention_check_s: float = 3600.0,
        **overrides: Any,
    ) -> Collector:
        collector = Collector(
            collector_settings(**overrides),
            staleness_check_s=staleness_check_s,
            expiry_check_s=expiry_check_s,
            retention_check_s=retention_check_s,
        )
        task = asyncio.create_task(collector.run())
        running.append(task)
        await wait_until(lambda: collector.ready.is_set() or task.done(), what="collector ready")
        if task.done():
            task.result()
        return collector

    yield start
    for task in running:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- payload builders (what agents and the CLI would publish) ---------------------------
def birth(node_id: str, session: int, **fields: Any) -> bytes:
    values: dict[str, Any] = {
        "node_id": node_id,
        "status": "online",
        "session": session,
        "ts": utc_now(),
        "hostname": f"{node_id}.example",
        "ip_address": "10.0.0.7",
        "os_info": "Linux 6.1",
        "agent_version": "0.1.0",
        "interval_s": 10.0,
    }
    values.update(fields)
    return encode(StatusReport(**values))


def offline(node_id: str, session: int, reason: str = "connection lost") -> bytes:
    return encode(StatusReport(node_id=node_id, status="offline", session=session, reason=reason))


def metric(node_id: str, session: int, seq: int, **fields: Any) -> bytes:
    values: dict[str, Any] = {
        "node_id": node_id,
        "session": session,
        "seq": seq,
        "ts": utc_now(),
        "cpu_usage": 12.5,
        "memory_usage": 40.0,
        "disk_usage": 70.25,
        "load_average": 0.5,
    }
    values.update(fields)
    return encode(MetricsReport(**values))


def command(
    node_id: str, *, expires_in: timedelta = timedelta(minutes=10), **fields: Any
) -> tuple[str, bytes]:
    now = utc_now()
    values: dict[str, Any] = {
        "command_id": str(uuid.uuid4()),
        "node_id": node_id,
        "command_text": "echo hello",
        "timeout_s": 60.0,
        "created_at": now,
        "expires_at": now + expires_in,
        "issuer": "alice@ops",
        "batch_id": "batch-1",
    }
    values.update(fields)
    req = CommandRequest(**values)
    return req.command_id, encode(req)


def started(node_id: str, command_id: str, at: datetime | None = None) -> bytes:
    return encode(
        CommandStarted(
            command_id=command_id, node_id=node_id, status="running", started_at=at or utc_now()
        )
    )


def finished(node_id: str, command_id: str, **fields: Any) -> bytes:
    now = utc_now()
    values: dict[str, Any] = {
        "command_id": command_id,
        "node_id": node_id,
        "status": "success",
        "started_at": now - timedelta(seconds=2),
        "completed_at": now,
        "exit_code": 0,
        "stdout": "hello\n",
        "stderr": "",
        "execution_time_ms": 2000,
    }
    values.update(fields)
    return encode(CommandFinished(**values))
