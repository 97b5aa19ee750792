from __future__ import annotations

import os
from pathlib import Path

import msgspec
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

#: Every setting's name, in definition order.
SETTING_NAMES = [field.name for field in msgspec.structs.fields(Settings)]


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


@pytest.mark.parametrize("value", [None, "", "relative/dir"])
def test_default_dirs_follow_xdg_home_when_unset_or_invalid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None
) -> None:
    # XDG Base Directory rules: an unset, empty or relative $XDG_*_HOME is ignored.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for variable in ("XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "mqfleet"
    assert default_config_file() == tmp_path / "home" / ".config" / "mqfleet" / "config.toml"


def test_default_dirs_use_absolute_xdg_dirs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "conf"))
    assert default_data_dir() == tmp_path / "data" / "mqfleet"
    assert default_config_file() == tmp_path / "conf" / "mqfleet" / "config.toml"


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
        ('nodeid = "typo"\n', "invalid setting nodeid: unknown setting, did you mean node_id?"),
        ("[agent]\nnode_id = 'x'\n", "invalid setting agent: unknown setting"),
        ('keepalive_s = "soon"\n', "invalid setting keepalive_s"),
        ('node_id = "a/b"\n', "invalid setting node_id: invalid node id"),
        ("metrics_interval_s = 0\n", "invalid setting metrics_interval_s"),
        ("keepalive_s = 30.5\n", "invalid setting keepalive_s"),
        ("keepalive_s = true\n", "invalid setting keepalive_s"),
        ("mqtt_version = 5\n", "invalid setting mqtt_version: Expected '5' or '3.1.1'"),
        ("ca_file = 3\n", "invalid setting ca_file"),
        ('command_allowlist = "^a$"\n', "invalid setting command_allowlist"),
        ("command_allowlist = [1]\n", "invalid setting command_allowlist[0]"),
        ("node_id = 1979-05-27\n", "invalid setting node_id"),
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
        ("MQFLEET_KEEPALIVE_S", "5.5", "invalid setting keepalive_s"),
        ("MQFLEET_KEEPALIVE_S", "", "invalid setting keepalive_s"),
        ("MQFLEET_RETENTION_DAYS", "nan", "invalid setting retention_days"),
        ("MQFLEET_INSECURE_UNSIGNED_COMMANDS", "maybe", "invalid setting insecure_unsigned"),
        ("MQFLEET_COMMAND_ALLOWLIST", "^a$", "invalid setting command_allowlist: Expected a JSON"),
        ("MQFLEET_COMMAND_ALLOWLIST", '["("]', "invalid setting command_allowlist: entry 0"),
        ("MQFLEET_COLLECTOR_GROUP", "a/b", "invalid setting collector_group"),
        ("MQFLEET_COLLECTOR_GROUP", "g" * 65, "invalid setting collector_group"),
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


def test_errors_name_where_the_value_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml(tmp_path / "c.toml", "batch_size = 0\n")
    with pytest.raises(ConfigError, match=rf"batch_size: .* \(in config file {config}\)$"):
        load_settings(config)
    monkeypatch.setenv("MQFLEET_BATCH_SIZE", "0")
    with pytest.raises(ConfigError, match=r"batch_size: .* \(from \$MQFLEET_BATCH_SIZE\)$"):
        load_settings(config)
    with pytest.raises(ConfigError, match=r"batch_size: .* \(from the command line\)$"):
        load_settings(config, batch_size=0)


def test_only_the_winning_value_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(tmp_path / "c.toml", 'keepalive_s = "soon"\n')
    monkeypatch.setenv("MQFLEET_KEEPALIVE_S", "abc")
    assert load_settings(config, keepalive_s=5).keepalive_s == 5


def test_repr_hides_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQFLEET_BROKER_URL", "mqtts://node-1:hunter2@broker:8883")
    monkeypatch.setenv("MQFLEET_DATABASE_URL", "postgresql+psycopg://app:s3cret@db/fleet")
    settings = load_settings()
    for text in (repr(settings), str(settings), repr(settings.__rich_repr__())):
        assert "hunter2" not in text
        assert "s3cret" not in text
        assert "mqtts://node-1:***@broker:8883" in text
        assert "postgresql+psycopg://app:***@db/fleet" in text
    assert settings.broker.password == "hunter2"
    assert settings.database_url == "postgresql+psycopg://app:s3cret@db/fleet"


def test_other_mqfleet_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # MQFLEET_BROKER_CONF and MQFLEET_TEST_POSTGRES_URL are read elsewhere; a typo in a
    # variable name is not refused (the environment is shared with everything else).
    monkeypatch.setenv("MQFLEET_BROKER_CONF", "/etc/x.conf")
    monkeypatch.setenv("MQFLEET_NODEID", "typo")
    assert load_settings() == Settings()


def test_names_are_case_insensitive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(write_toml(tmp_path / "c.toml", 'NODE_ID = "up"\n')).node_id == "up"
    monkeypatch.setenv("mqfleet_node_id", "lower")
    assert load_settings().node_id == "lower"


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("keepalive_s", " 5 ", 5),
        ("keepalive_s", "1_000", 1000),
        ("keepalive_s", "+5", 5),
        ("keepalive_s", "5.0", 5),
        ("retention_days", "1e1", 10.0),
        ("retention_days", "inf", float("inf")),
        ("insecure_unsigned_commands", "yes", True),
        ("insecure_unsigned_commands", "ON", True),
        ("insecure_unsigned_commands", "1", True),
        ("insecure_unsigned_commands", "t", True),
        ("insecure_unsigned_commands", "off", False),
        ("insecure_unsigned_commands", "No", False),
        ("command_allowlist", "[]", []),
        ("run_as_user", "", ""),
        ("ca_file", "", Path()),
    ],
)
def test_environment_text_is_read_as_before(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str, expected: object
) -> None:
    monkeypatch.setenv(f"MQFLEET_{name.upper()}", text)
    assert getattr(load_settings(), name) == expected


def test_flag_values_are_converted() -> None:
    settings = load_settings(
        keepalive_s="5",
        state_dir="s/d",
        metrics_interval_s=1,
        command_allowlist=("a", "b"),
        insecure_unsigned_commands="yes",
    )
    assert settings.keepalive_s == 5
    assert settings.state_dir == Path("s/d")
    assert settings.metrics_interval_s == 1.0
    assert isinstance(settings.metrics_interval_s, float)
    assert settings.command_allowlist == ["a", "b"]
    assert settings.insecure_unsigned_commands is True


def test_toml_values_are_converted(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "c.toml",
        'keepalive_s = "30"\nmetrics_interval_s = 5\nca_file = "rel/ca.pem"\n'
        "insecure_unsigned_commands = 1\ncommand_allowlist = ['^uptime$']\n",
    )
    settings = load_settings(config)
    assert settings.keepalive_s == 30
    assert settings.metrics_interval_s == 5.0
    assert settings.ca_file == Path("rel/ca.pem")
    assert settings.insecure_unsigned_commands is True
    assert settings.command_allowlist == ["^uptime$"]
    assert settings.config_file == config


def test_defaults_pass_the_checks() -> None:
    settings = load_settings()
    assert settings == Settings()
    assert settings.config_file is None
    assert Settings().config_file is None


#: One value, other than the default, for every setting: as text and as loaded.
ENV_SAMPLES: dict[str, tuple[str, object]] = {
    "broker_url": ("mqtts://broker:8884", "mqtts://broker:8884"),
    "topic_prefix": ("acme/v2/", "acme/v2"),
    "mqtt_version": ("3.1.1", "3.1.1"),
    "keepalive_s": ("45", 45),
    "ca_file": ("/etc/ca.pem", Path("/etc/ca.pem")),
    "cert_file": ("/etc/c.pem", Path("/etc/c.pem")),
    "key_file": ("/etc/k.pem", Path("/etc/k.pem")),
    "database_url": ("sqlite:///x.db", "sqlite:///x.db"),
    "node_id": ("web-01", "web-01"),
    "metrics_interval_s": ("2.5", 2.5),
    "state_dir": ("/srv/agent", Path("/srv/agent")),
    "metrics_backlog": ("10", 10),
    "disk_path": ("/srv", "/srv"),
    "max_concurrent_commands": ("8", 8),
    "output_limit_bytes": ("2048", 2048),
    "kill_grace_s": ("0", 0.0),
    "operator_public_key_file": ("/etc/op.pub", Path("/etc/op.pub")),
    "command_allowlist": ('["^uptime$", "^df( -h)?$"]', ["^uptime$", "^df( -h)?$"]),
    "run_as_user": ("nobody", "nobody"),
    "operator_private_key_file": ("/k/op.key", Path("/k/op.key")),
    "broker_password_file": ("/p/passwd", Path("/p/passwd")),
    "broker_pid_file": ("/p/pid", Path("/p/pid")),
    "insecure_unsigned_commands": ("true", True),
    "collector_id": ("c-2", "c-2"),
    "collector_group": ("g1", "g1"),
    "retention_days": ("7", 7.0),
    "batch_size": ("17", 17),
    "flush_interval_s": ("0.1", 0.1),
    "receive_maximum": ("100", 100),
    "collector_workers": ("4", 4),
}


def test_every_setting_has_an_env_sample() -> None:
    assert sorted(ENV_SAMPLES) == sorted(SETTING_NAMES)


@pytest.mark.parametrize("name", sorted(ENV_SAMPLES))
def test_every_setting_is_read_from_its_env_var(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    text, expected = ENV_SAMPLES[name]
    assert getattr(Settings(), name) != expected
    monkeypatch.setenv(f"MQFLEET_{name.upper()}", text)
    value = getattr(load_settings(), name)
    assert value == expected
    assert type(value) is type(expected)


def test_every_field_has_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQFLEET_BATCH_SIZE", "17")
    monkeypatch.setenv("MQFLEET_STATE_DIR", "/srv/agent")
    settings = load_settings()
    assert settings.batch_size == 17
    assert settings.agent_state_dir == Path("/srv/agent")
    assert all(name.isidentifier() for name in SETTING_NAMES)


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(AttributeError):
        settings.node_id = "other"  # type: ignore[misc]
    assert settings.node_id != "other"


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


@pytest.mark.parametrize("name", sorted(SETTING_NAMES))
def test_every_setting_is_documented_in_readme(name: str) -> None:
    text = README.read_text()
    row = f"| `{name}` | `MQFLEET_{name.upper()}` |"
    assert row in text, f"add a row for {name} to the configuration tables in README.md"
