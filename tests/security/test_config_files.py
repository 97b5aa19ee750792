"""Secret-holding files: atomic 0600 writes, permission warnings, the agent config."""

from __future__ import annotations

import logging
import stat
import tomllib
from pathlib import Path

import pytest

from mqfleet.errors import ConfigError
from mqfleet.security import (
    broker_url_with_credentials,
    check_private_file,
    generate_token,
    render_agent_config,
    warn_if_exposed,
    write_agent_config,
    write_private_file,
)
from mqfleet.security.config_files import render_toml
from mqfleet.settings import load_settings


def test_private_file_is_0600_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "token"
    write_private_file(path, "one")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_private_file(path, b"two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no temp file left


def test_permission_check(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "agent.toml"
    assert check_private_file(path) is None  # absent: nothing to warn about
    write_private_file(path, "x")
    assert check_private_file(path) is None
    for mode in (0o640, 0o604, 0o660, 0o644):
        path.chmod(mode)
        warning = check_private_file(path)
        assert warning is not None
        assert f"mode {mode:04o}" in warning
        assert "chmod 600" in warning
    with caplog.at_level(logging.WARNING):
        assert warn_if_exposed(path) is True
    assert "accessible by group/others" in caplog.text


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.example:1883", "mqtt://web-01:T0k-en_@broker.example:1883"),
        ("mqtts://broker.example", "mqtts://web-01:T0k-en_@broker.example"),
        ("mqtt://old:creds@10.0.0.1:1884", "mqtt://web-01:T0k-en_@10.0.0.1:1884"),
        ("mqtt://[::1]:1883", "mqtt://web-01:T0k-en_@[::1]:1883"),
    ],
)
def test_broker_url_with_credentials(url: str, expected: str) -> None:
    assert broker_url_with_credentials(url, username="web-01", password="T0k-en_") == expected


def test_credentials_are_quoted_and_parse_back() -> None:
    url = broker_url_with_credentials("mqtt://h:1", username="a b", password="p@ss:/w")
    assert url == "mqtt://a%20b:p%40ss%3A%2Fw@h:1"
    settings = load_settings(broker_url=url)
    assert (settings.broker.username, settings.broker.password) == ("a b", "p@ss:/w")


def test_agent_config_loads_as_settings(tmp_path: Path) -> None:
    token = generate_token()
    pub = tmp_path / "operator.pub"
    path = write_agent_config(
        tmp_path / "etc" / "agent.toml",
        node_id="web-01",
        broker_url="mqtts://broker.example:8883",
        token=token,
        operator_public_key_file=pub,
        topic_prefix="acme/v1",
        ca_file=tmp_path / "ca.pem",
        extra={"metrics_interval_s": 5.0, "max_concurrent_commands": 2},
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    settings = load_settings(config_file=path)
    assert settings.node_id == "web-01"
    assert settings.broker.username == "web-01"
    assert settings.broker.password == token
    assert settings.broker.tls
    assert settings.operator_public_key_file == pub
    assert settings.topic_prefix == "acme/v1"
    assert settings.ca_file == tmp_path / "ca.pem"
    assert settings.metrics_interval_s == 5.0
    assert settings.max_concurrent_commands == 2


def test_agent_config_refuses_reserved_names_and_weak_tokens() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        render_agent_config(node_id="operator", broker_url="mqtt://h", token=generate_token())
    with pytest.raises(ConfigError, match="too short"):
        render_agent_config(node_id="web-01", broker_url="mqtt://h", token="abc")
    with pytest.raises(ConfigError, match="broker URL"):
        render_agent_config(node_id="web-01", broker_url="http://h", token=generate_token())


def test_toml_strings_are_escaped() -> None:
    tricky = 'quote " backslash \\ newline \n tab \t bell \x07 unicode é'
    text = render_toml({"node_id": tricky, "flag": True, "n": 3, "x": 0.5, "p": Path("/a b")})
    assert tomllib.loads(text) == {"node_id": tricky, "flag": True, "n": 3, "x": 0.5, "p": "/a b"}


@pytest.mark.parametrize(("key", "value"), [("bad key", 1), ("k=v", 1), ("x", float("nan"))])
def test_toml_refuses_bad_keys_and_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError):
        render_toml({key: value})  # type: ignore[dict-item]
