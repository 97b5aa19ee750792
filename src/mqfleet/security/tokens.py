"""Broker account names and their tokens (the MQTT passwords of agents, operator, collector).

Every agent has its own MQTT account: username = node id, password = a random token. The
ACL grants node topics by username (``%u``), so a name that is also a service account
(``operator``, ``collector``) or an administrative one must never become a node id: it is
refused here, in one place, by :func:`validate_node_account`.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

from mqfleet.errors import ConfigError, ProtocolError
from mqfleet.protocol import validate_node_id

__all__ = [
    "COLLECTOR_ACCOUNT",
    "MIN_TOKEN_BITS",
    "OPERATOR_ACCOUNT",
    "RESERVED_ACCOUNT_NAMES",
    "TOKEN_BYTES",
    "generate_token",
    "is_reserved_account",
    "validate_node_account",
    "validate_token",
]

#: The CLI's account: publishes commands, reads everything.
OPERATOR_ACCOUNT: Final = "operator"
#: The collector's account: reads everything, republishes queued commands, owns its status.
COLLECTOR_ACCOUNT: Final = "collector"

#: Names that can never be node ids (compared case-insensitively, so ``Operator`` is
#: refused too and nobody can confuse a node with a service account in a listing).
RESERVED_ACCOUNT_NAMES: Final[frozenset[str]] = frozenset(
    {
        OPERATOR_ACCOUNT,
        COLLECTOR_ACCOUNT,
        "admin",
        "administrator",
        "root",
        "mqfleet",
        "mosquitto",
        "broker",
        "anonymous",
        "guest",
        "system",
        "sys",
        "all",
        "any",
        "everyone",
        "nobody",
        # "." and ".." are valid topic levels but name directories (the agent's state
        # dir is <data>/agent/<node_id>): refuse them before they become a path.
        ".",
        "..",
    }
)

#: Bytes of randomness in a generated token: 256 bits, well above the 128-bit minimum.
TOKEN_BYTES: Final = 32
#: Weakest token :func:`validate_token` accepts.
MIN_TOKEN_BITS: Final = 128
# token_urlsafe's alphabet; 6 bits per character, so 128 bits need 22 characters.
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_MIN_TOKEN_CHARS: Final = -(-MIN_TOKEN_BITS // 6)
_MAX_TOKEN_CHARS: Final = 256


def generate_token(nbytes: int = TOKEN_BYTES) -> str:
    """Generate a fresh random URL-safe token with ``nbytes`` (at least 16) bytes of entropy."""
    if nbytes * 8 < MIN_TOKEN_BITS:
        raise ConfigError(f"a token needs at least {MIN_TOKEN_BITS} bits, asked for {nbytes * 8}")
    return secrets.token_urlsafe(nbytes)


def validate_token(token: str) -> str:
    """Return ``token`` if it is URL-safe and long enough for 128 bits, else raise ConfigError."""
    # The message never echoes the token: it is a secret even when it is a bad one.
    if not _TOKEN_RE.fullmatch(token):
        raise ConfigError("invalid token: use only the characters A-Z a-z 0-9 _ -")
    if len(token) < _MIN_TOKEN_CHARS:
        raise ConfigError(
            f"token too short: {len(token)} characters, at least {_MIN_TOKEN_CHARS} "
            f"({MIN_TOKEN_BITS} bits) are needed"
        )
    if len(token) > _MAX_TOKEN_CHARS:
        raise ConfigError(f"token too long: at most {_MAX_TOKEN_CHARS} characters")
    return token


def is_reserved_account(name: str) -> bool:
    """Whether ``name`` is a reserved account name (case-insensitive)."""
    return name.lower() in RESERVED_ACCOUNT_NAMES


def validate_node_account(node_id: str) -> str:
    """Return ``node_id`` if it may own an agent account, else raise ConfigError (one line)."""
    try:
        validate_node_id(node_id)
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from exc
    if is_reserved_account(node_id):
        raise ConfigError(f"node id {node_id!r} is reserved for a service account; choose another")
    return node_id
