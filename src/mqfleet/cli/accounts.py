"""``mqfleet keys init``, ``mqfleet provision NODE`` and ``mqfleet revoke NODE``.

``mqfleet.security`` (and so ``cryptography``) is imported inside the commands, to keep
the start-up of every other command lean.

Tokens and private keys never reach stdout in ``--json`` output, logs or argv: a token
leaves this process only inside the agent config file (mode 0600) or, when the operator
asks for it with ``provision --print``, as that config on stdout.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mqfleet.cli import render
from mqfleet.cli.app import CliState, pass_state
from mqfleet.cli.exitcodes import ExitCode
from mqfleet.cli.localfleet import (
    default_operator_key_file,
    operator_private_key_file,
    public_key_file_for,
)
from mqfleet.errors import ConfigError
from mqfleet.protocol import DEFAULT_PREFIX

if TYPE_CHECKING:
    from mqfleet.settings import Settings

__all__ = ["keys", "provision", "revoke"]


def _emit_json(document: object) -> None:
    click.echo(render.dumps(document))


def _node_account(node_id: str) -> str:
    from mqfleet.security import validate_node_account  # noqa: PLC0415 - lean start-up

    try:
        return validate_node_account(node_id)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="'NODE'") from None


def _reload_hint(settings: Settings) -> str:
    return (
        f"could not signal the broker (pid file {settings.broker_pid_file}); reload it by "
        "hand for the change to take effect: systemctl reload mosquitto "
        "(or kill -HUP <mosquitto pid>)"
    )


# -- keys ----------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def keys() -> None:
    """Manage the operator's Ed25519 key pair that signs every command."""


@keys.command("init")
@click.option(
    "--private-key",
    "private_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the private key (default: the user config dir's operator.key).",
)
@click.option("--force", is_flag=True, help="Replace an existing key pair (update the agents).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (see docs/CLI.md).")
@pass_state
def keys_init(state: CliState, private_path: Path | None, *, force: bool, as_json: bool) -> int:
    """Create the operator key pair: private key (0600) here, public key for the agents."""
    from mqfleet.security.signing import key_id, save_key_pair  # noqa: PLC0415 - lean start-up

    if private_path is None:
        settings = state.settings()
        private_path = settings.operator_private_key_file or default_operator_key_file()
    public_path = public_key_file_for(private_path)
    public_key = save_key_pair(private_path, public_path, overwrite=force)
    kid = key_id(public_key)
    if as_json:
        _emit_json(
            {
                "key_id": kid,
                "private_key_file": str(private_path),
                "public_key_file": str(public_path),
            }
        )
        return ExitCode.OK
    click.echo(f"operator key {kid}", err=True)
    click.echo(f"  private key {private_path} (mode 0600: keep it on this machine only)", err=True)
    click.echo(
        "  copy the public key to every node and set operator_public_key_file to it:", err=True
    )
    click.echo(str(public_path))
    return ExitCode.OK


# -- provision -----------------------------------------------------------------------
def _agent_public_key(settings: Settings, given: Path | None) -> Path | None:
    if given is not None:
        return given
    if settings.operator_public_key_file is not None:
        return settings.operator_public_key_file
    private = operator_private_key_file(settings)
    if private is not None and public_key_file_for(private).is_file():
        return public_key_file_for(private)
    return None


def _config_target(
    settings: Settings, node_id: str, config_out: Path | None, *, print_config: bool, force: bool
) -> Path | None:
    """Check that provisioning may go ahead; return where the agent config goes."""
    from mqfleet.security import PasswordFile  # noqa: PLC0415 - lean start-up

    password_file = settings.broker_password_file
    if node_id in PasswordFile.read(password_file) and not force:
        raise ConfigError(
            f"node {node_id} already has an account in {password_file}; "
            "--force replaces its token (its agent needs the new config)"
        )
    if config_out is None and not print_config:
        config_out = Path(f"{node_id}.toml")
    if config_out is not None and config_out.exists() and not force:
        raise ConfigError(f"{config_out} already exists; --force replaces it")
    return config_out


def _create_account(
    settings: Settings, node_id: str, token: str, text: str, config_out: Path | None
) -> bool:
    """Write the config, add the account, reload the broker; return whether it reloaded."""
    from mqfleet.security import add_account, reload_broker, write_private_file  # noqa: PLC0415

    # The config first: if the account cannot be added, remove it again, so there is
    # never an account whose token nobody has, nor a config whose token the broker lacks.
    if config_out is not None:
        write_private_file(config_out, text)
    try:
        add_account(settings.broker_password_file, node_id, token)
    except ConfigError:
        if config_out is not None:
            with contextlib.suppress(OSError):
                config_out.unlink()
        raise
    return reload_broker(settings.broker_pid_file)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("node_id", metavar="NODE")
@click.option(
    "--write-config",
    "config_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the agent's config file here, mode 0600 (default: ./NODE.toml).",
)
@click.option("--print", "print_config", is_flag=True, help="Print the agent's config instead.")
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator public key path for the agent (default: the operator's .pub file).",
)
@click.option("--force", is_flag=True, help="Replace the token of an existing account.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (never the token).")
@pass_state
def provision(
    state: CliState,
    node_id: str,
    config_out: Path | None,
    public_key: Path | None,
    *,
    print_config: bool,
    force: bool,
    as_json: bool,
) -> int:
    """Create NODE's broker account (a new token) and its agent config file.

    Adds the account to the broker's password file (broker_password_file), reloads the
    broker (SIGHUP via broker_pid_file) and writes the agent's config (0600), which holds
    the token. Copy it to the node and run: mqfleet --config FILE agent.
    """
    from mqfleet.security import generate_token, render_agent_config  # noqa: PLC0415

    node_id = _node_account(node_id)
    if print_config and config_out is not None:
        raise click.UsageError("choose one of --write-config and --print")
    if print_config and as_json:
        raise click.UsageError("--json never shows the token: use --write-config with --json")
    settings = state.settings()
    config_out = _config_target(
        settings, node_id, config_out, print_config=print_config, force=force
    )
    token = generate_token()
    agent_key = _agent_public_key(settings, public_key)
    text = render_agent_config(
        node_id=node_id,
        broker_url=settings.broker_url,
        token=token,
        operator_public_key_file=agent_key,
        topic_prefix=settings.topic_prefix if settings.topic_prefix != DEFAULT_PREFIX else None,
        ca_file=settings.ca_file,
    )
    reloaded = _create_account(settings, node_id, token, text, config_out)

    if as_json:
        _emit_json(
            {
                "node_id": node_id,
                "password_file": str(settings.broker_password_file),
                "broker_reloaded": reloaded,
                "config_file": str(config_out) if config_out is not None else None,
                "operator_public_key_file": str(agent_key) if agent_key is not None else None,
            }
        )
    else:
        click.echo(f"node {node_id}: account added to {settings.broker_password_file}", err=True)
        if reloaded:
            click.echo("broker reloaded: the account works now", err=True)
        if config_out is None:
            click.echo(text, nl=False)  # --print: the operator asked for the token
        else:
            click.echo(
                f"agent config written to {config_out} (mode 0600, holds the token); on the "
                f"node run: mqfleet --config {config_out.name} agent",
                err=True,
            )
    if not reloaded:
        click.echo(f"mqfleet: warning: {_reload_hint(settings)}", err=True)
    if agent_key is None:
        click.echo(
            "mqfleet: warning: no operator public key found ('mqfleet keys init' makes one): "
            "the agent will refuse every command until operator_public_key_file is set",
            err=True,
        )
    return ExitCode.OK


# -- revoke --------------------------------------------------------------------------
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("node_id", metavar="NODE")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (see docs/CLI.md).")
@pass_state
def revoke(state: CliState, node_id: str, *, as_json: bool) -> int:
    """Remove NODE's broker account and reload the broker: the node is locked out at once."""
    from mqfleet.security import reload_broker, remove_account  # noqa: PLC0415 - lean start-up

    node_id = _node_account(node_id)
    settings = state.settings()
    password_file = settings.broker_password_file
    if not remove_account(password_file, node_id):
        raise ConfigError(f"node {node_id} has no account in {password_file}")
    reloaded = reload_broker(settings.broker_pid_file)
    if as_json:
        _emit_json(
            {"node_id": node_id, "password_file": str(password_file), "broker_reloaded": reloaded}
        )
    else:
        click.echo(f"node {node_id}: account removed from {password_file}", err=True)
        if reloaded:
            click.echo("broker reloaded: the node's connection is closed", err=True)
    if not reloaded:
        click.echo(f"mqfleet: warning: {_reload_hint(settings)}", err=True)
    return ExitCode.OK
