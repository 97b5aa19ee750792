"""CLI fixtures: a database seeded with the models, and an in-process CLI runner."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner, Result
from sqlmodel import Session

from mqfleet.cli import cli
from mqfleet.store.engine import create_store_engine
from mqfleet.store.models import Node, NodeMetric

Invoke = Callable[..., Result]


def add_node(url: str, node_id: str, *, status: str = "online", metrics: int = 0) -> None:
    """Insert a node (heard from just now) and ``metrics`` samples, one a minute."""
    now = datetime.now(UTC)
    engine = create_store_engine(url)
    try:
        with Session(engine) as session:
            session.add(
                Node(
                    node_id=node_id,
                    hostname=f"{node_id}.example",
                    ip_address="10.1.2.3",
                    os_info="Linux 6.1",
                    status=status,
                    status_reason=None if status == "online" else "shutdown",
                    last_heartbeat=now,
                    session=7,
                    interval_s=10.0,
                    agent_version="0.1.0",
                )
            )
            session.commit()
            for i in range(metrics):
                session.add(
                    NodeMetric(
                        node_id=node_id,
                        metric_time=now - timedelta(minutes=i),
                        cpu_usage=float(i),
                        memory_usage=40.5,
                        disk_usage=70.25,
                        load_average=0.75,
                        session=7,
                        seq=i,
                    )
                )
            session.commit()
    finally:
        engine.dispose()


@pytest.fixture
def invoke() -> Invoke:
    """Run ``mqfleet ARGS...`` in-process; stdout and stderr are kept apart."""
    runner = CliRunner()

    def run(*args: str, **kwargs: object) -> Result:
        return runner.invoke(cli, list(args), catch_exceptions=False, **kwargs)  # type: ignore[arg-type]

    return run


@pytest.fixture
def seed() -> Callable[..., None]:
    """The :func:`add_node` helper, for tests (conftest modules are not importable)."""
    return add_node
