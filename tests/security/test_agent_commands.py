"""Signed commands end to end: a real agent on the production broker config refuses every
command the operator did not sign for it, and never runs it (no marker file appears)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mqfleet.agent import run_agent
from mqfleet.agent.commands import EXPIRED_BEFORE_DELIVERY, NO_KEY_REFUSAL, NOT_ALLOWED_REFUSAL
from mqfleet.errors import AuthenticationError
from mqfleet.protocol import (
    CommandFinished,
    CommandRequest,
    Topics,
    decode_result,
    decode_status,
    encode,
    utc_now,
)
from mqfleet.security import OPERATOR_ACCOUNT, sign_command
from mqfleet.transport import MqttClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

pytestmark = pytest.mark.integration

T = Topics()
DEADLINE_S = 20.0


def request(node_id: str, text: str, *, expires_in: timedelta = timedelta(minutes=5)):
    now = utc_now()
    return CommandRequest(
        command_id=str(uuid.uuid4()),
        node_id=node_id,
        command_text=text,
        timeout_s=30,
        created_at=now,
        expires_at=now + expires_in,
        issuer="test",
    )


class Operator:
    """An MQTT 5 client logged in as the operator: publishes commands, collects results."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.results: dict[str, CommandFinished] = {}
        self.online: set[str] = set()

    async def collect(self) -> None:
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            parsed = T.parse(message.topic.value)
            if parsed.kind == "status":
                status = decode_status(message.payload)
                if status.status == "online":
                    self.online.add(status.node_id)
                continue
            result = decode_result(message.payload)
            if isinstance(result, CommandFinished):
                self.results[result.command_id] = result

    async def wait_online(self, node_id: str) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while node_id not in self.online:  # noqa: ASYNC110 - filled by collect()
                await asyncio.sleep(0.02)

    async def send(self, node_id: str, payload: bytes) -> None:
        await self.client.publish(T.commands(node_id), payload, qos=1)

    async def final(self, command_id: str) -> CommandFinished:
        async with asyncio.timeout(DEADLINE_S):
            while command_id not in self.results:  # noqa: ASYNC110 - filled by collect()
                await asyncio.sleep(0.02)
        return self.results[command_id]


@contextlib.asynccontextmanager
async def operator_on(secure_mosquitto) -> AsyncIterator[Operator]:
    async with MqttClient(
        secure_mosquitto.host,
        secure_mosquitto.port,
        username=OPERATOR_ACCOUNT,
        password=secure_mosquitto.tokens[OPERATOR_ACCOUNT],
        identifier=f"op-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(f"{T.prefix}/nodes/+/results/+", qos=1)
        await client.subscribe(f"{T.prefix}/nodes/+/status", qos=1)
        operator = Operator(client)
        task = asyncio.create_task(operator.collect())
        try:
            yield operator
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def agent_running(settings) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(run_agent(settings))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def node_a(secure_mosquitto, make_settings, operator_key) -> Callable[..., Any]:
    """Settings factory for agent node-a on the secure broker, trusting ``operator_key``."""
    secure_mosquitto.provision("node-a", "node-b")

    def settings(**overrides: Any):
        return make_settings(
            broker_url=secure_mosquitto.url_for("node-a"),
            node_id="node-a",
            metrics_interval_s=5,
            **overrides,
        )

    return settings


async def genuine_round_trip(operator: Operator, key) -> None:
    """A signed command after the refused ones: once it is done, they had their chance."""
    ok = request("node-a", "true")
    await operator.send("node-a", encode(key.sign(ok)))
    assert (await operator.final(ok.command_id)).status == "success"


def forged(req: CommandRequest, _key) -> bytes:
    return encode(sign_command(req, Ed25519PrivateKey.generate()))


def unsigned(req: CommandRequest, _key) -> bytes:
    return encode(req)


def altered(req: CommandRequest, key) -> bytes:
    signed = key.sign(req)
    return encode(msgspec.structs.replace(signed, command_text=signed.command_text + "; true"))


def malformed(req: CommandRequest, _key) -> bytes:
    return encode(msgspec.structs.replace(req, signature="not-a-signature"))


@pytest.mark.parametrize(
    ("make_payload", "reason_text"),
    [
        (unsigned, "refused: command is not signed"),
        (forged, "refused: signed by untrusted key"),
        (altered, "refused: signature does not match the command (altered or forged)"),
        (malformed, "refused: signature is malformed"),
    ],
    ids=["unsigned", "forged", "altered", "malformed"],
)
async def test_unauthenticated_commands_are_refused_never_run_never_journaled(  # noqa: PLR0917 - fixtures
    node_a, operator_key, secure_mosquitto, tmp_path: Path, make_payload, reason_text
) -> None:
    marker = tmp_path / "ran"
    settings = node_a()
    bad = request("node-a", f"touch {marker}")
    async with operator_on(secure_mosquitto) as operator, agent_running(settings):
        await operator.wait_online("node-a")
        await operator.send("node-a", make_payload(bad, operator_key))
        final = await operator.final(bad.command_id)
        await genuine_round_trip(operator, operator_key)
    assert final.status == "failed"
    assert final.error is not None
    assert final.error.startswith(reason_text)
    assert final.started_at is None
    assert not marker.exists()
    # The id of a forgery is not burnt: the genuine command with that id would still run.
    journal = settings.agent_state_dir / "commands" / "journal"
    assert not list(journal.glob(f"{bad.command_id}*"))


async def test_a_genuine_command_still_runs_after_a_forgery_used_its_id(
    node_a, operator_key, secure_mosquitto, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    genuine = request("node-a", f"touch {marker}")
    async with operator_on(secure_mosquitto) as operator, agent_running(node_a()):
        await operator.wait_online("node-a")
        await operator.send("node-a", forged(genuine, operator_key))
        assert (await operator.final(genuine.command_id)).status == "failed"
        del operator.results[genuine.command_id]
        await operator.send("node-a", encode(operator_key.sign(genuine)))
        assert (await operator.final(genuine.command_id)).status == "success"
    assert marker.exists()


async def test_an_expired_command_is_refused_as_expired_before_delivery(
    node_a, operator_key, secure_mosquitto, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    old = request("node-a", f"touch {marker}", expires_in=timedelta(seconds=-1))
    async with operator_on(secure_mosquitto) as operator, agent_running(node_a()):
        await operator.wait_online("node-a")
        await operator.send("node-a", encode(operator_key.sign(old)))
        final = await operator.final(old.command_id)
        await genuine_round_trip(operator, operator_key)
    assert final.status == "timeout"
    assert final.error == EXPIRED_BEFORE_DELIVERY
    assert not marker.exists()


async def test_a_replayed_command_runs_once(
    node_a, operator_key, secure_mosquitto, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    payload = encode(operator_key.sign(request("node-a", f"echo run >> {log}")))
    async with operator_on(secure_mosquitto) as operator, agent_running(node_a()):
        await operator.wait_online("node-a")
        await operator.send("node-a", payload)
        await genuine_round_trip(operator, operator_key)
        await operator.send("node-a", payload)  # the replay: a silent no-op
        await genuine_round_trip(operator, operator_key)
    assert log.read_text().splitlines() == ["run"]


async def test_a_command_signed_for_another_node_is_refused(
    node_a, operator_key, secure_mosquitto, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    for_b = request("node-b", f"touch {marker}")
    async with operator_on(secure_mosquitto) as operator, agent_running(node_a()):
        await operator.wait_online("node-a")
        # A replay of B's genuine command on A's topic (a compromised broker could do it).
        await operator.send("node-a", encode(operator_key.sign(for_b)))
        final = await operator.final(for_b.command_id)
        await genuine_round_trip(operator, operator_key)
    assert final.status == "failed"
    assert final.error == "refused: command is for node node-b, this is node-a"
    assert final.node_id == "node-a"
    assert not marker.exists()


async def test_without_a_public_key_the_agent_runs_nothing(  # noqa: PLR0917 - fixtures
    node_a, operator_key, secure_mosquitto, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.delenv("MQFLEET_OPERATOR_PUBLIC_KEY_FILE")
    marker = tmp_path / "ran"
    cmd = request("node-a", f"touch {marker}")
    async with operator_on(secure_mosquitto) as operator, agent_running(node_a()):
        await operator.wait_online("node-a")
        await operator.send("node-a", encode(operator_key.sign(cmd)))
        final = await operator.final(cmd.command_id)
    assert final.status == "failed"
    assert final.error == NO_KEY_REFUSAL
    assert not marker.exists()
    assert "every command will be refused" in caplog.text


async def test_the_insecure_switch_runs_unsigned_commands_and_says_so(
    node_a, secure_mosquitto, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.delenv("MQFLEET_OPERATOR_PUBLIC_KEY_FILE")
    marker = tmp_path / "ran"
    cmd = request("node-a", f"touch {marker}")
    settings = node_a(insecure_unsigned_commands=True)
    async with operator_on(secure_mosquitto) as operator, agent_running(settings):
        await operator.wait_online("node-a")
        await operator.send("node-a", encode(cmd))
        assert (await operator.final(cmd.command_id)).status == "success"
    assert marker.exists()
    assert "INSECURE" in caplog.text


async def test_the_allowlist_refuses_commands_that_do_not_match_whole(
    node_a, operator_key, secure_mosquitto, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    settings = node_a(command_allowlist=["uptime", r"df( -h)?", "true"])
    allowed = request("node-a", "df -h")
    sneaky = request("node-a", f"uptime; touch {marker}")  # a prefix match is not enough
    async with operator_on(secure_mosquitto) as operator, agent_running(settings):
        await operator.wait_online("node-a")
        await operator.send("node-a", encode(operator_key.sign(allowed)))
        await operator.send("node-a", encode(operator_key.sign(sneaky)))
        assert (await operator.final(allowed.command_id)).status == "success"
        refused = await operator.final(sneaky.command_id)
    assert refused.status == "failed"
    assert refused.error == NOT_ALLOWED_REFUSAL
    assert not marker.exists()


async def test_a_wrong_token_stops_the_agent_with_authentication_error(
    secure_mosquitto, make_settings
) -> None:
    secure_mosquitto.provision("node-a")
    url = secure_mosquitto.url_for("node-a").replace(secure_mosquitto.tokens["node-a"], "x" * 43)
    settings = make_settings(broker_url=url, node_id="node-a")
    async with asyncio.timeout(DEADLINE_S):
        with pytest.raises(AuthenticationError, match="refused the credentials"):
            await run_agent(settings)
    anonymous = make_settings(broker_url=secure_mosquitto.url, node_id="node-a")
    async with asyncio.timeout(DEADLINE_S):
        with pytest.raises(AuthenticationError, match="refused the credentials"):
            await run_agent(anonymous)
