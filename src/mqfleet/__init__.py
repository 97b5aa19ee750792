"""mqfleet: a fleet manager for Linux servers and edge devices built on MQTT."""

from mqfleet.errors import (
    AgentStateError,
    AuthenticationError,
    BrokerError,
    CommandRefusedError,
    ConfigError,
    MqfleetError,
    ProtocolError,
    StoreError,
    UnknownCommandError,
    UnknownNodeError,
)

__version__ = "0.1.0"

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
    "__version__",
]
