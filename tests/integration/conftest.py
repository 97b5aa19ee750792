"""End-to-end fixtures: the whole chain as real processes, the way an operator runs it.

A :class:`Fleet` is the shipped broker config with authentication and the fleet ACL on
(the ``secure_mosquitto`` fixture), one ``python -m mqfleet collector`` process logged in
as ``collector``, ``python -m mqfleet agent`` processes logged in with their own node
accounts and trusting the test operator key, and the CLI logged in as ``operator`` and
signing with that key (in-process through click's runner, or as a real subprocess).

An observer (an MQTT 5 client logged in as ``operator``, which may read everything)
records every message under the prefix, so a test can compare what the agents published
with what the database holds.

Every process runs in its own process group, logs to a file in the test's tmp dir and is
killed with its group when the test ends, whatever happened. Waits poll a condition
against a generous deadline (the machine is small and noisy); nothing asserts on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from mqfleet.cli import cli
from mqfleet.errors import ProtocolError
from mqfleet.protocol import (
    CollectorStatus,
    MetricsReport,
    StatusReport,
    Topics,
    decode_collector_status,
    decode_metrics,
    decode_status,
)
from mqfleet.security import COLLECTOR_ACCOUNT, OPERATOR_ACCOUNT
from mqfleet.store.engine import create_store_engine
from mqfleet.store.models import metadata

if TYPE_CHECKING:
    from paho.mqtt.client import MQTTMessage

TOPICS = Topics()
_T = TypeVar("_T")
#: Generous: a cold Python start of the collector or an agent can take seconds here.
DEADLINE_S = 45.0
#: The agents' MQTT keepalive (the broker declares a silent connection dead after 1.5x).
KEEPALIVE_S = 2
#: SIGTERM-to-SIGKILL grace of the agents' executor (default 5 s; shorter keeps tests quick).
KILL_GRACE_S = 1
#: Metrics interval of agents that are not about metrics: long, so the collector's
#: heartbeat timeout (3 x interval) never interferes with what a test checks.
QUIET_INTERVAL = "60s"


def wait_for(
    condition: Callable[[], Any],
    what: str,
    *,
    timeout_s: float = DEADLINE_S,
    diagnose: Callable[[], str] | None = None,
) -> Any:
    """Poll ``condition`` until it returns something truthy and return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{diagnose()}" if diagnose is not None else ""
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}{detail}")
        time.sleep(0.05)


def pid_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which may itself hold spaces.
    return stat.rpartition(")")[2].split()[0] not in {"Z", "X"}


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid``, if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class Service:
    """One real ``python -m mqfleet`` service process (agent or collector)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own group: the test kills it and nothing else, children included.
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9``: no clean shutdown, no offline status (the broker sends the Will)."""
        assert self.proc is not None
        kill_group(self.proc.pid)
        self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: a hung process whose sockets stay open."""
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        os.killpg(self.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (a clean stop) and return the exit code; SIGKILL if it hangs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(self.proc.pid)
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@dataclass(frozen=True)
class Seen:
    """One message the observer received."""

    topic: str
    payload: bytes
    retain: bool


class Observer:
    """An MQTT 5 client logged in as the operator, recording everything under the prefix."""

    def __init__(self, host: str, port: int, password: str) -> None:
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._subscribed = threading.Event()
        self.client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"observer-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set(OPERATOR_ACCOUNT, password)

        def on_connect(c: Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:  # also after a broker restart: paho reconnects
                c.subscribe(f"{TOPICS.prefix}/#", qos=1)

        def on_subscribe(_c: Client, _u: Any, _mid: int, rcs: Any, _p: Any) -> None:
            assert not any(rc.is_failure for rc in rcs), rcs
            self._subscribed.set()

        def on_message(_c: Client, _u: Any, msg: MQTTMessage) -> None:
            with self._lock:
                self._seen.append(Seen(msg.topic, bytes(msg.payload), bool(msg.retain)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        wait_for(self._subscribed.is_set, "the observer's subscription")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def seen(self, topic: str | None = None) -> list[Seen]:
        with self._lock:
            return [m for m in self._seen if topic is None or m.topic == topic]

    def _decoded(self, topic: str, decode: Callable[[bytes], _T]) -> list[_T]:
        # Tests publish garbage too: only valid payloads are what the services sent.
        decoded = []
        for message in self.seen(topic):
            with contextlib.suppress(ProtocolError):
                decoded.append(decode(message.payload))
        return decoded

    def metrics(self, node_id: str) -> list[MetricsReport]:
        """Every valid sample published for ``node_id`` (duplicates included), in order."""
        return self._decoded(TOPICS.metrics(node_id), decode_metrics)

    def statuses(self, node_id: str) -> list[StatusReport]:
        """Every valid status published for ``node_id`` (births, Wills, shutdowns), in order."""
        return self._decoded(TOPICS.status(node_id), decode_status)

    def collector_statuses(self) -> list[CollectorStatus]:
        return self._decoded(TOPICS.collector_status(), decode_collector_status)


class Fleet:
    """The secured broker, one database, the collector, agents, the CLI and an observer."""

    def __init__(self, broker: Any, database_url: str, public_key: Path, workdir: Path) -> None:
        self.broker = broker
        self.database_url = database_url
        self.public_key = public_key
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []
        self.collector: Service | None = None
        self.observer = Observer(broker.host, broker.port, broker.tokens[OPERATOR_ACCOUNT])
        self._engine: sa.Engine | None = None
        self._runner = CliRunner()

    # -- processes ------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        # Settings reach the services through the environment, as `mqfleet up` does it:
        # credentials never appear in argv.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MQFLEET_")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Service:
        service = Service(
            name=name,
            argv=[sys.executable, "-m", "mqfleet", *args],
            env={**self._base_env(), **env},
            log_path=self.workdir / f"{name}.log",
        )
        service.start()
        self.services.append(service)
        return service

    def start_collector(self) -> Service:
        """Start ``mqfleet collector``; return once it listens (its online status is seen)."""
        started = time.time()
        service = self._spawn(
            "collector",
            ["collector"],
            {
                "MQFLEET_BROKER_URL": self.broker.url_for(COLLECTOR_ACCOUNT),
                "MQFLEET_DATABASE_URL": self.database_url,
            },
        )
        self.collector = service

        # The collector subscribes before it publishes its birth on the same connection,
        # so once the birth is seen, the subscription is in place.
        def online() -> bool:
            if not service.running():
                pytest.fail(
                    f"the collector exited with {service.proc.returncode}:\n{service.tail()}"
                )  # type: ignore[union-attr]
            return any(
                s.status == "online" and s.ts is not None and s.ts.timestamp() >= started - 1
                for s in self.observer.collector_statuses()
            )

        wait_for(online, "the collector to come online", diagnose=self.diagnose)
        return service

    def provision(self, *node_ids: str) -> None:
        """Create broker accounts for nodes that have none (one broker reload for all)."""
        missing = [n for n in node_ids if n not in self.broker.tokens]
        if missing:
            self.broker.provision(*missing)

    def start_agent(
        self, node_id: str, *, interval: str = QUIET_INTERVAL, wait: bool = True
    ) -> Service:
        """Start ``mqfleet agent`` for ``node_id``; with ``wait``, until the DB says online."""
        self.provision(node_id)
        previous = self.session_of(node_id)
        service = self._spawn(
            f"agent-{node_id}",
            ["agent", "--node-id", node_id, "--interval", interval],
            {
                "MQFLEET_BROKER_URL": self.broker.url_for(node_id),
                "MQFLEET_STATE_DIR": str(self.workdir / "state" / node_id),
                "MQFLEET_KEEPALIVE_S": str(KEEPALIVE_S),
                "MQFLEET_KILL_GRACE_S": str(KILL_GRACE_S),
                "MQFLEET_OPERATOR_PUBLIC_KEY_FILE": str(self.public_key),
            },
        )
        if wait:
            self.wait_online(node_id, above=previous, service=service)
        return service

    def close(self) -> None:
        for service in self.services:
            if service.proc is not None and service.proc.poll() is None:
                kill_group(service.proc.pid)
                service.proc.wait()
        self.observer.close()
        if self._engine is not None:
            self._engine.dispose()

    def diagnose(self) -> str:
        """The last lines of every service's log, for a failure message."""
        return "\n".join(f"--- {s.name}:\n{s.tail()}" for s in self.services)

    @contextlib.contextmanager
    def raw_client(self, account: str, **connect: Any) -> Iterator[Client]:
        """A plain MQTT 5 client logged in as ``account`` (a node, operator or collector)."""
        client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=connect.pop("client_id", f"raw-{account}-{uuid.uuid4().hex[:8]}"),
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.username_pw_set(account, self.broker.tokens[account])
        client.connect(self.broker.host, self.broker.port, **connect)
        client.loop_start()
        try:
            wait_for(client.is_connected, f"a raw connection as {account}")
            yield client
        finally:
            client.disconnect()
            client.loop_stop()

    def publish(self, account: str, messages: list[tuple[str, bytes]]) -> None:
        """Publish with QoS 1 as ``account``, in order; return once all are acknowledged."""
        with self.raw_client(account) as client:
            infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
            for info in infos:
                info.wait_for_publish(DEADLINE_S)
                assert info.rc == 0

    def retained_status(self, node_id: str) -> StatusReport:
        """What a newcomer sees on the node's status topic: the retained message."""
        retained: list[bytes] = []
        with self.raw_client(OPERATOR_ACCOUNT) as client:
            client.on_message = lambda _c, _u, msg: retained.append(bytes(msg.payload))
            client.subscribe(TOPICS.status(node_id), qos=1)
            wait_for(lambda: retained, f"the retained status of {node_id}")
        return decode_status(retained[0])

    # -- database -------------------------------------------------------------------
    @property
    def db(self) -> sa.Engine:
        if self._engine is None:
            self._engine = create_store_engine(self.database_url)
        return self._engine

    def rows(self, sql: str, **params: Any) -> list[sa.Row[Any]]:
        with self.db.connect() as conn:
            return list(conn.execute(sa.text(sql), params).all())

    def table(self, name: str, *order_by: str, **where: Any) -> list[sa.Row[Any]]:
        """Rows of a table matching ``where``, typed by the models (aware datetimes)."""
        t = metadata.tables[name]
        query = sa.select(t).where(*(t.c[k] == v for k, v in where.items()))
        query = query.order_by(*(sa.text(o) for o in order_by or ("id",)))
        with self.db.connect() as conn:
            return list(conn.execute(query).all())

    def node(self, node_id: str) -> sa.Row[Any] | None:
        found = self.table("nodes", node_id=node_id)
        return found[0] if found else None

    def session_of(self, node_id: str) -> int:
        if self.collector is None:
            return 0
        node = self.node(node_id)
        return 0 if node is None else int(node.session)

    def wait_online(
        self, node_id: str, *, above: int = 0, service: Service | None = None
    ) -> sa.Row[Any]:
        """Wait until the DB shows ``node_id`` online with a session above ``above``."""

        def online() -> sa.Row[Any] | None:
            if service is not None and not service.running():
                pytest.fail(f"{service.name} exited:\n{service.tail()}")
            node = self.node(node_id)
            if node is not None and node.status == "online" and node.session > above:
                return node
            return None

        row: sa.Row[Any] = wait_for(online, f"{node_id} online", diagnose=self.diagnose)
        return row

    def command(self, command_id: str) -> sa.Row[Any] | None:
        """The command's row joined with its result's columns (``result_id`` None if none)."""
        c, r = metadata.tables["commands"], metadata.tables["command_results"]
        query = (
            sa.select(
                *c.c,
                r.c.id.label("result_id"),
                *(r.c[k] for k in ("stdout", "stderr", "exit_code", "execution_time_ms")),
                *(r.c[k] for k in ("error", "stdout_truncated", "stderr_truncated")),
            )
            .select_from(c.outerjoin(r, r.c.command_id == c.c.command_id))
            .where(c.c.command_id == command_id)
        )
        with self.db.connect() as conn:
            return conn.execute(query).first()

    def wait_command(self, command_id: str, *statuses: str) -> sa.Row[Any]:
        """Wait until the command is in one of ``statuses`` (and has a result if final)."""

        def reached() -> sa.Row[Any] | None:
            row = self.command(command_id)
            if row is None or row.status not in statuses:
                return None
            if row.status in {"success", "failed", "timeout"} and row.result_id is None:
                return None
            return row

        row: sa.Row[Any] = wait_for(
            reached, f"command {command_id} to be {'/'.join(statuses)}", diagnose=self.diagnose
        )
        return row

    # -- the CLI --------------------------------------------------------------------
    def _global_flags(self) -> list[str]:
        return [
            "--broker",
            self.broker.url_for(OPERATOR_ACCOUNT),
            "--database",
            self.database_url,
        ]

    def cli(self, *args: str) -> Result:
        """Run ``mqfleet ARGS`` in-process as the operator (signing with the test key)."""
        return self._runner.invoke(cli, [*self._global_flags(), *args], catch_exceptions=False)

    def cli_json(self, *args: str) -> Any:
        """Run ``mqfleet ARGS --json``; assert exit 0 and return the document."""
        result = self.cli(*args, "--json")
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    def cli_process(
        self, *args: str, flags: list[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m mqfleet ARGS`` as a real process (its real exit code)."""
        env = self._base_env()
        for key in ("MQFLEET_OPERATOR_PRIVATE_KEY_FILE",):
            if key in os.environ:
                env[key] = os.environ[key]
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "mqfleet",
                *(self._global_flags() if flags is None else flags),
                *args,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture
def fleet(
    secure_mosquitto: Any,
    database_url: str,
    operator_key: Any,
    tmp_path: Path,
) -> Iterator[Fleet]:
    """A secured fleet on one database (parametrised: SQLite and PostgreSQL)."""
    running = Fleet(secure_mosquitto, database_url, operator_key.public_file, tmp_path / "fleet")
    try:
        yield running
    finally:
        running.close()


@dataclass
class Leftovers:
    """Process groups a test deliberately orphaned (a command of a killed agent)."""

    pids: list[int] = field(default_factory=list)


@pytest.fixture
def leftovers() -> Iterator[Leftovers]:
    """Kill, at the end of the test, process groups a test deliberately orphaned."""
    found = Leftovers()
    yield found
    for pid in found.pids:
        kill_group(pid)
