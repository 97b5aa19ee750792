"""Process plumbing shared by ``mqfleet`` and ``mqfleet-agent``: signals, errors, durations."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from mqfleet.errors import (
    AgentStateError,
    BrokerError,
    ConfigError,
    MqfleetError,
    StoreError,
    UnknownNodeError,
)
from mqfleet.runtime import ExitCode, exit_code_for, one_line, parse_duration, serve

if TYPE_CHECKING:
    from mqfleet.settings import Settings


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_cancels_the_service_which_then_returns(
    signum: signal.Signals, make_settings
) -> None:
    events: list[str] = []

    async def entry(settings: Settings) -> None:
        events.append("started")
        os.kill(os.getpid(), signum)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("cancelled: publishing offline")
            raise

    serve(entry, make_settings())
    assert events == ["started", "cancelled: publishing offline"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_service_error_propagates(make_settings) -> None:
    async def entry(settings: Settings) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        serve(entry, make_settings())


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("10m", 600), ("1h", 3600), ("7d", 604800), ("45", 45)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1x", "h", "-5m", "0s", "1h30m", "99999d"])
def test_parse_duration_refuses_with_a_hint(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("x"), ExitCode.USAGE),
        (UnknownNodeError(["a"]), ExitCode.USAGE),
        (BrokerError("x"), ExitCode.UNREACHABLE),
        (StoreError("x"), ExitCode.UNREACHABLE),
        (AgentStateError("x"), ExitCode.FAILED),
        (MqfleetError("x"), ExitCode.FAILED),
    ],
)
def test_exit_codes_of_the_error_tree(error: MqfleetError, code: ExitCode) -> None:
    assert exit_code_for(error) == code


def test_one_line_joins_the_lines_of_a_message() -> None:
    assert one_line("  first\n\n  second  \n") == "first; second"
