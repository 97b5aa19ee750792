"""The collector: one persistent MQTT session in, batched transactions out.

Threads, and why:

* The network thread (:class:`~mqfleet.transport.PahoNetworkThread`, our own loop over
  paho's external-loop API, on a buffered socket) reads the socket and calls
  :meth:`Collector._on_message`, which only appends the message to a deque (no lock,
  no decoding, no I/O), so the socket is drained at full speed. It is the bottleneck
  of ingest: paho's own per-message Python work takes most of it, and every other
  thread's Python work competes with it for the GIL, which is why the database
  thread's hot path binds rows itself.
* One database thread (a single-worker executor) decodes and commits batches and runs
  the staleness, expiry and retention queries. A dedicated thread keeps blocking
  SQLite/PostgreSQL calls off the event loop, and a single one means our own writes
  never contend for SQLite's one write lock or race each other on a row.
* The asyncio loop only orchestrates: it wakes the writer (one ``call_soon_threadsafe``
  per idle-to-busy transition, not per message), acks, republishes queued commands and
  runs the periodic loops in one TaskGroup.

Batches form by themselves: while one batch commits, the next accumulates, so a busy
collector writes ``batch_size`` rows per transaction and an idle one writes each message
at once. Acknowledgements (PUBACK) are sent only after the commit, so a ``kill -9`` at any
moment leaves every uncommitted message queued at the broker for our persistent session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy.exc import SQLAlchemyError

from mqfleet.collector.writer import BatchOutcome, Inbound, StoreWriter
from mqfleet.errors import (
    AuthenticationError,
    ConfigError,
    MqfleetError,
    ProtocolError,
    StoreError,
)
from mqfleet.loops import run_loops
from mqfleet.protocol import (
    REASON_CONNECTION_LOST,
    REASON_SHUTDOWN,
    CollectorStatus,
    decode_collector_status,
    encode,
    utc_now,
)
from mqfleet.store.engine import create_store_engine, describe_url, upgrade
from mqfleet.transport import (
    AUTH_FAILURE_CODES,
    Backoff,
    PahoNetworkThread,
    connect_properties,
    paho_client,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
    from paho.mqtt.reasoncodes import ReasonCode
    from sqlalchemy.engine import Engine

    from mqfleet.settings import Settings

__all__ = ["SESSION_EXPIRY_S", "Collector", "CollectorStats", "run_collector"]

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: How long the broker keeps our session (and queues messages for it) while we are
#: down (MQTT 5 spec 3.1.2.11.2). A week matches mosquitto's persistent_client_expiration.
SESSION_EXPIRY_S: Final = 7 * 86400
#: Rows deleted per retention transaction: short enough not to stall ingest.
RETENTION_CHUNK: Final = 5000
DEFAULT_STALENESS_CHECK_S: Final = 1.0
DEFAULT_EXPIRY_CHECK_S: Final = 1.0
DEFAULT_RETENTION_CHECK_S: Final = 3600.0
#: How long a busy writer waits for its next batch to fill (bounded by flush_interval_s).
BATCH_LINGER_S: Final = 0.05
#: CONNACK reason code 132 (MQTT 5 spec 3.2.2.2); paho maps 3.1.1's return code 1 to it.
UNSUPPORTED_PROTOCOL_VERSION: Final = 132
#: Time allowed at shutdown for the last commit and the offline status.
SHUTDOWN_TIMEOUT_S: Final = 10.0


@dataclass(slots=True)
class CollectorStats:
    """Counters of what the collector has done since it started."""

    received: int = 0
    metrics: int = 0
    statuses: int = 0
    commands: int = 0
    results: int = 0
    #: Messages skipped as invalid (bad topic, JSON, fields, node id, size, refused).
    invalid: int = 0
    #: Valid messages skipped because they name a node that was never registered.
    skipped: int = 0
    batches: int = 0
    republished: int = 0
    stale: int = 0
    expired: int = 0
    pruned: int = 0

    def add(self, outcome: BatchOutcome) -> None:
        """Count a committed batch."""
        self.metrics += outcome.metrics
        self.statuses += outcome.statuses
        self.commands += outcome.commands
        self.results += outcome.results
        self.invalid += outcome.invalid
        self.skipped += outcome.skipped
        self.batches += 1


class Collector:
    """Subscribes to the whole fleet and persists it; see :func:`run_collector`."""

    def __init__(
        self,
        settings: Settings,
        *,
        staleness_check_s: float = DEFAULT_STALENESS_CHECK_S,
        expiry_check_s: float = DEFAULT_EXPIRY_CHECK_S,
        retention_check_s: float = DEFAULT_RETENTION_CHECK_S,
    ) -> None:
        """Prepare a collector.

        Args:
            settings: broker, database, topic prefix and the collector's own settings.
            staleness_check_s: how often to look for silent nodes.
            expiry_check_s: how often to time out expired pending commands.
            retention_check_s: how often to prune old metrics (also once at start).

        """
        self.settings = settings
        self.stats = CollectorStats()
        self._staleness_check_s = staleness_check_s
        self._expiry_check_s = expiry_check_s
        self._retention_check_s = retention_check_s
        self._topics = settings.topics
        self._collector_status_topic = self._topics.collector_status()
        # Shared with paho's network thread. paho's thread appends to _inbox and the
        # loop pops from it, with no lock: deque.append and popleft are atomic, and
        # _on_message must never wait for the loop (see _take for the idle handshake).
        self._inbox: collections.deque[Inbound] = collections.deque()
        self._writer_idle = False
        # paho's thread changes _generation (on connect/disconnect) under _lock; _ack
        # holds it while acknowledging, so no ack crosses to a new connection.
        self._lock = threading.Lock()
        self._generation = 0
        self._listening_since: datetime | None = None  # set while connected
        # Loop-side state.
        self._current: list[Inbound] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._fatal: asyncio.Future[MqfleetError] | None = None
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mqfleet-db")
        self._client: Client | None = None
        self._net: PahoNetworkThread | None = None
        self._writer: StoreWriter | None = None
        self._stopping = False
        #: Set while connected and subscribed (SUBACK received); for tests and probes.
        self.ready = threading.Event()

    # -- entry point ----------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled; then flush, ack, publish offline and disconnect."""
        if self.settings.collector_group and self.settings.mqtt_version != "5":
            # MQTT 3.1.1 has no shared subscriptions: a broker may take "$share/..." for
            # a plain topic nobody publishes on, and the group would silently hear nothing.
            raise ConfigError(
                "collector_group needs mqtt_version 5 (shared subscriptions are MQTT 5); "
                "on MQTT 3.1.1 run a single collector"
            )
        self._loop = asyncio.get_running_loop()
        self._fatal = self._loop.create_future()
        try:
            engine = await self._in_db(self._open_store)
        except BaseException:
            self._db.shutdown(wait=False)
            raise
        self._writer = StoreWriter(
            engine, topics=self._topics, default_interval_s=self.settings.metrics_interval_s
        )
        self._client = self._connect()
        try:
            await run_loops(
                {
                    "write_loop": self._write_loop,
                    "staleness_loop": self._staleness_loop,
                    "expiry_loop": self._expiry_loop,
                    "retention_loop": self._retention_loop,
                    "fatal_loop": self._fatal_loop,
                }
            )
        finally:
            await self._shutdown(engine)

    def _open_store(self) -> Engine:
        url = self.settings.database_url
        engine = create_store_engine(url, writer=True)
        try:
            with engine.connect():
                pass
        except SQLAlchemyError as exc:
            engine.dispose()
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise StoreError(f"cannot reach database {describe_url(url)}: {reason}") from exc
        try:
            upgrade(engine)
        except StoreError as exc:
            engine.dispose()
            raise StoreError(str(exc).strip().splitlines()[0]) from exc
        return engine

    # -- MQTT -----------------------------------------------------------------------
    def _connect(self) -> Client:
        settings = self.settings
        client = paho_client(
            settings, client_id=settings.collector_id, manual_ack=True, buffered=True
        )
        client.will_set(
            self._topics.collector_status(),
            self._status_payload("offline", REASON_CONNECTION_LOST),
            qos=1,
            retain=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        props = connect_properties(
            settings, session_expiry_s=SESSION_EXPIRY_S, receive_maximum=settings.receive_maximum
        )
        broker = settings.broker
        if settings.mqtt_version == "5":
            # clean_start=False resumes the session, and with it every message queued
            # while we were away and every one we had not acknowledged.
            client.connect_async(
                broker.host, broker.port, settings.keepalive_s, clean_start=False, properties=props
            )
        else:  # 3.1.1: clean_session=False was set when the client was made
            client.connect_async(broker.host, broker.port, settings.keepalive_s)
        # Our own network thread rather than loop_start(): see PahoNetworkThread.
        self._net = PahoNetworkThread(
            client,
            name="mqfleet-mqtt",
            backoff=Backoff(initial_s=1.0, maximum_s=30.0),
            on_connect_fail=self._on_connect_fail,
        )
        self._net.start()
        log.info("collector %s connecting to %s", settings.collector_id, broker)
        return client

    def _status_payload(self, status: str, reason: str | None = None) -> bytes:
        return encode(
            CollectorStatus(
                status="online" if status == "online" else "offline",
                collector_id=self.settings.collector_id[:128],
                ts=utc_now(),
                reason=reason,
            )
        )

    def _on_connect(
        self,
        client: Client,
        _userdata: object,
        flags: ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            if reason_code.value in AUTH_FAILURE_CODES:
                err = AuthenticationError(
                    f"broker {self.settings.broker} refused the collector: {reason_code}"
                )
                self._stopping = True  # what follows is not a lost connection
                self._stop_network()  # retrying with the same credentials cannot help
                client.disconnect()
                self._raise_fatal(err)
            elif reason_code.value == UNSUPPORTED_PROTOCOL_VERSION:
                # A 3.1.1-only broker (nats-server, older RabbitMQ): retrying cannot help.
                self._stopping = True
                self._stop_network()
                client.disconnect()
                self._raise_fatal(
                    ConfigError(
                        f"broker {self.settings.broker} does not speak MQTT "
                        f'{self.settings.mqtt_version}: set mqtt_version = "3.1.1" '
                        "(--mqtt-version 3.1.1)"
                    )
                )
            else:
                log.warning(
                    "broker %s refused the connection: %s", self.settings.broker, reason_code
                )
            return
        with self._lock:
            self._generation += 1
        self._listening_since = utc_now()
        # Subscribe on every connect: after a broker restart without persistence the
        # session (and its subscriptions) may be gone although we asked to keep it.
        client.subscribe(self._subscriptions())
        group = self.settings.collector_group
        if group:
            # A session that once ran without a group still holds the plain filters:
            # drop them, or this collector would get every message twice.
            topics = self._topics
            client.unsubscribe([topics.all_metrics(), topics.all_results()])
        client.publish(
            self._topics.collector_status(), self._status_payload("online"), qos=1, retain=True
        )
        log.info(
            "connected to %s (session present: %s%s)",
            self.settings.broker,
            flags.session_present,
            f", shared-subscription group {group!r}" if group else "",
        )

    def _subscriptions(self) -> list[tuple[str, SubscribeOptions]] | list[tuple[str, int]]:
        """List the filters to subscribe to: shared ones for metrics and results in a group.

        Metrics and results are stored once whichever collector gets them, so a group
        shares them out (MQTT 5 spec 4.8.2). Status stays a normal subscription: brokers
        never send retained messages to shared subscriptions (4.8.2), and every
        collector's status writes are conditional on the session, so all may apply it.
        Commands stay normal too (recording is an idempotent insert) because noLocal is
        a protocol error on a shared subscription (3.8.3.1). The collector status is
        watched at QoS 0 (nothing to acknowledge) to answer another collector's Will.
        """
        topics = self._topics
        group = self.settings.collector_group
        shared = [topics.all_metrics(), topics.all_results()]
        if group:
            shared = [topics.shared(group, f) for f in shared]
        if self.settings.mqtt_version != "5":
            return [(f, 1) for f in [topics.all_status(), *shared, topics.all_commands()]] + [
                (topics.collector_status(), 0)
            ]
        return [
            (topics.all_status(), SubscribeOptions(qos=1)),
            *[(f, SubscribeOptions(qos=1)) for f in shared],
            # noLocal: our own republished commands need not come back to us.
            (topics.all_commands(), SubscribeOptions(qos=1, noLocal=True)),
            (topics.collector_status(), SubscribeOptions(qos=0, noLocal=True)),
        ]

    def _on_disconnect(
        self,
        _client: Client,
        _userdata: object,
        _flags: DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        with self._lock:
            # Packet ids restart per connection: acks for messages received on the
            # old connection must never reach the new one (they would ack the wrong
            # message). The broker redelivers those, and writes are idempotent.
            self._generation += 1
        self._listening_since = None
        self.ready.clear()
        if not self._stopping:
            log.warning("lost the broker %s: %s; reconnecting", self.settings.broker, reason_code)

    def _on_subscribe(
        self,
        _client: Client,
        _userdata: object,
        _mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            log.error("broker refused a subscription: %s", refused)
        else:
            self.ready.set()

    def _stop_network(self) -> None:
        if self._net is not None:
            self._net.request_stop()

    def _on_connect_fail(self, exc: OSError) -> None:
        log.warning("cannot reach broker %s (%s); retrying", self.settings.broker, exc)

    def _on_message(self, _client: Client, _userdata: object, message: MQTTMessage) -> None:
        # Runs on the network thread for every message, and that thread is the
        # collector's bottleneck (it shares the GIL with the database thread): an
        # append, no lock, no decoding. _generation is only changed on this thread.
        try:
            topic: str | None = message.topic
        except UnicodeDecodeError:
            topic = None
        payload = message.payload
        if topic == self._collector_status_topic:
            self._answer_collector_status(bytes(payload))
            return
        self._inbox.append(
            Inbound(
                topic,
                payload if isinstance(payload, bytes) else bytes(payload),
                message.mid,
                message.qos,
                bool(message.retain),
                time.time(),
                self._generation,
            )
        )
        if self._writer_idle:
            # The writer found the inbox empty and waits (see _take): wake it, once.
            self._writer_idle = False
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._wakeup.set)

    def _answer_collector_status(self, payload: bytes) -> None:
        """Say "online" again when another collector's Will says "offline".

        Collectors share one retained status topic; with several running, the Will of
        one that died must not tell the CLI that nothing records the fleet.
        """
        try:
            status = decode_collector_status(payload)
        except ProtocolError:
            return  # not ours to judge: the CLI warns about malformed ones
        client = self._client
        if (
            status.status == "offline"
            and status.collector_id != self.settings.collector_id[:128]
            and client is not None
            and not self._stopping
        ):
            client.publish(
                self._collector_status_topic, self._status_payload("online"), qos=1, retain=True
            )

    def _raise_fatal(self, err: MqfleetError) -> None:
        loop, fatal = self._loop, self._fatal
        if loop is not None and fatal is not None:

            def resolve() -> None:
                if not fatal.done():
                    fatal.set_result(err)

            loop.call_soon_threadsafe(resolve)

    def _ack(self, batch: list[Inbound]) -> None:
        client = self._client
        if client is None:
            return
        with self._lock:
            generation = self._generation
            for msg in batch:
                if msg.qos and msg.generation == generation:
                    client.ack(msg.mid, msg.qos)

    def _buffered(self) -> int:
        return len(self._inbox)

    def _take(self) -> list[Inbound]:
        """Pop up to ``batch_size`` messages; when there are none, mark the writer idle.

        The handshake with :meth:`_on_message` needs no lock because the GIL orders
        every step: we raise the idle flag *then* look at the inbox, paho's thread
        appends *then* looks at the flag. So either we see its message, or it sees
        our flag and wakes us (at worst both: one spurious wake-up).
        """
        inbox = self._inbox
        if not inbox:
            self._writer_idle = True
            if not inbox:
                return []
            self._writer_idle = False
        return [inbox.popleft() for _ in range(min(len(inbox), self.settings.batch_size))]

    def _republish(self, outcome: BatchOutcome) -> None:
        client = self._client
        if client is None:
            return
        for item in outcome.redeliveries:
            props = None
            if self.settings.mqtt_version == "5":
                # MQTT 5 spec 3.3.2.3.3: the broker drops it once this many seconds pass.
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.MessageExpiryInterval = item.expires_in_s
            client.publish(item.topic, item.payload, qos=1, retain=False, properties=props)
            self.stats.republished += 1
            log.info("republished pending command %s to %s", item.command_id, item.topic)

    # -- loops ----------------------------------------------------------------------
    async def _in_db(self, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, lambda: func(*args, **kwargs))

    async def _write_loop(self) -> None:
        """Take whatever has arrived, commit it, then ack it; forever."""
        writer = self._require_writer()
        linger = min(self.settings.flush_interval_s, BATCH_LINGER_S)
        busy = False
        while True:
            if busy and self._buffered() < self.settings.batch_size:
                # Under load, let the next batch grow a little: fewer, larger
                # transactions cost less per row. An idle collector skips this, so a
                # lone status or result is written at once.
                await asyncio.sleep(linger)
            batch = self._take()
            if not batch:
                busy = False
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            busy = True
            self._current = batch
            self.stats.received += len(batch)
            backoff = Backoff(initial_s=0.5, maximum_s=10.0)
            while True:
                try:
                    outcome = await self._in_db(writer.write_batch, batch)
                    break
                except SQLAlchemyError as exc:
                    # Transient (locked, connection lost, server restarting): nothing
                    # is acked, so retry the same batch rather than drop it.
                    delay = backoff.next_delay()
                    log.warning(
                        "database error writing %d messages, retrying in %.1fs: %s",
                        len(batch),
                        delay,
                        str(getattr(exc, "orig", None) or exc).strip().splitlines()[0],
                    )
                    await asyncio.sleep(delay)
            self._ack(batch)
            self._current = []
            self.stats.add(outcome)
            self._republish(outcome)

    async def _staleness_loop(self) -> None:
        """Mark nodes offline that stayed silent for 3 x their interval."""
        writer = self._require_writer()
        while True:
            await asyncio.sleep(self._staleness_check_s)
            since = self._listening_since
            if since is None:
                continue  # we are deaf, not them
            with self._db_errors_logged("staleness check"):
                stale = await self._in_db(writer.mark_stale, utc_now(), since)
                self.stats.stale += len(stale)
                for node_id in stale:
                    log.info("node %s marked offline: heartbeat timeout", node_id)

    async def _expiry_loop(self) -> None:
        """Time out commands that stayed pending past their expiry."""
        writer = self._require_writer()
        while True:
            await asyncio.sleep(self._expiry_check_s)
            with self._db_errors_logged("command expiry"):
                expired = await self._in_db(writer.expire_commands, utc_now())
                self.stats.expired += len(expired)
                for command_id in expired:
                    log.info("command %s expired before delivery", command_id)

    async def _retention_loop(self) -> None:
        """Prune metrics older than the retention period, a small chunk at a time."""
        writer = self._require_writer()
        while True:
            cutoff = utc_now() - timedelta(days=self.settings.retention_days)
            with self._db_errors_logged("retention"):
                total = 0
                while True:
                    # One chunk per job: the writer's batches queue in between.
                    deleted = await self._in_db(writer.prune_metrics, cutoff, RETENTION_CHUNK)
                    total += deleted
                    self.stats.pruned += deleted
                    if deleted < RETENTION_CHUNK:
                        break
                if total:
                    log.info("pruned %d metrics older than %s", total, cutoff.isoformat())
            await asyncio.sleep(self._retention_check_s)

    async def _fatal_loop(self) -> None:
        """Raise the error paho's thread reported (bad credentials) in the TaskGroup."""
        assert self._fatal is not None  # noqa: S101 - set by run() before the loops start
        raise await self._fatal

    @contextlib.contextmanager
    def _db_errors_logged(self, what: str) -> Any:  # noqa: ANN401 - generator context manager
        try:
            yield
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            log.warning("%s failed, will retry: %s", what, reason)

    def _require_writer(self) -> StoreWriter:
        if self._writer is None:
            raise RuntimeError("collector store is not open")
        return self._writer

    # -- shutdown -------------------------------------------------------------------
    async def _shutdown(self, engine: Engine) -> None:
        self._stopping = True
        client, net = self._client, self._net
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                await self._final_flush()
                if client is not None:
                    await self._say_goodbye(client)
        except TimeoutError:
            log.warning(
                "shutdown took longer than %.0fs; the broker will redeliver the rest",
                SHUTDOWN_TIMEOUT_S,
            )
        finally:
            if client is not None and net is not None:
                # A normal DISCONNECT keeps our session (messages queue for us) and no
                # Will fires. The network thread writes what is queued, DISCONNECT last.
                client.disconnect()
                if not await asyncio.to_thread(net.stop, SHUTDOWN_TIMEOUT_S):
                    log.warning("the MQTT connection did not close in time")
            self._db.shutdown(wait=True)
            engine.dispose()
            log.info("collector stopped")

    async def _say_goodbye(self, client: Client) -> None:
        """Publish offline (retained) and wait for its PUBACK (the last acks go before it)."""
        if client.is_connected():
            info = client.publish(
                self._topics.collector_status(),
                self._status_payload("offline", REASON_SHUTDOWN),
                qos=1,
                retain=True,
            )
            # Bounded by _shutdown's timeout; stops waiting if the connection drops.
            while info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and client.is_connected():
                if info.is_published():
                    return
                await asyncio.sleep(0.005)

    async def _final_flush(self) -> None:
        writer = self._writer
        if writer is None:
            return
        # Wait for a batch the DB thread may still be committing, then write it again
        # with whatever arrived since (idempotent) and ack the lot.
        await self._in_db(lambda: None)
        batch = self._current + self._take()
        self._current = []
        if not batch:
            return
        try:
            outcome = await self._in_db(writer.write_batch, batch)
        except SQLAlchemyError as exc:
            log.warning(
                "could not commit %d messages at shutdown; the broker will redeliver them: %s",
                len(batch),
                str(getattr(exc, "orig", None) or exc).strip().splitlines()[0],
            )
            return
        self._ack(batch)
        self.stats.add(outcome)


async def run_collector(settings: Settings) -> None:
    """Run the collector until cancelled; then flush, publish offline and disconnect.

    Raises :class:`StoreError` when the database cannot be reached or migrated at
    start-up, :class:`AuthenticationError` when the broker refuses the credentials, and
    :class:`ConfigError` when the broker does not speak the configured MQTT version or
    ``collector_group`` is set on MQTT 3.1.1.
    """
    await Collector(settings).run()
