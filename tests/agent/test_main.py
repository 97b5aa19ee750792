"""``mqfleet-agent``: the agent's own entry point, its flags and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from mqfleet import __version__
from mqfleet.agent import __main__ as entry

if TYPE_CHECKING:
    from pathlib import Path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        entry.main(list(argv))
    out, err = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 1), out, err


def test_help_lists_the_flags_of_mqfleet_agent(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for flag in ("--config", "--broker", "--prefix", "--mqtt-version", "--node-id", "--interval"):
        assert flag in out
    assert "MQFLEET_*" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert (code, out.strip()) == (0, f"mqfleet-agent, version {__version__}")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--interval", "0s"], "invalid duration '0s': must be more than zero"),
        (["--interval", "soon"], "invalid duration 'soon'"),
        (["--mqtt-version", "4"], "argument --mqtt-version: invalid choice: '4'"),
        (["extra"], "unrecognized arguments: extra"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith("mqfleet-agent: error: ")
    assert message in err


BAD_SETTINGS = {
    "broker": (["--broker", "http://x"], {}),
    "node": (["--node-id", "a/b"], {}),
    "config file not found": ([], {"MQFLEET_CONFIG": "/nonexistent/agent.toml"}),
}


@pytest.mark.parametrize("message", list(BAD_SETTINGS))
def test_bad_settings_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    message: str,
) -> None:
    argv, env = BAD_SETTINGS[message]
    monkeypatch.setenv("MQFLEET_STATE_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith("mqfleet-agent: error: ")
    assert message in err


def test_an_unexpected_error_is_one_line_unless_verbose(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(entry, "serve", broken)
    monkeypatch.setenv("MQFLEET_STATE_DIR", str(tmp_path))
    code, _, err = run(capsys, "--node-id", "n1")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "mqfleet-agent: error: unexpected RuntimeError: boom (run with -v for the traceback)"
    )
    code, _, err = run(capsys, "--node-id", "n1", "-v")
    assert code == 1
    assert "Traceback" in err


def test_python_dash_m_is_the_same_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mqfleet.agent", "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mqfleet-agent, version {__version__}"
