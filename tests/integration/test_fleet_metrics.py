"""Issue 2 end to end: no metric is lost to a broker restart or a ``kill -9`` of the collector.

A real agent samples every 0.2 s while the broker or the collector goes away and comes
back. The agent does not log what it sampled, but ``seq`` counts its samples per session
from 0: a gapless ``0..max`` per session in the database means nothing was lost, and the
unique ``(node, session, seq)`` rows mean nothing was stored twice. Where the observer
(an independent MQTT subscriber) stayed connected, what it saw published is compared too.
Both scenarios run on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import pytest

from mqfleet.protocol import utc_now

from .conftest import wait_for

if TYPE_CHECKING:
    from datetime import datetime

    from .conftest import Fleet

pytestmark = pytest.mark.integration

INTERVAL = "0.2s"


def stored_samples(fleet: Fleet, node_id: str) -> dict[tuple[int, int], datetime]:
    """``(session, seq) -> metric_time`` of every stored sample; fails on a duplicate."""
    rows = fleet.table("node_metrics", node_id=node_id)
    samples = {(r.session, r.seq): r.metric_time for r in rows}
    assert len(samples) == len(rows), "a sample was stored twice"
    return samples


def assert_gapless(samples: dict[tuple[int, int], datetime]) -> dict[int, int]:
    """Every session's seqs are exactly 0..max; return ``session -> max seq``."""
    by_session: dict[int, set[int]] = defaultdict(set)
    for session, seq in samples:
        by_session[session].add(seq)
    for session, seqs in by_session.items():
        missing = sorted(set(range(max(seqs) + 1)) - seqs)
        assert not missing, f"session {session} lost samples {missing[:20]}"
    return {session: max(seqs) for session, seqs in by_session.items()}


def test_a_broker_restart_loses_no_metric(fleet: Fleet) -> None:
    fleet.start_collector()
    agent = fleet.start_agent("br-1", interval=INTERVAL)
    first = fleet.wait_online("br-1")
    wait_for(lambda: len(stored_samples(fleet, "br-1")) >= 5, "samples before the outage")

    # A clean broker stop (it saves its persistence: queued messages and sessions).
    fleet.broker.broker.stop()
    outage_start = utc_now()
    # Keep it down until the agent has failed to reconnect twice: it samples meanwhile.
    wait_for(
        lambda: agent.log().count("reconnecting in") >= 2,
        "the agent to notice the outage",
        diagnose=fleet.diagnose,
    )
    outage_end = utc_now()
    fleet.broker.broker.start()

    # The agent reconnects with a new session and drains its backlog.
    fleet.wait_online("br-1", above=first.session, service=agent)

    def sampled_in_outage() -> list[tuple[int, int]]:
        return [
            key
            for key, at in stored_samples(fleet, "br-1").items()
            if outage_start < at < outage_end
        ]

    wait_for(sampled_in_outage, "samples taken during the outage", diagnose=fleet.diagnose)
    # Let samples of the reconnected session follow, then stop the agent cleanly.
    now = utc_now()
    wait_for(
        lambda: sum(1 for at in stored_samples(fleet, "br-1").values() if at > now) >= 3,
        "samples after the outage",
        diagnose=fleet.diagnose,
    )
    assert agent.stop() == 0, agent.tail()
    wait_for(
        lambda: (n := fleet.node("br-1")) is not None and n.status_reason == "shutdown",
        "br-1 offline (shutdown)",
    )
    assert_gapless(stored_samples(fleet, "br-1"))
    assert fleet.collector is not None
    assert fleet.collector.running(), fleet.collector.tail()


def test_kill_9_of_the_collector_loses_no_metric(fleet: Fleet) -> None:
    collector = fleet.start_collector()
    agent = fleet.start_agent("ck-1", interval=INTERVAL)
    node = fleet.wait_online("ck-1")

    # Two crashes: one while samples flow, one right after the restart while the
    # collector drains what the broker queued for its persistent session.
    for _ in range(2):
        wait_for(lambda: len(stored_samples(fleet, "ck-1")) >= 5, "samples stored")
        collector.kill()
        published = len(fleet.observer.metrics("ck-1"))
        wait_for(
            lambda p=published: len(fleet.observer.metrics("ck-1")) >= p + 5,
            "samples published while the collector is dead",
        )
        collector = fleet.start_collector()

    # Every sample the observer saw published up to now must reach the database.
    sent = {(m.session, m.seq): m.ts for m in fleet.observer.metrics("ck-1")}
    wait_for(
        lambda: set(sent) <= set(stored_samples(fleet, "ck-1")),
        "every published sample in the database",
        diagnose=fleet.diagnose,
    )
    assert agent.stop() == 0, agent.tail()
    assert collector.stop() == 0, collector.tail()

    stored = stored_samples(fleet, "ck-1")
    # One session throughout (the agent never lost the broker); nothing lost, nothing
    # stored twice, and nothing stored that the agent did not publish.
    assert {session for session, _ in stored} == {node.session}
    assert_gapless(stored)
    everything_sent = {(m.session, m.seq): m.ts for m in fleet.observer.metrics("ck-1")}
    assert all(everything_sent[key] == at for key, at in stored.items())
