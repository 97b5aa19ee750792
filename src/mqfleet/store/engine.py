"""Engine setup: one place decides URLs, SQLite pragmas and migrations."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from mqfleet.errors import ConfigError, StoreError
from mqfleet.store.reader import SQLITE_BUSY_TIMEOUT_MS
from mqfleet.store.urls import parse_database_url

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection, Engine

__all__ = ["create_store_engine", "current_revision", "describe_url", "normalise_url", "upgrade"]

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).with_name("migrations")


def normalise_url(url: str) -> URL:
    """Parse a database URL; plain ``postgresql://`` means psycopg 3."""
    try:
        # The CLI's readers parse URLs without SQLAlchemy: one rule for both of which
        # databases and drivers mqfleet supports.
        parse_database_url(url)
        parsed = make_url(url)
    except ConfigError as exc:
        raise StoreError(str(exc)) from None
    except ArgumentError as exc:
        raise StoreError(f"invalid database URL {url!r}: {exc}") from None
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def describe_url(url: str) -> str:
    """Render the URL without its password, for messages."""
    return normalise_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:  # noqa: ANN401 - DB-API objects are untyped
    # WAL lets the CLI read while the collector writes; NORMAL is durable across
    # application crashes in WAL mode (only an OS crash may lose the last commits);
    # busy_timeout makes a second writer wait instead of failing; SQLite leaves
    # foreign keys off unless asked, per connection.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_driver_autocommit(dbapi_conn: Any, _record: Any) -> None:  # noqa: ANN401 - DB-API objects are untyped
    # pysqlite's own transaction handling sends BEGIN (deferred) only before the first
    # INSERT/UPDATE/DELETE: switch it off, _sqlite_begin_immediate sends BEGIN instead.
    dbapi_conn.isolation_level = None


def _sqlite_begin_immediate(conn: Connection) -> None:
    # Take SQLite's write lock when the transaction begins, not at its first write:
    # several writer processes (collector workers) then run whole transactions one
    # after the other, waiting in busy_timeout. A deferred transaction that reads and
    # then writes while another process has committed fails at once with
    # SQLITE_BUSY_SNAPSHOT instead (WAL mode; no busy handler helps it), and with
    # pysqlite's late BEGIN its reads would not even be isolated from that commit.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_store_engine(url: str, *, writer: bool = False, **kwargs: Any) -> Engine:  # noqa: ANN401
    """Create an engine for ``url`` with mqfleet's connection settings.

    ``writer``: the engine of a process that writes while others may too (the
    collector and its workers). On SQLite its transactions take the write lock at
    ``BEGIN IMMEDIATE``, so concurrent writers serialize instead of failing; readers
    (the CLI, WAL mode) are never blocked. No effect on PostgreSQL.
    """
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            try:
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the directory of {database}: {exc}") from exc
        engine = sa.create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        if writer:
            event.listen(engine, "connect", _sqlite_driver_autocommit)
            event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(parsed, **kwargs)


def _alembic_config(engine: Engine) -> Any:  # noqa: ANN401 - alembic.config.Config
    from alembic.config import Config  # noqa: PLC0415 - only migrations need alembic

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default: the newest)."""
    from alembic import command  # noqa: PLC0415 - only migrations need alembic

    try:
        command.upgrade(_alembic_config(engine), revision)
    except OperationalError as exc:
        raise StoreError(f"cannot migrate {engine.url.render_as_string()}: {exc.orig}") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate the database: {exc}") from exc


def current_revision(engine: Engine) -> str | None:
    """Return the Alembic revision the database is at, or None if never migrated."""
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
