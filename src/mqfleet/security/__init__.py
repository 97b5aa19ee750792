"""Security building blocks: broker accounts and tokens, password file, ACL, signed commands.

Self-contained: nothing here talks to the network or the database, so the agent, the
collector and the CLI each take only what they need (see docs/SECURITY.md for the threat
model and how each piece is wired).

The operator's signing functions (``load_private_key``, ``save_key_pair``,
``sign_command``) load ``cryptography`` and are imported on first use, so an agent
importing anything from here never pays for it (it verifies with
:mod:`mqfleet.security.ed25519`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mqfleet.security.acl import render_acl
from mqfleet.security.config_files import (
    PRIVATE_FILE_MODE,
    broker_url_with_credentials,
    check_private_file,
    render_agent_config,
    warn_if_exposed,
    write_agent_config,
    write_private_file,
)
from mqfleet.security.passwords import (
    PasswordFile,
    add_account,
    hash_password,
    reload_broker,
    remove_account,
    verify_password,
)
from mqfleet.security.tokens import (
    COLLECTOR_ACCOUNT,
    OPERATOR_ACCOUNT,
    RESERVED_ACCOUNT_NAMES,
    generate_token,
    is_reserved_account,
    validate_node_account,
    validate_token,
)
from mqfleet.security.verify import (
    CommandVerifier,
    RefusalReason,
    canonical_command_bytes,
    key_id,
    load_public_key,
    refuse_replayed,
    verify_signature,
)

if TYPE_CHECKING:
    from mqfleet.security.signing import load_private_key, save_key_pair, sign_command

__all__ = [
    "COLLECTOR_ACCOUNT",
    "OPERATOR_ACCOUNT",
    "PRIVATE_FILE_MODE",
    "RESERVED_ACCOUNT_NAMES",
    "CommandVerifier",
    "PasswordFile",
    "RefusalReason",
    "add_account",
    "broker_url_with_credentials",
    "canonical_command_bytes",
    "check_private_file",
    "generate_token",
    "hash_password",
    "is_reserved_account",
    "key_id",
    "load_private_key",
    "load_public_key",
    "refuse_replayed",
    "reload_broker",
    "remove_account",
    "render_acl",
    "render_agent_config",
    "save_key_pair",
    "sign_command",
    "validate_node_account",
    "validate_token",
    "verify_password",
    "verify_signature",
    "warn_if_exposed",
    "write_agent_config",
    "write_private_file",
]


_SIGNING = frozenset({"load_private_key", "save_key_pair", "sign_command"})


def __getattr__(name: str) -> Any:  # noqa: ANN401 - PEP 562 module attribute
    """Import the operator's signing functions (and cryptography) on first use."""
    if name in _SIGNING:
        from mqfleet.security import signing  # noqa: PLC0415 - the point of this hook

        return getattr(signing, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
