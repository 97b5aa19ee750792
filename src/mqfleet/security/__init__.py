"""Security building blocks: broker accounts and tokens, password file, ACL, signed commands.

Self-contained: nothing here talks to the network or the database, so the agent, the
collector and the CLI each take only what they need (see docs/SECURITY.md for the threat
model and how each piece is wired).

Every name below is imported from its module on first use (PEP 562): the agent, which
needs only the verifier, never loads the broker-account tooling, nor ``cryptography``
(the operator's signing functions; the agent verifies with
:mod:`mqfleet.security.ed25519`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from mqfleet.security.acl import (
        render_acl,
    )
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
    from mqfleet.security.signing import (
        load_private_key,
        save_key_pair,
        sign_command,
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

#: Where each public name lives.
_HOMES: Final[dict[str, str]] = {
    "COLLECTOR_ACCOUNT": "mqfleet.security.tokens",
    "CommandVerifier": "mqfleet.security.verify",
    "OPERATOR_ACCOUNT": "mqfleet.security.tokens",
    "PRIVATE_FILE_MODE": "mqfleet.security.config_files",
    "PasswordFile": "mqfleet.security.passwords",
    "RESERVED_ACCOUNT_NAMES": "mqfleet.security.tokens",
    "RefusalReason": "mqfleet.security.verify",
    "add_account": "mqfleet.security.passwords",
    "broker_url_with_credentials": "mqfleet.security.config_files",
    "canonical_command_bytes": "mqfleet.security.verify",
    "check_private_file": "mqfleet.security.config_files",
    "generate_token": "mqfleet.security.tokens",
    "hash_password": "mqfleet.security.passwords",
    "is_reserved_account": "mqfleet.security.tokens",
    "key_id": "mqfleet.security.verify",
    "load_private_key": "mqfleet.security.signing",
    "load_public_key": "mqfleet.security.verify",
    "refuse_replayed": "mqfleet.security.verify",
    "reload_broker": "mqfleet.security.passwords",
    "remove_account": "mqfleet.security.passwords",
    "render_acl": "mqfleet.security.acl",
    "render_agent_config": "mqfleet.security.config_files",
    "save_key_pair": "mqfleet.security.signing",
    "sign_command": "mqfleet.security.signing",
    "validate_node_account": "mqfleet.security.tokens",
    "validate_token": "mqfleet.security.tokens",
    "verify_password": "mqfleet.security.passwords",
    "verify_signature": "mqfleet.security.verify",
    "warn_if_exposed": "mqfleet.security.config_files",
    "write_agent_config": "mqfleet.security.config_files",
    "write_private_file": "mqfleet.security.config_files",
}


def __getattr__(name: str) -> Any:  # noqa: ANN401 - PEP 562 module attribute
    """Import ``name`` from its module on first use (see the module docstring)."""
    home = _HOMES.get(name)
    if home is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
