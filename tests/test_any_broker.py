"""mqfleet on a broker that is not mosquitto: nats-server's MQTT 3.1.1 listener.

Agent -> broker -> collector -> database -> CLI, all real processes, with
``--mqtt-version 3.1.1``: correctness lives in the payloads (session, seq, command_id,
expires_at), not in MQTT 5 features. The test starts its own nats-server (JetStream on,
as its MQTT support requires) on free loopback ports with a temporary config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mqfleet.localbroker import free_port

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0
NODE = "nats-1"


def find_nats_server() -> str | None:
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server") if Path(p).exists()),
        None,
    )


def wait_for(condition: Callable[[], Any], what: str, within: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def nats_mqtt(tmp_path: Path) -> Iterator[str]:
    """A private nats-server with an MQTT listener; yields its ``mqtt://`` URL."""
    exe = find_nats_server()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("nats-server is required in CI (apt-get install nats-server)")
        pytest.skip("nats-server not installed")
    mqtt_port, client_port = free_port(), free_port()
    store = tmp_path / "nats-store"
    conf = tmp_path / "nats.conf"
    # MQTT in nats-server needs JetStream (sessions, retained messages, QoS 1) and a
    # server name; everything listens on loopback only.
    conf.write_text(
        f"server_name: mqfleet-test\n"
        f"listen: 127.0.0.1:{client_port}\n"
        f'jetstream {{ store_dir: "{store}" }}\n'
        f'mqtt {{ listen: "127.0.0.1:{mqtt_port}" }}\n'
    )
    log = (tmp_path / "nats.log").open("wb")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: listening(mqtt_port) or proc.poll() is not None, "nats-server")
        assert proc.poll() is None, (tmp_path / "nats.log").read_text()
        yield f"mqtt://127.0.0.1:{mqtt_port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Fleet:
    """Runs ``mqfleet`` processes against one broker and one database."""

    def __init__(self, broker_url: str, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.env = {
            **os.environ,
            "MQFLEET_BROKER_URL": broker_url,
            "MQFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        with (self.tmp_path / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mqfleet", *args],
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # The version comes from the flag here, from MQFLEET_MQTT_VERSION for services.
        return subprocess.run(
            [sys.executable, "-m", "mqfleet", "--mqtt-version", "3.1.1", *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def json(self, *args: str) -> Any:
        done = self.cli(*args, "--json")
        return json.loads(done.stdout) if done.returncode == 0 else None

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def node_status(fleet: Fleet) -> str | None:
    document = fleet.json("nodes")
    found = [n for n in (document or {}).get("nodes", []) if n["node_id"] == NODE]
    return found[0]["status"] if found else None


def test_agent_collector_and_cli_work_on_nats_with_mqtt_311(
    nats_mqtt: str, tmp_path: Path, operator_key: Any
) -> None:
    fleet = Fleet(nats_mqtt, tmp_path)
    v311 = {"MQFLEET_MQTT_VERSION": "3.1.1"}
    try:
        fleet.start("collector", "collector", **v311)
        agent = fleet.start(
            "agent",
            "agent",
            "--node-id",
            NODE,
            "--interval",
            "1s",
            MQFLEET_STATE_DIR=str(tmp_path / "agent-state"),
            **v311,
        )
        wait_for(lambda: node_status(fleet) == "online", "the node online through nats")

        done = fleet.cli("run", "-n", NODE, "--timeout", "20s", "--", "echo through-nats")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "through-nats" in done.stdout

        commands = fleet.json("commands", "--node", NODE)["commands"]
        assert [c["status"] for c in commands] == ["success"]
        wait_for(lambda: len(fleet.json("metrics", NODE)["metrics"]) >= 2, "metrics stored")

        # The Will works too: a killed agent is shown offline, "connection lost".
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        wait_for(lambda: node_status(fleet) == "offline", "the Will of the killed agent")
        node = fleet.json("show", NODE)
        assert "connection lost" in json.dumps(node)
        assert "Traceback" not in fleet.log("collector") + fleet.log("agent")
    finally:
        fleet.stop_all()


def test_collector_says_how_to_talk_to_an_mqtt_311_broker(nats_mqtt: str, tmp_path: Path) -> None:
    fleet = Fleet(nats_mqtt, tmp_path)
    try:
        # MQTT 5 (the default) against a 3.1.1-only broker: one clear line, exit 2.
        proc = fleet.start("collector-v5", "collector")
        assert proc.wait(30) == 2
        assert "does not speak MQTT 5" in fleet.log("collector-v5")
        # Shared subscriptions are MQTT 5: a group on 3.1.1 is refused, not silently deaf.
        proc = fleet.start(
            "collector-group",
            "collector",
            MQFLEET_MQTT_VERSION="3.1.1",
            MQFLEET_COLLECTOR_GROUP="g",
        )
        assert proc.wait(30) == 2
        assert "collector_group needs mqtt_version 5" in fleet.log("collector-group")
    finally:
        fleet.stop_all()
