"""``mqfleet agent`` / ``collector``: lean imports, and signals make a clean stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from mqfleet.localbroker import LocalBroker

HEAVY = ("sqlalchemy", "sqlmodel", "alembic")


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_help_and_agent_never_import_the_database_layer() -> None:
    done = python(f"""
        import sys
        import mqfleet.cli.app as app
        seen = {{}}
        def fake_serve(entry, settings):
            seen["entry"] = entry.__module__
            seen["heavy"] = [m for m in {HEAVY!r} if m in sys.modules]
        app.serve = fake_serve
        try:
            app.cli.main(["--help"])
        except SystemExit:
            pass
        assert not [m for m in {HEAVY!r} if m in sys.modules], "--help"
        try:
            app.cli.main(["agent", "--node-id", "lean-1"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        assert seen["entry"].startswith("mqfleet.agent"), seen
        assert seen["heavy"] == [], seen
        print("ok")
    """)
    assert done.stdout.strip().endswith("ok"), done.stderr


def test_run_help_does_not_import_mqtt_or_the_database() -> None:
    done = python(f"""
        import sys
        from mqfleet.cli import cli
        try:
            cli.main(["run", "--help"])
        except SystemExit:
            pass
        print([m for m in {(*HEAVY, "aiomqtt", "paho")!r} if m in sys.modules])
    """)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr


@pytest.mark.integration
def test_agent_process_stops_cleanly_on_sigterm(mosquitto: LocalBroker, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqfleet", "--broker", mosquitto.url, "agent",
         "--node-id", "sig-1", "--interval", "1s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "sig-1" not in mosquitto.log_text() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
