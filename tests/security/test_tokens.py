"""Tokens and reserved account names."""

from __future__ import annotations

import pytest

from mqfleet.errors import ConfigError
from mqfleet.security import (
    COLLECTOR_ACCOUNT,
    OPERATOR_ACCOUNT,
    RESERVED_ACCOUNT_NAMES,
    generate_token,
    is_reserved_account,
    validate_node_account,
    validate_token,
)


def test_tokens_are_random_urlsafe_and_at_least_128_bits() -> None:
    tokens = {generate_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert validate_token(token) == token
        assert len(token) * 6 >= 256  # 32 bytes by default
    assert len(generate_token(16)) == 22


def test_weak_token_generation_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 128 bits"):
        generate_token(8)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("abc12", "too short"),
        ("a" * 21, "too short"),
        ("has space" * 4, "only the characters"),
        ("pa:ss/word" * 4, "only the characters"),
        ("a" * 257, "too long"),
    ],
)
def test_bad_tokens_are_refused_without_echoing_them(token: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        validate_token(token)
    assert token not in str(info.value)


def test_service_accounts_are_reserved() -> None:
    expected = {OPERATOR_ACCOUNT, COLLECTOR_ACCOUNT, "admin", "root", "mqfleet"}
    assert expected <= RESERVED_ACCOUNT_NAMES


@pytest.mark.parametrize(
    "name", ["operator", "Operator", "COLLECTOR", "root", "mqfleet", "..", "."]
)
def test_reserved_names_can_never_be_node_ids(name: str) -> None:
    assert is_reserved_account(name)
    with pytest.raises(ConfigError, match="reserved"):
        validate_node_account(name)


@pytest.mark.parametrize("name", ["", "a/b", "a+b", "#", "x" * 65, "sp ace"])
def test_invalid_node_ids_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid node id"):
        validate_node_account(name)


@pytest.mark.parametrize("name", ["web-01", "operator-1", "rooted", "db.eu_2"])
def test_ordinary_node_ids_pass(name: str) -> None:
    assert validate_node_account(name) == name
