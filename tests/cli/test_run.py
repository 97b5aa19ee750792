"""``mqfleet run`` end to end: a real mosquitto, a real database, fake agents in the test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import aiomqtt
import pytest
from click.testing import Result

from mqfleet.cli import run as run_module
from mqfleet.localbroker import LocalBroker, free_port
from mqfleet.protocol import (
    CommandFinished,
    CommandRequest,
    CommandStarted,
    Topics,
    decode_command,
    encode,
    utc_now,
)
from mqfleet.transport import MqttClient

pytestmark = pytest.mark.integration

Invoke = Callable[..., Result]
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
TOPICS = Topics()


@dataclass
class Seen:
    """What a fake agent or watcher received on a commands topic."""

    requests: list[CommandRequest] = field(default_factory=list)
    messages: list[aiomqtt.Message] = field(default_factory=list)


def answer_for(request: CommandRequest) -> tuple[int, str]:
    """The fake agent's "shell": ``exit N`` exits N, anything else echoes."""
    match = re.fullmatch(r"exit (\d+)", request.command_text)
    if match:
        return int(match[1]), ""
    return 0, f"{request.command_text} on {request.node_id}\n"


@contextlib.asynccontextmanager
async def fake_agent(broker: LocalBroker, node_id: str) -> AsyncIterator[Seen]:
    """An MQTT client that answers ``node_id``'s commands with running + final results."""
    seen = Seen()
    async with MqttClient(
        broker.host, broker.port, identifier=f"fake-{node_id}", protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        await client.subscribe(TOPICS.commands(node_id), qos=1)

        async def answer() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                request = decode_command(message.payload)
                seen.requests.append(request)
                seen.messages.append(message)
                topic = TOPICS.result(node_id, request.command_id)
                started = utc_now()
                running = CommandStarted(
                    command_id=request.command_id, node_id=node_id, status="running",
                    started_at=started,
                )  # fmt: skip
                await client.publish(topic, encode(running), qos=1)
                code, out = answer_for(request)
                final = CommandFinished(
                    command_id=request.command_id,
                    node_id=node_id,
                    status="success" if code == 0 else "failed",
                    started_at=started,
                    completed_at=utc_now(),
                    exit_code=code,
                    stdout=out,
                    stderr="" if code == 0 else f"exit status {code}\n",
                    execution_time_ms=3,
                )
                await client.publish(topic, encode(final), qos=1)

        task = asyncio.create_task(answer())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def command_watcher(broker: LocalBroker) -> AsyncIterator[Seen]:
    """Records every command published to any node (what the collector would see)."""
    seen = Seen()
    async with MqttClient(broker.host, broker.port, identifier="watcher") as client:
        await client.subscribe(TOPICS.all_commands(), qos=1)

        async def watch() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                seen.requests.append(decode_command(message.payload))
                seen.messages.append(message)

        task = asyncio.create_task(watch())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling a plain list filled by another task
            await asyncio.sleep(0.05)


@pytest.fixture
def fleet(
    sqlite_url: str,
    invoke: Invoke,
    seed: Callable[..., None],
    mosquitto: LocalBroker,
    operator_key: object,
):
    """A migrated database with web-1, web-2 online and edge-1 offline; CLI args for it.

    The CLI signs with ``operator_key`` (tests/security covers signatures end to end).
    """
    assert invoke("--database", sqlite_url, "db", "upgrade").exit_code == 0
    seed(sqlite_url, "web-1")
    seed(sqlite_url, "web-2")
    seed(sqlite_url, "edge-1", status="offline")
    return ["--database", sqlite_url, "--broker", mosquitto.url]


async def mqfleet(invoke: Invoke, *args: str) -> Result:
    """Run the CLI in a thread, so the fake agents keep running on this loop."""
    return await asyncio.to_thread(invoke, *args)


async def test_success_on_two_nodes(fleet: list[str], invoke: Invoke, mosquitto: LocalBroker):
    async with fake_agent(mosquitto, "web-1") as one, fake_agent(mosquitto, "web-2") as two:
        before = utc_now()
        result = await mqfleet(invoke, *fleet, "run", "-n", "web-1", "-n", "web-2", "--",
                               "echo", "hi")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "web-1 | success | exit 0 | 3 ms" in result.stdout
    assert "echo hi on web-2" in result.stdout
    assert result.stdout.strip().endswith("2 targets: 2 ok")
    assert "done:" not in result.output  # no progress line when not on a terminal
    (req1,), (req2,) = one.requests, two.requests
    assert req1.command_text == "echo hi"
    assert req1.batch_id == req2.batch_id
    assert req1.command_id != req2.command_id
    assert re.fullmatch(UUID_RE, req1.command_id)
    assert "@" in req1.issuer
    assert req1.timeout_s == 60
    assert req1.created_at >= before.replace(microsecond=0) - timedelta(seconds=1)
    assert req1.expires_at - req1.created_at == timedelta(minutes=10)
    message = one.messages[0]
    assert message.qos == 1
    assert not message.retain
    expiry = message.properties.MessageExpiryInterval  # type: ignore[union-attr]
    assert 0 < expiry <= 600


async def test_non_zero_exit_is_exit_1(fleet: list[str], invoke: Invoke, mosquitto: LocalBroker):
    async with fake_agent(mosquitto, "web-1"), fake_agent(mosquitto, "web-2"):
        result = await mqfleet(invoke, *fleet, "run", "--match", "web-*", "--", "exit 3")
    assert result.exit_code == 1, result.output
    assert "web-1 | failed | exit 3" in result.stdout
    assert "--- stderr\nexit status 3" in result.stdout
    assert "2 targets: 2 failed" in result.stdout


async def test_unknown_nodes_are_refused_up_front(
    fleet: list[str], invoke: Invoke, mosquitto: LocalBroker
):
    async with command_watcher(mosquitto) as watcher:
        result = await mqfleet(invoke, *fleet, "run", "-n", "web-1", "-n", "ghost", "-n", "nope",
                               "--", "true")  # fmt: skip
        usage = await mqfleet(invoke, *fleet, "run", "--", "true")
    assert result.exit_code == 2
    assert result.stderr.strip() == "mqfleet: error: unknown nodes: ghost, nope"
    assert watcher.requests == []  # nothing was published, not even to web-1
    assert usage.exit_code == 2
    assert "exactly one of -n/--node, --all, --match" in usage.stderr


async def test_broker_unreachable_is_exit_3(fleet: list[str], invoke: Invoke) -> None:
    down = f"mqtt://127.0.0.1:{free_port()}"
    result = await mqfleet(invoke, *fleet, "--broker", down, "run", "-n", "web-1", "--", "true")
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"mqfleet: error: cannot reach broker {down}")


async def test_offline_node_is_queued_exit_4(
    fleet: list[str], invoke: Invoke, mosquitto: LocalBroker
):
    async with command_watcher(mosquitto) as watcher, fake_agent(mosquitto, "web-1"):
        result = await mqfleet(invoke, *fleet, "run", "-n", "web-1", "-n", "edge-1", "--",
                               "uptime")  # fmt: skip
        await until(lambda: len(watcher.requests) == 2)
    assert result.exit_code == 4, result.output
    assert re.search(
        r"queued: node edge-1 is offline; delivered when it returns before \S+Z", result.stdout
    )
    assert "web-1 | success" in result.stdout
    assert "2 targets: 1 ok, 1 queued" in result.stdout
    # The command for the offline node is on the wire, for the collector to record.
    assert {r.node_id for r in watcher.requests} == {"web-1", "edge-1"}


async def test_failure_beats_queued(fleet: list[str], invoke: Invoke, mosquitto: LocalBroker):
    async with fake_agent(mosquitto, "web-1"):
        result = await mqfleet(invoke, *fleet, "run", "-n", "web-1", "-n", "edge-1", "--", "exit 1")
    assert result.exit_code == 1


async def test_no_wait_prints_the_command_ids(
    fleet: list[str], invoke: Invoke, mosquitto: LocalBroker
):
    async with fake_agent(mosquitto, "web-1") as agent:
        result = await mqfleet(invoke, *fleet, "run", "--no-wait", "-n", "web-1", "-n", "edge-1",
                               "--", "uptime")  # fmt: skip
        await until(lambda: len(agent.requests) == 1)
    assert result.exit_code == 4, result.output
    assert result.stderr.startswith("queued: node edge-1 is offline")
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [(node, state) for _, node, state in lines] == [("web-1", "sent"), ("edge-1", "queued")]
    command_id = lines[0][0]
    assert re.fullmatch(UUID_RE, lines[1][0])
    assert command_id == agent.requests[0].command_id


async def test_json_document(fleet: list[str], invoke: Invoke, mosquitto: LocalBroker) -> None:
    async with fake_agent(mosquitto, "web-1"), fake_agent(mosquitto, "web-2"):
        result = await mqfleet(invoke, *fleet, "run", "--all", "--timeout", "30s", "--expires",
                               "1h", "--json", "--", "hostname")  # fmt: skip
    assert result.exit_code == 4, result.output
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 4
    assert doc["command_text"] == "hostname"
    assert doc["timeout_s"] == 30
    assert doc["summary"]["targets"] == 3
    assert doc["summary"]["success"] == 2
    assert doc["summary"]["queued"] == 1
    by_node = {r["node_id"]: r for r in doc["results"]}
    assert by_node["web-2"]["status"] == "success"
    assert by_node["web-2"]["stdout"] == "hostname on web-2\n"
    assert by_node["web-2"]["exit_code"] == 0
    assert by_node["edge-1"]["status"] == "queued"
    assert all(re.fullmatch(UUID_RE, r["command_id"]) for r in doc["results"])


async def test_a_silent_node_is_no_answer(
    fleet: list[str], invoke: Invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_module, "RESULT_MARGIN_S", 0.5)
    result = await mqfleet(invoke, *fleet, "run", "-n", "web-1", "--timeout", "1s", "--", "true")
    assert result.exit_code == 1
    assert "web-1 | no answer" in result.stdout
    assert "1 target: 1 no answer" in result.stdout
