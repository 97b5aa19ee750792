"""Signed commands, the operator's side: Ed25519 key pairs on disk and signing.

The canonical form, key ids and verification are in :mod:`mqfleet.security.verify`
(the agent's side, which never loads ``cryptography``); this module makes the keys and
the signatures it checks, with ``cryptography``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from mqfleet.errors import ConfigError
from mqfleet.security.config_files import warn_if_exposed, write_private_file
from mqfleet.security.ed25519 import PublicKey
from mqfleet.security.verify import (
    SIGNATURE_CONTEXT,
    CommandVerifier,
    RefusalReason,
    canonical_command_bytes,
    key_id,
    load_public_key,
    read_key_file,
    refuse_replayed,
    verify_signature,
)

if TYPE_CHECKING:
    import logging

    from mqfleet.protocol import CommandRequest

# The agent's side (canonical form, key ids, verification) is re-exported from
# mqfleet.security.verify, so the operator's code needs one import.
__all__ = [
    "SIGNATURE_CONTEXT",
    "CommandVerifier",
    "RefusalReason",
    "canonical_command_bytes",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_of",
    "refuse_replayed",
    "save_key_pair",
    "save_private_key",
    "save_public_key",
    "sign_command",
    "signature_for",
    "verify_signature",
]

_PUBLIC_FILE_MODE: Final = 0o644


def generate_private_key() -> Ed25519PrivateKey:
    """Generate a new Ed25519 operator key."""
    return Ed25519PrivateKey.generate()


def public_key_of(private_key: Ed25519PrivateKey) -> PublicKey:
    """Return the public half of ``private_key``, as agents hold it."""
    return PublicKey(private_key.public_key().public_bytes_raw())


def save_private_key(private_key: Ed25519PrivateKey, path: Path) -> None:
    """Write the private key as unencrypted PKCS#8 PEM, mode 0600, atomically."""
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(path, pem)


def save_public_key(public_key: Ed25519PublicKey, path: Path) -> None:
    """Write the public key as SubjectPublicKeyInfo PEM (mode 0644: it is not a secret)."""
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_private_file(path, pem, mode=_PUBLIC_FILE_MODE)


def save_key_pair(private_path: Path, public_path: Path, *, overwrite: bool = False) -> PublicKey:
    """Create a key pair for ``mqfleet keys init``; refuse to replace keys unless told to."""
    if not overwrite:
        for path in (private_path, public_path):
            if Path(path).exists():
                raise ConfigError(f"{path} already exists; refusing to overwrite a key")
    private_key = generate_private_key()
    save_private_key(private_key, private_path)
    save_public_key(private_key.public_key(), public_path)
    return public_key_of(private_key)


def load_private_key(path: Path, *, logger: logging.Logger | None = None) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key; warn if others can read it; ConfigError if bad."""
    path = Path(path)
    data = read_key_file(path, "operator private key")
    warn_if_exposed(path, logger)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted PEM: we have no passphrase to give
        raise ConfigError(f"operator private key {path} is encrypted; not supported") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key ({type(key).__name__})")
    return key


def signature_for(request: CommandRequest, private_key: Ed25519PrivateKey) -> str:
    """Compute the signature string (``<key id>:<base64>``) of ``request`` under ``private_key``."""
    raw = private_key.sign(canonical_command_bytes(request))
    return f"{key_id(public_key_of(private_key))}:{base64.b64encode(raw).decode('ascii')}"


def sign_command(request: CommandRequest, private_key: Ed25519PrivateKey) -> CommandRequest:
    """Return a copy of ``request`` carrying its signature (any previous one is replaced)."""
    return msgspec.structs.replace(request, signature=signature_for(request, private_key))
