"""Writer engines: several processes writing one SQLite file serialize whole transactions."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import sqlalchemy as sa

from mqfleet.store.engine import create_store_engine, upgrade


def bump(engine: sa.Engine, pause_s: float) -> None:
    """Read a counter, think, write it back plus one: a lost update if not isolated."""
    with engine.begin() as conn:
        value = conn.execute(sa.text("SELECT n FROM counter")).scalar_one()
        time.sleep(pause_s)
        conn.execute(sa.text("UPDATE counter SET n = :n"), {"n": value + 1})


def test_concurrent_sqlite_writers_read_and_write_as_one_transaction(tmp_path: Path) -> None:
    # Two writer engines are two collector workers: each transaction that reads and then
    # writes must see every commit before it and let none in between (no lost update,
    # no SQLITE_BUSY_SNAPSHOT), waiting for the other in busy_timeout instead.
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    first, second = create_store_engine(url, writer=True), create_store_engine(url, writer=True)
    errors: list[BaseException] = []
    try:
        with first.begin() as conn:
            conn.execute(sa.text("CREATE TABLE counter (n INTEGER NOT NULL)"))
            conn.execute(sa.text("INSERT INTO counter VALUES (0)"))

        def run(engine: sa.Engine, pause_s: float) -> None:
            try:
                for _ in range(5):
                    bump(engine, pause_s)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=(first, 0.05)),
            threading.Thread(target=run, args=(second, 0.01)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with first.connect() as conn:
            assert conn.execute(sa.text("SELECT n FROM counter")).scalar_one() == 10
        assert errors == []
    finally:
        first.dispose()
        second.dispose()


def test_a_writer_engine_migrates_and_readers_are_not_blocked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    writer, reader = create_store_engine(url, writer=True), create_store_engine(url)
    try:
        upgrade(writer)  # Alembic runs in one BEGIN IMMEDIATE transaction
        with writer.begin() as conn:
            conn.execute(sa.text("DELETE FROM node_metrics"))
            # WAL: a reader sees the last commit while the writer holds the write lock.
            with reader.connect() as other:
                assert other.execute(sa.text("SELECT count(*) FROM nodes")).scalar_one() == 0
    finally:
        writer.dispose()
        reader.dispose()
