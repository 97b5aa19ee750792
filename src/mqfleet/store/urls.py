"""Database URLs in SQLAlchemy's syntax, parsed without importing SQLAlchemy.

The CLI's read commands talk to ``sqlite3`` and psycopg 3 directly, so that they start
without the ~150 ms import of SQLAlchemy. The one ``database_url`` setting must still
name the same database for them as for the collector (which uses SQLAlchemy): this
module decodes it the way ``sqlalchemy.engine.make_url`` does (percent-decoded user,
password and database, query options through ``parse_qsl``) and turns it into the
arguments SQLAlchemy's pysqlite and psycopg dialects would give those drivers.
tests/store/test_urls.py compares both with SQLAlchemy's own answers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote

from mqfleet.errors import ConfigError

__all__ = ["BACKENDS", "DatabaseURL", "parse_database_url"]

#: The databases mqfleet supports (SQLAlchemy backend names).
BACKENDS: Final = ("sqlite", "postgresql")
#: The DB-API driver of each backend: SQLAlchemy's scheme ``backend+driver`` may name it.
_DRIVERS: Final = {"sqlite": "pysqlite", "postgresql": "psycopg"}

# SQLAlchemy's own URL grammar (sqlalchemy/engine/url.py, _parse_url), so both read the
# same parts out of every URL, odd ones included.
_URL: Final = re.compile(
    r"""
    (?P<name>[\w+]+)://
    (?:
        (?P<username>[^:/]*)
        (?::(?P<password>[^@]*))?
    @)?
    (?:
        (?:
            \[(?P<ipv6host>[^/?]+)\] |
            (?P<ipv4host>[^/:?]+)
        )?
        (?::(?P<port>[^/?]*))?
    )?
    (?:/(?P<database>[^?]*))?
    (?:\?(?P<query>.*))?
    """,
    re.VERBOSE,
)
# The password part of a URL, for messages (same grammar as above).
_PASSWORD: Final = re.compile(r"^([\w+]+://[^:/]*):[^@]*@")
# Options of Python's sqlite3.connect that SQLAlchemy takes from the query string; the
# others (isolation_level, detect_types, ...) do not matter to reading, or would change
# what the reader gets back (detect_types), so they are left out.
_PYSQLITE_OPTIONS: Final = (
    "uri", "timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements",
)  # fmt: skip
# SQLAlchemy's asbool (sqlalchemy.util.asbool), for the ``uri`` option.
_TRUE: Final = frozenset({"true", "yes", "on", "y", "t", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "n", "f", "0"})
# A host with a port in PostgreSQL's ``?host=`` option (SQLAlchemy's multihost forms).
_HOST_PORT: Final = re.compile(r"[a-zA-Z0-9.-]*:\d*")


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A database URL taken apart, its parts decoded as SQLAlchemy decodes them."""

    text: str
    backend: Literal["sqlite", "postgresql"]
    username: str | None
    password: str | None
    host: str | None
    port: int | None
    database: str | None
    #: Query options; an option given more than once keeps every value, in order.
    query: dict[str, str | tuple[str, ...]]

    def redacted(self) -> str:
        """Return the URL as given, password replaced by ``***`` (for messages)."""
        return _redact(self.text)

    def _option(self, key: str) -> str | None:
        value = self.query.get(key)
        if isinstance(value, tuple):
            raise ConfigError(f"database URL {self.redacted()} gives {key!r} more than once")
        return value

    def sqlite_target(self) -> tuple[str, bool, float | None]:
        """Return what ``sqlite3.connect`` opens: (file name or URI, is a URI, timeout).

        As SQLAlchemy's pysqlite dialect: a relative path is made absolute (``~`` is not
        expanded), no path means ``:memory:``, and with ``uri=true`` the database is a
        SQLite ``file:`` URI that keeps the query options meant for SQLite.
        """
        if self.backend != "sqlite":
            raise ValueError(f"not a SQLite URL: {self.redacted()}")
        if self.username or self.password or self.host or self.port:
            raise ConfigError(
                f"invalid SQLite URL {self.redacted()}: use sqlite:///relative/path.db, "
                "sqlite:////absolute/path.db or sqlite:// (in memory)"
            )
        uri = self._option("uri")
        if uri is not None and uri.lower() not in _TRUE | _FALSE:
            raise ConfigError(f"database URL {self.redacted()}: uri={uri!r} is not a boolean")
        timeout = self._option("timeout")
        try:
            timeout_s = float(timeout) if timeout is not None else None
        except ValueError:
            raise ConfigError(
                f"database URL {self.redacted()}: timeout={timeout!r} is not a number"
            ) from None
        if uri is not None and uri.lower() in _TRUE:
            extra = sorted(k for k in self.query if k not in _PYSQLITE_OPTIONS)
            target = self.database or ""
            if extra:
                target += "?" + "&".join(f"{k}={self._option(k)}" for k in extra)
            return target, True, timeout_s
        database = self.database or ":memory:"
        if database != ":memory:":
            database = os.path.abspath(database)  # noqa: PTH100 - SQLAlchemy's exact rule
        return database, False, timeout_s

    def libpq_params(self) -> dict[str, str]:
        """Return the connection parameters (libpq keywords) for ``psycopg.connect``.

        As SQLAlchemy's psycopg dialect: user, password, host, port and database from
        the URL, then every query option (``sslmode``, ``options``, ...) as given; the
        multihost forms ``?host=h1:p1&host=h2:p2`` and ``?host=h1,h2&port=p1,p2`` become
        libpq's comma-separated ``host`` and ``port`` lists.
        """
        if self.backend != "postgresql":
            raise ValueError(f"not a PostgreSQL URL: {self.redacted()}")
        parts = {
            "user": self.username,
            "password": self.password,
            "host": self.host,
            "port": str(self.port) if self.port is not None else None,
            "dbname": self.database,
        }
        # SQLAlchemy leaves empty parts out too (URL.translate_connect_args).
        params = {key: value for key, value in parts.items() if value}
        query = dict(self.query)
        hosts = query.pop("host", None)
        for key, option in query.items():
            if isinstance(option, tuple):
                raise ConfigError(f"database URL {self.redacted()} gives {key!r} more than once")
            params[key] = option
        if hosts is not None:
            params.update(self._multihost(hosts))
        return params

    def _multihost(self, hosts: str | tuple[str, ...]) -> dict[str, str]:
        if isinstance(hosts, str) and ("port" in self.query or not _HOST_PORT.fullmatch(hosts)):
            return {"host": hosts}  # libpq reads "h1,h2" itself
        if "port" in self.query:
            raise ConfigError(
                f"database URL {self.redacted()} mixes multihost forms: use "
                "host=h1,h2&port=p1,p2 or host=h1:p1&host=h2:p2"
            )
        pairs = [h.split(":", 1) if ":" in h else (h, "") for h in (
            (hosts,) if isinstance(hosts, str) else hosts
        )]  # fmt: skip
        return {"host": ",".join(h for h, _ in pairs), "port": ",".join(p for _, p in pairs)}


def _redact(url: str) -> str:
    return _PASSWORD.sub(r"\1:***@", url)


def _backend(url: str, scheme: str) -> Literal["sqlite", "postgresql"]:
    backend, _, driver = scheme.partition("+")
    if scheme == "postgres":  # the old alias store/engine.py also takes, bare only
        backend = "postgresql"
    if backend == "sqlite":
        name: Literal["sqlite", "postgresql"] = "sqlite"
    elif backend == "postgresql":
        name = "postgresql"
    else:
        raise ConfigError(f"unsupported database {backend!r}: use sqlite or postgresql")
    if driver and driver != _DRIVERS[name]:
        raise ConfigError(
            f"unsupported database driver {scheme!r} in {_redact(url)}: "
            f"use {name}:// ({name}+{_DRIVERS[name]}://)"
        )
    return name


def parse_database_url(url: str) -> DatabaseURL:
    """Take a SQLAlchemy database URL apart; :class:`ConfigError` if mqfleet cannot use it."""
    match = _URL.match(url)
    if match is None:
        raise ConfigError(
            f"invalid database URL {_redact(url)!r}: "
            "expected sqlite:///path or postgresql://user:password@host:port/database"
        )
    parts = match.groupdict()
    query: dict[str, str | tuple[str, ...]] = {}
    for key, value in parse_qsl(parts["query"] or ""):
        previous = query.get(key)
        if previous is None:
            query[key] = value
        else:
            query[key] = (*((previous,) if isinstance(previous, str) else previous), value)
    port = parts["port"]
    try:
        port_number = int(port) if port else None
    except ValueError:
        raise ConfigError(f"invalid database URL {_redact(url)!r}: port {port!r}") from None
    return DatabaseURL(
        text=url,
        backend=_backend(url, parts["name"]),
        username=unquote(parts["username"]) if parts["username"] is not None else None,
        password=unquote(parts["password"]) if parts["password"] is not None else None,
        host=parts["ipv4host"] or parts["ipv6host"],
        port=port_number,
        database=unquote(parts["database"]) if parts["database"] is not None else None,
        query=query,
    )
