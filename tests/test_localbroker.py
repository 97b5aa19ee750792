from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import aiomqtt
import pytest

from mqfleet.errors import BrokerError
from mqfleet.localbroker import (
    MOSQUITTO_INSTALL_HINT,
    LocalBroker,
    find_broker_config,
    free_port,
    render_local_config,
)
from mqfleet.transport import MqttClient

REPO_CONFIG = Path(__file__).resolve().parents[1] / "broker" / "mosquitto.conf"


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def test_shipped_config_is_found() -> None:
    assert find_broker_config().read_text() == REPO_CONFIG.read_text()


def test_config_path_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    custom = tmp_path / "custom.conf"
    custom.write_text("listener 1 127.0.0.1\n")
    monkeypatch.setenv("MQFLEET_BROKER_CONF", str(custom))
    assert find_broker_config() == custom


def test_render_rewrites_only_listener_persistence_and_pid(tmp_path: Path) -> None:
    template = REPO_CONFIG.read_text()
    text = render_local_config(template, port=18999, data_dir=tmp_path)
    lines = text.splitlines()
    assert "listener 18999 127.0.0.1" in lines
    assert f"persistence_location {tmp_path}/" in lines
    assert f"pid_file {tmp_path / 'mosquitto.pid'}" in lines
    assert "listener 1883 127.0.0.1" not in lines
    # Every production setting is kept as shipped.
    for setting in (
        "persistence true",
        "set_tcp_nodelay true",
        "max_packet_size 2097152",
        "max_inflight_messages 10000",
    ):
        assert setting in lines
    assert ("user root" in lines) == (os.geteuid() == 0)


def test_render_keeps_authentication_on_with_paths_in_the_data_dir(tmp_path: Path) -> None:
    lines = render_local_config(REPO_CONFIG.read_text(), port=5, data_dir=tmp_path).splitlines()
    assert "allow_anonymous false" in lines
    assert "allow_anonymous true" not in lines
    assert f"password_file {tmp_path / 'passwd'}" in lines
    assert f"acl_file {tmp_path / 'acl'}" in lines
    assert not any("/etc/mosquitto" in line for line in lines if not line.startswith("#"))


def test_render_open_mode_allows_anonymous_and_drops_the_auth_files(tmp_path: Path) -> None:
    text = render_local_config(REPO_CONFIG.read_text(), port=5, data_dir=tmp_path, auth=False)
    lines = text.splitlines()
    assert "allow_anonymous true" in lines
    assert not any(line.startswith(("password_file", "acl_file")) for line in lines)


def test_shipped_config_refuses_anonymous_clients() -> None:
    settings = [line for line in REPO_CONFIG.read_text().splitlines() if line.strip()]
    assert "allow_anonymous false" in settings
    assert "allow_anonymous true" not in settings
    assert "password_file /etc/mosquitto/mqfleet/passwd" in settings
    assert "acl_file /etc/mosquitto/mqfleet/acl" in settings
    assert "per_listener_settings false" in settings  # so it covers every listener


@pytest.mark.integration
def test_default_broker_refuses_anonymous_and_open_mode_accepts(tmp_path: Path) -> None:
    async def connect(broker: LocalBroker) -> None:
        async with MqttClient(
            broker.host, broker.port, identifier="t-anon", protocol=aiomqtt.ProtocolVersion.V5
        ) as client:
            await client.publish("t/x", b"x", qos=1)

    with LocalBroker(data_dir=tmp_path / "secure") as secure:
        # The empty password file and ACL it creates let nobody in and allow nothing.
        assert secure.password_file.stat().st_mode & 0o777 == 0o600
        assert secure.acl_file.read_text() == ""
        with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
            asyncio.run(connect(secure))
    with LocalBroker(data_dir=tmp_path / "open", auth=False) as open_broker:
        asyncio.run(connect(open_broker))
        assert not open_broker.password_file.exists()


def test_render_leaves_comments_alone(tmp_path: Path) -> None:
    text = render_local_config("# listener 1883\nlistener 1 ::1\n", port=5, data_dir=tmp_path)
    assert text.startswith("# listener 1883\nlistener 5 127.0.0.1\n")


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_missing_mosquitto_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mqfleet.localbroker.shutil.which", lambda _name: None)
    monkeypatch.setattr("mqfleet.localbroker.Path.exists", lambda _self: False)
    with pytest.raises(BrokerError) as info:
        LocalBroker(data_dir=tmp_path).start()
    assert str(info.value) == MOSQUITTO_INSTALL_HINT
    assert "apt-get install -y mosquitto" in str(info.value)


@pytest.mark.integration
def test_bad_config_fails_fast_with_exit_code(tmp_path: Path) -> None:
    broker = LocalBroker(data_dir=tmp_path / "b", extra_config="no_such_option yes\n")
    with pytest.raises(BrokerError, match="mosquitto exited with code"):
        broker.start(timeout_s=20)
    broker.stop()
    assert "no_such_option" in broker.log_text()


@pytest.mark.integration
def test_start_stop_restart_keep_port_and_retained_messages(tmp_path: Path) -> None:
    broker = LocalBroker(data_dir=tmp_path / "b", auth=False)
    broker.start()
    try:
        assert broker.pid is not None
        assert accepts(broker.host, broker.port)
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        asyncio.run(publish_retained(broker, b"before restart"))
        first_pid = broker.pid
        broker.start()  # already running: no second process
        assert broker.pid == first_pid
        broker.restart()
        assert broker.pid not in {None, first_pid}
        # Persistence is on: the retained status board survives a clean restart.
        assert asyncio.run(read_retained(broker)) == b"before restart"
    finally:
        broker.stop()
    assert broker.pid is None
    assert not accepts(broker.host, broker.port)
    assert (tmp_path / "b" / "mosquitto.db").exists()
    broker.stop()  # idempotent


@pytest.mark.integration
def test_kill_is_a_crash_and_start_recovers(tmp_path: Path) -> None:
    with LocalBroker(data_dir=tmp_path / "b") as broker:
        broker.kill()
        assert broker.pid is None
        assert not accepts(broker.host, broker.port)
        broker.start()
        assert accepts(broker.host, broker.port)
    assert not accepts(broker.host, broker.port)


@pytest.mark.integration
def test_mosquitto_fixture_uses_project_config(mosquitto: LocalBroker) -> None:
    rendered = mosquitto.config_path.read_text()
    assert f"listener {mosquitto.port} 127.0.0.1" in rendered
    assert "set_tcp_nodelay true" in rendered
    assert mosquitto.port != 1883


async def publish_retained(broker: LocalBroker, payload: bytes) -> None:
    async with MqttClient(broker.host, broker.port, identifier="t-pub") as client:
        await client.publish("t/retained", payload, qos=1, retain=True)


async def read_retained(broker: LocalBroker) -> bytes:
    async with MqttClient(broker.host, broker.port, identifier="t-sub") as client:
        await client.subscribe("t/retained", qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert message.retain
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("no retained message")
