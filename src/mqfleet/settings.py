"""Typed settings of every mqfleet component, with one precedence.

Precedence, highest first: command-line flags (passed as keyword overrides) >
``MQFLEET_*`` environment variables > the TOML config file > the defaults below.

The config file is ``--config PATH``, else ``$MQFLEET_CONFIG``, else
``<user config dir>/mqfleet/config.toml`` when it exists. Its keys are the field names
below (``broker_url = "mqtt://..."``).

:class:`Settings` is a frozen :class:`msgspec.Struct`; :func:`load_settings` gathers the
sources, converts each value to its field's type and checks it, so every component starts
from valid settings. This module stays off pydantic: the CLI and the agent import it first
thing, and pydantic-settings alone cost ~100 ms and megabytes of RSS (docs/BENCHMARKS.md).
"""

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Final, Literal, NamedTuple, Self, cast, get_args, get_origin
from urllib.parse import unquote, urlsplit

import msgspec
from msgspec import Meta

from mqfleet.errors import ConfigError, ProtocolError
from mqfleet.protocol import DEFAULT_PREFIX, NODE_ID_PATTERN, Topics

__all__ = [
    "DEFAULT_BROKER_PASSWORD_FILE",
    "DEFAULT_BROKER_PID_FILE",
    "DEFAULT_BROKER_URL",
    "DEFAULT_COLLECTOR_ID",
    "DEFAULT_METRICS_INTERVAL_S",
    "MAX_COLLECTOR_WORKERS",
    "BrokerAddress",
    "Settings",
    "default_config_file",
    "default_data_dir",
    "load_settings",
]

APP_NAME: Final = "mqfleet"
ENV_PREFIX: Final = "MQFLEET_"
DEFAULT_BROKER_URL: Final = "mqtt://127.0.0.1:1883"
DEFAULT_METRICS_INTERVAL_S: Final = 10.0
DEFAULT_COLLECTOR_ID: Final = "mqfleet-collector"
#: Most ingest worker processes one collector service runs (``collector --workers N``).
MAX_COLLECTOR_WORKERS: Final = 64
#: 24 h at the default interval, so a day-long broker outage loses no metric.
DEFAULT_METRICS_BACKLOG: Final = 8640
#: Where broker/mosquitto.conf keeps its password file and writes its pid.
DEFAULT_BROKER_PASSWORD_FILE: Final = Path("/etc/mosquitto/mqfleet/passwd")
DEFAULT_BROKER_PID_FILE: Final = Path("/run/mosquitto/mosquitto.pid")

#: Settings whose value may carry a password: shown redacted in repr().
_URLS_WITH_SECRETS: Final = frozenset({"broker_url", "database_url"})
#: Spellings of booleans accepted from strings (env vars, TOML strings), any case.
_TRUE: Final = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE: Final = frozenset({"0", "false", "f", "no", "n", "off"})
#: An integer written as text: sign, digits with single "_" separators, maybe ".0".
_INT_TEXT: Final = re.compile(r"[+-]?\d+(?:_\d+)*(?:\.0*)?")
#: The " - at `$[0]`" suffix msgspec puts on errors inside a value.
_ERROR_PATH: Final = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>.*)`$")


def _xdg_base_dir(variable: str, fallback: str) -> Path:
    """Return an XDG base directory: ``$variable`` if it is an absolute path, else ``fallback``.

    The XDG Base Directory rules, as platformdirs applies them on Linux (a relative or
    empty value is invalid and ignored). mqfleet runs on Linux, and this is the whole of
    what it needed from platformdirs, whose import cost every agent about 0.5 MiB of
    its 30 MiB budget (docs/BENCHMARKS.md).
    """
    value = Path(os.environ.get(variable, ""))
    if value.is_absolute():
        return value
    # Unlike Path.expanduser, this leaves "~" as is (no RuntimeError) when no home is known.
    return Path(os.path.expanduser(fallback))  # noqa: PTH111


def default_data_dir() -> Path:
    """Directory for the default SQLite database and the agent's state."""
    return _xdg_base_dir("XDG_DATA_HOME", "~/.local/share") / APP_NAME


def default_config_file() -> Path:
    """Return the config file used when neither ``--config`` nor ``$MQFLEET_CONFIG`` is set."""
    return _xdg_base_dir("XDG_CONFIG_HOME", "~/.config") / APP_NAME / "config.toml"


def _default_database_url() -> str:
    return f"sqlite:///{default_data_dir() / 'mqfleet.db'}"


def _default_node_id() -> str:
    # Hostnames may carry characters the protocol forbids: map them to "-".
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0])[:64]
    return name or "node"


def _redact(url: str) -> str:
    # Error messages and reprs end up in logs and terminals: never echo a password.
    # Greedy up to the last "@" before the path, so an unescaped "@" in it is hidden too.
    url = re.sub(r"(//[^/@:]*):[^/]*@", r"\1:***@", url)
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", url)


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
    def parse(cls, url: str) -> Self:
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


# dict=True gives instances a __dict__ for the one piece of state that is not a setting:
# which config file load_settings() read (the agent checks its mode).
class Settings(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """Every setting of mqfleet; components read only the fields they need.

    Build it with :func:`load_settings`, which reads the sources and checks every value;
    the constructor itself checks nothing (``Settings()`` is simply the defaults).
    """

    # -- shared ---------------------------------------------------------------------
    broker_url: Annotated[str, Meta(description="mqtt[s]://[user:pass@]host:port")] = (
        DEFAULT_BROKER_URL
    )
    topic_prefix: Annotated[str, Meta(description="root of every topic")] = DEFAULT_PREFIX
    mqtt_version: Annotated[Literal["5", "3.1.1"], Meta(description="MQTT protocol version")] = "5"
    keepalive_s: Annotated[int, Meta(ge=2, le=3600, description="MQTT keepalive")] = 30
    ca_file: Annotated[Path | None, Meta(description="CA bundle for mqtts://")] = None
    cert_file: Annotated[Path | None, Meta(description="client certificate for mqtts://")] = None
    key_file: Annotated[Path | None, Meta(description="client key for mqtts://")] = None
    database_url: Annotated[str, Meta(description="SQLAlchemy URL of the database")] = (
        msgspec.field(default_factory=_default_database_url)
    )

    # -- agent ----------------------------------------------------------------------
    node_id: Annotated[str, Meta(description="this node's id")] = msgspec.field(
        default_factory=_default_node_id
    )
    metrics_interval_s: Annotated[
        float, Meta(gt=0, le=86400, description="seconds between samples")
    ] = DEFAULT_METRICS_INTERVAL_S
    state_dir: Annotated[
        Path | None, Meta(description="agent state (session counter, command journal)")
    ] = None
    metrics_backlog: Annotated[
        int, Meta(ge=1, description="samples kept while the broker is away")
    ] = DEFAULT_METRICS_BACKLOG
    disk_path: Annotated[str, Meta(description="filesystem whose usage is reported")] = "/"
    max_concurrent_commands: Annotated[int, Meta(ge=1, le=256)] = 4
    output_limit_bytes: Annotated[int, Meta(ge=1024, description="per stream")] = 64 * 1024
    kill_grace_s: Annotated[float, Meta(ge=0, description="SIGTERM to SIGKILL grace")] = 5.0
    operator_public_key_file: Annotated[
        Path | None, Meta(description="Ed25519 public key (PEM) that must sign every command")
    ] = None
    command_allowlist: Annotated[
        list[str],
        Meta(description="if set, only commands matching one of these regexes (whole text) run"),
    ] = msgspec.field(default_factory=list)
    run_as_user: Annotated[
        str | None, Meta(description="run commands as this user (the agent must be root)")
    ] = None

    # -- operator (CLI) -------------------------------------------------------------
    operator_private_key_file: Annotated[
        Path | None, Meta(description="Ed25519 private key (PEM, 0600) that signs commands")
    ] = None
    broker_password_file: Annotated[
        Path, Meta(description="mosquitto password file that provision/revoke edit")
    ] = DEFAULT_BROKER_PASSWORD_FILE
    broker_pid_file: Annotated[
        Path, Meta(description="mosquitto pid file, to reload the broker after provision/revoke")
    ] = DEFAULT_BROKER_PID_FILE

    # -- development only -----------------------------------------------------------
    insecure_unsigned_commands: Annotated[
        bool,
        Meta(
            description="DEVELOPMENT ONLY: agents without a public key run unsigned commands, "
            "and the CLI sends unsigned commands when it has no private key"
        ),
    ] = False

    # -- collector ------------------------------------------------------------------
    collector_id: Annotated[str, Meta(description="fixed MQTT client id")] = DEFAULT_COLLECTOR_ID
    collector_group: Annotated[
        str,
        Meta(
            max_length=64,
            description="MQTT 5 shared-subscription group for metrics and results; empty: none",
        ),
    ] = ""
    collector_workers: Annotated[
        int,
        Meta(
            ge=1,
            le=MAX_COLLECTOR_WORKERS,
            description="ingest worker processes of this collector (MQTT 5 shared subscription)",
        ),
    ] = 1
    retention_days: Annotated[float, Meta(gt=0, description="metrics older are pruned")] = 30.0
    batch_size: Annotated[int, Meta(ge=1, description="rows per transaction at most")] = 2000
    flush_interval_s: Annotated[float, Meta(gt=0, le=1.0, description="max batch delay")] = 0.5
    receive_maximum: Annotated[int, Meta(ge=1, le=65535, description="MQTT 5 inflight")] = 10000

    @property
    def config_file(self) -> Path | None:
        """The TOML config file these settings were read from, if any."""
        return cast("Path | None", self.__dict__.get("_config_source"))

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

    def __repr__(self) -> str:
        """Show every setting, with passwords in URLs replaced by ``***``."""
        shown = ", ".join(f"{name}={value!r}" for name, value in self.__rich_repr__())
        return f"{type(self).__name__}({shown})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        """List ``(name, value)`` pairs for repr() and rich, passwords redacted."""
        pairs: list[tuple[str, Any]] = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            pairs.append((name, _redact(value) if name in _URLS_WITH_SECRETS else value))
        return pairs


# -- checks beyond the field types: each returns the value to keep or raises ValueError --


def _allowlist_compiles(value: list[str]) -> list[str]:
    for index, pattern in enumerate(value):
        try:
            re.compile(pattern)
        except re.error as exc:
            msg = f"entry {index} ({pattern[:80]!r}) is not a regular expression: {exc}"
            raise ValueError(msg) from None
    return value


def _group_is_a_topic_level(value: str) -> str:
    # It becomes one topic level of "$share/<group>/...": MQTT 5 spec 4.8.2.
    if any(c in value for c in "/+#\0"):
        msg = f"{value[:80]!r} must not contain '/', '+', '#' or NUL (one topic level)"
        raise ValueError(msg)
    return value


def _broker_url_parses(value: str) -> str:
    try:
        BrokerAddress.parse(value)
    except ConfigError as exc:  # its message already hides the password
        raise ValueError(str(exc)) from None
    return value


def _prefix_is_valid(value: str) -> str:
    try:
        return Topics(value).prefix
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


def _node_id_is_valid(value: str) -> str:
    if not re.fullmatch(NODE_ID_PATTERN, value):
        msg = f"invalid node id {value[:80]!r}: use 1-64 characters of A-Z a-z 0-9 _ . -"
        raise ValueError(msg)
    return value


_CHECKS: Final[Mapping[str, Callable[[Any], object]]] = {
    "command_allowlist": _allowlist_compiles,
    "collector_group": _group_is_a_topic_level,
    "broker_url": _broker_url_parses,
    "topic_prefix": _prefix_is_valid,
    "node_id": _node_id_is_valid,
}


# -- converting one value to its field's type ------------------------------------------


class _Given(NamedTuple):
    """A value for a setting and where it came from, for error messages."""

    value: object
    origin: str  # "from $MQFLEET_X", "in config file P", "from the command line"
    from_env: bool = False


class _InvalidValueError(ValueError):
    """One setting's value is refused; ``where`` may name a part of it (``[0]``)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


def _bare(annotation: object) -> object:
    """Strip ``Annotated`` and ``| None``: ``Path`` for ``Annotated[Path | None, Meta()]``."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not NoneType)
    return annotation


def _value_class(annotation: object) -> object:
    """Return the class a field holds (``list`` for ``list[str]``), or ``Literal``."""
    bare = _bare(annotation)
    return get_origin(bare) or bare


@cache
def _fields() -> Mapping[str, tuple[object, object]]:
    """Each setting's name -> (type annotation, value class), in definition order."""
    return {
        info.name: (info.type, _value_class(info.type)) for info in msgspec.structs.fields(Settings)
    }


def _decode_custom(kind: type, value: object) -> object:
    # msgspec hands over the types it does not know itself: here only Path.
    if kind is Path and isinstance(value, str | os.PathLike):
        return Path(value)
    msg = f"Expected `{kind.__name__}`, got `{type(value).__name__}`"
    raise msgspec.ValidationError(msg)


def _from_text(kind: object, text: str, *, from_env: bool) -> object:
    """Parse text the way settings always accepted it (env vars, TOML strings, flags).

    Leniencies kept from the pydantic era: surrounding blanks and ``_`` in numbers,
    ``"5.0"`` for an integer, ``yes``/``on``/``t``/... for booleans.
    """
    if kind is bool:
        lowered = text.lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise _InvalidValueError(
            f"Expected `bool` (true/false, yes/no, on/off, 1/0), got {text[:40]!r}"
        )
    if kind is int:
        stripped = text.strip()
        if _INT_TEXT.fullmatch(stripped):
            return int(stripped.partition(".")[0])
        raise _InvalidValueError(f"Expected `int`, got {text[:40]!r}")
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise _InvalidValueError(f"Expected `float`, got {text[:40]!r}") from None
    if kind is list and from_env:
        # An environment variable holds one string: lists are written as JSON there.
        try:
            return msgspec.json.decode(text)
        except msgspec.DecodeError:
            raise _InvalidValueError("Expected a JSON array of strings") from None
    return text


def _convert(name: str, given: _Given) -> object:
    """Convert ``given`` to setting ``name``'s type and check it; raise ``ValueError``."""
    annotation, kind = _fields()[name]
    value = given.value
    if isinstance(value, str):
        value = _from_text(kind, value, from_env=given.from_env)
    elif kind is bool and type(value) in {int, float} and value in {0, 1}:
        value = bool(value)  # TOML "x = 1" has always meant true
    try:
        value = msgspec.convert(value, annotation, strict=False, dec_hook=_decode_custom)
    except msgspec.ValidationError as exc:
        if kind is Literal:  # msgspec says "Invalid enum value": name the choices instead
            choices = " or ".join(repr(choice) for choice in get_args(_bare(annotation)))
            raise _InvalidValueError(f"Expected {choices}, got {repr(value)[:80]}") from None
        match = _ERROR_PATH.match(str(exc))
        if match is None:
            raise _InvalidValueError(str(exc)) from None
        raise _InvalidValueError(match["msg"], match["path"]) from None
    check = _CHECKS.get(name)
    return value if check is None else check(value)


# -- the sources ---------------------------------------------------------------------


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


def _read_config_file(path: Path) -> dict[str, Any]:
    import tomllib  # noqa: PLC0415 - only when there is a file: `mqfleet --version` starts faster

    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, or malformed TOML
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def _environment() -> dict[str, _Given]:
    """Read the ``MQFLEET_<NAME>`` variables that name a setting, in any case.

    Others are ignored: ``MQFLEET_CONFIG`` or ``MQFLEET_BROKER_CONF`` are not settings.
    """
    names = _fields()
    found: dict[str, _Given] = {}
    for var, text in os.environ.items():
        lowered = var.lower()
        if lowered.startswith(ENV_PREFIX.lower()) and (name := lowered[len(ENV_PREFIX) :]) in names:
            found[name] = _Given(text, f"from ${var}", from_env=True)
    return found


def _take(
    source: Mapping[str, object], origin: str, given: dict[str, _Given], unknown: list[str]
) -> None:
    """Add the values of a file or the flags to ``given``; refuse names that are no setting."""
    names = _fields()
    for key, value in source.items():
        if value is None:  # a flag that was not given (TOML has no null)
            continue
        if (name := key.lower()) in names:
            given[name] = _Given(value, origin)
        else:
            from difflib import get_close_matches  # noqa: PLC0415 - only needed for a typo

            close = get_close_matches(name, names, n=1)
            hint = f", did you mean {close[0]}?" if close else ""
            unknown.append(f"invalid setting {key}: unknown setting{hint} ({origin})")


def _converted(given: Mapping[str, _Given], unknown: list[str]) -> dict[str, Any]:
    """Convert and check every given value; raise one :class:`ConfigError` for all errors."""
    values: dict[str, Any] = {}
    errors: list[str] = []
    for name in _fields():  # definition order, so the error reported first is stable
        if name in given:
            try:
                values[name] = _convert(name, given[name])
            except ValueError as exc:
                where = name + getattr(exc, "where", "")
                errors.append(f"invalid setting {where}: {exc} ({given[name].origin})")
    errors += unknown
    if errors:
        more = len(errors) - 1
        raise ConfigError(errors[0] + (f" (+{more} more)" if more else ""))
    return values


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:  # noqa: ANN401 - any setting's value
    """Load settings with the documented precedence; ``overrides`` are the CLI flags.

    ``None`` overrides are ignored, so flags that were not given fall through.
    Raises :class:`ConfigError` with a one-line message on any invalid value, naming the
    setting and where the value came from.
    """
    path = _resolve_config_file(config_file)
    given: dict[str, _Given] = {}
    unknown: list[str] = []
    # Lowest precedence first: each source overrides what the ones before it gave.
    if path is not None:
        _take(_read_config_file(path), f"in config file {path}", given, unknown)
    given.update(_environment())
    _take(overrides, "from the command line", given, unknown)
    settings = Settings(**_converted(given, unknown))
    # Defaults pass the same checks as given values (the node id comes from the host name).
    for name in _fields().keys() - given.keys():
        try:
            _convert(name, _Given(getattr(settings, name), "default"))
        except ValueError as exc:
            raise ConfigError(f"invalid setting {name}: {exc} (default)") from None
    msgspec.structs.force_setattr(settings, "_config_source", path)
    return settings
