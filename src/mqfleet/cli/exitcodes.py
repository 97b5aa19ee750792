"""The CLI's documented exit codes (docs/ARCHITECTURE.md and docs/CLI.md)."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode", "exit_code_for"]

from mqfleet.errors import (
    BrokerError,
    ConfigError,
    MqfleetError,
    ProtocolError,
    StoreError,
    UnknownCommandError,
    UnknownNodeError,
)


class ExitCode(IntEnum):
    """Process exit codes of every ``mqfleet`` command."""

    OK = 0
    #: A command failed, timed out, expired or got no answer (or a service failed).
    FAILED = 1
    #: Usage error, invalid config, unknown node or command.
    USAGE = 2
    #: The broker or the database cannot be reached.
    UNREACHABLE = 3
    #: ``run`` only: some targets are offline and their commands are queued.
    QUEUED = 4
    #: Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
    INTERRUPTED = 130


def exit_code_for(exc: MqfleetError) -> ExitCode:
    """Map an error of the exception tree to its documented exit code."""
    if isinstance(exc, (ConfigError, ProtocolError, UnknownNodeError, UnknownCommandError)):
        return ExitCode.USAGE
    if isinstance(exc, (BrokerError, StoreError)):
        return ExitCode.UNREACHABLE
    return ExitCode.FAILED
