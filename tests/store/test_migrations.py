from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from mqfleet.store.engine import create_store_engine, current_revision, upgrade
from mqfleet.store.models import metadata


def test_migrations_reach_head_and_match_the_models(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        upgrade(engine)
        assert current_revision(engine) is not None
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, metadata) == []
    finally:
        engine.dispose()


def test_upgrade_twice_is_harmless(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        upgrade(engine)
        upgrade(engine)
        names = set(sa.inspect(engine).get_table_names())
        assert {"nodes", "node_metrics", "commands", "command_results"} <= names
        indexes = {ix["name"] for ix in sa.inspect(engine).get_indexes("node_metrics")}
        assert "idx_node_metrics_time" in indexes
    finally:
        engine.dispose()
