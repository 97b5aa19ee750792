"""The CLI's readers must open the very database the collector (SQLAlchemy) opens."""

from __future__ import annotations

import os

import pytest
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import make_url

from mqfleet.errors import ConfigError, StoreError
from mqfleet.store.engine import normalise_url
from mqfleet.store.urls import parse_database_url

POSTGRES_URLS = [
    "postgresql://u:p@db.example:5433/fleet",
    "postgresql+psycopg://u:p@db.example/fleet?sslmode=require&application_name=mq",
    "postgresql://alice:p%40ss%3Aw%2Fd@db.example/fleet",  # @ : / in the password
    "postgresql://al%20ice@/fleet?host=/var/run/postgresql",  # Unix socket
    "postgresql://u@[::1]:5432/fleet",
    "postgresql://u@localhost/test?options=-csearch_path%3Dt_1",
    "postgresql://u@localhost/my%2Fdb",
    "postgresql://u@localhost/fleet?host=h1,h2&port=5432,5433",
    "postgresql://u@/fleet?host=db.example:6543",
    "postgres://u@localhost/fleet",
    "postgresql:///fleet",
    "postgresql://",
]
SQLITE_URLS = [
    "sqlite:////var/lib/mqfleet/fleet.db",
    "sqlite:///relative/fleet.db",
    "sqlite:///with%20space.db",
    "sqlite://",
    "sqlite:///:memory:",
    "sqlite+pysqlite:////tmp/x.db?timeout=2.5",
    "sqlite:///file:/tmp/x.db?uri=true&mode=ro",
]


@pytest.mark.parametrize("url", POSTGRES_URLS + SQLITE_URLS)
def test_parts_are_decoded_as_sqlalchemy_decodes_them(url: str) -> None:
    ours = parse_database_url(url)
    theirs = make_url(url)
    assert ours.username == theirs.username
    assert ours.password == theirs.password
    assert ours.host == theirs.host
    assert ours.port == theirs.port
    assert ours.database == theirs.database
    assert ours.query == dict(theirs.query)


@pytest.mark.parametrize("url", POSTGRES_URLS)
def test_libpq_parameters_are_what_sqlalchemy_gives_psycopg(url: str) -> None:
    _, expected = PGDialect_psycopg().create_connect_args(normalise_url(url))
    expected = {k: str(v) for k, v in expected.items()}
    # SQLAlchemy's "h1,h2" multihost form gives "," for "no ports": libpq's default.
    if expected.get("port") == ",":
        del expected["port"]
    assert parse_database_url(url).libpq_params() == expected


@pytest.mark.parametrize("url", SQLITE_URLS)
def test_sqlite_target_is_what_sqlalchemy_gives_sqlite3(url: str) -> None:
    (filename,), options = SQLiteDialect_pysqlite().create_connect_args(make_url(url))
    assert parse_database_url(url).sqlite_target() == (
        filename,
        bool(options.get("uri")),
        options.get("timeout"),
    )


def test_relative_sqlite_paths_are_made_absolute_not_user_expanded() -> None:
    target, is_uri, _ = parse_database_url("sqlite:///~/fleet.db").sqlite_target()
    assert target == os.path.join(os.getcwd(), "~", "fleet.db")  # noqa: PTH109, PTH118
    assert not is_uri


def test_repeated_hosts_become_libpq_lists() -> None:
    url = "postgresql://u@/fleet?host=h1:5432&host=h2:5433&sslmode=verify-full"
    assert parse_database_url(url).libpq_params() == {
        "user": "u",
        "dbname": "fleet",
        "host": "h1,h2",
        "port": "5432,5433",
        "sslmode": "verify-full",
    }


def test_messages_never_show_the_password() -> None:
    url = parse_database_url("postgresql+psycopg://alice:s3cret@db.example:5432/fleet")
    assert url.redacted() == "postgresql+psycopg://alice:***@db.example:5432/fleet"
    assert parse_database_url("sqlite:///x.db").redacted() == "sqlite:///x.db"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("oracle://x/y", "unsupported database 'oracle': use sqlite or postgresql"),
        ("mysql+pymysql://u:pw@h/db", "unsupported database 'mysql'"),
        ("postgresql+asyncpg://u:pw@h/db", "unsupported database driver 'postgresql+asyncpg'"),
        ("sqlite+aiosqlite:///x.db", "unsupported database driver"),
        ("not a url", "invalid database URL 'not a url'"),
        ("postgresql://u:pw@h:port/db", "port 'port'"),
    ],
)
def test_unusable_urls_are_one_line_config_errors(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_database_url(url)
    assert fragment in str(caught.value)
    assert "pw@" not in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1
    # The collector's engine refuses the same URLs (as a StoreError, as before).
    with pytest.raises(StoreError):
        normalise_url(url)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("sqlite://user@host/x.db", "invalid SQLite URL"),
        ("sqlite:///x.db?uri=maybe", "uri='maybe' is not a boolean"),
        ("sqlite:///x.db?timeout=soon", "timeout='soon' is not a number"),
    ],
)
def test_unusable_sqlite_options_are_config_errors(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_database_url(url).sqlite_target()


def test_an_option_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="'sslmode' more than once"):
        parse_database_url("postgresql://h/db?sslmode=require&sslmode=disable").libpq_params()
