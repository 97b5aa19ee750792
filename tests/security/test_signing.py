"""Signed commands: keys on disk, the canonical form, and every refusal of the verifier."""

from __future__ import annotations

import json
import logging
import stat
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mqfleet.errors import CommandRefusedError, ConfigError
from mqfleet.protocol import CommandRequest, decode_command, encode
from mqfleet.security import (
    CommandVerifier,
    canonical_command_bytes,
    key_id,
    load_private_key,
    load_public_key,
    refuse_replayed,
    save_key_pair,
    sign_command,
)
from mqfleet.security.signing import generate_private_key, public_key_of, save_private_key

if TYPE_CHECKING:
    from pathlib import Path

NOW = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def make_request(**overrides: object) -> CommandRequest:
    fields: dict[str, object] = {
        "command_id": "3f1c2a8e-1111-4222-8333-444455556666",
        "node_id": "web-01",
        "command_text": "uptime && echo 'héllo 🚀'",
        "timeout_s": 60.0,
        "created_at": NOW,
        "expires_at": NOW + timedelta(minutes=10),
        "issuer": "alice@laptop",
    }
    fields.update(overrides)
    return msgspec.convert(fields, CommandRequest)


@pytest.fixture
def key():
    return generate_private_key()


@pytest.fixture
def verifier(key) -> CommandVerifier:
    return CommandVerifier(node_id="web-01", public_keys=[public_key_of(key)], clock=lambda: NOW)


def refusal(verifier: CommandVerifier, request: CommandRequest) -> CommandRefusedError:
    with pytest.raises(CommandRefusedError) as info:
        verifier.check(request)
    assert "\n" not in str(info.value)
    assert info.value.command_id == request.command_id
    return info.value


# -- canonical form ---------------------------------------------------------------------


def test_canonical_form_is_documented_json() -> None:
    data = canonical_command_bytes(make_request())
    assert data == (
        b'{"command_id":"3f1c2a8e-1111-4222-8333-444455556666",'
        b'"command_text":"uptime && echo \'h\\u00e9llo \\ud83d\\ude80\'",'
        b'"created_at":"2026-01-02T03:04:05.678000Z","ctx":"mqfleet-command-v1",'
        b'"expires_at":"2026-01-02T03:14:05.678000Z","node_id":"web-01","timeout_s":60.0}'
    )
    assert json.loads(data)["command_text"] == "uptime && echo 'héllo 🚀'"


def test_canonical_form_ignores_offset_precision_and_int_timeouts() -> None:
    plus2 = timezone(timedelta(hours=2))
    same = make_request(
        created_at=NOW.astimezone(plus2), expires_at=(NOW + timedelta(minutes=10)), timeout_s=60
    )
    assert canonical_command_bytes(same) == canonical_command_bytes(make_request())
    whole = make_request(created_at=NOW.replace(microsecond=0))
    assert b'"created_at":"2026-01-02T03:04:05.000000Z"' in canonical_command_bytes(whole)


def test_issuer_batch_and_signature_are_not_signed() -> None:
    base = canonical_command_bytes(make_request())
    assert canonical_command_bytes(make_request(issuer="bob", batch_id="b1")) == base
    assert canonical_command_bytes(make_request(signature="x:y")) == base


# -- sign and verify ----------------------------------------------------------------------


def test_signed_command_survives_the_wire_and_passes(key, verifier) -> None:
    signed = sign_command(make_request(), key)
    assert signed.signature is not None
    assert signed.signature.startswith(key_id(public_key_of(key)) + ":")
    received = decode_command(encode(signed))  # JSON round trip, as the agent gets it
    verifier.check(received)


def test_collector_style_redelivery_of_the_payload_still_verifies(key, verifier) -> None:
    payload = encode(sign_command(make_request(), key))
    redelivered = encode(decode_command(payload))
    assert redelivered == payload
    verifier.check(decode_command(redelivered))


def test_unsigned_is_refused(verifier) -> None:
    error = refusal(verifier, make_request())
    assert error.reason == "unsigned"
    assert str(error) == "refused: command is not signed"


@pytest.mark.parametrize("signature", ["nocolon", "abcd:AAAA", "0123456789abcdef:!!notb64", ""])
def test_malformed_signature_is_refused(verifier, signature: str) -> None:
    error = refusal(verifier, make_request(signature=signature))
    assert error.reason == ("unsigned" if not signature else "malformed_signature")


def test_forged_with_another_key_is_refused(verifier) -> None:
    forged = sign_command(make_request(), generate_private_key())
    error = refusal(verifier, forged)
    assert error.reason == "unknown_key"
    assert "untrusted key" in str(error)


def test_forged_claiming_the_trusted_key_id_is_refused(key, verifier) -> None:
    mallory = sign_command(make_request(), generate_private_key())
    assert mallory.signature is not None
    claimed = key_id(public_key_of(key)) + ":" + mallory.signature.split(":", 1)[1]
    error = refusal(verifier, make_request(signature=claimed))
    assert error.reason == "bad_signature"


@pytest.mark.parametrize(
    "change",
    [
        {"command_id": "another-id"},
        {"node_id": "web-02"},
        {"command_text": "rm -rf /"},
        {"timeout_s": 60.000001},
        {"created_at": NOW + timedelta(microseconds=1)},
        {"expires_at": NOW + timedelta(days=365)},
    ],
    ids=lambda change: next(iter(change)),
)
def test_altering_any_signed_field_is_refused(key, verifier, change) -> None:
    signed = sign_command(make_request(), key)
    altered = msgspec.structs.replace(signed, **change)
    error = refusal(verifier, altered)
    assert error.reason == "bad_signature"
    assert str(error) == "refused: signature does not match the command (altered or forged)"


def test_command_for_another_node_is_refused(key, verifier) -> None:
    other = sign_command(make_request(node_id="db-01"), key)
    error = refusal(verifier, other)
    assert error.reason == "wrong_node"
    assert str(error) == "refused: command is for node db-01, this is web-01"


def test_expired_command_is_refused(key) -> None:
    signed = sign_command(make_request(), key)
    late = CommandVerifier(
        node_id="web-01",
        public_keys=[public_key_of(key)],
        clock=lambda: NOW + timedelta(minutes=10),
    )
    error = refusal(late, signed)
    assert error.reason == "expired"
    assert str(error) == "refused: command expired at 2026-01-02T03:14:05.678000Z"


def test_replay_reason_for_the_journal() -> None:
    error = refuse_replayed(make_request())
    assert error.reason == "replayed"
    assert str(error) == (
        "refused: command 3f1c2a8e-1111-4222-8333-444455556666 was already received"
    )


def test_each_refusal_has_a_distinct_message(key, verifier) -> None:
    cases = [
        make_request(),
        make_request(signature="bad"),
        sign_command(make_request(), generate_private_key()),
        msgspec.structs.replace(sign_command(make_request(), key), command_text="id"),
        sign_command(make_request(node_id="db-01"), key),
        sign_command(make_request(expires_at=NOW), key),
    ]
    errors = [refusal(verifier, case) for case in cases] + [refuse_replayed(make_request())]
    assert len({e.reason for e in errors}) == len(errors)
    assert len({str(e) for e in errors}) == len(errors)


def test_key_rotation_trusts_several_keys(key) -> None:
    new_key = generate_private_key()
    verifier = CommandVerifier(
        node_id="web-01",
        public_keys=[public_key_of(key), public_key_of(new_key)],
        clock=lambda: NOW,
    )
    verifier.check(sign_command(make_request(), key))
    verifier.check(sign_command(make_request(), new_key))
    assert verifier.key_ids == [key_id(public_key_of(key)), key_id(public_key_of(new_key))]


def test_verifier_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        CommandVerifier(node_id="web-01", public_keys=[])


# -- keys on disk -----------------------------------------------------------------------


def test_key_pair_files_and_round_trip(tmp_path: Path) -> None:
    private_path, public_path = tmp_path / "keys" / "operator.key", tmp_path / "keys" / "op.pub"
    public = save_key_pair(private_path, public_path)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private = load_private_key(private_path)
    loaded_public = load_public_key(public_path)
    assert key_id(loaded_public) == key_id(public) == key_id(public_key_of(private))
    verifier = CommandVerifier.from_files(node_id="web-01", public_key_files=[public_path])
    verifier.check(sign_command(make_request(expires_at=datetime.now(UTC) + timedelta(1)), private))


def test_keys_init_never_overwrites(tmp_path: Path) -> None:
    private_path, public_path = tmp_path / "op.key", tmp_path / "op.pub"
    first = save_key_pair(private_path, public_path)
    with pytest.raises(ConfigError, match="already exists"):
        save_key_pair(private_path, public_path)
    assert key_id(load_public_key(public_path)) == key_id(first)
    second = save_key_pair(private_path, public_path, overwrite=True)
    assert key_id(second) != key_id(first)


def test_readable_private_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "op.key"
    save_private_key(generate_private_key(), path)
    with caplog.at_level(logging.WARNING):
        load_private_key(path)
    assert not caplog.records
    path.chmod(0o640)
    with caplog.at_level(logging.WARNING):
        load_private_key(path)
    assert [r.getMessage() for r in caplog.records] == [
        (
            f"{path} holds secrets but is accessible by group/others (mode 0640); "
            f"run: chmod 600 {path}"
        )
    ]


@pytest.mark.parametrize(
    ("content", "loader", "message"),
    [
        (None, load_public_key, "cannot read operator public key"),
        (b"", load_public_key, "is not a PEM public key"),
        (b"garbage", load_private_key, "is not a PEM private key"),
        ("private", load_public_key, "looks like a PRIVATE key"),
        ("public", load_private_key, "is not a PEM private key"),
        ("ec", load_private_key, "is not an Ed25519 key"),
        (b"x" * 70000, load_public_key, "too large"),
    ],
)
def test_bad_key_files_are_one_line_errors(tmp_path: Path, content, loader, message) -> None:
    path = tmp_path / "key.pem"
    priv, pub = tmp_path / "p.key", tmp_path / "p.pub"
    save_key_pair(priv, pub)
    if content == "private":
        path.write_bytes(priv.read_bytes())
    elif content == "public":
        path.write_bytes(pub.read_bytes())
    elif content == "ec":
        ec_key = ec.generate_private_key(ec.SECP256R1())
        path.write_bytes(
            ec_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    elif content is not None:
        path.write_bytes(content)
    if path.exists():
        path.chmod(0o600)
    with pytest.raises(ConfigError, match=message) as info:
        loader(path)
    assert "\n" not in str(info.value)


def test_encrypted_private_key_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "enc.key"
    path.write_bytes(
        generate_private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="is encrypted"):
        load_private_key(path)
