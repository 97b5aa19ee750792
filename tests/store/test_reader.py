"""The readers bind and parse times exactly as UTCDateTime stores them through SQLAlchemy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from mqfleet.store.reader import open_reader, postgres_time, sqlite_time_text, utc_value
from mqfleet.store.types import UTCDateTime

if TYPE_CHECKING:
    from collections.abc import Callable

SQLITE = sqlite.dialect()  # type: ignore[no-untyped-call]
POSTGRES = postgresql.dialect()  # type: ignore[no-untyped-call]


def sqlalchemy_reads(text: str) -> datetime | None:
    """What the collector's side makes of a stored SQLite value."""
    stored = sqlite.DATETIME().result_processor(SQLITE, None)(text)  # type: ignore[misc]
    return UTCDateTime().process_result_value(stored, SQLITE)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-30 12:00:00.000000",  # UTCDateTime's own format
        "2026-11-30 12:00:00.123456",
        "2026-11-30 12:00:00",  # CURRENT_TIMESTAMP, the server default
        "2026-11-30 12:00:00.123",
        "2026-11-30T12:00:00",
        "2026-11-30",
        "2026-11-30 14:00:00+02:00",  # never written by mqfleet, still read as SQLAlchemy does
        "2026-11-30 12:00:00Z",
    ],
)
def test_sqlite_text_reads_as_sqlalchemy_reads_it(text: str) -> None:
    ours = utc_value(text)
    assert ours == sqlalchemy_reads(text)
    assert ours is not None
    assert ours.tzinfo is UTC


def test_unparseable_text_is_refused_like_sqlalchemy_does() -> None:
    with pytest.raises(ValueError, match="Invalid isoformat"):
        utc_value("yesterday")
    with pytest.raises(ValueError, match="Invalid isoformat"):
        sqlalchemy_reads("yesterday")


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 30, 12, 0, tzinfo=UTC),
        datetime(2026, 11, 30, 17, 45, 1, 5, tzinfo=ZoneInfo("Asia/Kathmandu")),
        datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=-3))),
    ],
)
def test_postgres_datetimes_become_utc(value: datetime) -> None:
    ours = utc_value(value)
    assert ours == UTCDateTime().process_result_value(value, POSTGRES)
    assert ours is not None
    assert ours.tzinfo is UTC


def test_none_stays_none() -> None:
    assert utc_value(None) is None


BIND_VALUES = [
    datetime(2026, 11, 30, 12, 0, tzinfo=UTC),
    datetime(2026, 11, 30, 12, 0, 0, 999_999, tzinfo=UTC),
    datetime(2026, 11, 30, 8, 0, 1, 5, tzinfo=ZoneInfo("America/New_York")),
    datetime(2026, 11, 30, 8, 0, 1, 5, tzinfo=ZoneInfo("UTC")),  # UTC, but not datetime.UTC
    datetime(5, 1, 2, 3, 4, 5, tzinfo=UTC),  # years below 1000 keep four digits
]


@pytest.mark.parametrize("value", BIND_VALUES)
def test_sqlite_binds_compare_as_sqlalchemy_stores_them(sqlite_url: str, value: datetime) -> None:
    # A `--since` bound must be the very text UTCDateTime stores, or SQLite's string
    # comparison of the two would be off.
    stored = sqlite.DATETIME().bind_processor(SQLITE)(  # type: ignore[misc]
        UTCDateTime().process_bind_param(value, SQLITE)
    )
    from sqlite3 import connect  # noqa: PLC0415

    connect(sqlite_url.removeprefix("sqlite:///")).close()  # an empty database
    with open_reader(sqlite_url) as reader:
        assert reader.bind_time(value) == stored


@pytest.mark.parametrize("value", BIND_VALUES)
def test_bind_functions_give_what_utcdatetime_binds(value: datetime) -> None:
    # The collector's bulk metrics insert binds with these, bypassing UTCDateTime.
    stored = sqlite.DATETIME().bind_processor(SQLITE)(  # type: ignore[misc]
        UTCDateTime().process_bind_param(value, SQLITE)
    )
    assert sqlite_time_text(value) == stored
    assert utc_value(sqlite_time_text(value)) == value
    pg = postgres_time(value)
    assert pg == UTCDateTime().process_bind_param(value, POSTGRES)
    assert pg.tzinfo is UTC


@pytest.mark.parametrize("bind", [sqlite_time_text, postgres_time])
def test_bind_functions_refuse_naive_times(bind: Callable[[datetime], object]) -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        bind(datetime(2026, 1, 1))  # noqa: DTZ001 - the point


def test_naive_binds_are_refused(sqlite_url: str) -> None:
    from sqlite3 import connect  # noqa: PLC0415

    connect(sqlite_url.removeprefix("sqlite:///")).close()
    with open_reader(sqlite_url) as reader, pytest.raises(ValueError, match="naive datetime"):
        reader.bind_time(datetime(2026, 1, 1))  # noqa: DTZ001 - the point


@pytest.mark.integration
@pytest.mark.postgres
def test_the_postgres_session_reads_in_utc_and_keeps_the_urls_options(postgres_url: str) -> None:
    # The URL's options (the fixture's search_path) still apply; TimeZone=UTC is added so
    # that psycopg reads times in datetime.UTC, with nothing left to convert.
    assert "search_path" in postgres_url
    with open_reader(postgres_url) as reader:
        (schema, zone, now), *_ = reader.fetch_all(
            "SELECT current_schema(), current_setting('TimeZone'), now()"
        )
    assert schema == postgres_url.rpartition("search_path%3D")[2]
    assert zone == "UTC"
    assert now.tzinfo is UTC
    assert abs(now - datetime.now(UTC)) < timedelta(minutes=5)
