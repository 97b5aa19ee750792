"""The agent's lifecycle: session, birth and Will, metrics with backlog, command routing.

One TaskGroup of named loops runs for the agent's lifetime::

    metrics_loop         samples every interval into the backlog, connected or not
    connection_loop      one connection after another, with capped backoff + jitter
      (per connection)   subscribe, birth, then a TaskGroup of
        publish_loop           drains the backlog in order (removes on PUBACK)
        message_loop           commands -> CommandService; own status -> stale-Will check
        status_loop            republishes the status when it changes or is contradicted
        command_deliver_loop   CommandService.deliver_loop
    command_run_loop     CommandService.run_loop

Availability follows Home Assistant's MQTT integration and Sparkplug B: a retained birth
on every connect, a retained Will registered at CONNECT, and a session number that
strictly increases on every connection so a late Will can be told from the truth.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import stat
from typing import TYPE_CHECKING, Final

import aiomqtt

from mqfleet import __version__
from mqfleet.agent.backlog import MetricsBacklog
from mqfleet.agent.commands import CommandService
from mqfleet.agent.hostinfo import hostname, ip_address, os_info
from mqfleet.agent.probes import MetricsProbe, MetricsSource, default_source
from mqfleet.agent.state import SessionCounter
from mqfleet.errors import AuthenticationError, BrokerError, ProtocolError
from mqfleet.loops import leaves, run_loops
from mqfleet.protocol import (
    REASON_CONNECTION_LOST,
    REASON_SHUTDOWN,
    NodeStatus,
    StatusReport,
    decode_status,
    encode,
    truncate_for_log,
    utc_now,
)
from mqfleet.security.config_files import warn_if_exposed
from mqfleet.transport import Backoff, aiomqtt_client, as_broker_error

if TYPE_CHECKING:
    from mqfleet.settings import Settings

__all__ = [
    "AGENT_CLIENT_ID_PREFIX",
    "SAMPLE_FAILURES_FOR_ERROR",
    "SESSION_EXPIRY_S",
    "AgentService",
    "run_agent",
    "warn_about_exposed_files",
]

log = logging.getLogger(__name__)

#: The MQTT client id is fixed per node, so the broker keeps one session per node.
AGENT_CLIENT_ID_PREFIX: Final = "mqfleet-agent-"
#: MQTT 5 session expiry: the broker keeps the command subscription and queues QoS 1
#: commands through outages shorter than this. Longer ones are covered by the
#: collector, which redelivers pending commands when the node's new session comes online.
SESSION_EXPIRY_S: Final = 3600
#: Consecutive failed samples after which the node reports status "error".
SAMPLE_FAILURES_FOR_ERROR: Final = 3
#: Samples published back to back before waiting for their PUBACKs. MQTT keeps QoS 1
#: messages of one connection in order (MQTT 5 spec 4.6), so a window keeps the order
#: while a day of backlog drains in seconds instead of one round trip per sample.
PUBLISH_WINDOW: Final = 16
#: A connection that lasted this long resets the backoff. One dropped right after its
#: birth (another agent with our node id takes the client id over) keeps backing off,
#: so two such agents cannot hammer the broker.
STABLE_CONNECTION_S: Final = 10.0
#: A read of the probes never gets less time than this, whatever the interval.
MIN_SAMPLE_TIMEOUT_S: Final = 5.0
#: How long a clean shutdown waits for the broker to acknowledge the offline status.
SHUTDOWN_PUBLISH_TIMEOUT_S: Final = 5.0
WILL_REASON: Final = REASON_CONNECTION_LOST
SHUTDOWN_REASON: Final = REASON_SHUTDOWN
_MAX_REASON: Final = 255


def _is_connection_loss(exc: BaseException) -> bool:
    return isinstance(exc, aiomqtt.MqttError) or (
        isinstance(exc, BrokerError) and not isinstance(exc, AuthenticationError)
    )


class AgentService:
    """One node's agent: keeps it online on the broker, reports metrics, routes commands."""

    def __init__(
        self,
        settings: Settings,
        *,
        source: MetricsSource | None = None,
        commands: CommandService | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        """Build the agent.

        Args:
            settings: broker, node id, interval, state dir, backlog size, disk path.
            source: psutil-like metrics source (default: the ``psutil`` module).
            commands: the command service (default: one built from ``settings``).
            backoff: reconnect delays (default: 0.5 s doubling up to 30 s, with jitter).

        """
        self._settings = settings
        self._node_id = settings.node_id
        topics = settings.topics
        self._status_topic = topics.status(self._node_id)
        self._metrics_topic = topics.metrics(self._node_id)
        self._commands_topic = topics.commands(self._node_id)
        self._probe = MetricsProbe(source or default_source(), disk_path=settings.disk_path)
        self._sessions = SessionCounter(settings.agent_state_dir)
        self.backlog = MetricsBacklog(settings.metrics_backlog)
        self._commands = commands if commands is not None else CommandService(settings)
        self._backoff = backoff if backoff is not None else Backoff()
        self._hostname = hostname()
        self._os_info = os_info()
        self._ip_address = "127.0.0.1"
        #: The session of the current (or next) connection; samples carry it too.
        self.session = 0
        self._seq = 0
        self._session_unused = False
        self._status: NodeStatus = "online"
        self._reason: str | None = None
        self._status_changed = asyncio.Event()
        self._online_since: float | None = None

    # -- lifetime -------------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled (then re-raise), or raise a fatal :class:`MqfleetError`."""
        warn_about_exposed_files(self._settings)
        # A session exists before the first sample, so every sample carries one.
        await self._new_session()
        await asyncio.to_thread(self._probe.prime)
        await self._commands.start()
        # An expected failure (bad credentials, unusable state dir) is raised as itself.
        await run_loops(
            {
                "metrics_loop": self._metrics_loop,
                "connection_loop": self._connection_loop,
                "command_run_loop": self._commands.run_loop,
            }
        )

    async def _new_session(self) -> None:
        self.session = await asyncio.to_thread(self._sessions.allocate)
        self._seq = 0
        self._session_unused = True

    # -- status ---------------------------------------------------------------------
    def _set_status(self, status: NodeStatus, reason: str | None) -> None:
        if (status, reason) == (self._status, self._reason):
            return
        self._status, self._reason = status, reason
        self._status_changed.set()

    def _status_report(self, session: int) -> StatusReport:
        return StatusReport(
            node_id=self._node_id,
            status=self._status,
            session=session,
            ts=utc_now(),
            hostname=self._hostname,
            ip_address=self._ip_address,
            os_info=self._os_info,
            agent_version=__version__,
            interval_s=self._settings.metrics_interval_s,
            reason=self._reason if self._status != "online" else None,
        )

    async def _publish_status(self, client: aiomqtt.Client, session: int) -> None:
        report = self._status_report(session)
        await client.publish(self._status_topic, encode(report), qos=1, retain=True)
        log.info("published status %s for session %d", report.status, session)

    # -- metrics --------------------------------------------------------------------
    async def _metrics_loop(self) -> None:
        """Sample every interval into the backlog, whether or not the broker is there."""
        interval = self._settings.metrics_interval_s
        timeout_s = max(interval, MIN_SAMPLE_TIMEOUT_S)
        loop = asyncio.get_running_loop()
        failures = 0
        next_at = loop.time()
        while True:
            ts = utc_now()
            try:
                sample = await self._probe.sample_async(timeout_s)
                report = sample.to_report(
                    node_id=self._node_id, session=self.session, seq=self._seq, ts=ts
                )
            except Exception as exc:  # noqa: BLE001 - a failing probe is reported, never fatal
                failures += 1
                log.warning("metrics sampling failed (%d in a row): %s", failures, exc)
                if failures == SAMPLE_FAILURES_FOR_ERROR:
                    reason = f"metrics sampling failed {failures} times in a row: {exc}"
                    self._set_status("error", reason[:_MAX_REASON])
            else:
                self._seq += 1
                self.backlog.append(report)
                if failures >= SAMPLE_FAILURES_FOR_ERROR:
                    log.info("metrics sampling works again after %d failures", failures)
                    self._set_status("online", None)
                failures = 0
            next_at += interval
            now = loop.time()
            # Fell behind (slow probe, suspended machine): skip the missed ticks instead
            # of sampling in a burst.
            next_at = max(next_at, now)
            await asyncio.sleep(next_at - now)

    # -- connection -----------------------------------------------------------------
    async def _connection_loop(self) -> None:
        """Connect, serve, and reconnect with backoff; stop on bad credentials."""
        broker = self._settings.broker
        while True:
            if not self._session_unused:
                await self._new_session()
            self._session_unused = False
            session = self.session
            log.info(
                "connecting to %s as session %d (attempt %d)",
                broker,
                session,
                self._backoff.attempt + 1,
            )
            try:
                await self._connection(session)
            except AuthenticationError:
                raise
            except BrokerError as exc:
                online_since, self._online_since = self._online_since, None
                now = asyncio.get_running_loop().time()
                if online_since is not None and now - online_since >= STABLE_CONNECTION_S:
                    self._backoff.reset()
                delay = self._backoff.next_delay()
                log.warning(
                    "%s; reconnecting in %.1f s (attempt %d)", exc, delay, self._backoff.attempt + 1
                )
                await asyncio.sleep(delay)

    def _client(self, session: int) -> aiomqtt.Client:
        will = StatusReport(
            node_id=self._node_id, status="offline", session=session, reason=WILL_REASON
        )
        return aiomqtt_client(
            self._settings,
            identifier=AGENT_CLIENT_ID_PREFIX + self._node_id,
            # Retained QoS 1, registered at CONNECT: the broker publishes it for us when
            # the connection dies without a DISCONNECT (MQTT 5 spec 3.1.2.5).
            will=aiomqtt.Will(self._status_topic, encode(will), qos=1, retain=True),
            # A persistent session keeps the command subscription, so commands published
            # during a short outage are queued by the broker, not lost.
            clean_start=False,
            session_expiry_s=SESSION_EXPIRY_S,
        )

    async def _connection(self, session: int) -> None:
        """One connection's life; raises :class:`BrokerError` when it ends."""
        client = self._client(session)
        # aiomqtt warns above 10 pending publishes; a full window is expected here.
        client.pending_calls_threshold = PUBLISH_WINDOW + 16
        connected = False
        try:
            async with client:
                connected = True
                await self._serve(client, session)
        except aiomqtt.MqttError as exc:
            if connected:
                msg = f"lost the connection to broker {self._settings.broker}: {exc}"
                raise BrokerError(msg) from exc
            raise as_broker_error(exc, self._settings) from exc

    async def _subscribe(self, client: aiomqtt.Client, topic: str) -> None:
        granted = await client.subscribe(topic, qos=1)
        for code in granted:
            value = getattr(code, "value", code)
            if isinstance(value, int) and value >= 0x80:  # noqa: PLR2004 - failure codes
                raise AuthenticationError(
                    f"broker {self._settings.broker} refused the subscription to {topic}: {code}"
                )

    async def _serve(self, client: aiomqtt.Client, session: int) -> None:
        """Subscribe, publish the birth, run the per-connection loops until it ends."""
        lost: BaseException | None = None
        try:
            # Subscribe first: a command or a contradicting status published right after
            # the birth must find the subscription in place.
            await self._subscribe(client, self._commands_topic)
            await self._subscribe(client, self._status_topic)
            broker = self._settings.broker
            self._ip_address = await asyncio.to_thread(ip_address, broker.host, broker.port)
            self._status_changed.clear()  # the birth carries the current status
            await self._publish_status(client, session)
            self._online_since = asyncio.get_running_loop().time()
            # The loops' TaskGroup runs in a task of its own: on Python 3.11 a TaskGroup
            # whose child fails leaves its parent task's cancel count raised, and this
            # task must be able to trust cancelling() to tell a shutdown from a broken
            # connection. Cancelling this task cancels the awaited one too.
            loops = asyncio.create_task(
                self._connected_loops(client, session), name=f"session_{session}_loops"
            )
            try:
                await loops
            except BaseExceptionGroup as group:
                found = leaves(group)
                if not all(_is_connection_loss(exc) for exc in found):
                    raise
                lost = found[0]
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # Cancelled just as the connection broke: the loops reported the break,
                # the cancellation was not delivered, and shutting down still wins.
                raise asyncio.CancelledError  # noqa: TRY301 - handled just below, on purpose
        except asyncio.CancelledError:
            await self._publish_shutdown(client, session)
            raise
        if lost is not None:
            raise lost
        msg = "the connection's loops ended"  # they never return while connected
        raise BrokerError(msg)

    async def _connected_loops(self, client: aiomqtt.Client, session: int) -> None:
        """Run the per-connection loops until one of them fails (the connection broke)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._publish_loop(client), name="publish_loop")
            tg.create_task(self._message_loop(client, session), name="message_loop")
            tg.create_task(self._status_loop(client, session), name="status_loop")
            tg.create_task(
                self._commands.deliver_loop(CommandPublisher(client)),
                name="command_deliver_loop",
            )

    async def _publish_shutdown(self, client: aiomqtt.Client, session: int) -> None:
        report = StatusReport(
            node_id=self._node_id,
            status="offline",
            session=session,
            ts=utc_now(),
            reason=SHUTDOWN_REASON,
        )
        try:
            async with asyncio.timeout(SHUTDOWN_PUBLISH_TIMEOUT_S):
                await client.publish(self._status_topic, encode(report), qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            # The broker is gone: the Will it registered says "connection lost" instead.
            log.warning("could not publish the shutdown status: %s", exc)
        else:
            log.info("published status offline (shutdown) for session %d", session)

    # -- per-connection loops -------------------------------------------------------
    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        """Publish the backlog in order; a sample leaves it only after its PUBACK."""
        while True:
            await self.backlog.wait_not_empty()
            batch = self.backlog.oldest(PUBLISH_WINDOW)
            # gather starts the publishes in order, so they go on the wire in order.
            results = await asyncio.gather(
                *(client.publish(self._metrics_topic, encode(r), qos=1) for r in batch),
                return_exceptions=True,
            )
            acked = sum(
                1 for _ in itertools.takewhile(lambda r: not isinstance(r, BaseException), results)
            )
            self.backlog.remove_acknowledged(batch[:acked])
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def _message_loop(self, client: aiomqtt.Client, session: int) -> None:
        """Route this node's commands; watch its own status topic for contradictions."""
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload
            if not isinstance(payload, bytes):  # paho always hands over bytes
                continue
            if topic == self._commands_topic:
                self._commands.accept(payload)
            elif topic == self._status_topic:
                newer = self._check_own_status(payload, session)
                if newer is not None:
                    await asyncio.to_thread(self._sessions.advance_past, newer)
                    msg = f"reconnecting with a session above {newer}"
                    raise BrokerError(msg)
            else:
                log.debug("ignoring message on %s: %s", topic, truncate_for_log(payload))

    def _check_own_status(self, payload: bytes, session: int) -> int | None:
        """Act on a status of our own node; return a session newer than ours, if seen."""
        try:
            report = decode_status(payload)
        except ProtocolError as exc:
            log.warning("ignoring invalid payload on %s: %s", self._status_topic, exc)
            return None
        if report.session > session:
            # Every receiver would ignore our status as stale: jump past that session.
            log.warning(
                "%s carries session %d, newer than ours (%d): the agent state dir was "
                "reset, or another agent runs with node id %s",
                self._status_topic,
                report.session,
                session,
                self._node_id,
            )
            return report.session
        if report.session == session and report.status == "offline":
            # Someone says our live session is offline (a late Will, a collector's
            # heartbeat verdict): republish the truth so every subscriber sees it.
            log.warning(
                "%s says session %d is offline (%s): republishing the birth",
                self._status_topic,
                session,
                report.reason or "no reason",
            )
            self._status_changed.set()
        return None

    async def _status_loop(self, client: aiomqtt.Client, session: int) -> None:
        """Publish the status again whenever it changes or is contradicted."""
        while True:
            await self._status_changed.wait()
            self._status_changed.clear()
            await self._publish_status(client, session)


def warn_about_exposed_files(settings: Settings) -> None:
    """Log a warning for each secret file others may read and for a trust file others may write.

    The config file holds the node's token (in the broker URL) and ``key_file`` the TLS
    client key: group/world access exposes them. The operator public key is no secret,
    but whoever may replace it chooses which commands this node runs.
    """
    for path in (settings.config_file, settings.key_file):
        if path is not None:
            warn_if_exposed(path, log)
    public = settings.operator_public_key_file
    try:
        mode = public.stat().st_mode if public is not None else 0
    except OSError:
        return  # a missing key is reported, with its path, by the verifier
    if public is not None and mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning(
            "%s decides which commands run here but group/others may write it "
            "(mode %04o); run: chmod 644 %s",
            public,
            stat.S_IMODE(mode),
            public,
        )


class CommandPublisher:
    """The :data:`mqfleet.agent.commands.Publish` callable over one connection."""

    def __init__(self, client: aiomqtt.Client) -> None:
        """Publish through ``client``."""
        self._client = client

    async def __call__(self, topic: str, payload: bytes) -> None:
        """Publish with QoS 1, not retained; return after the PUBACK."""
        await self._client.publish(topic, payload, qos=1, retain=False)


async def run_agent(settings: Settings) -> None:
    """Run the agent until cancelled.

    On cancellation it publishes offline (reason "shutdown"), disconnects cleanly and
    re-raises :class:`asyncio.CancelledError`. Raises :class:`AuthenticationError` on bad
    credentials and :class:`AgentStateError` when the state dir is unusable.
    """
    await AgentService(settings).run()
