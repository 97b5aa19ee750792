"""The deployment files: compose.yaml, the Dockerfile and the systemd units.

No Docker engine or systemd manager runs here, so the files are checked offline with the
real tools where they can be (`docker-compose config -q`, `systemd-analyze verify`) and
by reading them for the properties a deployment relies on. In CI both tools are
installed by .ci/run, so their absence is a failure there, a skip elsewhere.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
SYSTEMD = ROOT / "deploy" / "systemd"
UNITS = ("mqfleet-agent.service", "mqfleet-collector.service")
DROP_IN = SYSTEMD / "mosquitto.service.d" / "mqfleet-limits.conf"
#: The fleet size a single broker is sized for in docs/SCALING.md, with headroom.
MIN_NOFILE = 10_000


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} not installed")
    return path


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


# -- compose.yaml ------------------------------------------------------------------------
def test_compose_file_is_valid_for_docker_compose(tmp_path: Path) -> None:
    exe = require_tool("docker-compose")
    done = subprocess.run(
        [exe, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "--profile", "tools",
         "config", "-q"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    exe = require_tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQFLEET_", "POSTGRES_"))}
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = subprocess.run(
        [exe, "--env-file", str(empty), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True, text=True, timeout=60, check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    assert "in .env" in done.stderr  # the ${VAR:?set VAR in .env} message names it


def test_compose_secrets_come_only_from_the_env_file() -> None:
    services = compose()["services"]
    secret = re.compile(r"(TOKEN|PASSWORD)", re.IGNORECASE)
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if secret.search(key) or "@" in str(value):
                assert "${" in str(value), f"{name}.{key} must come from .env"
                assert ":?" in str(value), f"{name}.{key} must have no default"
    example = ENV_EXAMPLE.read_text()
    for variable in re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()):
        assert f"\n{variable}=" in example, f"{variable} missing from .env.example"


def test_compose_services_restart_and_report_health() -> None:
    services = compose()["services"]
    one_shot = {"init", "cli"}
    for name, service in services.items():
        if name in one_shot:
            assert service.get("restart") == "no", name
            continue
        assert service.get("restart") == "unless-stopped", name
        assert "test" in service.get("healthcheck", {}), name


def test_compose_broker_is_the_projects_secured_and_sized_mosquitto() -> None:
    broker = compose()["services"]["mosquitto"]
    assert "./broker:/broker:ro" in broker["volumes"]
    assert any(v.startswith("mosquitto-data:") for v in broker["volumes"])
    script = "\n".join(broker["command"])
    assert "-c /mosquitto/auth/mosquitto.conf" in script
    assert "allow_anonymous false" in script
    nofile = broker["ulimits"]["nofile"]
    assert nofile["soft"] >= MIN_NOFILE
    assert nofile["hard"] >= nofile["soft"]
    # Loopback only: remote agents use the TLS listener.
    assert all(p.startswith("127.0.0.1:") for p in broker["ports"])


def test_compose_demo_can_run_a_signed_command() -> None:
    services = compose()["services"]
    init, agent, cli = services["init"], services["agent"], services["cli"]
    assert "mqfleet keys init" in "\n".join(init["command"])
    # The agent trusts the public key the init service published, and waits for it.
    assert agent["depends_on"]["init"]["condition"] == "service_completed_successfully"
    key_file = agent["environment"]["MQFLEET_OPERATOR_PUBLIC_KEY_FILE"]
    assert any(
        v.startswith("operator-pub:") and key_file.startswith(v.split(":")[1])
        for v in agent["volumes"]
    )
    # It can verify but never sign: the private key's volume is not mounted there.
    assert not any(v.startswith("operator-key:") for v in agent["volumes"])
    # The operator's CLI signs with the private key and logs in as "operator".
    assert cli["environment"]["MQFLEET_OPERATOR_PRIVATE_KEY_FILE"].startswith("/etc/mqfleet/key/")
    assert cli["environment"]["MQFLEET_BROKER_URL"].startswith("mqtt://operator:")
    assert "operator-key:/etc/mqfleet/key:ro" in cli["volumes"]


def test_dockerfile_runs_unprivileged_and_prepares_the_key_volumes() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER mqfleet$", text, re.MULTILINE)
    assert "/etc/mqfleet/key" in text
    assert "/etc/mqfleet/pub" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored  # secrets never enter the build context


# -- systemd -----------------------------------------------------------------------------
def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_systemd_units_verify(tmp_path: Path) -> None:
    exe = require_tool("systemd-analyze")
    mqfleet = shutil.which("mqfleet") or str(Path(sys.executable).with_name("mqfleet"))
    assert Path(mqfleet).exists(), "the mqfleet entry point is installed with the package"
    # verify insists that ExecStart exists: point it at this checkout's entry point.
    agent = str(Path(mqfleet).with_name("mqfleet-agent"))
    assert Path(agent).exists(), "the mqfleet-agent entry point is installed with the package"
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text().replace("/usr/local/bin/mqfleet-agent", agent)
        text = text.replace("/usr/local/bin/mqfleet ", mqfleet + " ")
        (tmp_path / unit).write_text(text)
    # The drop-in is verified applied to a mosquitto.service (the packaged one if any).
    packaged = Path("/lib/systemd/system/mosquitto.service")
    stand_in = "[Service]\nExecStart=/bin/true\n"
    mosquitto_unit = tmp_path / "mosquitto.service"
    mosquitto_unit.write_text(packaged.read_text() if packaged.is_file() else stand_in)
    (tmp_path / "mosquitto.service.d").mkdir()
    shutil.copy(DROP_IN, tmp_path / "mosquitto.service.d" / DROP_IN.name)
    done = subprocess.run(
        [exe, "verify", *UNITS, "mosquitto.service"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )  # fmt: skip
    # verify exits 0 even for unknown keys: any message at all is a finding.
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_units_restart_on_failure_and_run_mqfleet() -> None:
    for unit in UNITS:
        service = read_unit(SYSTEMD / unit)["Service"]
        assert service["Restart"] == "on-failure", unit
    # Nodes run the agent's own entry point (no click: less memory, issue 5).
    assert read_unit(SYSTEMD / UNITS[0])["Service"]["ExecStart"] == "/usr/local/bin/mqfleet-agent"
    assert (
        read_unit(SYSTEMD / UNITS[1])["Service"]["ExecStart"] == "/usr/local/bin/mqfleet collector"
    )


def test_agent_unit_leaves_commands_able_to_administer_the_node() -> None:
    service = read_unit(SYSTEMD / "mqfleet-agent.service")["Service"]
    # Each of these would be inherited by every command and break normal admin work
    # (sudo, package installs, editing /etc): the unit says why it does not set them.
    for breaking in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                     "CapabilityBoundingSet", "SystemCallFilter", "MemoryMax"):  # fmt: skip
        assert breaking not in service, breaking
    assert service["KillMode"] == "control-group"
    assert service["StateDirectory"] == "mqfleet/agent"


def test_collector_unit_is_sandboxed() -> None:
    service = read_unit(SYSTEMD / "mqfleet-collector.service")["Service"]
    assert service["DynamicUser"] == "yes"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    # collector --workers N: the supervisor alone gets SIGTERM and stops its workers.
    assert service["KillMode"] == "mixed"


def test_mosquitto_drop_in_raises_the_open_files_limit() -> None:
    limit = int(read_unit(DROP_IN)["Service"]["LimitNOFILE"])
    assert limit >= MIN_NOFILE
