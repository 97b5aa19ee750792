"""``keys init``, ``provision``, ``revoke``, and ``run`` against the secured broker: tokens
stay secret, a revoked node is locked out, a signed run works (also over TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import stat
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mqfleet.agent import run_agent
from mqfleet.errors import AuthenticationError
from mqfleet.localbroker import LocalBroker
from mqfleet.security import OPERATOR_ACCOUNT, PasswordFile, add_account, generate_token
from mqfleet.security.signing import load_public_key
from mqfleet.settings import BrokerAddress, load_settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- keys init -----------------------------------------------------------------------
def test_keys_init_makes_a_private_0600_key_and_prints_the_public_path(invoke, tmp_path) -> None:
    result = invoke("keys", "init")
    assert result.exit_code == 0, result.stderr
    public = Path(result.stdout.strip())
    private = public.with_suffix(".key")
    assert private == tmp_path / "xdg-config" / "mqfleet" / "operator.key"
    assert mode(private) == 0o600
    assert "PRIVATE KEY" not in public.read_text()
    load_public_key(public)  # agents can load it
    # A second init would orphan every agent configured with the first key.
    again = invoke("keys", "init")
    assert again.exit_code == 2
    assert "already exists" in again.stderr
    assert invoke("keys", "init", "--force").exit_code == 0


def test_keys_init_json_names_the_files_not_the_key(invoke, tmp_path) -> None:
    path = tmp_path / "k" / "op.key"
    result = invoke("keys", "init", "--private-key", str(path), "--json")
    document = json.loads(result.stdout)
    assert document["private_key_file"] == str(path)
    assert document["public_key_file"] == str(path.with_suffix(".pub"))
    assert len(document["key_id"]) == 16
    assert "PRIVATE" not in result.stdout


# -- provision / revoke (files only) -------------------------------------------------
@pytest.fixture
def broker_files(tmp_path, monkeypatch) -> Path:
    """Point provision/revoke at a password file in tmp_path (no broker running)."""
    passwd = tmp_path / "broker" / "passwd"
    monkeypatch.setenv("MQFLEET_BROKER_PASSWORD_FILE", str(passwd))
    monkeypatch.setenv("MQFLEET_BROKER_PID_FILE", str(tmp_path / "broker" / "none.pid"))
    monkeypatch.setenv("MQFLEET_BROKER_URL", "mqtts://broker.example.com:8883")
    return passwd


def test_provision_writes_a_0600_agent_config_and_never_shows_the_token(
    invoke, broker_files: Path, operator_key, tmp_path: Path
) -> None:
    out = tmp_path / "agents" / "web-1.toml"
    result = invoke("provision", "web-1", "--write-config", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    assert mode(out) == 0o600
    values = tomllib.loads(out.read_text())  # the file itself: MQFLEET_* would win over it
    broker = BrokerAddress.parse(values["broker_url"])
    token = broker.password
    assert values["node_id"] == "web-1"
    assert str(broker) == "mqtts://web-1@broker.example.com:8883"
    assert values["operator_public_key_file"] == str(operator_key.public_file.resolve())
    assert token is not None
    assert PasswordFile.read(broker_files).check("web-1", token)
    assert mode(broker_files) == 0o600
    # The token is in the 0600 file only: not in the JSON, not in the messages.
    assert token not in result.stdout
    assert token not in result.stderr
    document = json.loads(result.stdout)
    assert document["config_file"] == str(out)
    assert document["broker_reloaded"] is False
    assert "reload it by hand" in result.stderr


def test_provision_print_shows_the_config_on_stdout_only_when_asked(
    invoke, broker_files: Path, operator_key
) -> None:
    result = invoke("provision", "web-2", "--print")
    assert result.exit_code == 0, result.stderr
    assert 'node_id = "web-2"' in result.stdout
    token = PasswordFile.read(broker_files)
    assert token.hash_of("web-2") is not None
    both = invoke("provision", "web-3", "--print", "--json")
    assert both.exit_code == 2
    assert "never shows the token" in both.stderr


def test_provision_refuses_reserved_names_and_existing_accounts(
    invoke, broker_files: Path, operator_key, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("operator", "Collector", "root", "bad/name"):
        result = invoke("provision", name)
        assert result.exit_code == 2, name
        assert result.stderr.count("\n") == 1
    assert invoke("provision", "web-1").exit_code == 0
    assert (tmp_path / "web-1.toml").exists()  # the default place
    first = PasswordFile.read(broker_files).hash_of("web-1")
    again = invoke("provision", "web-1", "--write-config", "other.toml")
    assert again.exit_code == 2
    assert "--force" in again.stderr
    assert PasswordFile.read(broker_files).hash_of("web-1") == first  # untouched
    assert invoke("provision", "web-1", "--force").exit_code == 0
    assert PasswordFile.read(broker_files).hash_of("web-1") != first


def test_revoke_removes_the_account_and_refuses_unknown_nodes(
    invoke, broker_files: Path, operator_key, tmp_path: Path
) -> None:
    invoke("provision", "web-1", "--write-config", str(tmp_path / "w.toml"))
    result = invoke("revoke", "web-1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["node_id"] == "web-1"
    assert "web-1" not in PasswordFile.read(broker_files)
    unknown = invoke("revoke", "web-1")
    assert unknown.exit_code == 2
    assert unknown.stderr.startswith("mqfleet: error: node web-1 has no account")


# -- against a real, secured broker ---------------------------------------------------
@contextlib.asynccontextmanager
async def agent_task(settings) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(run_agent(settings))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, AuthenticationError):
            await task


async def wait_until(condition, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls the CLI and the database
            await asyncio.sleep(0.1)


@pytest.fixture
def fleet_db(invoke, sqlite_url: str, seed) -> str:
    assert invoke("--database", sqlite_url, "db", "upgrade").exit_code == 0
    seed(sqlite_url, "node-a")
    return sqlite_url


@pytest.mark.integration
async def test_provisioned_node_works_and_revoke_locks_it_out(
    invoke, secure_mosquitto, operator_key, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("MQFLEET_BROKER_PASSWORD_FILE", str(secure_mosquitto.broker.password_file))
    monkeypatch.setenv("MQFLEET_BROKER_PID_FILE", str(secure_mosquitto.broker.pid_file))
    monkeypatch.setenv("MQFLEET_BROKER_URL", secure_mosquitto.url_for(OPERATOR_ACCOUNT))
    config = tmp_path / "node-c.toml"
    result = await asyncio.to_thread(invoke, "provision", "node-c", "--write-config", str(config))
    assert result.exit_code == 0, result.stderr
    assert "broker reloaded" in result.stderr
    monkeypatch.delenv("MQFLEET_BROKER_URL")  # the agent's own config file decides
    agent = load_settings(config_file=config, state_dir=tmp_path / "state", keepalive_s=2)
    assert agent.broker.username == "node-c"
    async with agent_task(agent) as task:
        log = secure_mosquitto.broker.log_text
        await wait_until(lambda: "mqfleet-agent-node-c" in log() and not task.done())
        revoked = await asyncio.to_thread(invoke, "revoke", "node-c")
        assert revoked.exit_code == 0, revoked.stderr
        # The broker closes the live connection; the reconnect is refused; the agent stops.
        async with asyncio.timeout(20):
            with pytest.raises(AuthenticationError):
                await task


@pytest.mark.integration
@pytest.mark.parametrize("account", ["wrong-token", "anonymous"])
def test_run_with_bad_credentials_is_one_line_and_exit_3(
    invoke, secure_mosquitto, operator_key, fleet_db: str, account: str
) -> None:
    url = (
        secure_mosquitto.url
        if account == "anonymous"
        else f"mqtt://operator:{generate_token()}@127.0.0.1:{secure_mosquitto.port}"
    )
    result = invoke("--database", fleet_db, "--broker", url, "run", "-n", "node-a", "--", "true")
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("mqfleet: error: broker mqtt://")
    assert "refused the credentials" in result.stderr
    assert "Traceback" not in result.stderr
    if account == "wrong-token":
        assert url.split(":")[2].split("@")[0] not in result.stderr  # never the token


def test_run_refuses_to_send_unsigned_commands(invoke, sqlite_url: str) -> None:
    result = invoke("--database", sqlite_url, "run", "-n", "node-a", "--", "true")
    assert result.exit_code == 2
    assert result.stderr.startswith("mqfleet: error: no operator private key")
    assert "mqfleet keys init" in result.stderr


@pytest.mark.integration
async def test_a_signed_run_through_a_real_agent_succeeds(
    invoke, secure_mosquitto, operator_key, fleet_db: str, make_settings
) -> None:
    secure_mosquitto.provision("node-a")
    settings = make_settings(broker_url=secure_mosquitto.url_for("node-a"), node_id="node-a")
    operator = secure_mosquitto.url_for(OPERATOR_ACCOUNT)
    args = ["--database", fleet_db, "--broker", operator, "run", "-n", "node-a"]
    async with agent_task(settings):
        await wait_until(lambda: "mqfleet-agent-node-a" in secure_mosquitto.broker.log_text())
        result = await asyncio.to_thread(invoke, *args, "--json", "--", "echo signed")
    assert result.exit_code == 0, result.stderr
    (target,) = json.loads(result.stdout)["results"]
    assert target["stdout"] == "signed\n"


# -- TLS -------------------------------------------------------------------------------
@pytest.fixture
def tls_broker(
    tmp_path: Path, tls_listener
) -> AsyncIterator[tuple[LocalBroker, int, Path, dict[str, str]]]:
    """The shipped config + the shipped TLS listener example, certificates by make-certs.sh."""
    broker = LocalBroker(
        data_dir=tmp_path / "tls-mosquitto", extra_config=tls_listener.extra_config
    )
    broker.data_dir.mkdir(parents=True)
    from mqfleet.security import render_acl  # noqa: PLC0415

    broker.acl_file.write_text(render_acl())
    tokens = {name: generate_token() for name in (OPERATOR_ACCOUNT, "node-a")}
    for name, token in tokens.items():
        add_account(broker.password_file, name, token)
    broker.start()
    try:
        yield broker, tls_listener.port, tls_listener.ca_file, tokens
    finally:
        broker.stop()


@pytest.mark.integration
# paho does not close the socket when the TLS handshake fails (the CLI exits right after):
# collected below, inside the test, so the ResourceWarning cannot leak into later tests.
@pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")
async def test_agent_and_run_over_tls_with_the_ca_and_not_without(
    invoke, tls_broker, operator_key, fleet_db: str, make_settings
) -> None:
    broker, port, ca, tokens = tls_broker
    agent = make_settings(
        broker_url=f"mqtts://node-a:{tokens['node-a']}@localhost:{port}",
        ca_file=ca,
        node_id="node-a",
    )
    operator = f"mqtts://operator:{tokens[OPERATOR_ACCOUNT]}@localhost:{port}"
    args = ["--database", fleet_db, "--broker", operator]
    async with agent_task(agent):
        await wait_until(lambda: "mqfleet-agent-node-a" in broker.log_text())
        with_ca = await asyncio.to_thread(
            invoke, *args, "run", "-n", "node-a", "--json", "--", "echo over tls",
            env={"MQFLEET_CA_FILE": str(ca)},
        )  # fmt: skip
        without = await asyncio.to_thread(invoke, *args, "run", "-n", "node-a", "--", "true")
        gc.collect()
    assert with_ca.exit_code == 0, with_ca.stderr
    assert json.loads(with_ca.stdout)["results"][0]["stdout"] == "over tls\n"
    assert without.exit_code == 3
    assert without.stderr.count("\n") == 1
    assert "certificate verify failed" in without.stderr
