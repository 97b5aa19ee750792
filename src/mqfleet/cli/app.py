"""The ``mqfleet`` click group: global options, error mapping and the read commands.

Start-up stays lean: the database drivers, aiomqtt and the agent/collector are imported
inside the commands that need them, and the commands defined in other modules (``run``,
``up``, ``keys``, ...) are imported only when one of them is invoked or ``--help`` lists
them (:data:`LAZY_COMMANDS`), so ``mqfleet --help`` and ``mqfleet agent`` never load the
database layer, and ``mqfleet nodes`` never loads the broker tooling of ``up``. The read
commands (and ``run``'s target lookup) use ``store.queries`` on ``sqlite3``/psycopg, never
SQLAlchemy; only ``mqfleet db upgrade`` and the collector load it.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click

from mqfleet import __version__
from mqfleet.cli import render
from mqfleet.cli.durations import DURATION
from mqfleet.cli.localfleet import fallback_config_file
from mqfleet.errors import ConfigError, MqfleetError, StoreError
from mqfleet.protocol import utc_now, validate_node_id
from mqfleet.runtime import (
    ExitCode,
    configure_logging,
    one_line,
    report_failure,
    safe_streams,
    serve,
)
from mqfleet.settings import load_settings

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from mqfleet.settings import Settings
    from mqfleet.store.reader import StoreReader

__all__ = ["LAZY_COMMANDS", "CliState", "cli", "main", "open_store"]

#: Commands that log nothing: sqlite3 never logs, psycopg only when something is already
#: wrong. They configure logging only with -v, as ``import logging`` (and traceback with
#: it) would cost each of them ~5 ms of start-up (issue 5).
_QUIET_COMMANDS: Final = frozenset({"nodes", "show", "metrics", "commands", "result"})
_NODE_STATUSES: Final = ("online", "offline", "error")
_COMMAND_STATUSES: Final = ("pending", "running", "success", "failed", "timeout")
#: Window of the sample count shown by ``mqfleet show``.
_SHOW_WINDOW: Final = timedelta(hours=24)
_PG_CONNECT_TIMEOUT_S: Final = 5
#: Commands defined in their own modules, by name: each module is imported only when its
#: command runs (or ``--help`` lists it), so a read command never pays for ``up``'s
#: broker tooling or ``run``'s MQTT client. The modules import this one, not the reverse.
LAZY_COMMANDS: Final[Mapping[str, str]] = {
    "keys": "mqfleet.cli.accounts",
    "provision": "mqfleet.cli.accounts",
    "revoke": "mqfleet.cli.accounts",
    "run": "mqfleet.cli.run",
    "simulate": "mqfleet.cli.simulate",
    "up": "mqfleet.cli.up",
}

# Whether -v was given, read by the error handler after the click context is gone.
_verbose = False


@dataclass
class CliState:
    """The global options, shared by every command through ``click.pass_obj``."""

    config_file: Path | None = None
    broker_url: str | None = None
    database_url: str | None = None
    topic_prefix: str | None = None
    verbose: bool = False
    mqtt_version: str | None = None
    _cache: dict[str, Settings] = field(default_factory=dict, repr=False)

    def settings(self, *, local_fleet: bool = True, **flags: Any) -> Settings:  # noqa: ANN401 - Settings field values
        """Load settings: the global flags plus ``flags`` over env, config file and defaults.

        With ``local_fleet`` (operator commands) and no other config file in use, the
        operator config written by ``mqfleet up`` is read; services never read it.
        """
        config_file = self.config_file
        if config_file is None and local_fleet:
            config_file = fallback_config_file()
        return load_settings(
            config_file,
            broker_url=self.broker_url,
            database_url=self.database_url,
            topic_prefix=self.topic_prefix,
            mqtt_version=self.mqtt_version,
            **flags,
        )

    def child_flags(self) -> list[str]:
        """List the global flags to hand to a child ``mqfleet`` process (``up``)."""
        args: list[str] = []
        if self.config_file is not None:
            args += ["--config", str(self.config_file)]
        if self.database_url is not None:
            args += ["--database", self.database_url]
        if self.topic_prefix is not None:
            args += ["--prefix", self.topic_prefix]
        if self.mqtt_version is not None:
            args += ["--mqtt-version", self.mqtt_version]
        if self.verbose:
            args.append("--verbose")
        return args


def _fail(message: str, code: int) -> int:
    click.echo(f"mqfleet: error: {one_line(message)}", err=True)
    return code


class MqfleetGroup(click.Group):
    """A click group whose errors are one line on stderr with the documented exit code.

    It also holds the :data:`LAZY_COMMANDS`, imported on first use.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Name every command, the lazy ones included, in alphabetical order."""
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Return the command called ``cmd_name``, importing its module if it is lazy."""
        command = super().get_command(ctx, cmd_name)
        module = LAZY_COMMANDS.get(cmd_name)
        if command is None and module is not None:
            command = getattr(importlib.import_module(module), cmd_name)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module}.{cmd_name} is not a click command")
            self.add_command(command, cmd_name)
        return command

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,  # noqa: FBT001, FBT002 - click's signature
        **extra: Any,  # noqa: ANN401 - forwarded to click
    ) -> Any:  # noqa: ANN401 - click's signature
        """Run the CLI; exit with the documented code and never print a traceback."""
        global _verbose  # noqa: PLW0603 - the one piece of state outliving the context
        _verbose = False
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        safe_streams()
        try:
            rv = super().main(args, prog_name or "mqfleet", complete_var, False, **extra)  # noqa: FBT003
            code = int(rv) if isinstance(rv, int) else 0
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            code = _fail(one_line(exc.format_message()).rstrip(".") + hint, ExitCode.USAGE)
        except click.ClickException as exc:
            code = _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            click.echo("mqfleet: interrupted", err=True)
            code = ExitCode.INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            code = report_failure("mqfleet", exc, verbose=_verbose)
        sys.stdout.flush()
        sys.exit(code)


@click.group("mqfleet", cls=MqfleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (default: $MQFLEET_CONFIG, else the user config dir).",
)
@click.option("--broker", "broker_url", metavar="URL", help="mqtt[s]://[user:pass@]host:port")
@click.option("--database", "database_url", metavar="URL", help="SQLAlchemy database URL.")
@click.option("--prefix", "topic_prefix", metavar="PREFIX", help="Topic prefix (fleet/v1).")
@click.option(
    "--mqtt-version",
    type=click.Choice(["5", "3.1.1"]),
    help="MQTT protocol version (5; 3.1.1 for brokers without MQTT 5).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks for bugs.")
@click.version_option(__version__, "--version", prog_name="mqfleet")
@click.pass_context
def cli(
    ctx: click.Context,
    config_file: Path | None,
    broker_url: str | None,
    database_url: str | None,
    topic_prefix: str | None,
    *,
    mqtt_version: str | None,
    verbose: bool,
) -> None:
    """Manage a fleet of Linux servers over MQTT.

    Settings: flags > MQFLEET_* environment > config file > defaults.
    Exit codes: 0 ok, 1 failed, 2 usage/unknown, 3 unreachable, 4 queued (run).
    """
    global _verbose  # noqa: PLW0603 - see MqfleetGroup.main
    _verbose = verbose
    if verbose or ctx.invoked_subcommand not in _QUIET_COMMANDS:
        configure_logging(verbose=verbose)
    ctx.obj = CliState(
        config_file, broker_url, database_url, topic_prefix, verbose, mqtt_version=mqtt_version
    )


pass_state = click.make_pass_decorator(CliState)


# -- database access -----------------------------------------------------------------
@contextmanager
def open_store(settings: Settings) -> Iterator[StoreReader]:
    """Open a read connection to the configured database; close it afterwards.

    The read commands connect with ``sqlite3``/psycopg directly (``store.reader``),
    never SQLAlchemy, which alone would take longer to import than their queries run. A
    missing SQLite file is reported instead of silently created empty: reading an empty
    new file would only say "no nodes", hiding a wrong ``--database``.
    """
    from mqfleet.store.reader import open_reader  # noqa: PLC0415 - lean start-up

    with open_reader(settings.database_url, connect_timeout_s=_PG_CONNECT_TIMEOUT_S) as reader:
        yield reader


def _emit_json(document: object) -> None:
    click.echo(render.dumps(document))


def _colour() -> bool:
    return render.use_colour(sys.stdout, os.environ)


def _node_id(value: str) -> str:
    try:
        return validate_node_id(value)
    except MqfleetError as exc:
        raise click.BadParameter(str(exc)) from None


# -- read commands -------------------------------------------------------------------
@cli.command()
@click.option("--status", type=click.Choice(_NODE_STATUSES), help="Only nodes in this state.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (see docs/CLI.md).")
@pass_state
def nodes(state: CliState, status: str | None, *, as_json: bool) -> int:
    """List the nodes of the fleet."""
    from mqfleet.store.queries import list_nodes  # noqa: PLC0415 - lean start-up

    settings = state.settings()
    with open_store(settings) as reader:
        rows = list_nodes(reader, status=status)
    now = utc_now()
    # The collector marks silent nodes offline; "online" nodes nobody has heard from
    # for long mean no collector is recording. Read from the rows already fetched, so
    # the warning costs nothing and needs no broker connection.
    warning = render.stale_warning(render.stale_nodes(rows, now), now)
    if warning:
        click.echo(f"mqfleet: {warning}", err=True)
    if as_json:
        _emit_json(render.nodes_json(rows))
    else:
        click.echo(render.nodes_table(rows, now, colour=_colour()))
    return ExitCode.OK


@cli.command()
@click.argument("node_id", metavar="NODE")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (see docs/CLI.md).")
@pass_state
def show(state: CliState, node_id: str, *, as_json: bool) -> int:
    """Show one node: its fields, latest metric and command counts."""
    from mqfleet.store.queries import get_node  # noqa: PLC0415 - lean start-up

    node_id = _node_id(node_id)
    settings = state.settings()
    now = utc_now()
    with open_store(settings) as reader:
        detail = get_node(reader, node_id, metrics_since=now - _SHOW_WINDOW)
    warning = render.stale_warning(render.stale_nodes([detail.node], now), now)
    if warning:
        click.echo(f"mqfleet: {warning}", err=True)
    if as_json:
        _emit_json(render.node_detail_json(detail, window="24h"))
    else:
        click.echo(render.node_detail_text(detail, now, colour=_colour(), window="24h"))
    return ExitCode.OK


@cli.command()
@click.argument("node_id", metavar="NODE")
@click.option("--since", type=DURATION, help="Only samples this recent: 30m, 1h, 7d.")
@click.option(
    "--limit", type=click.IntRange(1, 100_000), default=100, show_default=True, help="At most N."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document (see docs/CLI.md).")
@pass_state
def metrics(
    state: CliState, node_id: str, since: timedelta | None, limit: int, *, as_json: bool
) -> int:
    """Show a node's metrics, newest first."""
    from mqfleet.store.queries import list_metrics  # noqa: PLC0415 - lean start-up

    node_id = _node_id(node_id)
    settings = state.settings()
    now = utc_now()
    with open_store(settings) as reader:
        rows = list_metrics(reader, node_id, since=now - since if since else None, limit=limit)
    if as_json:
        _emit_json(render.metrics_json(node_id, rows))
    else:
        click.echo(render.metrics_table(rows, now))
    return ExitCode.OK


@cli.command()
@click.option("--node", "node_id", metavar="NODE", help="Only commands for this node.")
@click.option("--status", type=click.Choice(_COMMAND_STATUSES), help="Only in this state.")
@click.option("--since", type=DURATION, help="Only commands this recent: 30m, 1h, 7d.")
@click.option("--batch", "batch_id", metavar="ID", help="Only one run's commands.")
@click.option(
    "--limit", type=click.IntRange(1, 100_000), default=50, show_default=True, help="At most N."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document (see docs/CLI.md).")
@pass_state
def commands(
    state: CliState,
    *,
    node_id: str | None,
    status: str | None,
    since: timedelta | None,
    batch_id: str | None,
    limit: int,
    as_json: bool,
) -> int:
    """Show the command history, newest first."""
    from mqfleet.store.queries import list_commands  # noqa: PLC0415 - lean start-up

    if node_id is not None:
        node_id = _node_id(node_id)
    settings = state.settings()
    now = utc_now()
    with open_store(settings) as reader:
        rows = list_commands(
            reader,
            node_id=node_id,
            status=status,
            since=now - since if since else None,
            batch_id=batch_id,
            limit=limit,
        )
    if as_json:
        _emit_json({"commands": [render.command_json(c) for c in rows]})
    else:
        click.echo(render.commands_table(rows, now, colour=_colour()))
    return ExitCode.OK


@cli.command()
@click.argument("command_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (see docs/CLI.md).")
@pass_state
def result(state: CliState, command_id: str, *, as_json: bool) -> int:
    """Show one command's full result: output, timing, status, error."""
    from mqfleet.store.queries import get_command  # noqa: PLC0415 - lean start-up

    settings = state.settings()
    with open_store(settings) as reader:
        detail = get_command(reader, command_id)
    if as_json:
        _emit_json(render.command_detail_json(detail))
    else:
        click.echo(render.command_detail_text(detail, utc_now(), colour=_colour()))
    return ExitCode.OK


# -- database administration ---------------------------------------------------------
@cli.group()
def db() -> None:
    """Database administration."""


@db.command("upgrade")
@pass_state
def db_upgrade(state: CliState) -> int:
    """Create the tables or migrate the database to the newest schema."""
    from mqfleet.store.engine import (  # noqa: PLC0415 - lean start-up
        create_store_engine,
        describe_url,
        normalise_url,
        upgrade,
    )

    settings = state.settings()
    try:
        url = normalise_url(settings.database_url)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        # An unreachable host must fail in seconds, not hang on the TCP timeout.
        kwargs["connect_args"] = {"connect_timeout": _PG_CONNECT_TIMEOUT_S}
    # Unlike the readers, this creates the SQLite file (and its directory) if need be.
    engine = create_store_engine(settings.database_url, **kwargs)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    click.echo(f"database {describe_url(settings.database_url)} is up to date")
    return ExitCode.OK


@cli.command()
@click.option("--node-id", help="This node's id (default: the host name).")
@click.option("--interval", type=DURATION, help="Seconds between metric samples: 10s, 1m.")
@pass_state
def agent(state: CliState, node_id: str | None, interval: timedelta | None) -> int:
    """Run the agent for this machine until SIGTERM/SIGINT."""
    settings = state.settings(
        local_fleet=False,
        node_id=node_id,
        metrics_interval_s=interval.total_seconds() if interval else None,
    )
    import logging  # noqa: PLC0415 - lean start-up of the read commands

    configure_logging(verbose=state.verbose, level=logging.INFO)
    from mqfleet.agent import run_agent  # noqa: PLC0415 - only this command needs the agent

    serve(run_agent, settings)
    return ExitCode.OK


@cli.command()
@click.option(
    "--workers",
    type=int,
    metavar="N",
    help="Ingest worker processes, 1-64 (collector_workers; default 1). Needs MQTT 5.",
)
@click.option("--worker", "as_worker", is_flag=True, hidden=True, help="One of --workers N's.")
@pass_state
def collector(state: CliState, workers: int | None, *, as_worker: bool) -> int:
    """Run the collector (records the fleet into the database) until SIGTERM/SIGINT."""
    settings = state.settings(local_fleet=False, collector_workers=workers)
    import logging  # noqa: PLC0415 - lean start-up of the read commands

    label = settings.collector_id if as_worker else None
    configure_logging(verbose=state.verbose, level=logging.INFO, label=label)
    if as_worker or settings.collector_workers > 1:
        from mqfleet.cli import workers as collector_workers  # noqa: PLC0415 - only this mode

        if as_worker:
            return collector_workers.serve_worker(settings)
        return collector_workers.serve_workers(state, settings)
    from mqfleet.collector import run_collector  # noqa: PLC0415 - only this command needs it

    serve(run_collector, settings)
    return ExitCode.OK


def main() -> None:
    """Console entry point of ``mqfleet``."""
    # What the imports made (modules, classes, click's commands) lives as long as the
    # process: frozen, the collector never walks it again. A read command allocates ~50,000
    # objects for 10,000 nodes, and each full collection would walk those ~100,000 as well
    # (~8 ms of `mqfleet nodes`). Later garbage is collected as usual.
    gc.freeze()
    cli.main(prog_name="mqfleet")
