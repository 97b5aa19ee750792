r"""Signed commands: Ed25519 operator keys, the canonical form, signing and verification.

A broker account is not enough to run a command: the agent runs only commands signed by
an operator key it trusts. A compromised broker, collector or stolen service token can
drop, delay or replay messages, never make an agent run a command the operator did not
sign for that node before its expiry.

Canonical form (version 1)
--------------------------
The signature covers these bytes: a JSON object, keys sorted, no whitespace, ASCII only
(``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``)::

    {"command_id": str, "command_text": str, "created_at": time, "ctx": "mqfleet-command-v1",
     "expires_at": time, "node_id": str, "timeout_s": float}

- ``ctx`` separates these signatures from any other use of the key.
- times are UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (always six fractional digits), so the
  same instant always gives the same text whatever offset or precision the wire used;
- ``timeout_s`` is a float rendered by Python's shortest round-trip ``repr`` (``60.0``,
  ``0.5``): exact, so any change of value changes the bytes;
- non-ASCII characters are ``\uXXXX`` escapes (UTF-16 surrogate pairs beyond the BMP).

``issuer`` and ``batch_id`` are informational and not signed.

Signature string: ``<key id>:<base64 of the 64-byte Ed25519 signature>`` where the key id
is the first 16 hex digits of SHA-256 over the raw 32-byte public key. The key id lets an
agent trust several keys (rotation) and tell "signed by a key I do not trust" (forged)
from "my key, but the fields changed" (altered).

Replay: a validly signed command replayed to its own node is caught by the agent's
command journal (ids seen until they expire); replayed to another node it is refused
here (the node id is signed); replayed after ``expires_at`` it is refused here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import msgspec
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from mqfleet.errors import CommandRefusedError, ConfigError
from mqfleet.protocol import CommandRequest, utc_now
from mqfleet.security.config_files import warn_if_exposed, write_private_file

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = [
    "SIGNATURE_CONTEXT",
    "CommandVerifier",
    "RefusalReason",
    "canonical_command_bytes",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "refuse_replayed",
    "save_key_pair",
    "save_private_key",
    "save_public_key",
    "sign_command",
    "signature_for",
    "verify_signature",
]

log = logging.getLogger(__name__)

#: Domain separation tag inside the signed bytes; bump with the canonical form.
SIGNATURE_CONTEXT: Final = "mqfleet-command-v1"
_KEY_ID_HEX: Final = 16
_SIGNATURE_BYTES: Final = 64
_PUBLIC_FILE_MODE: Final = 0o644
_MAX_KEY_FILE_BYTES: Final = 64 * 1024

#: Why a command was refused; stable words for logs, metrics and tests.
RefusalReason = Literal[
    "unsigned",
    "malformed_signature",
    "unknown_key",
    "bad_signature",
    "wrong_node",
    "expired",
    "replayed",
]


# -- keys ---------------------------------------------------------------------------------


def generate_private_key() -> Ed25519PrivateKey:
    """Generate a new Ed25519 operator key."""
    return Ed25519PrivateKey.generate()


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: 16 hex digits of SHA-256 over its raw bytes."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:_KEY_ID_HEX]


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


def save_key_pair(
    private_path: Path, public_path: Path, *, overwrite: bool = False
) -> Ed25519PublicKey:
    """Create a key pair for ``mqfleet keys init``; refuse to replace keys unless told to."""
    if not overwrite:
        for path in (private_path, public_path):
            if Path(path).exists():
                raise ConfigError(f"{path} already exists; refusing to overwrite a key")
    private_key = generate_private_key()
    save_private_key(private_key, private_path)
    save_public_key(private_key.public_key(), public_path)
    return private_key.public_key()


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{what} {path} is too large to be a key")
    return data


def load_private_key(path: Path, *, logger: logging.Logger | None = None) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key; warn if others can read it; ConfigError if bad."""
    path = Path(path)
    data = _read_key_file(path, "operator private key")
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


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key; ConfigError with a one-line reason if bad."""
    path = Path(path)
    data = _read_key_file(path, "operator public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        hint = (
            " (this looks like a PRIVATE key: give agents the .pub file)"
            if (b"PRIVATE KEY" in data)
            else ""
        )
        raise ConfigError(f"{path} is not a PEM public key{hint}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 key ({type(key).__name__})")
    return key


# -- canonical form and signatures ---------------------------------------------------------


def _canonical_time(value: datetime) -> str:
    if value.tzinfo is None:
        raise ConfigError("command times must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_command_bytes(request: CommandRequest) -> bytes:
    """Return the exact bytes a command's signature covers (canonical form v1, see module doc)."""
    timeout_s = float(request.timeout_s)
    if not math.isfinite(timeout_s):
        raise ConfigError("timeout_s must be a finite number")
    fields = {
        "command_id": request.command_id,
        "command_text": request.command_text,
        "created_at": _canonical_time(request.created_at),
        "ctx": SIGNATURE_CONTEXT,
        "expires_at": _canonical_time(request.expires_at),
        "node_id": request.node_id,
        "timeout_s": timeout_s,
    }
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return text.encode("ascii")


def signature_for(request: CommandRequest, private_key: Ed25519PrivateKey) -> str:
    """Compute the signature string (``<key id>:<base64>``) of ``request`` under ``private_key``."""
    raw = private_key.sign(canonical_command_bytes(request))
    return f"{key_id(private_key.public_key())}:{base64.b64encode(raw).decode('ascii')}"


def sign_command(request: CommandRequest, private_key: Ed25519PrivateKey) -> CommandRequest:
    """Return a copy of ``request`` carrying its signature (any previous one is replaced)."""
    return msgspec.structs.replace(request, signature=signature_for(request, private_key))


def _refuse(reason: RefusalReason, message: str, request: CommandRequest) -> CommandRefusedError:
    return CommandRefusedError(f"refused: {message}", reason=reason, command_id=request.command_id)


def verify_signature(request: CommandRequest, trusted: Iterable[Ed25519PublicKey]) -> str:
    """Check ``request.signature`` against the trusted keys; return the signing key's id.

    Raises :class:`CommandRefusedError` (reason ``unsigned``, ``malformed_signature``,
    ``unknown_key`` or ``bad_signature``). It does not look at node id or expiry.
    """
    if not request.signature:
        raise _refuse("unsigned", "command is not signed", request)
    kid, sep, encoded = request.signature.partition(":")
    try:
        raw = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raw = b""
    if not sep or len(kid) != _KEY_ID_HEX or len(raw) != _SIGNATURE_BYTES:
        raise _refuse("malformed_signature", "signature is malformed", request)
    keys = {key_id(key): key for key in trusted}
    key = keys.get(kid)
    if key is None:
        raise _refuse("unknown_key", f"signed by untrusted key {kid} (forged?)", request)
    try:
        key.verify(raw, canonical_command_bytes(request))
    except InvalidSignature:
        raise _refuse(
            "bad_signature", "signature does not match the command (altered or forged)", request
        ) from None
    return kid


def refuse_replayed(request: CommandRequest) -> CommandRefusedError:
    """Build the error for a command id the agent's journal has already accepted (a replay)."""
    return _refuse("replayed", f"command {request.command_id} was already received", request)


class CommandVerifier:
    """The agent's gate: a command runs only if signed, intact, for this node, unexpired."""

    def __init__(
        self,
        *,
        node_id: str,
        public_keys: Iterable[Ed25519PublicKey],
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """Trust ``public_keys`` for commands addressed to ``node_id``.

        Args:
            node_id: this agent's node id; a command for any other id is refused.
            public_keys: the operator keys to trust (several during a key rotation).
            clock: returns the current aware UTC time (injected by tests).

        """
        self._node_id = node_id
        self._keys = list(public_keys)
        if not self._keys:
            raise ConfigError("a command verifier needs at least one operator public key")
        self._clock = clock

    @classmethod
    def from_files(cls, *, node_id: str, public_key_files: Iterable[Path]) -> CommandVerifier:
        """Build from PEM public key files (``settings.operator_public_key_file``)."""
        return cls(node_id=node_id, public_keys=[load_public_key(p) for p in public_key_files])

    @property
    def key_ids(self) -> list[str]:
        """Ids of the trusted keys, for the agent's start-up log line."""
        return [key_id(key) for key in self._keys]

    def check(self, request: CommandRequest) -> None:
        """Return if ``request`` may run; else raise :class:`CommandRefusedError`.

        Order matters: nothing in an unauthenticated payload is trusted, so the signature
        is checked before the node id and the expiry it vouches for. Replays of an
        accepted id are the journal's job (see :func:`refuse_replayed`).
        """
        verify_signature(request, self._keys)
        if request.node_id != self._node_id:
            raise _refuse(
                "wrong_node",
                f"command is for node {request.node_id}, this is {self._node_id}",
                request,
            )
        if self._clock() >= request.expires_at:
            raise _refuse(
                "expired",
                f"command expired at {_canonical_time(request.expires_at)}",
                request,
            )
