"""Security building blocks: broker accounts and tokens, password file, ACL, signed commands.

Self-contained: nothing here talks to the network or the database, so the agent, the
collector and the CLI each take only what they need (see docs/SECURITY.md for the threat
model and how each piece is wired).
"""

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
from mqfleet.security.signing import (
    CommandVerifier,
    RefusalReason,
    canonical_command_bytes,
    key_id,
    load_private_key,
    load_public_key,
    refuse_replayed,
    save_key_pair,
    sign_command,
    verify_signature,
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
