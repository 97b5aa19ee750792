"""What the agent publishes, seen by a plain MQTT 5 subscriber on a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Self

import aiomqtt
import msgspec
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import mqfleet
from mqfleet.agent import AgentService, run_agent
from mqfleet.errors import AuthenticationError
from mqfleet.localbroker import LocalBroker
from mqfleet.protocol import CommandRequest, StatusReport, Topics, encode, utc_now
from mqfleet.transport import MqttClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

pytestmark = pytest.mark.integration

TOPICS = Topics()
DEADLINE_S = 20.0
INTERVAL_S = 0.2


@dataclass
class Received:
    topic: str
    payload: dict[str, Any]
    retain: bool


@dataclass
class Recorder:
    """An independent MQTT 5 subscriber that records everything under the prefix.

    With ``persistent`` it keeps a broker session, so messages published while it is
    reconnecting (broker restart) are queued for it rather than missed.
    """

    port: int
    identifier: str = "test-recorder"
    persistent: bool = False
    username: str | None = None
    password: str | None = None
    messages: list[Received] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def _client(self) -> aiomqtt.Client:
        props = None
        if self.persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
        return MqttClient(
            "127.0.0.1",
            self.port,
            identifier=self.identifier,
            username=self.username,
            password=self.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not self.persistent,
            properties=props,
            keepalive=5,
        )

    async def _loop(self) -> None:
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe(f"{TOPICS.prefix}/#", qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        self.messages.append(
                            Received(
                                message.topic.value, json.loads(message.payload), message.retain
                            )
                        )
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.1)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._loop())
        async with asyncio.timeout(DEADLINE_S):
            await self.connected.wait()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def of(self, topic: str) -> list[dict[str, Any]]:
        return [m.payload for m in self.messages if m.topic == topic]

    async def wait_for(
        self, predicate: Callable[[Recorder], Any], what: str, within: float = DEADLINE_S
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            result = predicate(self)
            if result:
                return result
            if loop.time() > deadline:
                pytest.fail(f"timed out waiting for {what}; got {self.messages[-10:]}")
            await asyncio.sleep(0.02)


async def retained_status(port: int, node_id: str, **auth: Any) -> dict[str, Any]:
    """What a newcomer sees on the node's status topic: the retained message."""
    async with MqttClient("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, **auth) as client:
        await client.subscribe(TOPICS.status(node_id), qos=1)
        async with asyncio.timeout(DEADLINE_S):
            async for message in client.messages:
                assert message.retain
                assert isinstance(message.payload, bytes)
                payload: dict[str, Any] = json.loads(message.payload)
                return payload
    pytest.fail("no retained status")


@contextlib.asynccontextmanager
async def running(coro: Any) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def status_of(node_id: str, **match: Any) -> Callable[[Recorder], dict[str, Any] | None]:
    def predicate(recorder: Recorder) -> dict[str, Any] | None:
        for payload in recorder.of(TOPICS.status(node_id)):
            if all(payload.get(k) == v for k, v in match.items()):
                return payload
        return None

    return predicate


@pytest.mark.parametrize("mqtt_version", ["5", "3.1.1"])
async def test_birth_is_retained_with_every_field_and_metrics_count_up(
    mosquitto, make_settings, mqtt_version
):
    settings = make_settings(
        broker_url=mosquitto.url,
        node_id="web-1",
        metrics_interval_s=INTERVAL_S,
        mqtt_version=mqtt_version,
    )
    async with Recorder(mosquitto.port) as recorder, running(run_agent(settings)):
        birth = await recorder.wait_for(status_of("web-1", status="online"), "the birth")
        assert set(birth) == {
            "v", "node_id", "status", "session", "ts", "hostname", "ip_address", "os_info",
            "agent_version", "interval_s",
        }  # fmt: skip
        assert birth["v"] == 1
        assert birth["session"] == 1
        assert birth["agent_version"] == mqfleet.__version__
        assert birth["interval_s"] == INTERVAL_S
        assert birth["ts"].endswith("Z")
        assert msgspec.convert(birth, StatusReport).status == "online"

        metrics_topic = TOPICS.metrics("web-1")
        await recorder.wait_for(lambda r: len(r.of(metrics_topic)) >= 5, "5 samples")
        samples = recorder.of(metrics_topic)[:5]
        assert [s["seq"] for s in samples] == [0, 1, 2, 3, 4]
        assert {s["session"] for s in samples} == {1}
        assert [s["ts"] for s in samples] == sorted(s["ts"] for s in samples)
        for sample in samples:
            assert 0 <= sample["cpu_usage"] <= 100
            assert 0 <= sample["memory_usage"] <= 100
            assert 0 <= sample["disk_usage"] <= 100
            assert sample["load_average"] >= 0

        retained = await retained_status(mosquitto.port, "web-1")
        assert retained == birth


async def test_clean_shutdown_publishes_offline_shutdown(mosquitto, make_settings):
    settings = make_settings(broker_url=mosquitto.url, node_id="web-2", metrics_interval_s=1)
    async with Recorder(mosquitto.port) as recorder:
        task = asyncio.create_task(run_agent(settings))
        birth = await recorder.wait_for(status_of("web-2", status="online"), "the birth")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        offline = await recorder.wait_for(status_of("web-2", status="offline"), "offline")
    assert offline["reason"] == "shutdown"
    assert offline["session"] == birth["session"]
    # A clean DISCONNECT discards the Will: "shutdown" stays the retained truth.
    retained = await retained_status(mosquitto.port, "web-2")
    assert retained["reason"] == "shutdown"


AGENT_SCRIPT = textwrap.dedent(
    """
    import asyncio
    from mqfleet.agent import run_agent
    from mqfleet.settings import load_settings
    asyncio.run(run_agent(load_settings()))
    """
)


async def test_killed_agent_leaves_a_retained_offline_connection_lost(
    mosquitto, tmp_path, monkeypatch
):
    env = {
        **os.environ,
        "MQFLEET_BROKER_URL": mosquitto.url,
        "MQFLEET_NODE_ID": "edge-7",
        "MQFLEET_STATE_DIR": str(tmp_path / "edge-7"),
        "MQFLEET_KEEPALIVE_S": "2",
        "MQFLEET_METRICS_INTERVAL_S": str(INTERVAL_S),
    }
    async with Recorder(mosquitto.port) as recorder:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", AGENT_SCRIPT, env=env)
        try:
            birth = await recorder.wait_for(status_of("edge-7", status="online"), "the birth")
            proc.send_signal(signal.SIGKILL)
            async with asyncio.timeout(DEADLINE_S):
                await proc.wait()
            offline = await recorder.wait_for(status_of("edge-7", status="offline"), "the Will")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert offline == {
        "v": 1,
        "node_id": "edge-7",
        "status": "offline",
        "session": birth["session"],
        "reason": "connection lost",
    }
    assert await retained_status(mosquitto.port, "edge-7") == offline


@pytest.mark.parametrize(
    "entry", [["mqfleet", "agent"], ["mqfleet.agent"]], ids=["mqfleet agent", "mqfleet-agent"]
)
async def test_sigterm_to_the_agent_command_publishes_shutdown_and_exits_0(
    mosquitto, tmp_path, entry
):
    env = {
        **os.environ,
        "MQFLEET_BROKER_URL": mosquitto.url,
        "MQFLEET_NODE_ID": "edge-8",
        "MQFLEET_STATE_DIR": str(tmp_path / "edge-8"),
        "MQFLEET_KEEPALIVE_S": "2",
    }
    async with Recorder(mosquitto.port) as recorder:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *entry, env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            birth = await recorder.wait_for(status_of("edge-8", status="online"), "the birth")
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(DEADLINE_S):
                _, stderr = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, stderr.decode()
        offline = await recorder.wait_for(status_of("edge-8", status="offline"), "offline")
    assert offline["reason"] == "shutdown"
    assert offline["session"] == birth["session"]


async def test_broker_restart_loses_no_metric(tmp_path, make_settings):
    broker = LocalBroker(data_dir=tmp_path / "restart-broker", auth=False)
    broker.start()
    try:
        settings = make_settings(
            broker_url=broker.url, node_id="db-1", metrics_interval_s=INTERVAL_S
        )
        service = AgentService(settings)
        sampled: list[Any] = []
        append = service.backlog.append

        def record(report: Any) -> None:
            sampled.append(report)
            append(report)

        service.backlog.append = record  # type: ignore[method-assign]
        topic = TOPICS.metrics("db-1")
        async with (
            Recorder(broker.port, identifier="restart-recorder", persistent=True) as recorder,
            running(service.run()),
        ):
            await recorder.wait_for(lambda r: len(r.of(topic)) >= 5, "samples before the outage")
            await asyncio.to_thread(broker.stop)
            at_stop = len(sampled)
            # The agent keeps sampling while the broker is away.
            await recorder.wait_for(lambda _: len(sampled) >= at_stop + 10, "outage samples")
            await asyncio.to_thread(broker.start)
            # Everything sampled until now, and a bit after reconnecting, must arrive.
            await recorder.wait_for(
                lambda _: service.session > 1 and len(service.backlog) == 0, "backlog drained"
            )
            expected = [(r.session, r.seq, r.ts) for r in sampled]

            def unique(recorder: Recorder) -> list[tuple[int, int, str]]:
                seen: dict[tuple[int, int], str] = {}
                for payload in recorder.of(topic):
                    seen.setdefault((payload["session"], payload["seq"]), payload["ts"])
                return [(s, q, ts) for (s, q), ts in seen.items()]

            await recorder.wait_for(
                lambda r: len(unique(r)) >= len(expected), "every sample", within=30
            )
        got = unique(recorder)[: len(expected)]
        # Same samples, same order (first arrival), original timestamps.
        assert [(s, q) for s, q, _ in got] == [(s, q) for s, q, _ in expected]
        assert [ts for _, _, ts in got] == [
            ts.isoformat().replace("+00:00", "Z") for _, _, ts in expected
        ]
        sessions = [s for s, _, _ in got]
        assert sessions == sorted(sessions)
        assert len(set(sessions)) > 1  # the reconnect used a new session
    finally:
        broker.stop()


async def test_stale_offline_for_the_current_session_brings_the_birth_back(
    mosquitto, make_settings
):
    settings = make_settings(broker_url=mosquitto.url, node_id="web-3", metrics_interval_s=1)
    status_topic = TOPICS.status("web-3")
    async with Recorder(mosquitto.port) as recorder, running(run_agent(settings)):
        birth = await recorder.wait_for(status_of("web-3", status="online"), "the birth")
        session = birth["session"]
        stale = StatusReport(
            node_id="web-3", status="offline", session=session, reason="connection lost"
        )
        async with MqttClient(
            "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as other:
            await other.publish(status_topic, encode(stale), qos=1, retain=True)

        def rebirth(r: Recorder) -> bool:
            statuses = r.of(status_topic)
            offline_at = next((i for i, p in enumerate(statuses) if p["status"] == "offline"), None)
            return offline_at is not None and any(
                p["status"] == "online" and p["session"] == session
                for p in statuses[offline_at + 1 :]
            )

        await recorder.wait_for(rebirth, "the birth republished after the stale offline")
        retained = await retained_status(mosquitto.port, "web-3")
        assert retained["status"] == "online"
        assert retained["session"] == session


async def test_a_reset_state_dir_jumps_past_the_session_the_broker_remembers(
    mosquitto, make_settings
):
    # The node ran before with session 100; its state dir is gone (fresh container).
    remembered = StatusReport(
        node_id="web-6", status="offline", session=100, reason="connection lost"
    )
    async with MqttClient("127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as old:
        await old.publish(TOPICS.status("web-6"), encode(remembered), qos=1, retain=True)
    settings = make_settings(broker_url=mosquitto.url, node_id="web-6", metrics_interval_s=1)
    async with Recorder(mosquitto.port) as recorder, running(run_agent(settings)):
        birth = await recorder.wait_for(
            lambda r: next(
                (
                    p
                    for p in r.of(TOPICS.status("web-6"))
                    if p["status"] == "online" and p["session"] > 100
                ),
                None,
            ),
            "a birth above session 100",
        )
    assert birth["session"] == 101


@dataclass
class FlakySource:
    """Recorded values, except that reads fail while ``failing`` is set."""

    failing: bool = False

    def cpu_percent(self, interval: float | None = None) -> float:  # noqa: ARG002 - psutil API
        if self.failing:
            raise PermissionError(13, "Permission denied: '/proc/stat'")
        return 10.0

    def virtual_memory(self) -> Any:
        return _Percent(20.0)

    def disk_usage(self, path: str) -> Any:  # noqa: ARG002 - psutil API
        return _Percent(30.0)

    def getloadavg(self) -> tuple[float, float, float]:
        return (0.25, 0.2, 0.1)


@dataclass(frozen=True)
class _Percent:
    percent: float


async def test_repeated_sampling_failures_report_error_then_recover(mosquitto, make_settings):
    settings = make_settings(
        broker_url=mosquitto.url, node_id="web-4", metrics_interval_s=INTERVAL_S
    )
    source = FlakySource()
    service = AgentService(settings, source=source)
    async with Recorder(mosquitto.port) as recorder, running(service.run()):
        await recorder.wait_for(status_of("web-4", status="online"), "the birth")
        source.failing = True
        error = await recorder.wait_for(status_of("web-4", status="error"), "status error")
        assert "metrics sampling failed 3 times in a row" in error["reason"]
        assert "Permission denied" in error["reason"]
        count = len(recorder.of(TOPICS.status("web-4")))
        source.failing = False
        await recorder.wait_for(
            lambda r: any(p["status"] == "online" for p in r.of(TOPICS.status("web-4"))[count:]),
            "back online",
        )


async def test_bad_credentials_stop_the_agent_with_authentication_error(tmp_path, make_settings):
    password_file = tmp_path / "passwd"
    await asyncio.to_thread(
        subprocess.run,
        ["mosquitto_passwd", "-b", "-c", str(password_file), "agent", "s3cret"],
        check=True,
        capture_output=True,
    )
    broker = LocalBroker(
        data_dir=tmp_path / "auth-broker",
        extra_config=f"password_file {password_file}\nallow_anonymous false\n",
    )
    broker.start()
    try:
        bad = make_settings(
            broker_url=f"mqtt://agent:wrong@127.0.0.1:{broker.port}", node_id="web-5"
        )
        async with asyncio.timeout(DEADLINE_S):
            with pytest.raises(AuthenticationError, match="refused the credentials"):
                await run_agent(bad)
        # Control: the right password gets the agent online on the same broker.
        good = make_settings(
            broker_url=f"mqtt://agent:s3cret@127.0.0.1:{broker.port}",
            node_id="web-5",
            metrics_interval_s=1,
        )
        async with (
            Recorder(broker.port, username="agent", password="s3cret") as recorder,
            running(run_agent(good)),
        ):
            await recorder.wait_for(status_of("web-5", status="online"), "the birth")
    finally:
        broker.stop()


class FakeCommands:
    """Stands in for CommandService: records what the agent routes to it."""

    def __init__(self, result_topic: str) -> None:
        self.started = 0
        self.accepted: list[bytes] = []
        self.result_topic = result_topic
        self.got_command = asyncio.Event()

    async def start(self) -> None:
        self.started += 1

    def accept(self, payload: bytes) -> None:
        self.accepted.append(payload)
        self.got_command.set()

    async def run_loop(self) -> None:
        await asyncio.Event().wait()

    async def deliver_loop(self, publish: Callable[[str, bytes], Any]) -> None:
        # Publishes through the agent's connection once it has a command to answer.
        await self.got_command.wait()
        await publish(self.result_topic, b'{"fake": "result"}')
        await asyncio.Event().wait()


def command_payload(node_id: str, command_id: str) -> bytes:
    now = utc_now()
    return encode(
        CommandRequest(
            command_id=command_id,
            node_id=node_id,
            command_text="uptime",
            timeout_s=10,
            created_at=now,
            expires_at=now + timedelta(minutes=5),
            issuer="test",
        )
    )


async def test_commands_are_routed_and_results_published(mosquitto, make_settings):
    settings = make_settings(broker_url=mosquitto.url, node_id="app-1", metrics_interval_s=1)
    fake = FakeCommands(TOPICS.result("app-1", "c-1"))
    service = AgentService(settings, commands=fake)  # type: ignore[arg-type]
    payload = command_payload("app-1", "c-1")
    async with Recorder(mosquitto.port) as recorder, running(service.run()):
        await recorder.wait_for(status_of("app-1", status="online"), "the birth")
        async with MqttClient(
            "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as operator:
            await operator.publish(TOPICS.commands("app-1"), payload, qos=1)
        await recorder.wait_for(lambda r: r.of(TOPICS.result("app-1", "c-1")), "the result")
    assert fake.started == 1
    assert fake.accepted == [payload]


async def test_commands_sent_while_the_agent_is_down_arrive_when_it_returns(
    mosquitto, make_settings
):
    settings = make_settings(broker_url=mosquitto.url, node_id="app-2", metrics_interval_s=1)
    async with Recorder(mosquitto.port) as recorder:
        first = FakeCommands(TOPICS.result("app-2", "c-0"))
        async with running(AgentService(settings, commands=first).run()):  # type: ignore[arg-type]
            birth = await recorder.wait_for(status_of("app-2", status="online"), "first birth")
        # The agent is down (clean shutdown); its broker session keeps the subscription.
        payload = command_payload("app-2", "c-2")
        async with MqttClient(
            "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as operator:
            await operator.publish(TOPICS.commands("app-2"), payload, qos=1)
        second = FakeCommands(TOPICS.result("app-2", "c-2"))
        async with running(AgentService(settings, commands=second).run()):  # type: ignore[arg-type]
            rebirth = await recorder.wait_for(
                status_of("app-2", status="online", session=birth["session"] + 1), "second birth"
            )
            await recorder.wait_for(lambda _: second.accepted, "the queued command")
    assert second.accepted == [payload]
    # A restarted agent continues the session sequence from its state dir.
    assert rebirth["session"] == birth["session"] + 1
