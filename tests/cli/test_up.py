"""``mqfleet up``: the newcomer's one command."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path, PosixPath
from typing import TYPE_CHECKING

import pytest

from mqfleet import localbroker
from mqfleet.localbroker import MOSQUITTO_INSTALL_HINT, free_port

if TYPE_CHECKING:
    from collections.abc import Callable

    from click.testing import Result


def test_missing_mosquitto_prints_the_install_hint(
    invoke: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoMosquitto(PosixPath):
        def exists(self, *, follow_symlinks: bool = True) -> bool:
            if self.name == "mosquitto":
                return False
            return super().exists(follow_symlinks=follow_symlinks)

    monkeypatch.setattr(localbroker.shutil, "which", lambda _name: None)
    monkeypatch.setattr(localbroker, "Path", NoMosquitto)
    result = invoke("up", "--port", str(free_port()))
    assert result.exit_code == 3
    assert result.stderr == f"mqfleet: error: {MOSQUITTO_INSTALL_HINT}\n"


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert proc.poll() is None, f"mqfleet up exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def nodes(invoke: Callable[..., Result]) -> list[dict[str, object]]:
    result = invoke("nodes", "--json")
    if result.exit_code != 0:  # the collector has not created the database yet
        return []
    found: list[dict[str, object]] = json.loads(result.stdout)["nodes"]
    return found


@pytest.mark.integration
def test_up_runs_a_local_fleet_and_ctrl_c_stops_it_in_order(
    tmp_path: Path, invoke: Callable[..., Result], broker_accepts: Callable[..., bool]
) -> None:
    out = tmp_path / "up.out"
    port = free_port()
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mqfleet", "up", "--port", str(port)],
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: b"Press Ctrl-C" in out.read_bytes(), "the banner", proc)
        banner = out.read_text()
        operator_config = tmp_path / "xdg-data" / "mqfleet" / "up" / "operator.toml"
        assert f"operator   {operator_config}" in banner
        assert "authentication on, commands signed" in banner
        assert "export MQFLEET" not in banner  # the CLI finds the operator config itself
        assert "mqfleet run --all -- uptime" in banner
        # The operator's token is in a 0600 file, never on the terminal.
        assert operator_config.stat().st_mode & 0o777 == 0o600
        assert "operator:" not in banner
        # No flag, no token typed: the CLI reads up's operator config.
        wait_for(lambda: [n["status"] for n in nodes(invoke)] == ["online"], "the agent", proc)
        assert not broker_accepts("127.0.0.1", port, None, None)  # anonymous: refused
        ran = invoke("run", "--all", "--json", "--", "echo signed")
        assert ran.exit_code == 0, ran.stderr
        assert [r["stdout"] for r in json.loads(ran.stdout)["results"]] == ["signed\n"]
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"up did not stop within 60 s of Ctrl-C; its output:\n{out.read_text()}")
        assert code == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = out.read_text()
    assert log.index("stopping the agent") < log.index("stopping the collector")
    assert log.index("stopping the collector") < log.index("stopping the broker")
    assert "Traceback" not in log
    # The agent stopped first, so the collector recorded it going offline.
    (node,) = nodes(invoke)
    assert node["status"] == "offline"
