"""Issue 3 end to end: ``run --all`` over 20 real agents, and the CLI's exit codes 0-4.

The exit codes are checked on the real ``python -m mqfleet`` process, as a script sees
them. Both tests run on SQLite: 20 agents answering at once is the harder case for its
single writer.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from mqfleet.localbroker import free_port
from mqfleet.security import OPERATOR_ACCOUNT

from .conftest import wait_for

if TYPE_CHECKING:
    from .conftest import Fleet

pytestmark = pytest.mark.integration

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
FLEET_SIZE = 20


@SQLITE
def test_run_all_over_20_agents(fleet: Fleet) -> None:
    fleet.start_collector()
    node_ids = [f"fleet-{i:02d}" for i in range(1, FLEET_SIZE + 1)]
    fleet.provision(*node_ids)  # one broker reload for all accounts
    agents = [fleet.start_agent(node_id, wait=False) for node_id in node_ids]
    wait_for(
        lambda: len(fleet.rows("SELECT 1 FROM nodes WHERE status = 'online'")) == FLEET_SIZE,
        f"{FLEET_SIZE} agents online",
        diagnose=fleet.diagnose,
    )

    result = fleet.cli("run", "--all", "--json", "--", 'echo "$MQFLEET_NODE_ID"')
    assert result.exit_code == 0, (result.stdout, result.stderr, fleet.diagnose())
    document = json.loads(result.stdout)
    assert document["exit_code"] == 0
    assert document["summary"]["targets"] == document["summary"]["success"] == FLEET_SIZE
    by_node = {t["node_id"]: t for t in document["results"]}
    assert sorted(by_node) == node_ids
    assert {n: t["stdout"] for n, t in by_node.items()} == {n: f"{n}\n" for n in node_ids}
    batch = document["batch_id"]
    wait_for(
        lambda: (
            fleet.rows(
                "SELECT count(*) FROM commands c JOIN command_results r"
                " ON r.command_id = c.command_id WHERE c.batch_id = :b AND c.status = 'success'",
                b=batch,
            )[0][0]
            == FLEET_SIZE
        ),
        "20 results stored",
    )

    # One node fails: the run exits 1 and says which.
    result = fleet.cli("run", "--all", "--json", "--", 'test "$MQFLEET_NODE_ID" != fleet-07')
    assert result.exit_code == 1, (result.stdout, result.stderr)
    document = json.loads(result.stdout)
    failed = [t for t in document["results"] if t["status"] != "success"]
    assert [(t["node_id"], t["status"], t["exit_code"]) for t in failed] == [
        ("fleet-07", "failed", 1)
    ]
    assert document["summary"]["success"] == FLEET_SIZE - 1

    # --match picks nodes by glob.
    result = fleet.cli("run", "--match", "fleet-1*", "--json", "--", "true")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    matched = sorted(t["node_id"] for t in json.loads(result.stdout)["results"])
    assert matched == [f"fleet-{i}" for i in range(10, 20)]

    # One node away: no failure, so exit 4; its command runs when it is back.
    away = agents.pop()
    assert away.stop() == 0, away.tail()
    wait_for(lambda: fleet.node(node_ids[-1]).status == "offline", "one node offline")  # type: ignore[union-attr]
    result = fleet.cli("run", "--all", "--json", "--", 'echo "$MQFLEET_NODE_ID"')
    assert result.exit_code == 4, (result.stdout, result.stderr)
    document = json.loads(result.stdout)
    assert (document["summary"]["success"], document["summary"]["queued"]) == (FLEET_SIZE - 1, 1)
    (queued,) = [t for t in document["results"] if t["status"] == "queued"]
    assert queued["node_id"] == node_ids[-1]
    agents.append(fleet.start_agent(node_ids[-1]))
    row = fleet.wait_command(queued["command_id"], "success")
    assert row.stdout == f"{node_ids[-1]}\n"
    assert all(agent.running() for agent in agents), fleet.diagnose()


@SQLITE
def test_exit_codes_of_the_real_cli(fleet: Fleet) -> None:
    fleet.start_collector()
    fleet.start_agent("ex-1")
    away = fleet.start_agent("ex-2")
    assert away.stop() == 0, away.tail()
    wait_for(lambda: fleet.node("ex-2").status == "offline", "ex-2 offline")  # type: ignore[union-attr]

    def mqfleet(*args: str, flags: list[str] | None = None) -> tuple[int, str, str]:
        done = fleet.cli_process(*args, flags=flags)
        # Whatever the outcome: at most one line of error, never a traceback.
        assert "Traceback" not in done.stderr
        return done.returncode, done.stdout, done.stderr

    # 0: every target succeeded.
    code, out, _ = mqfleet("run", "-n", "ex-1", "--", "echo fine")
    assert code == 0
    assert "fine" in out
    # 1: a command failed; also when another target is merely queued.
    assert mqfleet("run", "-n", "ex-1", "--", "false")[0] == 1
    assert mqfleet("run", "-n", "ex-1", "-n", "ex-2", "--", "false")[0] == 1
    # 1: timed out.
    assert mqfleet("run", "-n", "ex-1", "--timeout", "0.5s", "--", "sleep 30")[0] == 1
    # 2: unknown node, no target, unknown command id, bad duration.
    code, _, err = mqfleet("run", "-n", "ghost", "--", "true")
    assert (code, err) == (2, "mqfleet: error: unknown node: ghost\n")
    assert mqfleet("run", "--", "true")[0] == 2
    assert mqfleet("result", "no-such-command")[0] == 2
    assert mqfleet("run", "-n", "ex-1", "--timeout", "soon", "--", "true")[0] == 2
    # 3: broker unreachable; database unreachable.
    closed = f"mqtt://{OPERATOR_ACCOUNT}:x@127.0.0.1:{free_port()}"
    flags = ["--broker", closed, "--database", fleet.database_url]
    code, _, err = mqfleet("run", "-n", "ex-1", "--", "true", flags=flags)
    assert code == 3
    assert err.startswith("mqfleet: error: ")
    assert err.count("\n") == 1
    missing = ["--database", f"sqlite:///{fleet.workdir / 'missing.db'}"]
    assert mqfleet("nodes", flags=missing)[0] == 3
    # 4: no failure, but the target is offline: queued.
    code, out, _ = mqfleet("run", "-n", "ex-2", "--", "true")
    assert code == 4
    assert "queued: node ex-2 is offline" in out
