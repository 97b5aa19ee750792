"""``mqfleet up``: a whole local fleet in one command (broker, collector, agent).

The collector and the agent run as child processes in their own sessions, so a Ctrl-C
on the terminal reaches only ``up``, which then stops them in order: the agent first
(it publishes "offline" while the collector still records it), then the collector,
then the broker.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import click

from mqfleet.cli.app import CliState, pass_state
from mqfleet.cli.exitcodes import ExitCode
from mqfleet.localbroker import LocalBroker, free_port
from mqfleet.settings import DEFAULT_BROKER_URL, default_data_dir

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["PREFERRED_PORT", "up"]

#: The standard MQTT port, used when free so the defaults need no flag at all.
PREFERRED_PORT: Final = 1883
#: How long each child gets to stop after SIGTERM before it is killed.
_STOP_TIMEOUT_S: Final = 15.0
_POLL_S: Final = 0.2


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        click.echo(f"stopping the {self.name} (pid {self.proc.pid})", err=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            click.echo(f"mqfleet: the {self.name} did not stop in time: killing it", err=True)
            self.proc.kill()
            self.proc.wait()


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _spawn(name: str, argv: list[str]) -> _Child:
    # Own session: the terminal's SIGINT must not reach the children, so that the
    # shutdown order stays ours. Output goes to our terminal, as logs.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)  # noqa: S603 - our own interpreter and fixed arguments
    return _Child(name, proc)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help=f"Broker port on 127.0.0.1 (default {PREFERRED_PORT} if free, else any free one).",
)
@pass_state
def up(state: CliState, port: int | None) -> int:
    """Start a local fleet: a private mosquitto, the collector and an agent for this machine.

    Ctrl-C stops all three cleanly.
    """
    settings = state.settings()  # refuse a broken config before starting anything
    if port is None:
        port = PREFERRED_PORT if _port_is_free(PREFERRED_PORT) else free_port()
    broker = LocalBroker(data_dir=default_data_dir() / "broker", port=port)
    broker.start()  # BrokerError with the install hint when mosquitto is missing: exit 3
    children: list[_Child] = []
    code: int = ExitCode.OK
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        base = [sys.executable, "-m", "mqfleet", "--broker", broker.url, *state.child_flags()]
        children.append(_spawn("collector", [*base, "collector"]))
        children.append(_spawn("agent", [*base, "agent"]))
        _announce(broker, settings.database_url, settings.node_id, state)
        code = _watch(children)
    except KeyboardInterrupt:
        click.echo("\nstopping the local fleet", err=True)
    finally:
        # A second Ctrl-C must not cut the shutdown short: each step is bounded anyway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for child in reversed(children):  # agent, then collector
                child.stop()
            click.echo("stopping the broker", err=True)
            broker.stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    return code


def _watch(children: list[_Child]) -> int:
    while True:
        for child in children:
            rc = child.proc.poll()
            if rc is not None:
                click.echo(
                    f"mqfleet: error: the {child.name} exited with code {rc} "
                    "(see its messages above); stopping the rest",
                    err=True,
                )
                return rc if rc in {ExitCode.USAGE, ExitCode.UNREACHABLE} else ExitCode.FAILED
        time.sleep(_POLL_S)


def _announce(broker: LocalBroker, database_url: str, node_id: str, state: CliState) -> None:
    exports = []
    if broker.url != DEFAULT_BROKER_URL:
        exports.append(f"export MQFLEET_BROKER_URL={broker.url}")
    if state.database_url is not None:
        exports.append(f"export MQFLEET_DATABASE_URL='{state.database_url}'")
    if state.config_file is not None:
        exports.append(f"export MQFLEET_CONFIG='{state.config_file}'")
    from mqfleet.store.engine import describe_url  # noqa: PLC0415 - only for this message

    lines = [
        "",
        "mqfleet is up:",
        f"  broker     {broker.url}  (data in {broker.data_dir})",
        f"  database   {describe_url(database_url)}",
        f"  agent      node {node_id!r}",
        "",
        "In another terminal, try:",
        *(f"  {line}" for line in exports),
        "  mqfleet nodes",
        f"  mqfleet show {node_id}",
        "  mqfleet run --all -- uptime",
        "",
        "Press Ctrl-C to stop the broker, the collector and the agent.",
        "",
    ]
    click.echo("\n".join(lines))
