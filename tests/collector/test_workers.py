"""``mqfleet collector --workers 2`` as a real process on mosquitto, SQLite and PostgreSQL.

Two worker processes share the fleet's metrics and results through one MQTT 5 shared
subscription and write to one database: every message is stored exactly once, a
SIGKILLed worker is restarted under its id and picks up its share, SIGTERM stops the
whole service (exit 0, no process left), and the supervisor's own death stops its
workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil
import pytest

from mqfleet.protocol import utc_now
from mqfleet.security import COLLECTOR_ACCOUNT

from .conftest import (
    TOPICS,
    MqttPeer,
    birth,
    command,
    finished,
    make_peer,
    metric,
    online_since,
    rows,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import sqlalchemy as sa

    from mqfleet.localbroker import LocalBroker

pytestmark = pytest.mark.integration

WORKERS = ("mqfleet-collector-1", "mqfleet-collector-2")
NODES = ("w-1", "w-2", "w-3")


@dataclass
class Service:
    """A ``mqfleet collector --workers N`` process with its stderr in a file."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def workers(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


_SERVICES: list[Service] = []


@pytest.fixture(autouse=True)
def _stop_services() -> Iterator[None]:
    yield
    while _SERVICES:
        service = _SERVICES.pop()
        children = service.workers()
        if service.proc.poll() is None:
            service.proc.kill()
            service.proc.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def start_service(
    broker_url: str, database_url: str, tmp_path: Path, *args: str, name: str = "service"
) -> Service:
    log_path = tmp_path / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mqfleet", "--broker", broker_url, "--database",
             database_url, "collector", "--workers", "2", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    service = Service(proc, log_path)
    _SERVICES.append(service)
    return service


async def all_online(mqtt: MqttPeer, service: Service, since: float) -> None:
    for worker in WORKERS:
        await wait_until(
            lambda w=worker: online_since(mqtt, w, since) or service.proc.poll() is not None,
            what=f"{worker} online",
        )
        assert service.proc.poll() is None, service.log()


def stop(service: Service) -> list[psutil.Process]:
    """SIGTERM the supervisor; assert exit 0 and that none of its workers is left."""
    children = service.workers()
    assert len(children) == 2
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(30) == 0, service.log()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], "orphan workers"
    return children


def metric_count(db: sa.Engine) -> int:
    return int(rows(db, "SELECT count(*) FROM node_metrics")[0][0])


def assert_each_metric_once(db: sa.Engine, per_node: int) -> None:
    counts = rows(
        db, "SELECT node_id, count(*), count(DISTINCT seq) FROM node_metrics GROUP BY node_id"
    )
    assert sorted(tuple(r) for r in counts) == [(n, per_node, per_node) for n in NODES]


async def test_two_workers_store_queued_metrics_once_and_sigterm_stops_all(
    mosquitto: LocalBroker, migrated_url: str, mqtt: MqttPeer, db: sa.Engine, tmp_path: Path
) -> None:
    mqtt.subscribe(TOPICS.collector_status())
    since = utc_now().timestamp() - 1
    service = start_service(mosquitto.url, migrated_url, tmp_path)
    await all_online(mqtt, service, since)
    for node in NODES:
        mqtt.publish(TOPICS.status(node), birth(node, 1), retain=True)
    await wait_until(lambda: len(rows(db, "SELECT 1 FROM nodes")) == 3, what="births")
    stop(service)

    # While the service is down, the broker queues each worker's share in its session.
    per_node = 1000
    fast = make_peer(mosquitto, max_inflight=1000)
    try:
        for seq in range(per_node):
            for node in NODES:
                fast.client.publish(TOPICS.metrics(node), metric(node, 1, seq), qos=1)
        fast.publish(TOPICS.metrics(NODES[0]), metric(NODES[0], 1, per_node - 1))  # flushed
    finally:
        fast.client.disconnect()
        fast.client.loop_stop()
    assert metric_count(db) == 0

    since = utc_now().timestamp() - 1
    service = start_service(mosquitto.url, migrated_url, tmp_path, name="again")
    await wait_until(lambda: metric_count(db) >= per_node * len(NODES), what="all stored")
    await all_online(mqtt, service, since)
    assert_each_metric_once(db, per_node)
    stop(service)
    log = service.log()
    assert "Traceback" not in log
    assert "restarting" not in log
    # Each worker's lines carry its id; both were in the one group.
    for worker in WORKERS:
        assert f"INFO [{worker}] mqfleet.collector.service: connected to" in log
    assert log.count("shared-subscription group 'mqfleet-collector'") >= 2


async def test_a_killed_worker_is_restarted_and_nothing_is_lost_or_doubled(
    mosquitto: LocalBroker, migrated_url: str, mqtt: MqttPeer, db: sa.Engine, tmp_path: Path
) -> None:
    mqtt.subscribe(TOPICS.collector_status())
    since = utc_now().timestamp() - 1
    service = start_service(mosquitto.url, migrated_url, tmp_path)
    await all_online(mqtt, service, since)
    for node in NODES:
        mqtt.publish(TOPICS.status(node), birth(node, 1), retain=True)
    await wait_until(lambda: len(rows(db, "SELECT 1 FROM nodes")) == 3, what="births")
    per_node, commands = 2000, 300
    command_ids = [str(uuid.uuid4()) for _ in range(commands)]
    fast = make_peer(mosquitto, max_inflight=1000)

    def publish_stream() -> None:
        # Metrics and command results interleaved, full speed, from several nodes.
        for seq in range(per_node):
            for node in NODES:
                fast.client.publish(TOPICS.metrics(node), metric(node, 1, seq), qos=1)
            if seq < commands:
                node = NODES[seq % len(NODES)]
                _, payload = command(node, command_id=command_ids[seq])
                fast.client.publish(TOPICS.commands(node), payload, qos=1)
                fast.client.publish(
                    TOPICS.result(node, command_ids[seq]), finished(node, command_ids[seq]), qos=1
                )
        fast.publish(TOPICS.status(NODES[0]), birth(NODES[0], 1, os_info="last"))

    publisher = threading.Thread(target=publish_stream)
    try:
        before = {p.pid for p in service.workers()}
        publisher.start()
        await wait_until(lambda: metric_count(db) >= 300, what="ingest under way")
        victim = service.workers()[0]
        victim.kill()
        at_kill = metric_count(db)
        assert at_kill < per_node * len(NODES), "the kill must land mid-stream"
        await wait_until(
            lambda: {p.pid for p in service.workers()} - {victim.pid} - before,
            what="the worker restarted",
        )
        await wait_until(lambda: not publisher.is_alive(), what="publisher done")
        await wait_until(lambda: metric_count(db) >= per_node * len(NODES), what="all stored")
        await wait_until(
            lambda: rows(db, "SELECT count(*) FROM command_results")[0][0] >= commands,
            what="every result stored",
        )
        await wait_until(
            lambda: rows(db, "SELECT os_info FROM nodes WHERE node_id = 'w-1'")[0][0] == "last",
            what="last status stored",
        )
    finally:
        publisher.join()
        fast.client.disconnect()
        fast.client.loop_stop()
    assert_each_metric_once(db, per_node)
    results = rows(db, "SELECT count(*), count(DISTINCT command_id) FROM command_results")
    assert tuple(results[0]) == (commands, commands)
    statuses = rows(db, "SELECT status, count(*) FROM commands GROUP BY status")
    assert [tuple(r) for r in statuses] == [("success", commands)]
    after = {p.pid for p in stop(service)}
    assert len(after - before) == 1
    log = service.log()
    assert "was killed by SIGKILL; restarting it in 1.0s" in log
    assert "Traceback" not in log
    if migrated_url.startswith("sqlite"):
        # Two writer processes on one file wait for the write lock, never fail on it.
        assert "database error" not in log


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
    mosquitto: LocalBroker, migrated_url: str, mqtt: MqttPeer, tmp_path: Path
) -> None:
    mqtt.subscribe(TOPICS.collector_status())
    since = utc_now().timestamp() - 1
    service = start_service(mosquitto.url, migrated_url, tmp_path)
    await all_online(mqtt, service, since)
    children = service.workers()
    service.proc.kill()
    service.proc.wait()
    # Their stdin closes with the supervisor: each stops cleanly, none keeps its id.
    _, alive = psutil.wait_procs(children, timeout=20)
    assert alive == []
    log = service.log()
    assert log.count("end of stdin (the supervisor is gone) received: stopping") == 2
    assert log.count("collector stopped") == 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_refused_credentials_stop_the_service_with_one_line_and_no_restart(
    secure_mosquitto, migrated_url: str, tmp_path: Path
) -> None:
    url = secure_mosquitto.url_for(COLLECTOR_ACCOUNT).replace(
        secure_mosquitto.tokens[COLLECTOR_ACCOUNT], "wrong-token"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mqfleet", "--database", migrated_url,
         "collector", "--workers", "2"],
        env={**os.environ, "MQFLEET_BROKER_URL": url},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("mqfleet: ")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("mqfleet: error: collector worker mqfleet-collector-")
    assert "refused the collector" in errors[0]
    assert "wrong-token" not in done.stderr
    assert "restarting" not in done.stderr
    assert "Traceback" not in done.stderr
