"""Bounded soak with faults, then a reconciliation against the database (issue 5).

    .venv/bin/python bench/soak.py                  # 10 minutes, 500 simulated nodes
    .venv/bin/python bench/soak.py --duration 60    # the CI version

Simulated nodes (bench/simproc.py) plus real ``mqfleet agent`` processes, one collector
and one mosquitto. During the run: the broker is restarted, the collector is killed with
SIGKILL twice (and restarted), random simulated nodes lose their connection without a
DISCONNECT, and signed commands are sent continuously. At the end every metric sent
must be stored exactly once, every command must have exactly one terminal status and one
result with the expected exit code and output, and every node's status must be right.
Prints the totals; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from harness import (
    PYTHON,
    ROOT,
    broker,
    database,
    mqfleet_argv,
    operator_keys,
    scalar,
    start,
    wait_for,
    workdir,
)
from run import close, connect, paho, start_collector

from mqfleet.protocol import CommandRequest, Topics, encode, utc_now
from mqfleet.security.signing import load_private_key, sign_command
from mqfleet.store.engine import create_store_engine

TOPICS = Topics()
SIMPROC = str(ROOT / "bench" / "simproc.py")
#: What each command does and what its result must be: (text, status, exit code, stdout).
COMMANDS = (
    ("true", "success", 0, ""),
    ("false", "failed", 1, ""),
    ("echo soak", "success", 0, "soak\n"),
)


@dataclass
class Sent:
    """Commands published during the soak, with what their results must say."""

    expected: dict[str, tuple[str, str, int, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def command_loop(
    port: int,
    targets: list[str],
    key_file: Path,
    *,
    sent: Sent,
    stop: threading.Event,
    period_s: float,
) -> None:
    """Publish a signed command to a random target every ``period_s``, broker or not."""
    key = load_private_key(key_file)
    rng = random.Random(7)  # noqa: S311 - picks targets
    client = paho(f"soak-operator-{uuid.uuid4().hex[:8]}")
    # paho queues QoS 1 publishes while the broker is away and resends them on reconnect.
    client.max_queued_messages_set(0)
    connect(client, port)
    while not stop.wait(period_s):
        node = rng.choice(targets)
        text, status, code, out = rng.choice(COMMANDS)
        now = utc_now()
        request = sign_command(
            CommandRequest(
                command_id=str(uuid.uuid4()),
                node_id=node,
                command_text=text,
                timeout_s=30.0,
                created_at=now,
                expires_at=now + timedelta(minutes=30),
                issuer="soak",
            ),
            key,
        )
        with sent.lock:
            sent.expected[request.command_id] = (node, status, code, out)
        client.publish(TOPICS.commands(node), encode(request), qos=1)
    # Let the last publishes leave.
    deadline = time.monotonic() + 30
    while client._out_messages and time.monotonic() < deadline:  # noqa: SLF001 - bench only
        time.sleep(0.1)
    close(client)


def main() -> int:  # noqa: C901, PLR0912, PLR0915 - one scenario, told in order
    """Run the soak with its faults, reconcile, print the totals; 1 on any mismatch."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=600.0, help="seconds of faults and traffic"
    )
    parser.add_argument("--nodes", type=int, default=500, help="simulated nodes")
    parser.add_argument("--agents", type=int, default=2, help="real mqfleet agent processes")
    parser.add_argument("--interval", type=float, default=5.0, help="metrics interval (s)")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    t_begin = time.monotonic()
    problems: list[str] = []

    def step(text: str) -> None:
        print(f"[{time.monotonic() - t_begin:6.1f}s] {text}", flush=True)

    with workdir("soak") as work, broker(work) as b, database(args.db, work) as url:
        keys = operator_keys(work)
        collector = start_collector(b, url, work)
        sim = start(
            "sim",
            [
                PYTHON,
                SIMPROC,
                "--broker",
                b.url,
                "--nodes",
                str(args.nodes),
                "--interval",
                str(args.interval),
                "--ledger",
                str(work / "ledger.json"),
                "--keepalive",
                "10",
            ],
            work,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        agent_ids = [f"soak-agent-{i}" for i in range(1, args.agents + 1)]
        agents = [
            start(
                node,
                mqfleet_argv(
                    b.url, None, "agent", "--node-id", node, "--interval", f"{args.interval}s"
                ),
                work,
                env={"MQFLEET_STATE_DIR": str(work / node), "MQFLEET_KEEPALIVE_S": "10", **keys},
            )
            for node in agent_ids
        ]
        total = args.nodes + args.agents

        def online() -> int:
            return int(scalar(url, "select count(*) from nodes where status='online'") or 0)

        wait_for(lambda: online() == total, 180, "every node online", 0.5)
        step(f"{args.nodes} simulated nodes + {args.agents} agents online")

        sent = Sent()
        stop = threading.Event()
        sim_ids = [f"sim-{i:05d}" for i in range(1, args.nodes + 1)]
        targets = sim_ids + agent_ids * max(1, args.nodes // 20)  # agents get a fair share
        sender = threading.Thread(
            target=command_loop,
            args=(b.port, targets, Path(keys["MQFLEET_OPERATOR_PRIVATE_KEY_FILE"])),
            kwargs={"sent": sent, "stop": stop, "period_s": 0.2},
            daemon=True,
        )
        sender.start()

        d = args.duration
        faults = sorted(
            [
                (0.15 * d, "drop"),
                (0.25 * d, "broker"),
                (0.4 * d, "drop"),
                (0.45 * d, "kill"),
                (0.6 * d, "drop"),
                (0.7 * d, "kill"),
                (0.85 * d, "drop"),
            ]
        )
        t0 = time.monotonic()
        for at, fault in faults:
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            if fault == "drop":
                k = max(1, args.nodes // 20)
                sim.proc.stdin.write(f"drop {k}\n".encode())  # type: ignore[union-attr]
                sim.proc.stdin.flush()  # type: ignore[union-attr]
                step(f"dropped {k} random node connections (no DISCONNECT: Wills fire)")
            elif fault == "broker":
                b.restart()
                step("restarted the broker")
            elif fault == "kill":
                collector.kill()
                step("SIGKILLed the collector")
                time.sleep(2.0)
                collector = start_collector(b, url, work, name=f"collector-{int(at)}")
                step("collector back")
        time.sleep(max(0.0, d - (time.monotonic() - t0)))
        stop.set()
        sender.join(60)
        with sent.lock:
            expected = dict(sent.expected)
        step(f"traffic stopped: {len(expected)} commands sent")

        # Every command reaches exactly one terminal status.
        terminal_q = (
            "select count(*) from commands where status in ('success','failed','timeout') "
            "and issuer='soak'"
        )
        try:
            wait_for(
                lambda: scalar(url, terminal_q) == len(expected), 180, "terminal commands", 1.0
            )
        except TimeoutError as exc:
            problems.append(str(exc))
        # Every node is shown online while it runs.
        try:
            wait_for(lambda: online() == total, 120, "every node online again", 1.0)
        except TimeoutError:
            problems.append(f"{total - online()} live nodes not shown online")

        sim.proc.stdin.write(b"stop\n")  # type: ignore[union-attr]
        sim.proc.stdin.flush()  # type: ignore[union-attr]
        sim.proc.wait(240)
        for agent in agents:
            agent.stop()
        ledger = json.loads((work / "ledger.json").read_text())
        want = sum(n for s in ledger["sessions"].values() for n in s.values())

        def sim_stored() -> int:
            return int(
                scalar(url, "select count(*) from node_metrics where node_id like 'sim-%'") or 0
            )

        with contextlib.suppress(TimeoutError):  # reported below, precisely
            wait_for(lambda: sim_stored() >= want, 180, "every simulated sample stored", 1.0)
        try:
            wait_for(lambda: online() == 0, 60, "every node offline after the stop", 0.5)
        except TimeoutError:
            problems.append(f"{online()} nodes still shown online after every node stopped")
        time.sleep(2.0)  # a late duplicate would land now
        collector.stop()
        step("stopped; reconciling")

        engine = create_store_engine(url)
        with engine.connect() as conn:
            groups = {
                (r[0], int(r[1])): (r[2], r[3], r[4], r[5])
                for r in conn.execute(
                    sa.text(
                        "select node_id, session, count(*), count(distinct seq), "
                        "min(seq), max(seq) from node_metrics group by node_id, session"
                    )
                )
            }
            commands = {
                r[0]: (r[1], r[2])
                for r in conn.execute(
                    sa.text(
                        "select command_id, target_node_id, status from commands "
                        "where issuer='soak'"
                    )
                )
            }
            results = {}
            for r in conn.execute(
                sa.text(
                    "select r.command_id, count(*), max(r.exit_code), max(r.stdout) "
                    "from command_results r join commands c on c.command_id = r.command_id "
                    "where c.issuer='soak' group by r.command_id"
                )
            ):
                results[r[0]] = (r[1], r[2], r[3])
            statuses = dict(conn.execute(sa.text("select node_id, status from nodes")).all())
        engine.dispose()

    # Metrics of simulated nodes: exactly the ledger, seq 0..n-1 once each per session.
    ledger_groups = {
        (node, int(s)): n
        for node, sessions in ledger["sessions"].items()
        for s, n in sessions.items()
        if n
    }
    bad_groups = [k for k, n in ledger_groups.items() if groups.get(k) != (n, n, 0, n - 1)]
    extra = [k for k in groups if k[0].startswith("sim-") and k not in ledger_groups]
    stored_sim = sum(v[0] for k, v in groups.items() if k[0].startswith("sim-"))
    if bad_groups or extra:
        problems.append(
            f"{len(bad_groups)} simulated (node, session) groups differ from the ledger, "
            f"{len(extra)} unknown; e.g. {bad_groups[:3]}"
        )
    # Metrics of real agents: every session's seq contiguous from 0, none twice.
    agent_groups = {k: v for k, v in groups.items() if k[0] in agent_ids}
    gaps = [
        k for k, (c, dc, lo, hi) in agent_groups.items() if not (c == dc == hi - lo + 1 and lo == 0)
    ]
    if gaps:
        problems.append(f"{len(gaps)} agent sessions with missing or repeated samples: {gaps[:3]}")
    stored_agents = sum(v[0] for v in agent_groups.values())
    # Commands: each one terminal, one result, the right exit code and output.
    wrong = []
    for cid, (node, status, code, out) in expected.items():
        row, res = commands.get(cid), results.get(cid)
        if (
            row is None
            or res is None
            or row != (node, status)
            or res[0] != 1
            or res[1] != code
            or (res[2] or "") != out
        ):
            wrong.append((cid, row, res))
    if wrong:
        problems.append(
            f"{len(wrong)} commands without exactly one right terminal result, e.g. {wrong[:2]}"
        )
    not_offline = [n for n, s in statuses.items() if s != "offline"]
    if not_offline:
        problems.append(f"{len(not_offline)} nodes not offline after the stop: {not_offline[:5]}")

    st = ledger["stats"]
    print(
        f"\nsoak {args.duration:.0f}s on {args.db}: "
        f"{args.nodes} simulated nodes + {args.agents} agents; "
        "faults: 1 broker restart, 2 collector SIGKILLs, "
        f"{4 * max(1, args.nodes // 20)} dropped connections\n"
        f"  metrics: simulated {want} sent / {stored_sim} stored; agents {stored_agents} stored in "
        f"{len(agent_groups)} sessions, {len(gaps)} with gaps\n"
        f"  commands: {len(expected)} sent, "
        f"{len(expected) - len(wrong)} with exactly one right result; "
        f"simulator saw {st['duplicate_commands']} duplicate deliveries, "
        f"{st['disconnects']} disconnects\n"
        f"  nodes: {len(statuses)} in the database, {len(not_offline)} not offline after the stop\n"
        f"  wall time {time.monotonic() - t_begin:.0f}s"
    )
    if problems:
        print("MISMATCH:\n  " + "\n  ".join(problems))
        return 1
    print("OK: nothing lost, nothing doubled, every status right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
