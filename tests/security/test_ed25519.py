"""Ed25519 verification on the shared libcrypto, held to cryptography's answers."""

from __future__ import annotations

import ctypes
import os
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from mqfleet.security import ed25519 as module
from mqfleet.security.ed25519 import (
    Backend,
    PublicKey,
    backend,
    cryptography_backend,
    openssl_backend,
)

#: RFC 8032 section 7.1, tests 1-3: (public key, message, signature).
RFC8032 = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]
#: The group order L: adding it to S gives the same point but a non-canonical signature.
ORDER = 2**252 + 27742317777372353535851937790883648493

needs_shared_openssl = pytest.mark.skipif(
    openssl_backend() is None, reason="this interpreter's ssl has no shared libcrypto"
)


def backends() -> list[Backend]:
    found = [cryptography_backend()]
    shared = openssl_backend()
    if shared is not None:
        found.append(shared)
    return found


@pytest.fixture(params=backends(), ids=lambda b: "openssl" if "ssl module" in b.name else "crypto")
def using(request: pytest.FixtureRequest) -> Backend:
    return request.param  # type: ignore[no-any-return]


def test_a_dynamically_linked_ssl_means_the_shared_backend_is_used() -> None:
    # Where _ssl mapped a libcrypto (pyenv, distro and Debian-built Pythons), the agent
    # must verify with it: that is the ~7 MiB of issue 5's footprint target.
    if module._loaded_libcrypto() is None:
        pytest.skip("no shared libcrypto mapped by ssl here")
    assert backend() is openssl_backend()
    assert "shared with the ssl module" in backend().name


@pytest.mark.parametrize(("public", "message", "signature"), RFC8032)
def test_rfc8032_vectors(using: Backend, public: str, message: str, signature: str) -> None:
    key = PublicKey(bytes.fromhex(public), using=using)
    msg, sig = bytes.fromhex(message), bytes.fromhex(signature)
    assert key.verify(sig, msg)
    assert not key.verify(sig, msg + b"\0")
    assert not key.verify(sig[:-1] + bytes([sig[-1] ^ 1]), msg)
    assert not key.verify(sig[:63], msg)  # wrong length: refused before any C call
    assert not key.verify(sig + b"\0", msg)


def test_non_canonical_signatures_are_refused(using: Backend) -> None:
    public, message, signature = (bytes.fromhex(x) for x in RFC8032[1])
    s = int.from_bytes(signature[32:], "little") + ORDER
    malleated = signature[:32] + s.to_bytes(32, "little")
    assert not PublicKey(public, using=using).verify(malleated, message)


@needs_shared_openssl
def test_both_backends_give_the_same_answer_on_random_and_corrupted_input() -> None:
    rng = random.Random(5)  # noqa: S311 - test data, not crypto
    shared, reference = openssl_backend(), cryptography_backend()
    assert shared is not None
    for i in range(300):
        private = ed25519.Ed25519PrivateKey.generate()
        raw = private.public_key().public_bytes_raw()
        message = os.urandom(rng.randrange(0, 600))
        signature = private.sign(message)
        if i % 3 == 1:  # flip one bit of the signature
            bit = rng.randrange(512)
            signature = bytearray(signature)
            signature[bit // 8] ^= 1 << (bit % 8)
            signature = bytes(signature)
        elif i % 3 == 2:  # sign something else
            message += b"!"
        ours = PublicKey(raw, using=shared).verify(signature, message)
        theirs = PublicKey(raw, using=reference).verify(signature, message)
        assert ours == theirs == (i % 3 == 0)


@needs_shared_openssl
@pytest.mark.parametrize(
    "raw",
    [bytes(32), b"\x01" + bytes(31), b"\xff" * 32, bytes.fromhex(RFC8032[0][0])[::-1]],
    ids=["zero", "identity", "all-ones", "reversed"],
)
def test_odd_public_keys_get_the_same_answer_from_both_backends(raw: bytes) -> None:
    _, message, signature = (bytes.fromhex(x) for x in RFC8032[0])
    answers = []
    for using in backends():
        try:
            answers.append(PublicKey(raw, using=using).verify(signature, message))
        except ValueError:
            answers.append(None)
    assert len(set(answers)) == 1, answers
    assert answers[0] is not True


@needs_shared_openssl
def test_a_failed_check_leaves_no_error_for_the_ssl_module() -> None:
    shared = openssl_backend()
    assert shared is not None
    path = module._loaded_libcrypto()
    assert path is not None
    peek = ctypes.CDLL(path).ERR_peek_error
    peek.restype = ctypes.c_ulong
    public, message, _ = (bytes.fromhex(x) for x in RFC8032[2])
    assert not PublicKey(public, using=shared).verify(bytes(64), message)
    assert peek() == 0


def test_raw_keys_must_be_32_bytes(using: Backend) -> None:
    with pytest.raises(ValueError, match="32 bytes, not 31"):
        PublicKey(bytes(31), using=using)


def _pem(key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_pem_round_trip_with_what_cryptography_writes(using: Backend) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = _pem(private.public_key())
    key = PublicKey.from_pem(pem, using=using)
    assert key.raw == private.public_key().public_bytes_raw()
    assert key.verify(private.sign(b"m"), b"m")
    assert PublicKey.from_pem(pem.replace(b"\n", b"\r\n"), using=using) == key  # CRLF copies
    assert PublicKey.from_pem(b"# the operator's key\n" + pem, using=using) == key


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a PEM public key"),
        (b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "not a PEM public key"),
        (b"-----BEGIN PUBLIC KEY-----\nMCow!!\n-----END PUBLIC KEY-----\n", "not a PEM"),
        (b"-----BEGIN PUBLIC KEY-----\nMCowBQ==\n-----END PUBLIC KEY-----\n", "not an Ed25519"),
        (b"ec", "not an Ed25519 public key"),
        (b"truncated", "not an Ed25519 public key"),
    ],
)
def test_what_is_not_an_ed25519_pem_public_key(data: bytes, reason: str) -> None:
    if data == b"ec":
        data = _pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    elif data == b"truncated":
        lines = _pem(ed25519.Ed25519PrivateKey.generate().public_key()).splitlines()
        data = b"\n".join([lines[0], lines[1][:-8] + b"AAAA", lines[2]])
    with pytest.raises(ValueError, match=reason):
        PublicKey.from_pem(data)


def test_no_shared_libcrypto_falls_back_to_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "_loaded_libcrypto", lambda: None)
    openssl_backend.cache_clear()
    try:
        assert openssl_backend() is None
        assert backend() is cryptography_backend()
        public, message, signature = (bytes.fromhex(x) for x in RFC8032[1])
        assert PublicKey(public).verify(signature, message)
    finally:
        openssl_backend.cache_clear()


@needs_shared_openssl
def test_a_library_failing_the_self_test_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module._LibCrypto, "verify", lambda *_: True)  # says yes to anything
    openssl_backend.cache_clear()
    try:
        assert openssl_backend() is None
    finally:
        openssl_backend.cache_clear()


def test_a_missing_library_is_no_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(module, "_loaded_libcrypto", lambda: str(tmp_path / "libcrypto.so.3"))
    openssl_backend.cache_clear()
    try:
        assert openssl_backend() is None
    finally:
        openssl_backend.cache_clear()


def test_keys_are_values(using: Backend) -> None:
    raw = bytes.fromhex(RFC8032[0][0])
    assert PublicKey(raw, using=using) == PublicKey(raw)
    assert len({PublicKey(raw, using=using), PublicKey(raw)}) == 1
    assert raw.hex() in repr(PublicKey(raw, using=using))
