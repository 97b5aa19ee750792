from __future__ import annotations

import os
from pathlib import Path

import pytest

from mqfleet.errors import ConfigError
from mqfleet.settings import (
    DEFAULT_BROKER_URL,
    DEFAULT_COLLECTOR_ID,
    DEFAULT_METRICS_INTERVAL_S,
    BrokerAddress,
    Settings,
    default_config_file,
    default_data_dir,
    load_settings,
)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings()
    assert settings.broker_url == DEFAULT_BROKER_URL == "mqtt://127.0.0.1:1883"
    assert settings.metrics_interval_s == DEFAULT_METRICS_INTERVAL_S == 10.0
    assert settings.collector_id == DEFAULT_COLLECTOR_ID
    assert settings.topic_prefix == "fleet/v1"
    assert settings.mqtt_version == "5"
    assert settings.retention_days == 30.0
    # 24 h of samples at the default interval survive a broker outage.
    assert settings.metrics_backlog * settings.metrics_interval_s >= 24 * 3600
    # The default database is an SQLite file in the user's data dir (isolated by conftest).
    assert settings.database_url == f"sqlite:///{default_data_dir() / 'mqfleet.db'}"
    assert str(default_data_dir()).startswith(str(tmp_path))
    assert settings.agent_state_dir == default_data_dir() / "agent" / settings.node_id


def test_precedence_flag_over_env_over_toml_over_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml(
        tmp_path / "c.toml",
        'node_id = "from-toml"\nmetrics_interval_s = 5\ntopic_prefix = "acme/v1"\n'
        "retention_days = 7\n",
    )
    monkeypatch.setenv("MQFLEET_NODE_ID", "from-env")
    monkeypatch.setenv("MQFLEET_METRICS_INTERVAL_S", "2.5")
    settings = load_settings(config, node_id="from-flag")
    assert settings.node_id == "from-flag"  # flag beats env
    assert settings.metrics_interval_s == 2.5  # env beats TOML
    assert settings.topic_prefix == "acme/v1"  # TOML beats default
    assert settings.retention_days == 7.0
    assert settings.batch_size == 2000  # default


def test_none_flags_fall_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQFLEET_NODE_ID", "from-env")
    assert load_settings(node_id=None).node_id == "from-env"


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(tmp_path / "c.toml", 'node_id = "from-toml"\n')
    monkeypatch.setenv("MQFLEET_CONFIG", str(config))
    assert load_settings().node_id == "from-toml"
    # MQFLEET_CONFIG is the file's name, not a setting, and survives loading.
    assert os.environ["MQFLEET_CONFIG"] == str(config)


def test_explicit_config_beats_mqfleet_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQFLEET_CONFIG", str(write_toml(tmp_path / "a.toml", 'node_id = "a"\n')))
    assert load_settings(write_toml(tmp_path / "b.toml", 'node_id = "b"\n')).node_id == "b"


def test_default_config_file_is_read_when_present() -> None:
    path = default_config_file()
    assert load_settings().node_id != "from-default-file"
    path.parent.mkdir(parents=True)
    path.write_text('node_id = "from-default-file"\n')
    assert load_settings().node_id == "from-default-file"


def test_missing_config_file_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MQFLEET_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.toml.*MQFLEET_CONFIG"):
        load_settings()


def test_missing_config_file_from_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path)  # a directory is not a file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node_id = \n", "cannot read config file"),
        ('nodeid = "typo"\n', "invalid setting nodeid: Extra inputs are not permitted"),
        ('keepalive_s = "soon"\n', "invalid setting keepalive_s"),
        ('node_id = "a/b"\n', "invalid setting node_id: invalid node id"),
        ("metrics_interval_s = 0\n", "invalid setting metrics_interval_s"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    config = write_toml(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_config_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "bin.toml"
    config.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"cannot read config file .*bin\.toml"):
        load_settings(config)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MQFLEET_KEEPALIVE_S", "abc", "invalid setting keepalive_s"),
        ("MQFLEET_KEEPALIVE_S", "1", "invalid setting keepalive_s"),
        ("MQFLEET_METRICS_INTERVAL_S", "-1", "invalid setting metrics_interval_s"),
        ("MQFLEET_MQTT_VERSION", "4", "invalid setting mqtt_version"),
        ("MQFLEET_NODE_ID", "x" * 65, "invalid setting node_id"),
        ("MQFLEET_NODE_ID", "web 01", "invalid setting node_id"),
        ("MQFLEET_TOPIC_PREFIX", "fleet/#", "invalid setting topic_prefix"),
        ("MQFLEET_BROKER_URL", "http://h", "invalid setting broker_url: broker URL must"),
        ("MQFLEET_FLUSH_INTERVAL_S", "5", "invalid setting flush_interval_s"),
    ],
)
def test_bad_env_value_is_one_line_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match="invalid setting bogus"):
        load_settings(bogus=1)


def test_several_errors_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQFLEET_KEEPALIVE_S", "abc")
    monkeypatch.setenv("MQFLEET_BATCH_SIZE", "0")
    with pytest.raises(ConfigError, match=r"\(\+1 more\)"):
        load_settings()


def test_password_never_appears_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQFLEET_BROKER_URL", "mqtt://bob:hunter2@host:99999")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "hunter2" not in str(info.value)
    assert "bob:***@host" in str(info.value)


def test_every_field_has_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQFLEET_BATCH_SIZE", "17")
    monkeypatch.setenv("MQFLEET_STATE_DIR", "/srv/agent")
    settings = load_settings()
    assert settings.batch_size == 17
    assert settings.agent_state_dir == Path("/srv/agent")
    assert all(name.isidentifier() for name in Settings.model_fields)


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.node_id = "other"  # type: ignore[misc]


def test_default_node_id_is_a_valid_node_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "my host+name#1.example.com")
    assert load_settings().node_id == "my-host-name-1"


def test_derived_topics_use_the_prefix() -> None:
    settings = load_settings(topic_prefix="acme/v1")
    assert settings.topics.status("n") == "acme/v1/nodes/n/status"


# -- BrokerAddress ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", BrokerAddress("127.0.0.1", 1883, tls=False)),
        ("mqtt://broker", BrokerAddress("broker", 1883, tls=False)),
        ("mqtts://broker", BrokerAddress("broker", 8883, tls=True)),
        ("mqtts://broker:8884/", BrokerAddress("broker", 8884, tls=True)),
        ("mqtt://u:p@h:1", BrokerAddress("h", 1, tls=False, username="u", password="p")),
        (
            "mqtt://a%40b:p%3Aw%2F@h",
            BrokerAddress("h", 1883, tls=False, username="a@b", password="p:w/"),
        ),
        ("mqtt://agent@h", BrokerAddress("h", 1883, tls=False, username="agent")),
        ("mqtt://[::1]:1884", BrokerAddress("::1", 1884, tls=False)),
    ],
)
def test_broker_address_parses(url: str, expected: BrokerAddress) -> None:
    assert BrokerAddress.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h", "must start with mqtt:// or mqtts://"),
        ("h:1883", "must start with mqtt:// or mqtts://"),
        ("", "must start with mqtt:// or mqtts://"),
        ("mqtt://", "no host"),
        ("mqtt://:1883", "no host"),
        ("mqtt://h:port", "invalid port"),
        ("mqtt://h:70000", "invalid port"),
        ("mqtt://h/topic", "must not have a path"),
        ("mqtt://h?x=1", "must not have a path"),
        ("mqtt://[::1", "malformed"),
    ],
)
def test_broker_address_refuses(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerAddress.parse(url)


def test_broker_address_str_hides_the_password() -> None:
    address = BrokerAddress.parse("mqtts://bob:hunter2@h:8884")
    assert str(address) == "mqtts://bob@h:8884"
    assert str(BrokerAddress.parse("mqtt://[::1]")) == "mqtt://[::1]:1883"
    assert "hunter2" not in repr(address)
    assert address.password == "hunter2"


# -- the configuration reference in README.md stays complete --------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_documented_in_readme(name: str) -> None:
    text = README.read_text()
    row = f"| `{name}` | `MQFLEET_{name.upper()}` |"
    assert row in text, f"add a row for {name} to the configuration tables in README.md"
