"""The one exception tree of mqfleet.

Every error mqfleet raises on purpose is a subclass of :class:`MqfleetError`::

    MqfleetError
    ├── ConfigError              settings, config file or flags are invalid
    ├── ProtocolError            a topic or payload breaks wire protocol v1
    ├── BrokerError              the MQTT broker cannot be reached or refused us
    │   └── AuthenticationError  bad credentials or not authorised: never retried
    ├── StoreError               the database cannot be reached, read or migrated
    ├── UnknownNodeError         a node id that the fleet has never seen
    ├── UnknownCommandError      a command id that the fleet has never seen
    ├── AgentStateError          the agent's state directory is unusable
    └── CommandRefusedError      a command failed signature or validity checks on the agent

The CLI maps them to one-line messages and documented exit codes (see ``mqfleet.cli``).
"""

from __future__ import annotations

__all__ = [
    "AgentStateError",
    "AuthenticationError",
    "BrokerError",
    "CommandRefusedError",
    "ConfigError",
    "MqfleetError",
    "ProtocolError",
    "StoreError",
    "UnknownCommandError",
    "UnknownNodeError",
]


class MqfleetError(Exception):
    """Base class of every error mqfleet raises on purpose."""


class ConfigError(MqfleetError):
    """Settings, a config file or command-line flags are invalid."""


class ProtocolError(MqfleetError):
    """A topic or payload does not follow wire protocol v1."""

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        """Bind the message and the topic the offending message came on, if known."""
        super().__init__(message)
        self.topic = topic


class BrokerError(MqfleetError):
    """The MQTT broker cannot be reached, or it closed or refused the connection."""


class AuthenticationError(BrokerError):
    """The broker refused our credentials; retrying would only hammer it."""


class StoreError(MqfleetError):
    """The database cannot be reached, read, written or migrated."""


class UnknownNodeError(MqfleetError):
    """A node id that no birth or metric has ever registered."""

    def __init__(self, node_ids: list[str]) -> None:
        """Bind the unknown node ids."""
        plural = "s" if len(node_ids) > 1 else ""
        super().__init__(f"unknown node{plural}: {', '.join(node_ids)}")
        self.node_ids = node_ids


class UnknownCommandError(MqfleetError):
    """A command id that the collector has never recorded."""

    def __init__(self, command_id: str) -> None:
        """Bind the unknown command id."""
        super().__init__(f"unknown command: {command_id}")
        self.command_id = command_id


class AgentStateError(MqfleetError):
    """The agent's state directory cannot be created, read or written."""


class CommandRefusedError(MqfleetError):
    """The agent refuses a command: unsigned, forged, altered, expired, replayed or misrouted.

    ``reason`` is a stable machine-readable word (see ``mqfleet.security.signing``); the
    message is the one-line text reported in the command's result and logged on the node.
    """

    def __init__(self, message: str, *, reason: str, command_id: str | None = None) -> None:
        """Bind the one-line message, the reason word and the refused command's id."""
        super().__init__(message)
        self.reason = reason
        self.command_id = command_id
