"""Issue 2 end to end: registration, offline detection, the stale-Will race, garbage input.

Real processes on the secured broker: ``mqfleet collector`` and ``mqfleet agent``; the CLI
reads what the collector wrote. Every scenario runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest

from mqfleet import __version__
from mqfleet.agent.hostinfo import hostname
from mqfleet.cli.render import rfc3339
from mqfleet.protocol import utc_now
from mqfleet.security import COLLECTOR_ACCOUNT, OPERATOR_ACCOUNT

from .conftest import KEEPALIVE_S, TOPICS, wait_for

if TYPE_CHECKING:
    import sqlalchemy as sa

    from .conftest import Fleet

pytestmark = pytest.mark.integration

#: Added to the broker's 1.5 x keepalive: process start-up and scheduling on a busy box.
OFFLINE_MARGIN_S = 20.0


def test_kill_9_and_a_hung_agent_go_offline_and_a_quick_restart_stays_online(
    fleet: Fleet,
) -> None:
    fleet.start_collector()
    agent = fleet.start_agent("db-1")
    first = fleet.wait_online("db-1")

    def offline(session: int) -> sa.Row[Any]:
        def check() -> sa.Row[Any] | None:
            node = fleet.node("db-1")
            return node if node is not None and node.status == "offline" else None

        node: sa.Row[Any] = wait_for(
            check,
            f"db-1 offline (session {session})",
            timeout_s=1.5 * KEEPALIVE_S + OFFLINE_MARGIN_S,
            diagnose=fleet.diagnose,
        )
        # The broker's Will, not the collector's heartbeat timeout (3 x 60 s).
        assert (node.status_reason, node.session) == ("connection lost", session)
        return node

    # kill -9: no shutdown message; the broker publishes the Will when the socket closes.
    agent.kill()
    offline(first.session)
    agent = fleet.start_agent("db-1")
    second = fleet.wait_online("db-1", above=first.session)

    # A hung agent (SIGSTOP) keeps its socket open: only the keepalive (1.5 x 2 s) tells.
    agent.pause()
    offline(second.session)
    # Woken up, it finds its connection gone and comes back on its own, with a new session.
    agent.resume()
    third = fleet.wait_online("db-1", above=second.session, service=agent)

    # The stale-Will race: kill -9 and restart at once. The old connection's Will
    # (session n) can reach the collector after the new birth (session n+1); mosquitto
    # may also drop it when the new connection takes the client id over.
    agent.kill()
    agent = fleet.start_agent("db-1", wait=False)
    fourth = fleet.wait_online("db-1", above=third.session, service=agent)
    # It stays online with the new session, past the moment the broker gives up on the
    # old connection (1.5 x keepalive after the kill) and then some.
    watch_until = time.monotonic() + 1.5 * KEEPALIVE_S + 2
    while time.monotonic() < watch_until:
        node = fleet.node("db-1")
        assert node is not None
        assert (node.status, node.session) == ("online", fourth.session), node
        time.sleep(0.1)
    assert agent.running(), agent.tail()
    # Third-party MQTT clients see the truth too: the retained status is the new birth.
    retained = fleet.retained_status("db-1")
    assert (retained.status, retained.session) == ("online", fourth.session)


def test_birth_registers_the_node_and_duplicates_and_cli_json_match_the_database(
    fleet: Fleet,
) -> None:
    fleet.start_collector()
    before = utc_now()
    agent = fleet.start_agent("web-1", interval="0.3s")
    node = fleet.wait_online("web-1")

    # The row holds what the agent announced in its birth.
    births = [s for s in fleet.observer.statuses("web-1") if s.status == "online"]
    assert births, "the observer saw no birth"
    birth = births[-1]
    assert birth.session == node.session == 1
    assert birth.hostname == hostname()
    assert (node.hostname, node.ip_address, node.os_info) == (
        birth.hostname,
        birth.ip_address,
        birth.os_info,
    )
    assert node.os_info
    assert (node.agent_version, node.interval_s) == (__version__, 0.3)
    assert node.status_reason is None
    assert before - timedelta(seconds=1) <= node.registered_at <= utc_now()
    assert node.last_heartbeat is not None

    # Metrics flow; then the agent stops cleanly (offline, "shutdown").
    wait_for(lambda: len(fleet.observer.metrics("web-1")) >= 4, "a few samples")
    assert agent.stop() == 0, agent.tail()
    wait_for(
        lambda: (n := fleet.node("web-1")) is not None and n.status_reason == "shutdown",
        "web-1 offline (shutdown)",
    )

    # Forced redelivery: every sample the agent published arrives a second time, byte
    # for byte (what a QoS 1 resend looks like), from the node's own account.
    published = fleet.observer.seen(TOPICS.metrics("web-1"))
    fleet.publish("web-1", [(m.topic, m.payload) for m in published])

    # The agent's next birth reaches the collector after the duplicates (the broker
    # took them first, and the collector's queue is in order): when the DB shows the
    # new session, the duplicates have been through the collector.
    fleet.start_agent("web-1", interval="0.3s")
    second = fleet.wait_online("web-1", above=node.session)
    wait_for(
        lambda: fleet.rows(
            "SELECT 1 FROM node_metrics WHERE session = :s AND seq >= 2", s=second.session
        ),
        "samples of the new session",
    )
    # Stop the collector so the database holds still while it is compared.
    assert fleet.collector is not None
    assert fleet.collector.stop() == 0, fleet.collector.tail()

    stored = fleet.table("node_metrics", "metric_time DESC", node_id="web-1")
    keys = [(r.session, r.seq) for r in stored]
    assert len(keys) == len(set(keys)), "a duplicate sample was stored"
    sent = {(m.session, m.seq): m for m in fleet.observer.metrics("web-1")}
    # Every sample of the first session (all published before the duplicates) is stored,
    # and every stored sample is exactly what the agent published.
    first_session = {k for k in sent if k[0] == node.session}
    assert first_session <= set(keys)
    for row in stored:
        report = sent[(row.session, row.seq)]
        assert (
            row.metric_time,
            row.cpu_usage,
            row.memory_usage,
            row.disk_usage,
            row.load_average,
        ) == (
            report.ts,
            report.cpu_usage,
            report.memory_usage,
            report.disk_usage,
            report.load_average,
        )

    assert_cli_matches_database(fleet, "web-1", stored)


def assert_cli_matches_database(fleet: Fleet, node_id: str, stored: list[sa.Row[Any]]) -> None:
    """``nodes``, ``metrics`` and ``show`` (JSON) show exactly the node's rows."""
    # The CLI shows exactly what the database holds.
    db_node = fleet.node(node_id)
    assert db_node is not None
    expected_node = {
        "node_id": node_id,
        "hostname": db_node.hostname,
        "ip_address": db_node.ip_address,
        "os_info": db_node.os_info,
        "status": db_node.status,
        "status_reason": db_node.status_reason,
        "last_heartbeat": rfc3339(db_node.last_heartbeat),
        "registered_at": rfc3339(db_node.registered_at),
        "updated_at": rfc3339(db_node.updated_at),
        "session": db_node.session,
        "interval_s": db_node.interval_s,
        "agent_version": db_node.agent_version,
    }
    assert fleet.cli_json("nodes") == {"nodes": [expected_node]}
    expected_metrics = [
        {
            "node_id": node_id,
            "metric_time": rfc3339(r.metric_time),
            "cpu_usage": r.cpu_usage,
            "memory_usage": r.memory_usage,
            "disk_usage": r.disk_usage,
            "load_average": r.load_average,
        }
        for r in stored
    ]
    assert fleet.cli_json("metrics", node_id, "--limit", "100000") == {
        "node_id": node_id,
        "metrics": expected_metrics,
    }
    assert fleet.cli_json("show", node_id) == {
        "node": expected_node,
        "latest_metric": expected_metrics[0],
        "metrics_window": "24h",
        "metrics_in_window": len(stored),
        "commands": {},
    }


# -- garbage --------------------------------------------------------------------------
def _garbage(node_id: str) -> list[bytes]:
    now = utc_now().isoformat()
    return [
        b"",
        b"not json",
        b"\xff\xfe\x00 binary",
        b"[1, 2, 3]",
        b"{}",
        b'{"v": 2}',
        json.dumps({"v": 1, "node_id": node_id, "status": "online", "session": "7"}).encode(),
        json.dumps(
            {"v": 1, "node_id": node_id, "session": 1, "seq": -1, "ts": now, "cpu_usage": 150}
        ).encode(),
        json.dumps({"v": 1, "node_id": "other-node", "session": 1, "surprise": True}).encode(),
        json.dumps({"v": 1, "node_id": "bad id/#", "status": "offline", "session": 1}).encode(),
        json.dumps({"v": 1, "hostname": "\u0000" * 10, "x": "\ud800"}).encode(),
        b"{" * 100_000,  # deep nesting and oversized
        b"x" * (300 * 1024),  # oversized for every topic kind but results
    ]


def test_garbage_on_every_topic_leaves_the_collector_storing_good_messages(
    fleet: Fleet,
) -> None:
    collector = fleet.start_collector()
    agent = fleet.start_agent("gx-1", interval="0.3s")
    node = fleet.wait_online("gx-1")
    wait_for(lambda: len(fleet.observer.metrics("gx-1")) >= 2, "samples before the garbage")

    # Each account publishes garbage wherever the ACL lets it: the node on its status,
    # metrics and results topics; the operator on command topics (also of a node id that
    # is not valid); the collector account on the collector's status (not retained).
    targets = [
        ("gx-1", TOPICS.status("gx-1")),
        ("gx-1", TOPICS.metrics("gx-1")),
        ("gx-1", TOPICS.result("gx-1", str(uuid.uuid4()))),
        ("gx-1", f"{TOPICS.prefix}/nodes/gx-1/results/bad id!"),
        (OPERATOR_ACCOUNT, TOPICS.commands("gx-1")),
        (OPERATOR_ACCOUNT, f"{TOPICS.prefix}/nodes/bad id!/commands"),
        (OPERATOR_ACCOUNT, TOPICS.commands("never-seen")),
        (COLLECTOR_ACCOUNT, TOPICS.collector_status()),
    ]
    for account, topic in targets:
        fleet.publish(account, [(topic, payload) for payload in _garbage("gx-1")])
    published_before = max(m.seq for m in fleet.observer.metrics("gx-1"))

    # Good messages keep landing after the garbage: the agent's later samples...
    wait_for(
        lambda: fleet.rows(
            "SELECT 1 FROM node_metrics WHERE node_id = 'gx-1' AND session = :s AND seq > :q",
            s=node.session,
            q=published_before + 2,
        ),
        "samples published after the garbage",
        diagnose=fleet.diagnose,
    )
    # ...and a command round trip through every component.
    result = fleet.cli("run", "-n", "gx-1", "--json", "--", "echo still fine")
    assert result.exit_code == 0, result.stderr
    (target,) = json.loads(result.stdout)["results"]
    assert fleet.wait_command(target["command_id"], "success").stdout == "still fine\n"

    assert collector.running(), collector.tail()
    assert agent.running(), agent.tail()
    # Nothing of the garbage became data: one node, its birth's fields, only real samples.
    nodes = fleet.rows("SELECT node_id, hostname, status, session FROM nodes")
    assert [tuple(n) for n in nodes] == [("gx-1", node.hostname, "online", node.session)]
    sent = {(m.session, m.seq) for m in fleet.observer.metrics("gx-1")}
    stored = fleet.rows("SELECT session, seq, cpu_usage FROM node_metrics")
    assert {(r.session, r.seq) for r in stored} <= sent
    assert all(0 <= r.cpu_usage <= 100 for r in stored)
    assert [tuple(r) for r in fleet.rows("SELECT command_text, status FROM commands")] == [
        ("echo still fine", "success")
    ]
    # Each skipped message was logged with its topic.
    log = collector.log()
    for _account, topic in targets[:-1]:
        assert f"skipped message on {topic}" in log, topic


def test_a_node_that_dies_while_the_broker_is_down_times_out(fleet: Fleet) -> None:
    # No Will can tell: the broker crashes (kill -9: it publishes no Will and saves no
    # state), and the agent dies before it is back. Only the collector's heartbeat check
    # (3 x the node's interval of silence) can.
    fleet.start_collector()
    agent = fleet.start_agent("hb-1", interval="1s")
    node = fleet.wait_online("hb-1")
    fleet.broker.broker.kill()
    agent.kill()
    fleet.broker.broker.start()

    def timed_out() -> sa.Row[Any] | None:
        row = fleet.node("hb-1")
        return row if row is not None and row.status == "offline" else None

    row = wait_for(timed_out, "hb-1 offline after its silence", diagnose=fleet.diagnose)
    assert (row.status_reason, row.session) == ("heartbeat timeout", node.session)
    assert fleet.cli_json("nodes", "--status", "offline")["nodes"][0]["node_id"] == "hb-1"
