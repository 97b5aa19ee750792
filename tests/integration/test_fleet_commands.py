"""Issue 3 end to end: ``mqfleet run`` -> broker -> agent -> broker -> collector -> database.

Real agent and collector processes on the secured broker; the CLI signs with the test
operator key. Command scenarios depend little on the backend, so each runs on one
(alternating, to keep the suite quick); the collector's command bookkeeping itself runs
on both in tests/collector.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mqfleet.protocol import CommandRequest, encode, utc_now
from mqfleet.security import OPERATOR_ACCOUNT

from .conftest import TOPICS, pid_running, wait_for

if TYPE_CHECKING:
    from .conftest import Fleet, Leftovers

pytestmark = pytest.mark.integration

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
POSTGRES = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def run_json(fleet: Fleet, *args: str) -> tuple[int, dict[str, Any]]:
    """``mqfleet run ARGS --json``: the exit code and the only target's JSON."""
    *options, command = args
    result = fleet.cli("run", *options, "--json", "--", command)
    assert result.stdout, result.stderr
    (target,) = json.loads(result.stdout)["results"]
    return result.exit_code, target


def result_json(fleet: Fleet, command_id: str) -> dict[str, Any]:
    document: dict[str, Any] = fleet.cli_json("result", command_id)
    return document


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@SQLITE
def test_success_failure_not_found_and_invalid_utf8(fleet: Fleet) -> None:
    fleet.start_collector()
    fleet.start_agent("cmd-1")

    code, target = run_json(fleet, "-n", "cmd-1", "echo 'héllo wörld ✓'; echo note >&2")
    assert code == 0
    assert (target["status"], target["exit_code"]) == ("success", 0)
    row = fleet.wait_command(target["command_id"], "success")
    assert (row.stdout, row.stderr, row.exit_code) == ("héllo wörld ✓\n", "note\n", 0)
    assert row.started_at is not None
    assert row.completed_at is not None
    assert row.execution_time_ms is not None
    assert row.started_at <= row.completed_at
    assert target["stdout"] == row.stdout

    code, target = run_json(fleet, "-n", "cmd-1", "echo partial; exit 3")
    assert code == 1
    assert (target["status"], target["exit_code"]) == ("failed", 3)
    row = fleet.wait_command(target["command_id"], "failed")
    assert (row.stdout, row.exit_code) == ("partial\n", 3)

    code, target = run_json(fleet, "-n", "cmd-1", "no-such-command-anywhere --flag")
    assert code == 1
    assert (target["status"], target["exit_code"]) == ("failed", 127)
    row = fleet.wait_command(target["command_id"], "failed")
    assert row.exit_code == 127
    assert "not found" in row.stderr
    assert "did not find the command" in row.error

    # Bytes that are not UTF-8 arrive as replacement characters, never a crash.
    code, target = run_json(fleet, "-n", "cmd-1", r"printf 'ok \377\376 end\n'")
    assert code == 0
    assert target["stdout"] == "ok \ufffd\ufffd end\n"
    row = fleet.wait_command(target["command_id"], "success")
    assert row.stdout == "ok \ufffd\ufffd end\n"
    document = result_json(fleet, target["command_id"])
    assert document["result"]["stdout"] == "ok \ufffd\ufffd end\n"
    text = fleet.cli("result", target["command_id"])
    assert text.exit_code == 0, text.stderr
    assert "ok \ufffd\ufffd end" in text.stdout
    table = fleet.cli("run", "-n", "cmd-1", "--", r"printf '\377\n'")
    assert table.exit_code == 0, table.stderr
    assert "\ufffd" in table.stdout

    # Exactly one result row per command, and the history shows all five.
    wait_for(lambda: len(fleet.rows("SELECT 1 FROM command_results")) == 5, "the fifth result")
    history = fleet.cli_json("commands", "--node", "cmd-1")["commands"]
    assert len(history) == 5
    counts = fleet.rows("SELECT command_id, count(*) FROM command_results GROUP BY command_id")
    assert sorted(c for _, c in counts) == [1] * 5


@POSTGRES
def test_timeout_kills_the_process_tree_and_big_output_is_truncated(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.start_collector()
    fleet.start_agent("cmd-2")

    # A backgrounded grandchild that would outlive a careless kill of the shell.
    pid_file = tmp_path / "grandchild.pid"
    code, target = run_json(
        fleet, "-n", "cmd-2", "--timeout", "1s", f"sleep 300 & echo $! > {pid_file}; wait"
    )
    assert code == 1
    assert target["status"] == "timeout"
    assert "timed out after 1 s" in target["error"]
    row = fleet.wait_command(target["command_id"], "timeout")
    assert "timed out" in row.error
    grandchild = int(pid_file.read_text())
    wait_for(lambda: not pid_running(grandchild), f"grandchild {grandchild} to be gone")

    # 10 MB of output: head and tail kept, the middle replaced by a counted marker.
    total = 4 + 10_000_000 + 4
    code, target = run_json(
        fleet,
        "-n",
        "cmd-2",
        r"printf HEAD; head -c 10000000 /dev/zero | tr '\0' x; printf TAIL",
    )
    assert code == 0
    kept = 64 * 1024
    marker = f"\n... [{total - kept} bytes truncated] ...\n"
    expected = "HEAD" + "x" * (kept // 2 - 4) + marker + "x" * (kept // 2 - 4) + "TAIL"
    assert target["stdout"] == expected
    assert target["stdout_truncated"] is True
    row = fleet.wait_command(target["command_id"], "success")
    assert (row.stdout, row.stdout_truncated, row.stderr_truncated) == (expected, True, False)
    result = result_json(fleet, target["command_id"])["result"]
    assert (result["stdout"], result["stdout_truncated"]) == (expected, True)


def _wipe_broker_session(fleet: Fleet, node_id: str) -> None:
    """Drop the agent's persistent broker session: nothing the broker queued survives."""
    # The agent's fixed client id; clean_start discards its session, and without a
    # session expiry this connection's own session ends when it closes.
    with fleet.raw_client(node_id, client_id=f"mqfleet-agent-{node_id}", clean_start=True):
        pass


@POSTGRES
def test_offline_node_runs_a_queued_command_once_and_never_an_expired_one(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.start_collector()
    agent = fleet.start_agent("off-1")
    first = fleet.wait_online("off-1")
    assert agent.stop() == 0
    wait_for(lambda: fleet.node("off-1").status == "offline", "off-1 offline")  # type: ignore[union-attr]

    once, late = tmp_path / "once.txt", tmp_path / "late.txt"
    expiring = fleet.cli("run", "-n", "off-1", "--expires", "2s", "--", f"echo ran >> {late}")
    assert expiring.exit_code == 4, expiring.stderr
    assert "queued: node off-1 is offline" in expiring.stdout
    expiring_id = expiring.stdout.rsplit("(command ", 1)[1].split(")")[0]
    code, target = run_json(fleet, "-n", "off-1", f"echo ran >> {once}")
    assert code == 4
    assert target["status"] == "queued"
    queued_id = target["command_id"]
    assert fleet.wait_command(queued_id, "pending").started_at is None

    # Nobody delivered the short-lived one before it expired: the collector says so.
    expired = fleet.wait_command(expiring_id, "timeout")
    assert expired.error == "not delivered before expiry"

    agent = fleet.start_agent("off-1")
    fleet.wait_online("off-1", above=first.session)
    row = fleet.wait_command(queued_id, "success")
    assert (row.exit_code, row.stdout) == (0, "")
    # It reached the agent twice (the broker queued it for the agent's persistent
    # session, and the collector republished it when the node came back): run once.
    wait_for(
        lambda: f"command {queued_id} already accepted: duplicate ignored" in agent.log(),
        "the second delivery to be ignored",
        diagnose=fleet.diagnose,
    )
    # The queue runs in order: a later command finishing means nothing else is left.
    code, _ = run_json(fleet, "-n", "off-1", "true")
    assert code == 0
    assert lines(once) == ["ran"]
    assert not late.exists()
    expired = fleet.command(expiring_id)
    assert (expired.status, expired.error) == ("timeout", "not delivered before expiry")  # type: ignore[union-attr]
    assert result_json(fleet, queued_id)["status"] == "success"


@SQLITE
def test_the_collector_redelivers_the_signed_payload_unchanged(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Issue 4 through the chain: only the collector (its own account, through the ACL)
    # can bring this command to the node, and the agent verifies the operator's
    # signature on what it republished.
    fleet.start_collector()
    agent = fleet.start_agent("re-1")
    first = fleet.wait_online("re-1")
    assert agent.stop() == 0
    wait_for(lambda: fleet.node("re-1").status == "offline", "re-1 offline")  # type: ignore[union-attr]
    _wipe_broker_session(fleet, "re-1")

    marker = tmp_path / "redelivered.txt"
    code, target = run_json(fleet, "-n", "re-1", f"echo ran >> {marker}")
    assert code == 4
    command_id = target["command_id"]
    fleet.wait_command(command_id, "pending")

    agent = fleet.start_agent("re-1")
    fleet.wait_online("re-1", above=first.session)
    row = fleet.wait_command(command_id, "success")
    assert row.error is None
    assert lines(marker) == ["ran"]
    sent = fleet.observer.seen(TOPICS.commands("re-1"))
    assert len(sent) == 2, "the CLI's publish and the collector's republish"
    assert sent[0].payload == sent[1].payload
    assert json.loads(sent[0].payload)["signature"]
    assert f"command {command_id} accepted" in agent.log()
    assert "refused" not in agent.log()


@SQLITE
def test_a_duplicate_publish_of_the_same_command_runs_once(
    fleet: Fleet, tmp_path: Path, operator_key: Any
) -> None:
    fleet.start_collector()
    agent = fleet.start_agent("dup-1")
    marker = tmp_path / "dup.txt"
    now = utc_now()
    request = operator_key.sign(
        CommandRequest(
            command_id=str(uuid.uuid4()),
            node_id="dup-1",
            command_text=f"echo ran >> {marker}",
            timeout_s=30.0,
            created_at=now,
            expires_at=now + timedelta(minutes=5),
            issuer="test@integration",
        )
    )
    payload = encode(request)
    # The same signed payload twice, as the operator (what a QoS 1 resend or a replay
    # by someone holding the operator token looks like).
    fleet.publish(OPERATOR_ACCOUNT, [(TOPICS.commands("dup-1"), payload)] * 2)

    row = fleet.wait_command(request.command_id, "success")
    wait_for(
        lambda: f"command {request.command_id} already accepted: duplicate ignored" in agent.log(),
        "the duplicate to be ignored",
        diagnose=fleet.diagnose,
    )
    assert row.exit_code == 0
    assert lines(marker) == ["ran"]
    assert len(fleet.rows("SELECT 1 FROM commands")) == 1
    assert len(fleet.rows("SELECT 1 FROM command_results")) == 1


@POSTGRES
def test_kill_9_of_the_agent_mid_command_reports_agent_restarted_and_never_reruns(
    fleet: Fleet, tmp_path: Path, leftovers: Leftovers
) -> None:
    fleet.start_collector()
    agent = fleet.start_agent("mid-1")
    first = fleet.wait_online("mid-1")
    marker, pid_file = tmp_path / "mid.txt", tmp_path / "mid.pid"
    result = fleet.cli(
        "run",
        "-n",
        "mid-1",
        "--no-wait",
        "--",
        f"echo $$ > {pid_file}; echo ran >> {marker}; sleep 60",
    )
    assert result.exit_code == 0, result.stderr
    command_id = result.stdout.split("\t")[0]
    fleet.wait_command(command_id, "running")
    wait_for(lambda: lines(marker) == ["ran"], "the command to start")
    shell = int(pid_file.read_text())
    leftovers.pids.append(shell)  # the command's own session outlives the killed agent

    agent.kill()
    agent = fleet.start_agent("mid-1", wait=False)
    fleet.wait_online("mid-1", above=first.session, service=agent)
    row = fleet.wait_command(command_id, "failed")
    assert row.error == "agent restarted"
    assert row.exit_code is None
    document = result_json(fleet, command_id)
    assert (document["status"], document["result"]["error"]) == ("failed", "agent restarted")
    # The queue runs in order: had the command been queued again, it would run first.
    code, _ = run_json(fleet, "-n", "mid-1", "true")
    assert code == 0
    assert lines(marker) == ["ran"]


@SQLITE
def test_a_result_that_finishes_during_a_broker_outage_is_not_lost(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.start_collector()
    agent = fleet.start_agent("bo-1")
    first = fleet.wait_online("bo-1")
    go = tmp_path / "go"
    result = fleet.cli(
        "run",
        "-n",
        "bo-1",
        "--no-wait",
        "--",
        f"while [ ! -e {go} ]; do sleep 0.05; done; echo finished",
    )
    assert result.exit_code == 0, result.stderr
    command_id = result.stdout.split("\t")[0]
    fleet.wait_command(command_id, "running")

    fleet.broker.broker.stop()
    go.touch()  # the command ends while the broker is away: its result waits on disk
    wait_for(
        lambda: f"command {command_id} finished: success" in agent.log(),
        "the command to finish during the outage",
        diagnose=fleet.diagnose,
    )
    fleet.broker.broker.start()

    fleet.wait_online("bo-1", above=first.session, service=agent)
    row = fleet.wait_command(command_id, "success")
    assert (row.stdout, row.exit_code) == ("finished\n", 0)
