"""Run every mqfleet benchmark and print one table; each figure beside a same-run baseline.

    .venv/bin/python bench/run.py                      # all, small defaults (~6 min)
    .venv/bin/python bench/run.py --only ingest,rtt    # some of them
    .venv/bin/python bench/run.py --nodes 10000 --duration 600 --rows 10000000  # issue 5 scale

Benchmarks (issue 5): ingest (SQLite, PostgreSQL), scale, rtt, fanout, footprint, reads.
Each starts its own mosquitto on a free port and its own temp database. Timings live
here, never in the pass/fail tests.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from harness import (
    MQFLEET,
    MQFLEET_AGENT,
    PYTHON,
    ROOT,
    Row,
    Table,
    broker,
    database,
    median,
    mqfleet_argv,
    operator_keys,
    percentile,
    postgres_available,
    scalar,
    start,
    wait_for,
    workdir,
)
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqfleet.protocol import (
    CommandRequest,
    MetricsReport,
    StatusReport,
    Topics,
    decode_collector_status,
    decode_metrics,
    decode_result,
    encode,
    utc_now,
)
from mqfleet.store.engine import create_store_engine
from mqfleet.store.models import NodeMetric

TOPICS = Topics()
SIMPROC = str(ROOT / "bench" / "simproc.py")
BENCH_SESSION_EXPIRY = 3600


# -- small paho helpers -------------------------------------------------------------------
def paho(client_id: str = "") -> Client:
    """Make an MQTT 5 paho client (not connected) with a wide inflight window."""
    client = Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.max_inflight_messages_set(1000)
    return client


def connect(
    client: Client, port: int, *, clean: bool = True, receive_maximum: int | None = None
) -> None:
    """Connect with an optional persistent session; wait for CONNACK."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0 if clean else BENCH_SESSION_EXPIRY
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", port, 60, clean_start=clean, properties=props)
    client.loop_start()
    if not connected.wait(10):
        raise TimeoutError("no CONNACK")
    sock = client.socket()
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]


def close(client: Client) -> None:
    """Disconnect and stop the network thread."""
    client.disconnect()
    client.loop_stop()


def publish_all(port: int, messages: list[tuple[str, bytes, bool]]) -> float:
    """Publish every (topic, payload, retain) at QoS 1; wait for every PUBACK; msg/s."""
    client = paho()
    acked = 0
    done = threading.Event()
    lock = threading.Lock()

    def on_publish(*_args: object) -> None:
        nonlocal acked
        with lock:
            acked += 1
            if acked == len(messages):
                done.set()

    client.on_publish = on_publish
    connect(client, port)
    t0 = time.perf_counter()
    for topic, payload, retain in messages:
        client.publish(topic, payload, qos=1, retain=retain)
    if not done.wait(600):
        raise TimeoutError(f"only {acked}/{len(messages)} PUBACKs")
    elapsed = time.perf_counter() - t0
    close(client)
    return len(messages) / elapsed


def births(nodes: list[str]) -> list[tuple[str, bytes, bool]]:
    """Retained births of ``nodes``."""
    now = utc_now()
    return [
        (
            TOPICS.status(n),
            encode(
                StatusReport(
                    node_id=n,
                    status="online",
                    session=1,
                    ts=now,
                    hostname=n,
                    ip_address="10.0.0.1",
                    interval_s=10.0,
                )
            ),
            True,
        )
        for n in nodes
    ]


def metric_messages(nodes: list[str], count: int) -> list[tuple[str, bytes, bool]]:
    """``count`` valid metrics payloads spread over ``nodes`` (about 200 B each)."""
    base = utc_now() - timedelta(seconds=count // len(nodes) * 10)
    out = []
    for i in range(count):
        node = nodes[i % len(nodes)]
        seq = i // len(nodes)
        report = MetricsReport(
            node_id=node,
            session=1,
            seq=seq,
            ts=base + timedelta(seconds=10 * seq),
            cpu_usage=12.5,
            memory_usage=43.25,
            disk_usage=71.0,
            load_average=0.42,
        )
        out.append((TOPICS.metrics(node), encode(report), False))
    return out


def start_collector(
    b: object, url: str, work: Path, name: str = "collector", workers: int = 1
) -> object:
    """Start the collector and wait until each worker's retained status says online."""
    args = ["collector", "--workers", str(workers)] if workers > 1 else ["collector"]
    collector = start(name, mqfleet_argv(b.url, url, *args), work)  # type: ignore[attr-defined]
    online_ids: set[str] = set()
    online = threading.Event()
    watcher = paho()

    def on_message(_c: object, _u: object, message: object) -> None:
        status = decode_collector_status(message.payload)  # type: ignore[attr-defined]
        if status.status == "online":
            online_ids.add(status.collector_id)
            if len(online_ids) >= workers:
                online.set()

    watcher.on_message = on_message
    connect(watcher, b.port)  # type: ignore[attr-defined]
    watcher.subscribe(TOPICS.collector_status(), qos=1)
    ok = online.wait(60)
    close(watcher)
    if not ok:
        raise TimeoutError(f"collector not online:\n{collector.tail()}")  # type: ignore[attr-defined]
    # Its subscriptions are sent right before the online status, on the same connection.
    time.sleep(0.5 if workers > 1 else 0.2)
    return collector


# -- 1. ingest ---------------------------------------------------------------------------
def collector_drain(
    kind: str, nodes: list[str], payloads: list[tuple[str, bytes, bool]], workers: int
) -> tuple[float, int, int, float]:
    """Drain pre-queued metrics with ``collector [--workers N]``.

    Returns rows/s, rows stored, distinct rows and the publisher's rate.
    """
    messages = len(payloads)
    label = f"ingest-{kind}-{workers}w"
    with workdir(label) as work, broker(work) as b, database(kind, work) as url:
        collector = start_collector(b, url, work, workers=workers)
        publish_all(b.port, births(nodes))
        wait_for(lambda: scalar(url, "select count(*) from nodes") == len(nodes), 60, "births")
        # Stop it: the broker keeps its persistent session(s) and queues what follows
        # (a worker's share of the group in its own session).
        collector.stop()
        publish_rate = publish_all(b.port, payloads)
        args = ["collector", "--workers", str(workers)] if workers > 1 else ["collector"]
        collector = start("collector2", mqfleet_argv(b.url, url, *args), work)
        count = lambda: int(scalar(url, "select count(*) from node_metrics") or 0)  # noqa: E731
        wait_for(lambda: count() > 0, 60, "first rows", poll_s=0.02)
        t0, c0 = time.perf_counter(), count()
        wait_for(lambda: count() >= messages, 600, "all rows", poll_s=0.05)
        rate = (messages - c0) / (time.perf_counter() - t0)
        collector.stop()
        stored = count()
        distinct = int(
            scalar(
                url,
                "select count(*) from (select distinct node_id, session, seq from node_metrics) d",
            )
            or 0
        )
    return rate, stored, distinct, publish_rate


def bench_ingest(table: Table, kind: str, messages: int) -> None:
    """Collector drain rate of queued metrics (1 and 2 workers) vs paho drain, executemany."""
    print(f"[ingest/{kind}] {messages} metrics", flush=True)
    nodes = [f"ing-{i:04d}" for i in range(100)]
    payloads = metric_messages(nodes, messages)
    results = {workers: collector_drain(kind, nodes, payloads, workers) for workers in (1, 2)}
    drain = paho_drain_rate(payloads)
    raw = executemany_rate(kind, messages)
    for workers, (rate, stored, distinct, publish_rate) in results.items():
        loss = messages - stored
        ok = rate >= 20_000 and loss == 0 and distinct == stored
        note = f"{stored}/{messages} stored, {loss} lost; publisher {publish_rate:,.0f}/s"
        name = f"1. ingest {kind}" + (f", collector --workers {workers}" if workers > 1 else "")
        target = ">= 20,000/s, 0 lost"
        table.add(Row(name, rate, "msg/s", "bare paho drain", drain, target, ok, note))
    table.add(
        Row(f"1. ingest {kind} vs DB", results[1][0], "msg/s", "raw executemany", raw, "", None)
    )


def paho_drain_rate(payloads: list[tuple[str, bytes, bool]]) -> float:
    """How fast a bare paho subscriber (auto ack) drains the same pre-queued messages."""
    with workdir("drain") as work, broker(work) as b:
        received = 0
        done = threading.Event()
        first: list[float] = []

        def on_message(*_args: object) -> None:
            nonlocal received
            if not first:
                first.append(time.perf_counter())
            received += 1
            if received == len(payloads):
                done.set()

        sub = paho("bench-drain")
        connect(sub, b.port, clean=False, receive_maximum=10000)
        sub.subscribe(TOPICS.all_metrics(), qos=1)
        time.sleep(0.5)
        close(sub)
        publish_all(b.port, payloads)
        sub = paho("bench-drain")
        sub.on_message = on_message
        connect(sub, b.port, clean=False, receive_maximum=10000)
        if not done.wait(600):
            raise TimeoutError("paho drain incomplete")
        rate = (len(payloads) - 1) / (time.perf_counter() - first[0])
        close(sub)
        return rate


def executemany_rate(kind: str, rows: int) -> float:
    """Raw SQLAlchemy Core executemany of metric rows into the same schema, rows/s."""
    with workdir(f"raw-{kind}") as work, database(kind, work) as url:
        engine = create_store_engine(url)
        table = NodeMetric.__table__  # type: ignore[attr-defined]
        now = utc_now()
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "insert into nodes (node_id, hostname, ip_address, status, registered_at, "
                    "updated_at, session) values ('raw', 'raw', '1', 'online', :t, :t, 1)"
                ),
                {"t": now.replace(tzinfo=None) if kind == "sqlite" else now},
            )
        batch = [
            {
                "node_id": "raw",
                "metric_time": now,
                "cpu_usage": 1.0,
                "memory_usage": 2.0,
                "disk_usage": 3.0,
                "load_average": 0.1,
                "created_at": now,
                "session": 1,
                "seq": i,
            }
            for i in range(rows)
        ]
        t0 = time.perf_counter()
        for start_at in range(0, rows, 2000):
            with engine.begin() as conn:
                conn.execute(sa.insert(table), batch[start_at : start_at + 2000])
        rate = rows / (time.perf_counter() - t0)
        engine.dispose()
        return rate


# -- 2. scale ----------------------------------------------------------------------------
class LagProbe:
    """A bare paho subscriber measuring transport lag (metric ts -> received) as baseline."""

    def __init__(self, port: int) -> None:
        """Connect to the broker on ``port`` and subscribe to every node's metrics."""
        self.lags: list[float] = []
        self.client = paho()
        self.client.on_message = self._on_message
        connect(self.client, port)
        self.client.subscribe(TOPICS.all_metrics(), qos=1)

    def _on_message(self, _c: object, _u: object, message: object) -> None:
        report = decode_metrics(message.payload)  # type: ignore[attr-defined]
        self.lags.append(time.time() - report.ts.timestamp())

    def close(self) -> None:
        """Disconnect the subscriber."""
        close(self.client)


def simulator(work: Path, port: int, nodes: int, interval: float, name: str = "sim") -> object:
    """Start bench/simproc.py (stdin-steered) and return its Service."""
    argv = [
        PYTHON,
        SIMPROC,
        "--broker",
        f"mqtt://127.0.0.1:{port}",
        "--nodes",
        str(nodes),
        "--interval",
        str(interval),
        "--ledger",
        str(work / f"{name}-ledger.json"),
    ]
    return start(name, argv, work, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def stop_simulator(sim: object, work: Path, name: str = "sim") -> dict:
    """Ask the simulator to drain and stop; return its ledger."""
    sim.proc.stdin.write(b"stop\n")  # type: ignore[attr-defined]
    sim.proc.stdin.flush()  # type: ignore[attr-defined]
    sim.proc.wait(180)  # type: ignore[attr-defined]
    return json.loads((work / f"{name}-ledger.json").read_text())


def reconcile_metrics(url: str, ledger: dict) -> tuple[int, int, int]:
    """Compare stored samples with the ledger: (expected, stored, mismatched groups)."""
    expected = {
        (node, int(session)): n
        for node, sessions in ledger["sessions"].items()
        for session, n in sessions.items()
        if n
    }
    engine = create_store_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "select node_id, session, count(*), count(distinct seq), min(seq), max(seq) "
                "from node_metrics group by node_id, session"
            )
        ).all()
    engine.dispose()
    stored = {(r[0], int(r[1])): (r[2], r[3], r[4], r[5]) for r in rows}
    bad = 0
    for key, n in expected.items():
        if stored.get(key) != (n, n, 0, n - 1):
            bad += 1
    bad += len(set(stored) - set(expected))
    return sum(expected.values()), sum(v[0] for v in stored.values()), bad


def bench_scale(table: Table, nodes: int, duration: float) -> None:
    """N simulated nodes at 10 s for a duration: zero loss, p99 lag ts -> stored."""
    interval = 10.0
    print(f"[scale] {nodes} nodes x {duration:.0f}s at {interval:.0f}s", flush=True)
    with workdir("scale") as work, broker(work) as b, database("sqlite", work) as url:
        collector = start_collector(b, url, work)
        probe = LagProbe(b.port)
        t_start = time.time()
        sim = simulator(work, b.port, nodes, interval)
        ramp = wait_for(
            lambda: scalar(url, "select count(*) from nodes where status='online'") == nodes,
            max(120.0, nodes / 50),
            "every node online",
            poll_s=0.5,
        )
        measure_from = datetime.now(UTC) + timedelta(seconds=interval)
        time.sleep(duration)
        ledger = stop_simulator(sim, work)
        expected = sum(n for s in ledger["sessions"].values() for n in s.values())
        wait_for(
            lambda: int(scalar(url, "select count(*) from node_metrics") or 0) >= expected,
            120,
            "every sample stored",
            poll_s=0.5,
        )
        time.sleep(1.0)  # a duplicate would land now
        collector.stop()
        probe.close()
        want, got, bad = reconcile_metrics(url, ledger)
        engine = create_store_engine(url)
        with engine.connect() as conn:
            pairs = conn.execute(
                sa.select(NodeMetric.metric_time, NodeMetric.created_at).where(
                    NodeMetric.metric_time >= measure_from
                )
            ).all()
        engine.dispose()
        lags = [(c - m).total_seconds() for m, c in pairs]
        base = [lag for lag in probe.lags if lag < 3600]
    p99 = percentile(lags, 99)
    ok = bad == 0 and want == got and p99 < 2.0
    note = (
        f"{nodes} nodes x {duration:.0f}s, ramp {ramp:.0f}s, {got}/{want} stored, "
        f"{bad} mismatched (node, session); p50 {percentile(lags, 50):.3f}s; "
        f"elapsed {time.time() - t_start:.0f}s"
    )
    table.add(
        Row(
            "2. scale: p99 ingest lag",
            p99,
            "s",
            "p99 broker->paho lag",
            percentile(base, 99),
            "< 2 s, 0 lost",
            ok,
            note,
        )
    )


# -- 3. command round trip ----------------------------------------------------------------
def wait_online(url: str, node: str, timeout: float = 60) -> None:
    """Wait until the collector has ``node`` online."""
    wait_for(
        lambda: scalar(url, "select status from nodes where node_id=:n", n=node) == "online",
        timeout,
        f"{node} online",
    )


def command(node: str, text: str = "true") -> CommandRequest:
    """Build a command request for ``node``."""
    now = utc_now()
    return CommandRequest(
        command_id=str(uuid.uuid4()),
        node_id=node,
        command_text=text,
        timeout_s=30.0,
        created_at=now,
        expires_at=now + timedelta(minutes=5),
        issuer="bench",
    )


def in_process_rtt(
    port: int, node: str, rounds: int, keys: dict[str, str] | None = None
) -> list[float]:
    """Publish a signed `true` command and wait for its final result; seconds per round."""
    from mqfleet.security.signing import load_private_key, sign_command  # noqa: PLC0415

    key = load_private_key(Path(keys["MQFLEET_OPERATOR_PRIVATE_KEY_FILE"])) if keys else None
    client = paho()
    finished = threading.Event()
    waiting: dict[str, str] = {}

    def on_message(_c: object, _u: object, message: object) -> None:
        result = decode_result(message.payload)  # type: ignore[attr-defined]
        if result.status != "running" and waiting.get("id") == result.command_id:
            finished.set()

    client.on_message = on_message
    connect(client, port)
    client.subscribe(TOPICS.node_results(node), qos=1)
    time.sleep(0.3)
    out = []
    for _ in range(rounds):
        req = command(node)
        if key is not None:
            req = sign_command(req, key)  # part of the round trip, as in `mqfleet run`
        finished.clear()
        waiting["id"] = req.command_id
        t0 = time.perf_counter()
        client.publish(TOPICS.commands(node), encode(req), qos=1)
        if not finished.wait(30):
            raise TimeoutError("no result")
        out.append(time.perf_counter() - t0)
    close(client)
    return out


def ping_pong_rtt(port: int, rounds: int) -> list[float]:
    """Minimal paho ping-pong (QoS 1, TCP_NODELAY) through the same broker; seconds."""
    responder, asker = paho(), paho()
    responder.on_message = lambda c, _u, m: c.publish("bench/pong", m.payload, qos=1)
    got = threading.Event()
    asker.on_message = lambda *_a: got.set()
    connect(responder, port)
    connect(asker, port)
    responder.subscribe("bench/ping", qos=1)
    asker.subscribe("bench/pong", qos=1)
    time.sleep(0.3)
    out = []
    for _ in range(rounds):
        got.clear()
        t0 = time.perf_counter()
        asker.publish("bench/ping", b"x" * 200, qos=1)
        if not got.wait(10):
            raise TimeoutError("no pong")
        out.append(time.perf_counter() - t0)
    close(responder)
    close(asker)
    return out


def process_times(
    argv: list[str], rounds: int, env: dict[str, str] | None = None
) -> tuple[list[float], int]:
    """Wall time of a whole process, ``rounds`` times; and its last exit code."""
    out, code = [], 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, check=False, env={**_env(), **(env or {})})
        out.append(time.perf_counter() - t0)
        code = proc.returncode
        if code != 0:
            print(proc.stderr.decode(errors="replace")[-500:], file=sys.stderr)
    return out, code


def _env() -> dict[str, str]:
    from harness import bench_env  # noqa: PLC0415

    return bench_env()


def bench_rtt(table: Table, rounds: int) -> None:
    """Time `true` on one real agent: in-process and whole `mqfleet run`, vs paho ping-pong."""
    print(f"[rtt] {rounds} rounds", flush=True)
    with workdir("rtt") as work, broker(work) as b, database("sqlite", work) as url:
        collector = start_collector(b, url, work)
        keys = operator_keys(work)
        agent = start(
            "agent",
            mqfleet_argv(b.url, None, "agent", "--node-id", "bench-agent"),
            work,
            env={"MQFLEET_STATE_DIR": str(work / "agent-state"), **keys},
        )
        wait_online(url, "bench-agent")
        sim = simulator(work, b.port, 1, 10.0, name="sim1")
        wait_online(url, "sim-00001")
        inproc = in_process_rtt(b.port, "bench-agent", rounds, keys)
        inproc_sim = in_process_rtt(b.port, "sim-00001", rounds)
        whole, code = process_times(
            mqfleet_argv(b.url, url, "run", "-n", "bench-agent", "--", "true"),
            max(5, rounds // 10),
            keys,
        )
        base = ping_pong_rtt(b.port, rounds)
        py_start, _ = process_times([PYTHON, "-c", "pass"], 5)
        stop_simulator(sim, work, "sim1")
        agent.stop()
        collector.stop()
    p50 = median(inproc) * 1000
    table.add(
        Row(
            "3. rtt `true`, real agent, in-process p50",
            p50,
            "ms",
            "paho ping-pong p50",
            median(base) * 1000,
            "< 5 ms",
            p50 < 5,
            f"p99 {percentile(inproc, 99) * 1000:.1f} ms; "
            f"ping-pong p99 {percentile(base, 99) * 1000:.2f} ms",
        )
    )
    p50s = median(inproc_sim) * 1000
    table.add(
        Row(
            "3. rtt `true`, simulated node, in-process p50",
            p50s,
            "ms",
            "paho ping-pong p50",
            median(base) * 1000,
            "",
            None,
            f"p99 {percentile(inproc_sim, 99) * 1000:.1f} ms",
        )
    )
    w50 = median(whole) * 1000
    table.add(
        Row(
            "3. rtt whole `mqfleet run -n NODE -- true` p50",
            w50,
            "ms",
            "`python -c pass` p50",
            median(py_start) * 1000,
            "< 250 ms",
            w50 < 250 and code == 0,
            f"p99 {percentile(whole, 99) * 1000:.0f} ms, exit {code}; Salt cmd.run ~500 ms (issue)",
        )
    )


# -- 4. fan-out ---------------------------------------------------------------------------
def bench_fanout(table: Table, nodes: int) -> None:
    """`mqfleet run --all -- true` over simulated nodes: printed and stored."""
    print(f"[fanout] {nodes} nodes", flush=True)
    with workdir("fanout") as work, broker(work) as b, database("sqlite", work) as url:
        collector = start_collector(b, url, work)
        sim = simulator(work, b.port, nodes, 10.0)
        wait_for(
            lambda: scalar(url, "select count(*) from nodes where status='online'") == nodes,
            120,
            "every node online",
            poll_s=0.5,
        )
        keys = operator_keys(work)
        single, _ = process_times(
            mqfleet_argv(b.url, url, "run", "-n", "sim-00001", "--", "true"), 3, keys
        )
        t0 = time.perf_counter()
        proc = subprocess.run(
            mqfleet_argv(b.url, url, "run", "--all", "--json", "--", "true"),
            capture_output=True,
            check=False,
            env={**_env(), **keys},
        )
        printed = time.perf_counter() - t0
        doc = json.loads(proc.stdout or b"{}")
        targets = doc.get("results", [])
        ok_targets = sum(1 for t in targets if t.get("status") == "success")
        batch = doc.get("batch_id")
        stored_q = (
            "select count(*) from command_results r join commands c on c.command_id=r.command_id "
            "where c.batch_id=:b and c.status='success'"
        )
        stored_after = (
            wait_for(
                lambda: scalar(url, stored_q, b=batch) == nodes, 60, "every result stored", 0.05
            )
            + printed
        )
        stop_simulator(sim, work)
        collector.stop()
    ok = proc.returncode == 0 and ok_targets == nodes and stored_after < 3.0
    table.add(
        Row(
            f"4. fan-out `run --all -- true` x{nodes}",
            printed,
            "s",
            "`run -n` one node",
            median(single),
            "< 3 s, all stored",
            ok,
            f"exit {proc.returncode}, {ok_targets} success printed, "
            f"all stored after {stored_after:.2f}s",
        )
    )


# -- 5. agent footprint ---------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _private_pss_mib(pid: int) -> tuple[float, float]:
    """(private, proportional) memory of ``pid`` in MiB: RSS minus shared library pages."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) / 1024
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


#: Prometheus' node_exporter from Debian's package, when installed: the issue's reference.
NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")
IDLE_PYTHON = "import time\nwhile True: time.sleep(10)"


def bench_footprint(table: Table, seconds: float) -> None:
    """RSS and CPU of the real agent idle at its default interval, beside its baselines.

    Same run, same machine: a bare interpreter, a minimal aiomqtt + psutil agent
    (bench/minimal_agent.py) and, when installed, node_exporter.
    """
    print(f"[footprint] {seconds:.0f}s idle", flush=True)
    with workdir("footprint") as work, broker(work) as b:
        keys = operator_keys(work)
        procs = {
            # What nodes run (deploy/systemd/mqfleet-agent.service): the agent's own entry.
            "agent": start(
                "agent",
                [MQFLEET_AGENT, "--broker", b.url, "--node-id", "bench-agent"],
                work,
                env={"MQFLEET_STATE_DIR": str(work / "agent-state"), **keys},
            ),
            # The same agent started through the operator CLI (click), for comparison.
            "cli_agent": start(
                "cli_agent",
                mqfleet_argv(b.url, None, "agent", "--node-id", "bench-agent-2"),
                work,
                env={"MQFLEET_STATE_DIR": str(work / "agent-state-2"), **keys},
            ),
            "bare": start("python", [PYTHON, "-c", IDLE_PYTHON], work),
            "minimal": start(
                "minimal", [PYTHON, str(ROOT / "bench" / "minimal_agent.py"), str(b.port)], work
            ),
        }
        if NODE_EXPORTER.exists():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            listen = f"--web.listen-address=127.0.0.1:{port}"
            procs["node_exporter"] = start("node_exporter", [str(NODE_EXPORTER), listen], work)
        time.sleep(5)  # start-up done, first sample published
        pids = {k: p.proc.pid for k, p in procs.items()}  # type: ignore[attr-defined]
        cpu0 = {k: _cpu_seconds(p) for k, p in pids.items()}
        time.sleep(seconds)
        cpu = {k: (_cpu_seconds(p) - cpu0[k]) / seconds * 100 for k, p in pids.items()}
        rss = {k: _rss_mib(p) for k, p in pids.items()}
        private = {k: _private_pss_mib(p) for k, p in pids.items()}
        for proc in procs.values():
            proc.stop()  # type: ignore[attr-defined]
    others = "; ".join(
        f"{k} {rss[k]:.1f} MiB RSS / {private[k][0]:.1f} private, {cpu[k]:.2f} % CPU"
        for k in ("minimal", "node_exporter")
        if k in rss
    )
    if "node_exporter" not in rss:
        others += f"; node_exporter not installed ({NODE_EXPORTER}): not measured"
    table.add(
        Row(
            "5. agent RSS (idle, 10 s interval)",
            rss["agent"],
            "MiB",
            "minimal aiomqtt+psutil agent",
            rss["minimal"],
            "<= 30 MiB",
            rss["agent"] <= 30,
            f"mqfleet-agent; private {private['agent'][0]:.1f} MiB, PSS {private['agent'][1]:.1f}"
            f" MiB; `mqfleet agent` (through click) {rss['cli_agent']:.1f} MiB; "
            f"bare python {rss['bare']:.1f} MiB; {others}",
        )
    )
    table.add(
        Row(
            "5. agent CPU (idle, 10 s interval)",
            cpu["agent"],
            "% core",
            "minimal aiomqtt+psutil agent",
            cpu["minimal"],
            "<= 0.2 %",
            cpu["agent"] <= 0.2,
            f"over {seconds:.0f}s",
        )
    )


# -- 6. CLI reads ---------------------------------------------------------------------------
def fill_sqlite(path: Path, nodes: int, rows: int) -> float:
    """10,000 nodes and ``rows`` metrics (10 s apart, newest now) via executemany; rows/s."""
    now = datetime.now(UTC).replace(tzinfo=None)
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    stamp = now.strftime(fmt)
    conn.executemany(
        "insert into nodes (node_id, hostname, ip_address, os_info, status, last_heartbeat, "
        "registered_at, updated_at, session, interval_s) "
        "values (?, ?, ?, ?, 'online', ?, ?, ?, 1, 10.0)",
        [
            (f"sim-{i:05d}", f"sim-{i:05d}", "10.0.0.1", "Linux", stamp, stamp, stamp)
            for i in range(1, nodes + 1)
        ],
    )
    per_node = max(1, rows // nodes)
    t0 = time.perf_counter()
    written = 0
    chunk: list[tuple] = []
    for step in range(per_node):
        ts = (now - timedelta(seconds=10 * step)).strftime(fmt)
        chunk.extend(
            (f"sim-{i:05d}", ts, 10.0, 20.0, 30.0, 0.5, ts, 1, step) for i in range(1, nodes + 1)
        )
        if len(chunk) >= 200_000:
            conn.executemany(
                "insert into node_metrics (node_id, metric_time, cpu_usage, memory_usage, "
                "disk_usage, load_average, created_at, session, seq) values (?,?,?,?,?,?,?,?,?)",
                chunk,
            )
            conn.commit()
            written += len(chunk)
            chunk = []
    if chunk:
        conn.executemany(
            "insert into node_metrics (node_id, metric_time, cpu_usage, memory_usage, "
            "disk_usage, load_average, created_at, session, seq) values (?,?,?,?,?,?,?,?,?)",
            chunk,
        )
        written += len(chunk)
    conn.commit()
    conn.execute("ANALYZE")
    conn.close()
    return written / (time.perf_counter() - t0)


def fill_postgres(url: str, nodes: int, rows: int) -> float:
    """As :func:`fill_sqlite` on PostgreSQL, the rows made by the server; metric rows/s."""
    engine = create_store_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "insert into nodes (node_id, hostname, ip_address, os_info, status, "
                    "last_heartbeat, registered_at, updated_at, session, interval_s) "
                    "select 'sim-' || lpad(i::text, 5, '0'), 'sim-' || lpad(i::text, 5, '0'), "
                    "'10.0.0.1', 'Linux', 'online', now(), now(), now(), 1, 10.0 "
                    "from generate_series(1, :nodes) as i"
                ),
                {"nodes": nodes},
            )
        t0 = time.perf_counter()
        with engine.begin() as conn:
            # Oldest first, every node per step, as the collector writes them.
            conn.execute(
                sa.text(
                    "insert into node_metrics (node_id, metric_time, cpu_usage, memory_usage, "
                    "disk_usage, load_average, created_at, session, seq) "
                    "select 'sim-' || lpad(i::text, 5, '0'), "
                    "now() - make_interval(secs => 10 * s), 10.0, 20.0, 30.0, 0.5, now(), 1, s "
                    "from generate_series(:last, 0, -1) as s, "
                    "generate_series(1, :nodes) as i"
                ),
                {"nodes": nodes, "last": max(1, rows // nodes) - 1},
            )
        elapsed = time.perf_counter() - t0
        # Settled before the timings: statistics, and no autovacuum of the new rows
        # running beside them. VACUUM cannot run in a transaction.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("vacuum (analyze) nodes, node_metrics"))
    finally:
        engine.dispose()
    return max(1, rows // nodes) * nodes / elapsed


def bench_reads(table: Table, rows: int, nodes: int = 10_000, backend: str = "sqlite") -> None:
    """Whole-process `mqfleet nodes [--json]` and `metrics NODE --since 1h` on a big DB."""
    label = "SQLite" if backend == "sqlite" else "PostgreSQL"
    print(f"[reads/{backend}] {nodes} nodes, {rows} metric rows", flush=True)
    with workdir("reads") as work, database(backend, work) as url:
        if backend == "sqlite":
            fill_rate = fill_sqlite(work / "fleet.db", nodes, rows)
        else:
            fill_rate = fill_postgres(url, nodes, rows)
        total = scalar(url, "select count(*) from node_metrics")
        argv = [MQFLEET, "--database", url]
        nodes_t, c1 = process_times([*argv, "nodes"], 10)
        json_t, c2 = process_times([*argv, "nodes", "--json"], 10)
        metrics_t, c3 = process_times([*argv, "metrics", "sim-05000", "--since", "1h"], 10)
        version_t, _ = process_times([MQFLEET, "--version"], 5)
        py_t, _ = process_times([PYTHON, "-c", "pass"], 5)
    base = median(py_t) * 1000
    note = (
        f"filled at {fill_rate:,.0f} rows/s; `mqfleet --version` {median(version_t) * 1000:.0f} ms"
    )
    for name, times, code, extra in (
        (f"`mqfleet nodes` ({nodes} nodes, {label})", nodes_t, c1, note),
        (f"`mqfleet nodes --json` ({nodes} nodes, {label})", json_t, c2, ""),
        (f"`mqfleet metrics NODE --since 1h` ({total:,} rows, {label})", metrics_t, c3, ""),
    ):
        p50 = median(times) * 1000
        table.add(
            Row(
                f"6. {name} p50",
                p50,
                "ms",
                "`python -c pass`",
                base,
                "< 300 ms",
                p50 < 300 and code == 0,
                extra,
            )
        )


# -- main -------------------------------------------------------------------------------------
ALL = ("ingest", "scale", "rtt", "fanout", "footprint", "reads")


def run_benchmark(table: Table, name: str, args: argparse.Namespace) -> None:
    """Run the benchmark called ``name`` with the sizes given on the command line."""
    if name == "ingest":
        bench_ingest(table, "sqlite", args.messages)
        if postgres_available():
            bench_ingest(table, "postgres", args.messages)
        else:
            print("[ingest/postgres] skipped: PostgreSQL not reachable", flush=True)
    elif name == "scale":
        bench_scale(table, args.nodes, args.duration)
    elif name == "rtt":
        bench_rtt(table, args.rounds)
    elif name == "fanout":
        bench_fanout(table, args.fanout)
    elif name == "footprint":
        bench_footprint(table, args.idle)
    elif name == "reads":
        bench_reads(table, args.rows)
        if postgres_available():
            bench_reads(table, args.rows, backend="postgres")
        else:
            print("[reads/postgres] skipped: PostgreSQL not reachable", flush=True)


def main() -> int:
    """Parse the arguments, run the chosen benchmarks and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {ALL}")
    parser.add_argument("--messages", type=int, default=50_000, help="ingest: metrics per backend")
    parser.add_argument("--nodes", type=int, default=1000, help="scale: simulated nodes")
    parser.add_argument("--duration", type=float, default=60.0, help="scale: seconds")
    parser.add_argument("--rounds", type=int, default=100, help="rtt: commands")
    parser.add_argument("--fanout", type=int, default=1000, help="fan-out: simulated nodes")
    parser.add_argument("--idle", type=float, default=60.0, help="footprint: seconds measured")
    parser.add_argument("--rows", type=int, default=1_000_000, help="reads: node_metrics rows")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(ALL)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {platform.platform()}",
        flush=True,
    )
    # Measure the CLI as installed: pip compiles bytecode at install time, but an editable
    # checkout under PYTHONDONTWRITEBYTECODE=1 would recompile every module on every
    # process start (~30-40 ms more per `mqfleet` command). Compile once, up front.
    compileall.compile_dir(str(ROOT / "src" / "mqfleet"), quiet=1)
    table = Table()
    t0 = time.time()
    for name in chosen:
        try:
            run_benchmark(table, name, args)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the rest
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            table.rows.append(
                Row(name, float("nan"), "", "", float("nan"), met=False, note=f"failed: {exc}")
            )
    text = table.render()
    print(f"\nall benchmarks in {time.time() - t0:.0f}s\n\n{text}")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0 if all(r.met is not False for r in table.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
