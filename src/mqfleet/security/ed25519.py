"""Ed25519 public keys and signature checks for the agent, on the OpenSSL already loaded.

Every agent checks the operator's signature on every command. ``cryptography`` can do
that, but its wheel carries a second, statically linked OpenSSL that costs about 7 MiB
of RSS on every node: a fifth of the agent. The interpreter's own ``ssl`` module has
already mapped the system's libcrypto, and OpenSSL >= 1.1.1 verifies Ed25519 itself. So
this module makes the calls ``cryptography`` makes (``EVP_PKEY_new_raw_public_key``,
``EVP_DigestVerifyInit``, ``EVP_DigestVerify``) on that library, through :mod:`ctypes`.

Where that library cannot be used (an interpreter whose ``_ssl`` links OpenSSL
statically, an OpenSSL older than 1.1.1, no ``/proc``), or fails the RFC 8032 self-test
run before first use, the same check runs through ``cryptography`` instead: a different
footprint, never a different answer. Both backends are tested against each other.

Only public keys and verification live here. Keys are made, stored and used to sign on
the operator's machine, with ``cryptography`` (:mod:`mqfleet.security.signing`).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import re
import ssl
import weakref
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "Backend",
    "PublicKey",
    "backend",
    "cryptography_backend",
    "openssl_backend",
]

PUBLIC_KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64

#: DER of an Ed25519 SubjectPublicKeyInfo up to the key itself (RFC 8410 section 4): the
#: only shape such a key has, so parsing is a comparison, not an ASN.1 decoder.
_SPKI_PREFIX: Final = bytes.fromhex("302a300506032b6570032100")
_PEM_RE: Final = re.compile(
    rb"-----BEGIN PUBLIC KEY-----\r?\n([A-Za-z0-9+/=\r\n]+?)-----END PUBLIC KEY-----"
)
#: OpenSSL's NID_ED25519 (EVP_PKEY_ED25519), the same in 1.1.1 and 3.x.
_EVP_PKEY_ED25519: Final = 1087
_OPENSSL_1_1_1: Final = 0x1010100F
_LIBCRYPTO_RE: Final = re.compile(r"/libcrypto\.so[.\d]*$")

#: RFC 8032 section 7.1, test 1 (empty message): the self-test a backend must pass.
_RFC8032_PUBLIC: Final = bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
)
_RFC8032_SIGNATURE: Final = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


class Backend(Protocol):
    """What verifies: loads a raw public key into a handle, checks signatures with it."""

    name: str

    def load(self, raw: bytes) -> object:
        """Return a handle for the 32-byte public key ``raw``; ValueError if refused."""
        ...

    def verify(self, handle: object, signature: bytes, message: bytes) -> bool:
        """Say whether ``signature`` (64 bytes) is valid for ``message`` under ``handle``."""
        ...

    def free(self, handle: object) -> None:
        """Release what :meth:`load` allocated."""
        ...


class _LibCrypto:
    """The Ed25519 part of OpenSSL's EVP API, on a libcrypto already in this process."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)  # already mapped by _ssl: dlopen only returns its handle
        ptr, size = ctypes.c_void_p, ctypes.c_size_t
        if lib.OpenSSL_version_num() < _OPENSSL_1_1_1:  # no raw Ed25519 keys before
            msg = f"{path} is older than OpenSSL 1.1.1"
            raise OSError(msg)
        self._new_key = lib.EVP_PKEY_new_raw_public_key
        self._new_key.argtypes = [ctypes.c_int, ptr, ctypes.c_char_p, size]
        self._new_key.restype = ptr
        self._free_key = lib.EVP_PKEY_free
        self._free_key.argtypes = [ptr]
        self._free_key.restype = None
        self._new_ctx = lib.EVP_MD_CTX_new
        self._new_ctx.argtypes = []
        self._new_ctx.restype = ptr
        self._free_ctx = lib.EVP_MD_CTX_free
        self._free_ctx.argtypes = [ptr]
        self._free_ctx.restype = None
        self._init = lib.EVP_DigestVerifyInit
        self._init.argtypes = [ptr, ptr, ptr, ptr, ptr]
        self._init.restype = ctypes.c_int
        self._verify = lib.EVP_DigestVerify
        self._verify.argtypes = [ptr, ctypes.c_char_p, size, ctypes.c_char_p, size]
        self._verify.restype = ctypes.c_int
        # OpenSSL queues an error for every failed check, per thread; the ssl module in
        # this same thread must never find ours.
        self._clear_errors = lib.ERR_clear_error
        self._clear_errors.argtypes = []
        self._clear_errors.restype = None
        self.name = f"{ssl.OPENSSL_VERSION} ({path}, shared with the ssl module)"

    def load(self, raw: bytes) -> object:
        key = self._new_key(_EVP_PKEY_ED25519, None, raw, len(raw))
        if not key:
            self._clear_errors()
            msg = "OpenSSL refused the Ed25519 public key"
            raise ValueError(msg)
        return key

    def verify(self, handle: object, signature: bytes, message: bytes) -> bool:
        ctx = self._new_ctx()
        if not ctx:
            raise MemoryError
        try:
            # Ed25519 is "pure": no digest (NULL), the message is passed whole.
            if self._init(ctx, None, None, None, handle) != 1:
                return False
            status: int = self._verify(ctx, signature, len(signature), message, len(message))
            return status == 1
        finally:
            self._free_ctx(ctx)
            self._clear_errors()

    def free(self, handle: object) -> None:
        self._free_key(handle)


class _Cryptography:
    """The same checks through the ``cryptography`` package (its own OpenSSL)."""

    name = "cryptography"

    def load(self, raw: bytes) -> object:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
            Ed25519PublicKey,
        )

        return Ed25519PublicKey.from_public_bytes(raw)

    def verify(self, handle: object, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature  # noqa: PLC0415

        key: Ed25519PublicKey = handle  # type: ignore[assignment]
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def free(self, handle: object) -> None:
        pass


def _loaded_libcrypto() -> str | None:
    """Path of the libcrypto the ``ssl`` module (imported above) mapped, if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and _LIBCRYPTO_RE.search(fields[5]):  # noqa: PLR2004 - maps columns
            return fields[5]
    return None


def _passes_self_test(candidate: Backend) -> bool:
    handle = candidate.load(_RFC8032_PUBLIC)
    try:
        good = candidate.verify(handle, _RFC8032_SIGNATURE, b"")
        forged = candidate.verify(handle, _RFC8032_SIGNATURE, b"x")
    finally:
        candidate.free(handle)
    return good and not forged


@cache
def openssl_backend() -> Backend | None:
    """Return the shared-libcrypto backend, or None where it cannot be used here."""
    path = _loaded_libcrypto()
    if path is None:
        return None
    try:
        candidate = _LibCrypto(path)
        if _passes_self_test(candidate):
            return candidate
    except (OSError, AttributeError, ValueError):  # not loadable, a symbol missing, refused
        return None
    return None


@cache
def cryptography_backend() -> Backend:
    """Return the fallback backend (the reference the tests hold the other one to)."""
    return _Cryptography()


def backend() -> Backend:
    """Return the backend to verify with: shared OpenSSL if usable, else cryptography."""
    return openssl_backend() or cryptography_backend()


class PublicKey:
    """An Ed25519 public key (its 32 raw bytes) that verifies signatures."""

    __slots__ = ("__weakref__", "_backend", "_handle", "raw")

    def __init__(self, raw: bytes, *, using: Backend | None = None) -> None:
        """Take the 32 raw bytes of a key (RFC 8032); ValueError if they cannot be one."""
        if len(raw) != PUBLIC_KEY_BYTES:
            msg = f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, not {len(raw)}"
            raise ValueError(msg)
        self.raw = bytes(raw)
        self._backend = using or backend()
        self._handle = self._backend.load(self.raw)
        weakref.finalize(self, self._backend.free, self._handle)

    @classmethod
    def from_pem(cls, data: bytes, *, using: Backend | None = None) -> PublicKey:
        """Read a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo) block; ValueError saying why not."""
        match = _PEM_RE.search(data)
        if match is None:
            msg = "not a PEM public key"
            raise ValueError(msg)
        try:
            der = base64.b64decode(b"".join(match[1].split()), validate=True)
        except binascii.Error:
            msg = "not a PEM public key (bad base64)"
            raise ValueError(msg) from None
        if len(der) != len(_SPKI_PREFIX) + PUBLIC_KEY_BYTES or not der.startswith(_SPKI_PREFIX):
            msg = "not an Ed25519 public key"
            raise ValueError(msg)
        return cls(der[len(_SPKI_PREFIX) :], using=using)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Say whether ``signature`` is this key's signature over ``message``."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        return self._backend.verify(self._handle, signature, message)

    def __eq__(self, other: object) -> bool:
        """Keys are equal when their raw bytes are."""
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        """Hash of the raw bytes (keys are values)."""
        return hash(self.raw)

    def __repr__(self) -> str:
        """Show the key's bytes in hex and the backend verifying with it."""
        return f"PublicKey({self.raw.hex()}, backend={self._backend.name!r})"
