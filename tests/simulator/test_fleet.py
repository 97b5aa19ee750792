"""A small simulated fleet against a real mosquitto: births, metrics, commands, Will."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from mqfleet.protocol import (
    CommandFinished,
    CommandRequest,
    StatusReport,
    Topics,
    decode_metrics,
    decode_result,
    decode_status,
    encode,
    utc_now,
)
from mqfleet.simulator import Fleet

pytestmark = pytest.mark.integration

NODES = 20
TOPICS = Topics()


class Observer:
    """A plain paho client on its own thread that records what the fleet publishes."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client = Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def matching(self, predicate: Callable[[str], bool]) -> list[tuple[str, bytes, bool]]:
        with self.lock:
            return [m for m in self.messages if predicate(m[0])]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def eventually(condition: Callable[[], object], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def latest_status(observer: Observer, node_id: str) -> StatusReport | None:
    found = observer.matching(lambda t: t == TOPICS.status(node_id))
    return decode_status(found[-1][1]) if found else None


@contextlib.asynccontextmanager
async def running(fleet: Fleet):
    task = asyncio.create_task(fleet.run())
    try:
        await eventually(lambda: fleet.stats.connected == NODES or task.done())
        assert not task.done(), task.exception()
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_simulated_fleet_speaks_protocol_v1(mosquitto, make_settings):  # noqa: PLR0915 - one fleet, one story
    settings = make_settings(broker_url=mosquitto.url)
    fleet = Fleet(settings, nodes=NODES, interval_s=0.3, seed=42)
    async with running(fleet):
        # Births are retained: a client that subscribes afterwards still sees them all.
        observer = Observer(mosquitto.port)
        try:
            observer.subscribe(TOPICS.all_status())
            observer.subscribe(TOPICS.all_metrics())
            observer.subscribe(TOPICS.all_results())
            await eventually(
                lambda: len(observer.matching(lambda t: t.endswith("/status"))) >= NODES
            )
            for node in fleet.nodes:
                birth = latest_status(observer, node.node_id)
                assert birth is not None
                assert birth.status == "online"
                assert birth.session == node.session
                assert birth.hostname == node.node_id
                assert birth.interval_s == 0.3
            assert all(retain for _, _, retain in observer.matching(lambda t: "status" in t))

            # Metrics flow from every node, seq counting from 0 within the session.
            def metrics_by_node():
                seen: dict[str, list[int]] = {}
                for _, payload, _ in observer.matching(lambda t: t.endswith("/metrics")):
                    report = decode_metrics(payload)
                    seen.setdefault(report.node_id, []).append(report.seq)
                return seen

            await eventually(lambda: len(metrics_by_node()) == NODES)
            for node_id, seqs in metrics_by_node().items():
                assert seqs == sorted(seqs)
                assert len(seqs) == len(set(seqs))
                assert fleet.node(node_id).sessions  # numbered in a session

            # A command is answered with running + a real final result, exactly once.
            target = fleet.nodes[2]
            now = utc_now()
            request = CommandRequest(
                command_id=str(uuid.uuid4()),
                node_id=target.node_id,
                command_text="echo hi there",
                timeout_s=10.0,
                created_at=now,
                expires_at=now + timedelta(minutes=5),
                issuer="test",
            )
            for _ in range(2):  # a QoS 1 duplicate must not run twice
                observer.client.publish(TOPICS.commands(target.node_id), encode(request), qos=1)
            result_topic = TOPICS.result(target.node_id, request.command_id)
            await eventually(lambda: len(observer.matching(lambda t: t == result_topic)) >= 2)
            await eventually(lambda: fleet.stats.duplicate_commands == 1)
            answers = observer.matching(lambda t: t == result_topic)
            results = [decode_result(p) for _, p, _ in answers]
            assert [r.status for r in results] == ["running", "success"]
            final = results[-1]
            assert isinstance(final, CommandFinished)
            assert (final.exit_code, final.stdout) == (0, "hi there\n")
            assert final.started_at is not None

            # The session rule: an offline for the live session makes the node re-birth.
            liar = fleet.nodes[1]
            fake = StatusReport(
                node_id=liar.node_id, status="offline", session=liar.session, reason="late Will"
            )
            observer.client.publish(TOPICS.status(liar.node_id), encode(fake), qos=1, retain=True)
            await eventually(
                lambda: (
                    (s := latest_status(observer, liar.node_id)) is not None
                    and s.status == "online"
                    and s.reason is None
                    and len(observer.matching(lambda t: t == TOPICS.status(liar.node_id))) >= 3
                )
            )

            # A dropped connection publishes the Will; the node comes back in a new session.
            victim = fleet.nodes[0]
            old_session = victim.session
            victim.drop()
            await eventually(
                lambda: any(
                    decode_status(p).status == "offline" and decode_status(p).session == old_session
                    for _, p, _ in observer.matching(lambda t: t == TOPICS.status(victim.node_id))
                )
            )
            await eventually(
                lambda: (
                    (s := latest_status(observer, victim.node_id)) is not None
                    and s.status == "online"
                    and s.session > old_session
                )
            )
            assert fleet.stats.disconnects >= 1
        finally:
            observer.close()

    # A clean stop leaves every node retained as offline (reason "shutdown").
    assert fleet.stats.metrics_sent == fleet.stats.metrics_acked
    late = Observer(mosquitto.port)
    try:
        late.subscribe(TOPICS.all_status())
        await eventually(lambda: len(late.matching(lambda _t: True)) >= NODES)
        statuses = [decode_status(p) for _, p, _ in late.matching(lambda _t: True)]
        assert {(s.status, s.reason) for s in statuses} == {("offline", "shutdown")}
    finally:
        late.close()
