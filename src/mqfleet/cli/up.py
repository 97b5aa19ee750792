"""``mqfleet up``: a whole local fleet in one command (broker, collector, agent).

The fleet is secure from the first minute, like a production one: the broker refuses
anonymous clients and applies the fleet ACL; ``up`` gives the operator, the collector
and the local node accounts with fresh tokens (accounts added by ``mqfleet provision``
are kept), makes the operator key pair if there is none (``mqfleet keys init``'s
place), and the agent runs only commands signed with it. The operator's side (broker
URL with its token, key, password file) goes to a 0600 config file that the CLI reads
by default, so ``mqfleet nodes`` and ``mqfleet run`` work right away. Children get their
tokens through the environment, never in argv.

The collector and the agent run as child processes in their own sessions, so a Ctrl-C
on the terminal reaches only ``up``, which then stops them in order: the agent first
(it publishes "offline" while the collector still records it), then the collector,
then the broker.
"""

from __future__ import annotations

import os
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
from mqfleet.cli.localfleet import (
    default_operator_key_file,
    local_fleet_dir,
    operator_config_file,
    operator_private_key_file,
    public_key_file_for,
)
from mqfleet.localbroker import LocalBroker, find_mosquitto, free_port
from mqfleet.settings import default_config_file, default_data_dir

if TYPE_CHECKING:
    from pathlib import Path
    from types import FrameType

    from mqfleet.security.config_files import TomlValue
    from mqfleet.settings import Settings

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


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> _Child:
    # Own session: the terminal's SIGINT must not reach the children, so that the
    # shutdown order stays ours. Output goes to our terminal, as logs. Tokens travel in
    # the environment (readable by the same user only), never in argv (readable by all).
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and fixed arguments
        argv, stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **env}
    )
    return _Child(name, proc)


@dataclass(frozen=True)
class _Accounts:
    """What ``up`` made: each component's broker URL (with token) and the keys."""

    operator_url: str
    collector_url: str
    agent_url: str
    private_key_file: Path
    public_key_file: Path
    key_id: str


def _prepare_accounts(settings: Settings, broker: LocalBroker) -> _Accounts:
    """Give operator, collector and the local node fresh tokens; render the ACL; keys."""
    from mqfleet.security import (  # noqa: PLC0415 - lean start-up of the other commands
        COLLECTOR_ACCOUNT,
        OPERATOR_ACCOUNT,
        add_account,
        broker_url_with_credentials,
        generate_token,
        key_id,
        render_acl,
        validate_node_account,
        write_private_file,
    )
    from mqfleet.security.signing import (  # noqa: PLC0415
        load_private_key,
        public_key_of,
        save_key_pair,
        save_public_key,
    )

    node_id = validate_node_account(settings.node_id)
    urls: dict[str, str] = {}
    for account in (OPERATOR_ACCOUNT, COLLECTOR_ACCOUNT, node_id):
        token = generate_token()
        # Replaces only these three: nodes added with `mqfleet provision` keep theirs.
        add_account(broker.password_file, account, token)
        urls[account] = broker_url_with_credentials(broker.url, username=account, password=token)
    write_private_file(broker.acl_file, render_acl(settings.topic_prefix))

    private = operator_private_key_file(settings)
    if private is None:
        private = default_operator_key_file()
        save_key_pair(private, public_key_file_for(private))
        click.echo(f"created the operator key pair {private} (+ .pub)", err=True)
    key = load_private_key(private)
    # The agent's copy of the public key, derived from the key that really signs.
    public = local_fleet_dir() / "operator.pub"
    save_public_key(key.public_key(), public)
    return _Accounts(
        operator_url=urls[OPERATOR_ACCOUNT],
        collector_url=urls[COLLECTOR_ACCOUNT],
        agent_url=urls[node_id],
        private_key_file=private,
        public_key_file=public,
        key_id=key_id(public_key_of(key)),
    )


def _write_operator_config(settings: Settings, broker: LocalBroker, accounts: _Accounts) -> Path:
    from mqfleet.security import write_private_file  # noqa: PLC0415 - lean start-up
    from mqfleet.security.config_files import render_toml  # noqa: PLC0415

    path = operator_config_file()
    values: dict[str, TomlValue] = {
        "broker_url": accounts.operator_url,
        "database_url": settings.database_url,
        "topic_prefix": settings.topic_prefix,
        "operator_private_key_file": accounts.private_key_file.resolve(),
        "operator_public_key_file": accounts.public_key_file.resolve(),
        "broker_password_file": broker.password_file.resolve(),
        "broker_pid_file": broker.pid_file.resolve(),
    }
    header = (
        "Operator settings of the local fleet, written by `mqfleet up` on every start.\n"
        "Holds the operator's broker token: keep it mode 0600, never share or log it."
    )
    write_private_file(path, render_toml(values, header=header))
    return path


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
    # Refuse a broken config before starting anything. Never the operator config of a
    # previous `up`: it is rewritten below.
    settings = state.settings(local_fleet=False)
    find_mosquitto()  # the install hint (exit 3) before anything is written
    if port is None:
        port = PREFERRED_PORT if _port_is_free(PREFERRED_PORT) else free_port()
    broker = LocalBroker(data_dir=default_data_dir() / "broker", port=port)
    broker.data_dir.mkdir(parents=True, exist_ok=True)
    accounts = _prepare_accounts(settings, broker)
    operator_config = _write_operator_config(settings, broker, accounts)
    broker.start()  # BrokerError with the install hint when mosquitto is missing: exit 3
    children: list[_Child] = []
    code: int = ExitCode.OK
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        base = [sys.executable, "-m", "mqfleet", *state.child_flags()]
        collector_env = {"MQFLEET_BROKER_URL": accounts.collector_url}
        children.append(_spawn("collector", [*base, "collector"], collector_env))
        agent_env = {
            "MQFLEET_BROKER_URL": accounts.agent_url,
            "MQFLEET_NODE_ID": settings.node_id,
            "MQFLEET_OPERATOR_PUBLIC_KEY_FILE": str(accounts.public_key_file),
        }
        children.append(_spawn("agent", [*base, "agent"], agent_env))
        _announce(broker, settings, accounts, operator_config, state)
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


def _announce(
    broker: LocalBroker,
    settings: Settings,
    accounts: _Accounts,
    operator_config: Path,
    state: CliState,
) -> None:
    exports = []
    # The CLI reads the operator config by default only when no other config is in use.
    if (
        state.config_file is not None
        or os.environ.get("MQFLEET_CONFIG")
        or default_config_file().is_file()
    ):
        exports.append(f"export MQFLEET_CONFIG='{operator_config}'")
    # The environment beats the config file: a stale broker URL there would win.
    exports += [f"unset {name}" for name in ("MQFLEET_BROKER_URL",) if os.environ.get(name)]
    from mqfleet.store.engine import describe_url  # noqa: PLC0415 - only for this message

    node_id = settings.node_id
    lines = [
        "",
        "mqfleet is up (authentication on, commands signed):",
        f"  broker     {broker.url}  (anonymous clients refused; data in {broker.data_dir})",
        f"  database   {describe_url(settings.database_url)}",
        f"  agent      node {node_id!r}, runs commands signed by key {accounts.key_id}",
        f"  operator   {operator_config}  (broker token and key; the CLI reads it by default)",
        "",
        "In another terminal, try:",
        *(f"  {line}" for line in exports),
        "  mqfleet nodes",
        f"  mqfleet show {node_id}",
        "  mqfleet run --all -- uptime",
        "  mqfleet provision web-2      # a config file for another node",
        "",
        "Press Ctrl-C to stop the broker, the collector and the agent.",
        "",
    ]
    click.echo("\n".join(lines))
