"""Read connections for the CLI: ``sqlite3`` or psycopg 3 straight, no SQLAlchemy.

``mqfleet nodes``, ``show``, ``metrics``, ``commands``, ``result`` and the target lookup
of ``mqfleet run`` only read a few indexed rows; importing SQLAlchemy would cost them more
than the reads (issue 5: a whole ``mqfleet nodes`` of 10,000 nodes in 300 ms). A
:class:`StoreReader` runs the SQL of :mod:`mqfleet.store.queries` on one DB-API
connection and turns every driver error into a one-line
:class:`~mqfleet.errors.StoreError`. It reads what the collector writes through
SQLAlchemy, so it binds and parses values exactly as :class:`~mqfleet.store.types.UTCDateTime`
stores them. :func:`sqlite_time_text` and :func:`utc_value` are the one place that knows
that SQLite text: the collector's bulk metrics insert binds its times with them too.
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import quote

from mqfleet.errors import StoreError
from mqfleet.store.urls import parse_database_url

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from mqfleet.store.urls import DatabaseURL

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "SQLITE_BUSY_TIMEOUT_MS",
    "StoreReader",
    "open_reader",
    "postgres_time",
    "sqlite_time_text",
    "utc_value",
]

#: How long a SQLite statement waits for the collector's write lock before failing.
SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
#: An unreachable PostgreSQL host must fail in seconds, not hang on the TCP timeout.
DEFAULT_CONNECT_TIMEOUT_S: Final = 5

#: libpq ``options`` that make the read session's TimeZone UTC.
_UTC_SESSION: Final = "-c TimeZone=UTC"
#: PostgreSQL's SQLSTATE codes for a missing table and a missing column.
_UNDEFINED_TABLE: Final = "42P01"
_UNDEFINED_COLUMN: Final = "42703"


def sqlite_time_text(value: datetime) -> str:
    """Return an aware datetime as the naive UTC text ``UTCDateTime`` stores in SQLite.

    ``2026-11-30 12:00:00.000000``: SQLAlchemy's SQLite ``DATETIME`` format of the naive
    UTC datetime ``UTCDateTime`` binds, which :func:`utc_value` reads back. SQLite
    compares these strings, so a bound and a stored time must be the very same text.
    Naive values are refused with ``ValueError``, as ``UTCDateTime`` refuses them.
    """
    if value.tzinfo is not UTC:
        value = _naive_refused(value).astimezone(UTC)
    # Cut the "+00:00" a UTC datetime always ends with: cheaper than replace(tzinfo=None)
    # first, and the collector formats every metric's time here.
    return value.isoformat(" ", "microseconds")[:-6]


def postgres_time(value: datetime) -> datetime:
    """Return an aware datetime in UTC, as ``UTCDateTime`` binds it for ``timestamptz``.

    Naive values are refused with ``ValueError``, as ``UTCDateTime`` refuses them.
    """
    return value if value.tzinfo is UTC else _naive_refused(value).astimezone(UTC)


def _naive_refused(value: datetime) -> datetime:
    if value.tzinfo is None:
        # As UTCDateTime: a silent local-time guess is a bug, not a query.
        msg = f"naive datetime {value!r} given to a UTC column"
        raise ValueError(msg)
    return value


def utc_value(value: str | datetime | None) -> datetime | None:
    """Return a stored ``UTCDateTime`` value as an aware UTC datetime (None stays None).

    SQLite keeps naive UTC text (``2026-11-30 12:00:00.000000``, or without the
    microseconds when the database's ``CURRENT_TIMESTAMP`` default wrote it), which
    SQLAlchemy reads with ``fromisoformat`` and UTCDateTime marks as UTC; psycopg gives
    aware datetimes in the session's time zone, which UTCDateTime converts to UTC.
    """
    if value is None:
        return None
    if isinstance(value, str):
        # fromisoformat + replace(tzinfo=UTC) in one step: the same datetime, and several
        # times faster over the 30,000 times of `mqfleet nodes`. Text with an offset of
        # its own fails to parse, and a date alone comes back naive: both take the slow
        # path.
        try:
            parsed = _fromisoformat(value + "+00:00")
        except ValueError:
            return _utc_text(value)
        return parsed if parsed.tzinfo is UTC else _utc_text(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_fromisoformat: Final = datetime.fromisoformat


def _utc_text(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class StoreReader(ABC):
    """One open read connection to the store, SQLite or PostgreSQL.

    SQL is written once for both with ``%s`` placeholders; datetimes are bound with
    :meth:`bind_time`. Closing is the caller's job (:func:`open_reader` does it).
    """

    backend: Literal["sqlite", "postgresql"]
    #: The driver's base error class (DB-API ``Error``).
    _driver_error: type[Exception]

    def __init__(self, url: DatabaseURL) -> None:
        """Remember where the connection goes, for messages."""
        self.where = url.redacted()

    @abstractmethod
    def _fetch_all(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    def bind_time(self, value: datetime) -> object:
        """Return ``value`` as the driver must be given it to compare with a stored time."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""

    def fetch_all(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run one query and return every row as a tuple; errors become StoreError."""
        try:
            return self._fetch_all(sql, params)
        except self._driver_error as exc:
            raise self.error(exc) from exc

    def fetch_one(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        """Run one query and return its first row, or None."""
        rows = self.fetch_all(sql, params)
        return rows[0] if rows else None

    def error(self, exc: Exception) -> StoreError:
        """Turn a driver error into a one-line StoreError that says what to do."""
        reason = _first_line(exc)
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate == _UNDEFINED_TABLE or reason.startswith("no such table"):
            return StoreError(
                f"database {self.where} has no mqfleet tables: run 'mqfleet db upgrade'"
            )
        if sqlstate == _UNDEFINED_COLUMN or reason.startswith("no such column"):
            return StoreError(
                f"database {self.where} has an older mqfleet schema ({reason}): "
                "run 'mqfleet db upgrade'"
            )
        return StoreError(f"cannot read database {self.where}: {reason}")


class _SQLiteReader(StoreReader):
    backend = "sqlite"
    _driver_error = sqlite3.Error

    def __init__(self, url: DatabaseURL) -> None:
        super().__init__(url)
        target, is_uri, timeout_s = url.sqlite_target()
        if not is_uri and target != ":memory:":
            path = Path(target)
            if not path.is_file():
                # Reading a new empty file would only say "no nodes", hiding a wrong
                # --database; and a read must never create the collector's file.
                raise StoreError(
                    f"database {path} does not exist yet: start 'mqfleet up' or "
                    "'mqfleet collector', or create it with 'mqfleet db upgrade'"
                )
            # mode=rw: open an existing file, never create one (even if it vanished
            # since the check above).
            target, is_uri = f"file:{quote(str(path))}?mode=rw", True
        busy_s = SQLITE_BUSY_TIMEOUT_MS / 1000 if timeout_s is None else timeout_s
        try:
            # The timeout is SQLite's busy_timeout: wait for the collector's write lock
            # as store/engine.py's connections do. Reads need none of its other pragmas
            # (journal mode and foreign keys matter to writers only).
            self._conn = sqlite3.connect(target, timeout=busy_s, uri=is_uri)
        except sqlite3.Error as exc:
            raise self.error(exc) from exc

    def _fetch_all(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._conn.execute(sql.replace("%s", "?"), params).fetchall()
        return rows

    def bind_time(self, value: datetime) -> object:
        """Naive UTC text in UTCDateTime's storage format: SQLite compares the strings."""
        return sqlite_time_text(value)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


class _PostgresReader(StoreReader):
    backend = "postgresql"

    def __init__(self, url: DatabaseURL, *, connect_timeout_s: float) -> None:
        super().__init__(url)
        params = url.libpq_params()
        import psycopg  # noqa: PLC0415 - only PostgreSQL users pay for the import
        from psycopg.conninfo import make_conninfo  # noqa: PLC0415

        self._driver_error = psycopg.Error
        # libpq counts whole seconds; a timeout in the URL's options wins.
        params.setdefault("connect_timeout", str(max(1, round(connect_timeout_s))))
        # A UTC session: psycopg then reads timestamptz as datetimes in datetime.UTC, which
        # utc_value passes through, rather than in a ZoneInfo to convert (10,000 nodes:
        # ~15 ms less). Comparisons of timestamptz do not depend on it; the URL's own
        # options come first and stay.
        params["options"] = " ".join(filter(None, [params.get("options"), _UTC_SESSION]))
        try:
            conninfo = make_conninfo("", **params)
            # Autocommit: a read needs no transaction, and BEGIN would cost a round trip.
            self._conn = psycopg.connect(conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise self.error(exc) from exc

    def _fetch_all(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        # Binary results: no text to parse for times and numbers (10,000 nodes: ~4 ms less).
        return self._conn.execute(sql, params, binary=True).fetchall()

    def bind_time(self, value: datetime) -> object:
        """Pass the aware datetime on in UTC: psycopg sends it as timestamptz."""
        return postgres_time(value)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


@contextmanager
def open_reader(
    url: str, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
) -> Iterator[StoreReader]:
    """Open a read connection to the store at ``url`` (a SQLAlchemy URL); close it after.

    Raises :class:`~mqfleet.errors.ConfigError` for a URL mqfleet cannot use and
    :class:`~mqfleet.errors.StoreError` for a database it cannot reach, including a
    SQLite file that does not exist (it is never created).
    """
    parsed = parse_database_url(url)
    reader: StoreReader
    if parsed.backend == "sqlite":
        reader = _SQLiteReader(parsed)
    else:
        reader = _PostgresReader(parsed, connect_timeout_s=connect_timeout_s)
    try:
        yield reader
    finally:
        reader.close()
