r"""Signed commands, the agent's side: the canonical form, key ids, verification.

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

This module never imports ``cryptography``: the agent verifies through
:mod:`mqfleet.security.ed25519`. Keys are made and commands signed in
:mod:`mqfleet.security.signing`, on the operator's machine.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from mqfleet.errors import CommandRefusedError, ConfigError
from mqfleet.protocol import CommandRequest, utc_now
from mqfleet.security.ed25519 import SIGNATURE_BYTES, PublicKey

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = [
    "SIGNATURE_CONTEXT",
    "CommandVerifier",
    "RefusalReason",
    "canonical_command_bytes",
    "key_id",
    "load_public_key",
    "read_key_file",
    "refuse_replayed",
    "verify_signature",
]

#: Domain separation tag inside the signed bytes; bump with the canonical form.
SIGNATURE_CONTEXT: Final = "mqfleet-command-v1"
_KEY_ID_HEX: Final = 16
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


def key_id(public_key: PublicKey) -> str:
    """Short fingerprint of a public key: 16 hex digits of SHA-256 over its raw bytes."""
    return hashlib.sha256(public_key.raw).hexdigest()[:_KEY_ID_HEX]


def read_key_file(path: Path, what: str) -> bytes:
    """Read a key file, refusing what is too large to be one; ConfigError if unreadable."""
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{what} {path} is too large to be a key")
    return data


def load_public_key(path: Path) -> PublicKey:
    """Load a PEM Ed25519 public key; ConfigError with a one-line reason if bad."""
    path = Path(path)
    data = read_key_file(path, "operator public key")
    try:
        return PublicKey.from_pem(data)
    except ValueError as exc:
        hint = (
            " (this looks like a PRIVATE key: give agents the .pub file)"
            if (b"PRIVATE KEY" in data)
            else ""
        )
        raise ConfigError(f"{path} is {exc}{hint}") from exc


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


def _refuse(reason: RefusalReason, message: str, request: CommandRequest) -> CommandRefusedError:
    return CommandRefusedError(f"refused: {message}", reason=reason, command_id=request.command_id)


def verify_signature(request: CommandRequest, trusted: Iterable[PublicKey]) -> str:
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
    if not sep or len(kid) != _KEY_ID_HEX or len(raw) != SIGNATURE_BYTES:
        raise _refuse("malformed_signature", "signature is malformed", request)
    keys = {key_id(key): key for key in trusted}
    key = keys.get(kid)
    if key is None:
        raise _refuse("unknown_key", f"signed by untrusted key {kid} (forged?)", request)
    if not key.verify(raw, canonical_command_bytes(request)):
        raise _refuse(
            "bad_signature", "signature does not match the command (altered or forged)", request
        )
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
        public_keys: Iterable[PublicKey],
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
