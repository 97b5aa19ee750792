"""Typed settings of every mqfleet component, with one precedence.

Precedence, highest first: command-line flags (passed as keyword overrides) >
``MQFLEET_*`` environment variables > the TOML config file > the defaults below.

The config file is ``--config PATH``, else ``$MQFLEET_CONFIG``, else
``<user config dir>/mqfleet/config.toml`` when it exists. Its keys are the field names
below (``broker_url = "mqtt://..."``).
"""

from __future__ import annotations

import os
import re
import socket
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mqfleet.errors import ConfigError, ProtocolError
from mqfleet.protocol import DEFAULT_PREFIX, NODE_ID_PATTERN, Topics

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "DEFAULT_BROKER_PASSWORD_FILE",
    "DEFAULT_BROKER_PID_FILE",
    "DEFAULT_BROKER_URL",
    "DEFAULT_COLLECTOR_ID",
    "DEFAULT_METRICS_INTERVAL_S",
    "BrokerAddress",
    "Settings",
    "default_config_file",
    "default_data_dir",
    "load_settings",
]

APP_NAME: Final = "mqfleet"
DEFAULT_BROKER_URL: Final = "mqtt://127.0.0.1:1883"
DEFAULT_METRICS_INTERVAL_S: Final = 10.0
DEFAULT_COLLECTOR_ID: Final = "mqfleet-collector"
#: 24 h at the default interval, so a day-long broker outage loses no metric.
DEFAULT_METRICS_BACKLOG: Final = 8640
#: Where broker/mosquitto.conf keeps its password file and writes its pid.
DEFAULT_BROKER_PASSWORD_FILE: Final = Path("/etc/mosquitto/mqfleet/passwd")
DEFAULT_BROKER_PID_FILE: Final = Path("/run/mosquitto/mosquitto.pid")

_config_file: ContextVar[Path | None] = ContextVar("mqfleet_config_file", default=None)


def default_data_dir() -> Path:
    """Directory for the default SQLite database and the agent's state."""
    from platformdirs import user_data_path  # noqa: PLC0415 - keep CLI start-up lean

    return user_data_path(APP_NAME, appauthor=False)


def default_config_file() -> Path:
    """Return the config file used when neither ``--config`` nor ``$MQFLEET_CONFIG`` is set."""
    from platformdirs import user_config_path  # noqa: PLC0415 - keep CLI start-up lean

    return user_config_path(APP_NAME, appauthor=False) / "config.toml"


def _default_database_url() -> str:
    return f"sqlite:///{default_data_dir() / 'mqfleet.db'}"


def _default_node_id() -> str:
    # Hostnames may carry characters the protocol forbids: map them to "-".
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0])[:64]
    return name or "node"


def _redact(url: str) -> str:
    # Error messages end up in logs and terminals: never echo a password.
    return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", url)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """A parsed broker URL: ``mqtt[s]://[user[:password]@]host[:port]``."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    # Kept out of repr(): addresses end up in logs.
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse a broker URL; raise :class:`ConfigError` with a one-line reason."""
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # e.g. an unbalanced "[" in an IPv6 host
            raise ConfigError(f"broker URL is malformed: {_redact(url)!r}") from exc
        if parts.scheme not in {"mqtt", "mqtts"}:
            raise ConfigError(
                f"broker URL must start with mqtt:// or mqtts://, got {_redact(url)!r}"
            )
        if not parts.hostname:
            raise ConfigError(f"broker URL has no host: {_redact(url)!r}")
        if parts.path not in {"", "/"} or parts.query or parts.fragment:
            raise ConfigError(f"broker URL must not have a path or query: {_redact(url)!r}")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"broker URL has an invalid port: {_redact(url)!r}") from exc
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        """Render without the password, for logs and messages."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"


class Settings(BaseSettings):
    """Every setting of mqfleet; components read only the fields they need."""

    model_config = SettingsConfigDict(
        env_prefix="MQFLEET_",
        extra="forbid",
        validate_default=True,
        frozen=True,
    )

    # Not a setting: which file load_settings() read (the agent checks its mode).
    _config_source: Path | None = PrivateAttr(default=None)

    # -- shared ---------------------------------------------------------------------
    broker_url: str = Field(default=DEFAULT_BROKER_URL, description="mqtt[s]://[user:pass@]host:port")
    topic_prefix: str = Field(default=DEFAULT_PREFIX, description="root of every topic")
    mqtt_version: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version")
    keepalive_s: int = Field(default=30, ge=2, le=3600, description="MQTT keepalive")
    ca_file: Path | None = Field(default=None, description="CA bundle for mqtts://")
    cert_file: Path | None = Field(default=None, description="client certificate for mqtts://")
    key_file: Path | None = Field(default=None, description="client key for mqtts://")
    database_url: str = Field(
        default_factory=_default_database_url, description="SQLAlchemy URL of the database"
    )

    # -- agent ----------------------------------------------------------------------
    node_id: str = Field(default_factory=_default_node_id, description="this node's id")
    metrics_interval_s: float = Field(
        default=DEFAULT_METRICS_INTERVAL_S, gt=0, le=86400, description="seconds between samples"
    )
    state_dir: Path | None = Field(
        default=None, description="agent state (session counter, command journal)"
    )
    metrics_backlog: int = Field(
        default=DEFAULT_METRICS_BACKLOG, ge=1, description="samples kept while the broker is away"
    )
    disk_path: str = Field(default="/", description="filesystem whose usage is reported")
    max_concurrent_commands: int = Field(default=4, ge=1, le=256)
    output_limit_bytes: int = Field(default=64 * 1024, ge=1024, description="per stream")
    kill_grace_s: float = Field(default=5.0, ge=0, description="SIGTERM to SIGKILL grace")
    operator_public_key_file: Path | None = Field(
        default=None, description="Ed25519 public key (PEM) that must sign every command"
    )
    command_allowlist: list[str] = Field(
        default_factory=list,
        description="if set, only commands matching one of these regexes (whole text) run",
    )
    run_as_user: str | None = Field(
        default=None, description="run commands as this user (the agent must be root)"
    )

    # -- operator (CLI) -------------------------------------------------------------
    operator_private_key_file: Path | None = Field(
        default=None, description="Ed25519 private key (PEM, 0600) that signs commands"
    )
    broker_password_file: Path = Field(
        default=DEFAULT_BROKER_PASSWORD_FILE,
        description="mosquitto password file that provision/revoke edit",
    )
    broker_pid_file: Path = Field(
        default=DEFAULT_BROKER_PID_FILE,
        description="mosquitto pid file, to reload the broker after provision/revoke",
    )

    # -- development only -----------------------------------------------------------
    insecure_unsigned_commands: bool = Field(
        default=False,
        description="DEVELOPMENT ONLY: agents without a public key run unsigned commands, "
        "and the CLI sends unsigned commands when it has no private key",
    )

    # -- collector ------------------------------------------------------------------
    collector_id: str = Field(default=DEFAULT_COLLECTOR_ID, description="fixed MQTT client id")
    collector_group: str = Field(
        default="",
        max_length=64,
        description="MQTT 5 shared-subscription group for metrics and results; empty: none",
    )
    retention_days: float = Field(default=30.0, gt=0, description="metrics older are pruned")
    batch_size: int = Field(default=2000, ge=1, description="rows per transaction at most")
    flush_interval_s: float = Field(default=0.5, gt=0, le=1.0, description="max batch delay")
    receive_maximum: int = Field(default=10000, ge=1, le=65535, description="MQTT 5 inflight")

    @field_validator("command_allowlist")
    @classmethod
    def _allowlist_compiles(cls, value: list[str]) -> list[str]:
        for index, pattern in enumerate(value):
            try:
                re.compile(pattern)
            except re.error as exc:
                msg = f"entry {index} ({pattern[:80]!r}) is not a regular expression: {exc}"
                raise ValueError(msg) from None
        return value

    @field_validator("collector_group")
    @classmethod
    def _group_is_a_topic_level(cls, value: str) -> str:
        # It becomes one topic level of "$share/<group>/...": MQTT 5 spec 4.8.2.
        if any(c in value for c in "/+#\0"):
            msg = f"{value[:80]!r} must not contain '/', '+', '#' or NUL (one topic level)"
            raise ValueError(msg)
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url_parses(cls, value: str) -> str:
        try:
            BrokerAddress.parse(value)
        except ConfigError as exc:  # pydantic only collects ValueErrors
            raise ValueError(str(exc)) from None
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_valid(cls, value: str) -> str:
        try:
            return Topics(value).prefix
        except ProtocolError as exc:  # pydantic only collects ValueErrors
            raise ValueError(str(exc)) from None

    @field_validator("node_id")
    @classmethod
    def _node_id_is_valid(cls, value: str) -> str:
        if not re.fullmatch(NODE_ID_PATTERN, value):
            msg = f"invalid node id {value[:80]!r}: use 1-64 characters of A-Z a-z 0-9 _ . -"
            raise ValueError(msg)
        return value

    @property
    def config_file(self) -> Path | None:
        """The TOML config file these settings were read from, if any."""
        return self._config_source

    @property
    def broker(self) -> BrokerAddress:
        """The parsed broker URL."""
        return BrokerAddress.parse(self.broker_url)

    @property
    def topics(self) -> Topics:
        """Topic builder/parser for the configured prefix."""
        return Topics(self.topic_prefix)

    @property
    def agent_state_dir(self) -> Path:
        """Where the agent keeps its session counter and command journal."""
        return self.state_dir or default_data_dir() / "agent" / self.node_id

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no .env files
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - not used
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order the sources: flags (init) > environment > TOML config file > defaults."""
        path = _config_file.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def _resolve_config_file(config_file: Path | str | None) -> Path | None:
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    env = os.environ.get("MQFLEET_CONFIG")
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (from MQFLEET_CONFIG)")
        return path
    default = default_config_file()
    return default if default.is_file() else None


def _one_line(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "settings"
    msg = str(err["msg"]).removeprefix("Value error, ")
    more = exc.error_count() - 1
    return f"invalid setting {where}: {msg}" + (f" (+{more} more)" if more else "")


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:  # noqa: ANN401
    """Load settings with the documented precedence; ``overrides`` are the CLI flags.

    ``None`` overrides are ignored, so flags that were not given fall through.
    Raises :class:`ConfigError` with a one-line message on any invalid value.
    """
    flags: Mapping[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    # MQFLEET_CONFIG names the file; it is not a setting itself.
    path = _resolve_config_file(config_file)
    token = _config_file.set(path)
    saved = os.environ.pop("MQFLEET_CONFIG", None)
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    finally:
        if saved is not None:
            os.environ["MQFLEET_CONFIG"] = saved
        _config_file.reset(token)
    settings._config_source = path  # noqa: SLF001 - set once, by the loader that read it
    return settings
