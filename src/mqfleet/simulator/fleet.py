"""Thousands of simulated agents in one process: paho clients driven by one asyncio loop.

One aiomqtt client per node costs a task set and a background machinery per connection,
which does not reach 5,000 nodes on two cores. Here every node is a plain paho client in
external-loop mode: its socket is registered with the running event loop
(``add_reader``/``add_writer``, as paho's ``loop_asyncio`` example does), so one thread
serves every connection, and timers replace per-node tasks. One TaskGroup of named loops
runs the fleet::

    connect_loop   opens connections at a bounded rate (a reconnect storm is one too)
    metrics_loop   publishes each node's sample when it is due (a heap of due times)
    misc_loop      paho's keepalive bookkeeping, a slice of the nodes per tick

Each node speaks protocol v1 as the real agent does: a retained birth on every connect,
a retained Will registered at CONNECT, a session number that strictly increases on every
connection (here: milliseconds since the epoch, so it also increases across restarts of
the simulator without a state file), ``seq`` per session, a persistent MQTT session so
commands queue through short outages, and the session rule (an ``offline`` for the
current session on the node's own status topic makes it republish its birth). Commands
are answered with a ``running`` and a final result computed by
:func:`mqfleet.simulator.actions.run_builtin`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from paho.mqtt.enums import MQTTErrorCode

from mqfleet import __version__
from mqfleet.errors import AuthenticationError, ConfigError, MqfleetError, ProtocolError
from mqfleet.localbroker import raise_nofile_limit
from mqfleet.loops import run_loops
from mqfleet.protocol import (
    ERROR_EXPIRED_BEFORE_DELIVERY,
    REASON_CONNECTION_LOST,
    REASON_SHUTDOWN,
    CommandFinished,
    CommandRequest,
    CommandStarted,
    MetricsReport,
    StatusReport,
    decode_command,
    decode_status,
    encode,
    utc_now,
    validate_node_id,
)
from mqfleet.simulator.actions import run_builtin
from mqfleet.simulator.values import MetricsModel
from mqfleet.transport import (
    AUTH_FAILURE_CODES,
    NODELAY_OPTION,
    Backoff,
    connect_properties,
    paho_client,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    from mqfleet.settings import Settings

__all__ = [
    "DEFAULT_NODE_PREFIX",
    "SIM_CLIENT_ID_PREFIX",
    "Fleet",
    "FleetStats",
    "SimulatedNode",
    "run_simulator",
]

log = logging.getLogger(__name__)

DEFAULT_NODE_PREFIX: Final = "sim-"
#: MQTT client ids of simulated nodes; distinct from real agents' so both can coexist.
SIM_CLIENT_ID_PREFIX: Final = "mqfleet-sim-"
#: The broker keeps a node's command subscription this long while it is away (the
#: agent's value), so commands published during a short outage still arrive.
SESSION_EXPIRY_S: Final = 3600
#: Connections waiting for their CONNACK at once. Mosquitto accepts from a listen
#: backlog of 100; a blocking connect() on a full backlog would stall every node.
MAX_CONNECTING: Final = 64
#: Default connections opened per second (at start and when the broker comes back).
DEFAULT_CONNECT_RATE: Final = 1000.0
#: File descriptors kept for everything that is not a node connection.
_SPARE_FDS: Final = 64
_TICK_S: Final = 0.1
#: Longest time between two keepalive checks of one node.
_MISC_PERIOD_MAX_S: Final = 5.0
SHUTDOWN_TIMEOUT_S: Final = 10.0
WILL_REASON: Final = REASON_CONNECTION_LOST
SHUTDOWN_REASON: Final = REASON_SHUTDOWN
EXPIRED_BEFORE_DELIVERY: Final = ERROR_EXPIRED_BEFORE_DELIVERY
OS_INFO: Final = "Linux (simulated by mqfleet simulate)"
#: Past this many remembered command ids, the expired ones are forgotten.
_ACCEPTED_PRUNE_AT: Final = 4096


@dataclass(slots=True)
class FleetStats:
    """Counters of a simulated fleet since it started."""

    nodes: int = 0
    connected: int = 0
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    births: int = 0
    #: Samples handed to the client (each carries its own session and seq).
    metrics_sent: int = 0
    #: Samples the broker acknowledged (PUBACK).
    metrics_acked: int = 0
    #: Samples refused because a node's offline queue was full (never numbered).
    metrics_dropped: int = 0
    commands: int = 0
    duplicate_commands: int = 0
    results: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        """One progress line for a terminal or a log."""
        return (
            f"{self.connected}/{self.nodes} connected, {self.metrics_sent} metrics sent "
            f"({self.metrics_acked} acked), {self.commands} commands answered, "
            f"{self.disconnects} disconnects"
        )


class SimulatedNode:
    """One simulated agent: a paho client in external-loop mode plus its metric model."""

    __slots__ = (
        "_backoff",
        "_connecting",
        "_expiry",
        "_fleet",
        "_ip",
        "_metrics_topic",
        "_pending",
        "_shutdown_mids",
        "_status_topic",
        "accepted",
        "client",
        "commands_topic",
        "connected",
        "ever_connected",
        "model",
        "node_id",
        "seq",
        "session",
        "sessions",
        "wanted",
    )

    def __init__(self, fleet: Fleet, node_id: str, index: int, rng: random.Random) -> None:
        """Build node ``node_id`` (the ``index``-th of ``fleet``), not yet connected."""
        self._fleet = fleet
        self.node_id = node_id
        topics = fleet.settings.topics
        self._status_topic = topics.status(node_id)
        self._metrics_topic = topics.metrics(node_id)
        self.commands_topic = topics.commands(node_id)
        host = index + 1  # never the network address x.y.z.0 of the first subnet
        self._ip = f"10.{(host >> 16) & 255}.{(host >> 8) & 255}.{host & 255}"
        self.model = MetricsModel(rng, interval_s=fleet.interval_s)
        self._backoff = Backoff(initial_s=0.5, maximum_s=30.0, _rng=rng)
        self.session = 0
        self.seq = 0
        #: Samples numbered per session: session -> how many (seq 0..n-1).
        self.sessions: dict[int, int] = {}
        #: Message ids of samples sent and not yet acknowledged.
        self._pending: dict[int, None] = {}
        self._shutdown_mids: set[int] = set()
        #: Command ids already accepted (QoS 1 and the collector may deliver twice).
        self.accepted: set[str] = set()
        self._expiry: list[tuple[datetime, str]] = []
        self.connected = False
        self.ever_connected = False
        self._connecting = False
        self.wanted = True
        self.client = self._make_client()

    # -- client and socket hooks ----------------------------------------------------
    def _make_client(self) -> Client:
        client = paho_client(self._fleet.settings, client_id=SIM_CLIENT_ID_PREFIX + self.node_id)
        if not logging.getLogger("mqfleet.mqtt").isEnabledFor(logging.DEBUG):
            # paho logs every packet; at thousands of nodes even the level checks show.
            client.disable_logger()
        # The offline queue of each node is bounded like the agent's backlog.
        client.max_queued_messages_set(self._fleet.settings.metrics_backlog)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _on_socket_open(self, client: Client, _userdata: object, sock: object) -> None:
        sock.setsockopt(*NODELAY_OPTION)  # type: ignore[attr-defined]
        self._fleet.loop.add_reader(sock, client.loop_read)  # type: ignore[arg-type]

    def _on_socket_close(self, _client: Client, _userdata: object, sock: object) -> None:
        loop = self._fleet.loop
        loop.remove_reader(sock)  # type: ignore[arg-type]
        loop.remove_writer(sock)  # type: ignore[arg-type]

    def _on_register_write(self, client: Client, _userdata: object, sock: object) -> None:
        self._fleet.loop.add_writer(sock, client.loop_write)  # type: ignore[arg-type]

    def _on_unregister_write(self, _client: Client, _userdata: object, sock: object) -> None:
        self._fleet.loop.remove_writer(sock)  # type: ignore[arg-type]

    # -- connection -----------------------------------------------------------------
    def connect(self) -> None:
        """Open a new connection with a new session (call from the event loop only)."""
        fleet = self._fleet
        settings = fleet.settings
        # Strictly increasing on every connection and across simulator restarts.
        self.session = max(self.session + 1, int(time.time() * 1000))
        self.seq = 0
        will = StatusReport(
            node_id=self.node_id, status="offline", session=self.session, reason=WILL_REASON
        )
        # Retained QoS 1 Will, registered at CONNECT (MQTT 5 spec 3.1.2.5).
        self.client.will_set(self._status_topic, encode(will), qos=1, retain=True)
        broker = settings.broker
        self._connecting = True
        fleet.connecting += 1
        try:
            if settings.mqtt_version == "5":
                self.client.connect(
                    broker.host,
                    broker.port,
                    settings.keepalive_s,
                    clean_start=False,
                    properties=connect_properties(settings, session_expiry_s=SESSION_EXPIRY_S),
                )
            else:
                self.client.connect(broker.host, broker.port, settings.keepalive_s)
        except OSError as exc:
            self._connect_ended()
            fleet.stats.connect_failures += 1
            log.debug("node %s cannot connect: %s", self.node_id, exc)
            fleet.reconnect_later(self, self._backoff.next_delay())

    def _connect_ended(self) -> None:
        if self._connecting:
            self._connecting = False
            self._fleet.connecting -= 1

    def _on_connect(
        self,
        client: Client,
        _userdata: object,
        _flags: ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        fleet = self._fleet
        self._connect_ended()
        if reason_code.is_failure:
            if reason_code.value in AUTH_FAILURE_CODES:
                fleet.fail(
                    AuthenticationError(
                        f"broker {fleet.settings.broker} refused node {self.node_id}: {reason_code}"
                    )
                )
            return  # the broker closes the connection; on_disconnect retries
        self.connected = True
        fleet.stats.connected += 1
        fleet.stats.connects += 1
        self._backoff.reset()
        # Subscribe before the birth: a command or a contradicting status published
        # right after it must find the subscription in place.
        client.subscribe([(self.commands_topic, 1), (self._status_topic, 1)])
        self._publish_status("online", None)
        if not self.ever_connected:
            self.ever_connected = True
            fleet.start_sampling(self)

    def _on_disconnect(
        self,
        _client: Client,
        _userdata: object,
        _flags: DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        fleet = self._fleet
        self._connect_ended()
        if self.connected:
            self.connected = False
            fleet.stats.connected -= 1
            fleet.stats.disconnects += 1
            log.debug("node %s lost its connection: %s", self.node_id, reason_code)
        if self.wanted and fleet.running:
            fleet.reconnect_later(self, self._backoff.next_delay())

    def drop(self) -> None:
        """Break the connection without a DISCONNECT, as a crash or a cable pull would.

        The broker then publishes the node's Will; the node reconnects after its backoff.
        """
        sock = self.client.socket()
        if sock is not None and self.connected:
            # shutdown() makes the next read fail, which runs paho's own loss handling.
            sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]  # paho types it loosely

    # -- status ---------------------------------------------------------------------
    def _publish_status(self, status: str, reason: str | None) -> int:
        report = StatusReport(
            node_id=self.node_id,
            status="online" if status == "online" else "offline",
            session=self.session,
            ts=utc_now(),
            hostname=self.node_id,
            ip_address=self._ip,
            os_info=OS_INFO,
            agent_version=f"{__version__}+sim",
            interval_s=self._fleet.interval_s,
            reason=reason,
        )
        info = self.client.publish(self._status_topic, encode(report), qos=1, retain=True)
        if status == "online":
            self._fleet.stats.births += 1
        return info.mid

    def stop(self) -> int | None:
        """Stop reconnecting; publish the shutdown status if connected; return its mid."""
        self.wanted = False
        if not self.connected:
            return None
        mid = self._publish_status("offline", SHUTDOWN_REASON)
        self._shutdown_mids.add(mid)
        return mid

    def shutdown_acked(self) -> bool:
        """Say whether the shutdown status has been acknowledged (or cannot be)."""
        return not self._shutdown_mids or not self.connected

    def _check_own_status(self, payload: bytes) -> None:
        try:
            report = decode_status(payload)
        except ProtocolError as exc:
            log.warning("node %s: ignoring invalid own status: %s", self.node_id, exc)
            return
        if report.session > self.session:
            log.warning(
                "%s carries session %d, newer than node %s's (%d): is another simulator or "
                "agent running with this node id?",
                self._status_topic,
                report.session,
                self.node_id,
                self.session,
            )
        elif report.session == self.session and report.status == "offline" and self.wanted:
            # A late Will or a third party says our live session is offline: republish
            # the truth, so every subscriber sees it (the agent's session rule).
            self._publish_status("online", None)

    # -- metrics --------------------------------------------------------------------
    def publish_sample(self) -> None:
        """Take one sample and publish it (queued by paho while disconnected)."""
        sample = self.model.next_sample()
        report = MetricsReport(
            node_id=self.node_id,
            session=self.session,
            seq=self.seq,
            ts=utc_now(),
            cpu_usage=sample.cpu_usage,
            memory_usage=sample.memory_usage,
            disk_usage=sample.disk_usage,
            load_average=sample.load_average,
        )
        info = self.client.publish(self._metrics_topic, encode(report), qos=1)
        stats = self._fleet.stats
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            stats.metrics_dropped += 1
            return
        self.seq += 1
        self.sessions[self.session] = self.seq
        self._pending[info.mid] = None
        stats.metrics_sent += 1

    def _on_publish(
        self,
        _client: Client,
        _userdata: object,
        mid: int,
        _reason_code: ReasonCode,
        _properties: Properties,
    ) -> None:
        if mid in self._pending:
            del self._pending[mid]
            self._fleet.stats.metrics_acked += 1
        else:
            self._shutdown_mids.discard(mid)

    @property
    def unacked(self) -> int:
        """Samples sent and not yet acknowledged by the broker."""
        return len(self._pending)

    # -- commands -------------------------------------------------------------------
    def _on_message(self, _client: Client, _userdata: object, message: MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            return
        payload = bytes(message.payload)
        if topic == self.commands_topic:
            self._on_command(payload)
        elif topic == self._status_topic:
            self._check_own_status(payload)

    def _on_command(self, payload: bytes) -> None:
        fleet = self._fleet
        try:
            request = decode_command(payload)
        except ProtocolError as exc:
            log.warning("node %s: ignoring invalid command: %s", self.node_id, exc)
            return
        if request.node_id != self.node_id:
            log.warning("node %s: ignoring a command for %s", self.node_id, request.node_id)
            return
        if request.command_id in self.accepted:
            fleet.stats.duplicate_commands += 1
            return
        self._accept(request)
        now = utc_now()
        if request.expires_at <= now:
            self._publish_result(
                CommandFinished(
                    command_id=request.command_id,
                    node_id=self.node_id,
                    status="timeout",
                    completed_at=now,
                    error=EXPIRED_BEFORE_DELIVERY,
                )
            )
            return
        self._publish_result(
            CommandStarted(
                command_id=request.command_id,
                node_id=self.node_id,
                status="running",
                started_at=now,
            )
        )
        action = run_builtin(request.command_text, hostname=self.node_id)
        if action.duration_s <= 0.0:
            self._finish(request, now, action.exit_code, action.stdout, action.stderr)
            return
        timed_out = action.duration_s > request.timeout_s
        fleet.loop.call_later(
            min(action.duration_s, request.timeout_s),
            self._finish,
            request,
            now,
            None if timed_out else action.exit_code,
            action.stdout,
            action.stderr,
        )

    def _accept(self, request: CommandRequest) -> None:
        self.accepted.add(request.command_id)
        heapq.heappush(self._expiry, (request.expires_at, request.command_id))
        if len(self._expiry) > _ACCEPTED_PRUNE_AT:
            # An expired command is never run again anyway: its id can be forgotten.
            now = utc_now()
            while self._expiry and self._expiry[0][0] < now:
                self.accepted.discard(heapq.heappop(self._expiry)[1])

    def _finish(
        self,
        request: CommandRequest,
        started: datetime,
        exit_code: int | None,
        stdout: str,
        stderr: str,
    ) -> None:
        completed = utc_now()
        status: Literal["success", "failed", "timeout"] = (
            "timeout" if exit_code is None else "success" if exit_code == 0 else "failed"
        )
        self._publish_result(
            CommandFinished(
                command_id=request.command_id,
                node_id=self.node_id,
                status=status,
                started_at=started,
                completed_at=completed,
                exit_code=exit_code,
                stdout=stdout,
                stderr=stderr,
                execution_time_ms=max(0, int((completed - started).total_seconds() * 1000)),
            )
        )
        self._fleet.stats.commands += 1

    def _publish_result(self, result: CommandStarted | CommandFinished) -> None:
        topic = self._fleet.settings.topics.result(self.node_id, result.command_id)
        self.client.publish(topic, encode(result), qos=1)
        self._fleet.stats.results += 1


class Fleet:
    """N simulated agents on one event loop; see :func:`run_simulator`."""

    def __init__(
        self,
        settings: Settings,
        *,
        nodes: int,
        interval_s: float | None = None,
        prefix: str = DEFAULT_NODE_PREFIX,
        first_index: int = 1,
        seed: int | None = None,
        connect_rate: float = DEFAULT_CONNECT_RATE,
    ) -> None:
        """Describe a fleet; nothing connects before :meth:`run`.

        Args:
            settings: broker URL, credentials, topic prefix, keepalive, MQTT version.
            nodes: how many simulated agents.
            interval_s: seconds between samples (default: ``settings.metrics_interval_s``).
            prefix: node ids are ``{prefix}{index:05d}``.
            first_index: index of the first node (to run several simulators side by side).
            seed: seed of the value generators (default: random).
            connect_rate: connections opened per second at most.

        """
        if nodes < 1:
            raise ConfigError("a simulated fleet needs at least one node")
        if connect_rate <= 0:
            raise ConfigError("the connect rate must be positive")
        self.settings = settings
        self.interval_s = interval_s if interval_s is not None else settings.metrics_interval_s
        if not 0 < self.interval_s <= 86400:  # noqa: PLR2004 - the protocol's bound
            raise ConfigError("the interval must be between 0 and 86400 seconds")
        try:
            indices = range(first_index, first_index + nodes)
            self.node_ids = [validate_node_id(f"{prefix}{i:05d}") for i in indices]
        except ProtocolError as exc:
            raise ConfigError(f"invalid node prefix {prefix!r}: {exc}") from None
        self._rng = random.Random(seed)  # noqa: S311 - simulated values, not secrets
        self._connect_rate = connect_rate
        self.stats = FleetStats(nodes=nodes)
        self.nodes: list[SimulatedNode] = []
        self.connecting = 0
        self.running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[SimulatedNode] = deque()
        self._queued_wakeup = asyncio.Event()
        self._due: list[tuple[float, int]] = []
        self._index: dict[str, int] = {}
        self._fatal: asyncio.Future[MqfleetError] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop that drives every node's socket."""
        if self._loop is None:
            raise RuntimeError("the fleet is not running")
        return self._loop

    def node(self, node_id: str) -> SimulatedNode:
        """Return the node with id ``node_id``."""
        return self.nodes[self._index[node_id]]

    def ledger(self) -> dict[str, dict[int, int]]:
        """Return the samples numbered so far: node id -> session -> count (seq 0..n-1)."""
        return {node.node_id: dict(node.sessions) for node in self.nodes}

    def unacked(self) -> int:
        """Count the samples of every node not yet acknowledged by the broker."""
        return sum(node.unacked for node in self.nodes)

    # -- lifetime -------------------------------------------------------------------
    async def run(self) -> None:
        """Connect every node and run until cancelled; then publish offline and leave.

        Raises :class:`ConfigError` when the open-files limit cannot hold the fleet and
        :class:`AuthenticationError` when the broker refuses the credentials.
        """
        self._loop = asyncio.get_running_loop()
        self._fatal = self._loop.create_future()
        limit = raise_nofile_limit()
        needed = len(self.node_ids) + _SPARE_FDS
        if limit < needed:
            raise ConfigError(
                f"{len(self.node_ids)} nodes need {needed} open files but the limit is "
                f"{limit}: raise it (ulimit -n) or simulate fewer nodes"
            )
        for i, node_id in enumerate(self.node_ids):
            rng = random.Random(self._rng.random())  # noqa: S311 - simulated values
            self.nodes.append(SimulatedNode(self, node_id, i, rng))
            self._index[node_id] = i
        self._queue = deque(self.nodes)
        self._queued_wakeup.set()
        self.running = True
        log.info("simulating %d nodes against %s", len(self.nodes), self.settings.broker)
        try:
            await run_loops(
                {
                    "connect_loop": self._connect_loop,
                    "metrics_loop": self._metrics_loop,
                    "misc_loop": self._misc_loop,
                    "fatal_loop": self._fatal_loop,
                }
            )
        finally:
            self.running = False
            await self._shutdown()

    def fail(self, error: MqfleetError) -> None:
        """Stop the fleet with ``error`` (bad credentials)."""
        if self._fatal is not None and not self._fatal.done():
            self._fatal.set_result(error)

    async def _fatal_loop(self) -> None:
        """Raise the fatal error a node's callback reported, in the TaskGroup."""
        assert self._fatal is not None  # noqa: S101 - set by run() first
        raise await self._fatal

    def reconnect_later(self, node: SimulatedNode, delay_s: float) -> None:
        """Queue ``node`` for a new connection after ``delay_s`` (backoff with jitter)."""
        self.loop.call_later(delay_s, self._enqueue, node)

    def _enqueue(self, node: SimulatedNode) -> None:
        if node.wanted and self.running and not node.connected:
            self._queue.append(node)
            self._queued_wakeup.set()

    def start_sampling(self, node: SimulatedNode) -> None:
        """Schedule ``node``'s first sample at a random point of the first interval.

        Sampling starts at a node's first connection, so the ramp-up of a big fleet
        does not show up as ingest lag; phases spread the load evenly over the interval.
        """
        first = self.loop.time() + self._rng.uniform(0.0, self.interval_s)
        heapq.heappush(self._due, (first, self._index[node.node_id]))

    async def _connect_loop(self) -> None:
        """Open queued connections: at most ``connect_rate``/s and MAX_CONNECTING at once."""
        per_tick = max(1, int(self._connect_rate * 0.01))
        while True:
            await self._queued_wakeup.wait()
            started = 0
            while self._queue and started < per_tick and self.connecting < MAX_CONNECTING:
                node = self._queue.popleft()
                if node.wanted and not node.connected:
                    node.connect()
                    started += 1
            if not self._queue:
                self._queued_wakeup.clear()
            # The CONNACKs arrive through this same loop: yield to it between batches.
            await asyncio.sleep(0.01 if started else 0.002)

    async def _metrics_loop(self) -> None:
        """Publish every node's sample when it is due; skip missed ticks, never burst."""
        loop = self.loop
        interval = self.interval_s
        due = self._due
        while True:
            now = loop.time()
            while due and due[0][0] <= now:
                when, index = heapq.heappop(due)
                self.nodes[index].publish_sample()
                nxt = when + interval
                heapq.heappush(due, (nxt if nxt > now else now + interval, index))
            wait = due[0][0] - loop.time() if due else _TICK_S
            await asyncio.sleep(min(_TICK_S, max(0.0, wait)))

    async def _misc_loop(self) -> None:
        """Let paho send PINGREQs and notice dead connections, a slice of nodes per tick."""
        period = min(_MISC_PERIOD_MAX_S, self.settings.keepalive_s / 4)
        per_tick = max(1, int(len(self.nodes) * _TICK_S / period) + 1)
        position = 0
        while True:
            await asyncio.sleep(_TICK_S)
            for _ in range(min(per_tick, len(self.nodes))):
                node = self.nodes[position]
                position = (position + 1) % len(self.nodes)
                if node.connected:
                    node.client.loop_misc()

    async def _shutdown(self) -> None:
        """Publish every node's offline status, wait for the PUBACKs, then disconnect."""
        if not self.nodes:
            return
        for node in self.nodes:
            node.stop()
        await _wait_until(lambda: all(n.shutdown_acked() for n in self.nodes), SHUTDOWN_TIMEOUT_S)
        for node in self.nodes:
            # A normal DISCONNECT keeps the session and suppresses the Will: the offline
            # status just published is the truth.
            node.client.disconnect()
        await _wait_until(lambda: all(n.client.socket() is None for n in self.nodes), 2.0)
        log.info("simulated fleet stopped: %s", self.stats.line())


async def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; say whether it held."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    # paho's per-client state has no event to wait on: poll it, briefly.
    while not condition():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def run_simulator(
    settings: Settings,
    *,
    nodes: int,
    interval_s: float | None = None,
    prefix: str = DEFAULT_NODE_PREFIX,
    seed: int | None = None,
    progress: Callable[[FleetStats], None] | None = None,
    progress_every_s: float = 10.0,
) -> None:
    """Run ``nodes`` simulated agents until cancelled (then they publish offline and leave).

    ``progress`` is called with the fleet's counters every ``progress_every_s`` seconds.
    """
    fleet = Fleet(settings, nodes=nodes, interval_s=interval_s, prefix=prefix, seed=seed)
    if progress is None:
        await fleet.run()
        return

    async def progress_loop() -> None:
        while True:
            await asyncio.sleep(progress_every_s)
            progress(fleet.stats)

    reporter = asyncio.create_task(progress_loop(), name="progress_loop")
    try:
        await fleet.run()
    finally:
        reporter.cancel()
