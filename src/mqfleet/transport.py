"""The one seam between mqfleet and MQTT client libraries.

Agent and CLI use aiomqtt (asyncio); the collector uses paho-mqtt directly because it
needs manual acknowledgement (a QoS 1 PUBACK only after the row is committed), which
aiomqtt does not expose. Both get their options here, so TCP_NODELAY, TLS, protocol
version and credentials are decided once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import select
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from mqfleet.errors import AuthenticationError, BrokerError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from mqfleet.settings import Settings

__all__ = [
    "AUTH_FAILURE_CODES",
    "Backoff",
    "BufferedPahoClient",
    "BufferedSocket",
    "MqttClient",
    "PahoNetworkThread",
    "aiomqtt_client",
    "as_broker_error",
    "connect_properties",
    "is_auth_failure",
    "paho_client",
    "set_nodelay",
    "tls_context",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: CONNACK codes meaning "your credentials are wrong": MQTT 3.1.1 (4, 5) and MQTT 5
#: (134 bad user name or password, 135 not authorized, 138 banned). Reconnecting
#: with the same credentials cannot succeed, so we stop instead (as Home Assistant does).
AUTH_FAILURE_CODES: Final = frozenset({4, 5, 134, 135, 138})
_AUTH_REASON_CODES: Final = frozenset({134, 135, 138})
_AUTH_CONNACK_CODES_V311: Final = frozenset({4, 5})
MQTT_ERR_SUCCESS: Final = MQTTErrorCode.MQTT_ERR_SUCCESS

#: Nagle's algorithm plus delayed ACK cost 88 ms per command round trip where 1 ms is
#: possible (measured on these machines): every client socket disables it.
NODELAY_OPTION: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _protocol(settings: Settings) -> MQTTProtocolVersion:
    return (
        MQTTProtocolVersion.MQTTv5 if settings.mqtt_version == "5" else MQTTProtocolVersion.MQTTv311
    )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS context for ``mqtts://`` URLs (hostname checked), else None."""
    if not settings.broker.tls:
        return None
    ctx = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if settings.cert_file is not None:
        ctx.load_cert_chain(
            str(settings.cert_file), str(settings.key_file) if settings.key_file else None
        )
    return ctx


def connect_properties(
    settings: Settings, *, session_expiry_s: int = 0, receive_maximum: int | None = None
) -> Properties | None:
    """MQTT 5 CONNECT properties (None on MQTT 3.1.1)."""
    if settings.mqtt_version != "5":
        return None
    # paho's Properties has no annotations; the packet type is all it takes.
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if session_expiry_s:
        props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


class MqttClient(aiomqtt.Client):
    """aiomqtt's client, with waits that never swallow a cancellation.

    aiomqtt waits for every acknowledgement (CONNACK, SUBACK, PUBACK, the disconnect)
    with ``asyncio.wait_for``. On Python 3.11 that loses a cancellation arriving in the
    same loop step as the acknowledgement (CPython gh-86296, fixed only by 3.12's rewrite
    on ``asyncio.timeout``): the cancelled task carries on as if nothing happened. A
    shutdown that cancels a loop just as its PUBACK lands then waits forever for that
    loop (seen in CI as a hung test). ``asyncio.timeout`` counts cancellations, so this
    wait re-raises them; timeouts and their error stay aiomqtt's.
    """

    async def _wait_for(self, fut: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109 - aiomqtt's signature
        if timeout is None:
            timeout = self.timeout
        try:
            async with asyncio.timeout(None if timeout == math.inf else timeout):
                return await fut
        except TimeoutError:
            msg = "Operation timed out"  # aiomqtt's own message
            raise aiomqtt.MqttError(msg) from None


def aiomqtt_client(
    settings: Settings,
    *,
    identifier: str,
    will: aiomqtt.Will | None = None,
    clean_start: bool = True,
    session_expiry_s: int = 0,
    timeout_s: float = 10.0,
) -> MqttClient:
    """Build an aiomqtt client from ``settings`` (credentials, TLS, version)."""
    broker = settings.broker
    v5 = settings.mqtt_version == "5"
    return MqttClient(
        broker.host,
        broker.port,
        username=broker.username,
        password=broker.password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        will=will,
        clean_session=None if v5 else clean_start,
        clean_start=clean_start if v5 else 3,  # 3 == MQTT_CLEAN_START_FIRST_ONLY, unused on 3.1.1
        keepalive=settings.keepalive_s,
        properties=connect_properties(settings, session_expiry_s=session_expiry_s),
        tls_context=tls_context(settings),
        socket_options=[NODELAY_OPTION],
        timeout=timeout_s,
        logger=logging.getLogger("mqfleet.mqtt"),
    )


def paho_client(
    settings: Settings, *, client_id: str, manual_ack: bool = False, buffered: bool = False
) -> Client:
    """Build a paho-mqtt client from ``settings``; call :func:`set_nodelay` on connect.

    ``buffered`` makes a :class:`BufferedPahoClient`, for :class:`PahoNetworkThread`,
    which sets TCP_NODELAY itself before CONNECT is sent.
    """
    broker = settings.broker
    v5 = settings.mqtt_version == "5"
    client = (BufferedPahoClient if buffered else Client)(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=_protocol(settings),
        clean_session=None if v5 else False,
        manual_ack=manual_ack,
        reconnect_on_failure=True,
    )
    client.enable_logger(logging.getLogger("mqfleet.mqtt"))
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    ctx = tls_context(settings)
    if ctx is not None:
        client.tls_set_context(ctx)
    return client


def set_nodelay(client: Client) -> None:
    """Disable Nagle's algorithm on a connected paho client's socket."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(*NODELAY_OPTION)


def is_auth_failure(exc: BaseException) -> bool:
    """Say whether ``exc`` means the broker refused our credentials."""
    rc = getattr(exc, "rc", None)
    if isinstance(rc, ReasonCode):
        # CONNACK/DISCONNECT reason codes use MQTT 5 numbering; paho maps the MQTT 3.1.1
        # CONNACK return codes 4 and 5 onto 134 and 135 (MQTT 5 spec 3.2.2.2).
        return rc.value in _AUTH_REASON_CODES
    # A bare int is a 3.1.1 CONNACK code only on a connect error. Anywhere else it is
    # paho's MQTTErrorCode, where 4 is MQTT_ERR_NO_CONN: a lost connection, to retry.
    return (
        isinstance(exc, MqttConnectError) and isinstance(rc, int) and rc in _AUTH_CONNACK_CODES_V311
    )


def as_broker_error(exc: Exception, settings: Settings) -> BrokerError:
    """Translate a client library exception into our tree (auth failures apart)."""
    if is_auth_failure(exc):
        return AuthenticationError(f"broker {settings.broker} refused the credentials: {exc}")
    return BrokerError(f"cannot reach broker {settings.broker}: {exc}")


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter (as aiomqtt's examples recommend)."""

    initial_s: float = 0.5
    maximum_s: float = 30.0
    factor: float = 2.0
    attempt: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """Delay before the next attempt; grows until :meth:`reset`."""
        # Cap the exponent: factor**attempt overflows a float after ~1000 failed attempts,
        # which a long outage reaches.
        ceiling = min(self.maximum_s, self.initial_s * self.factor ** min(self.attempt, 64))
        self.attempt += 1
        # Jitter in [ceiling/2, ceiling]: spreads reconnect storms yet never retries at once.
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def reset(self) -> None:
        """Start again from the initial delay (after a successful connection)."""
        self.attempt = 0


class BufferedSocket:
    """The socket of a :class:`BufferedPahoClient`: large reads, one write per round.

    paho reads every packet with three or more ``recv()`` calls (type byte, each
    length byte, body) and sends every PUBACK with its own ``send()``: about five
    system calls per 200-byte metric, which bounded the collector. This serves paho's
    small reads from one 64 KiB read and keeps its writes until :meth:`flush`, which
    :class:`PahoNetworkThread` calls once per round (so the acks of a whole read go out
    in one segment, with TCP_NODELAY still on for latency). Measured with a bare
    subscriber on a 2-core VM, TCP_NODELAY on: ~19,000 -> ~38,000 QoS 1 msg/s drained.

    It implements paho's ``SocketLike`` protocol (recv, send, close, fileno,
    setblocking) and must only be driven by :class:`PahoNetworkThread`.
    """

    #: Bytes asked of the kernel per read (about 280 metrics).
    READ_SIZE: Final = 65536
    #: How long close() may block to hand over what is still buffered (DISCONNECT).
    CLOSE_FLUSH_S: Final = 1.0

    __slots__ = ("_error", "_in", "_out", "_pos", "raw")

    def __init__(self, raw: socket.socket) -> None:
        """Wrap a connected socket (plain or TLS)."""
        self.raw = raw
        self._in = b""
        self._pos = 0
        self._out = bytearray()
        self._error: OSError | None = None

    def recv(self, buffer_size: int) -> bytes:
        """Return up to ``buffer_size`` buffered bytes, reading once more when none are."""
        if self._error is not None:
            raise self._error  # a failed flush: paho sees the connection lost here
        if self._pos >= len(self._in):
            data = self.raw.recv(self.READ_SIZE)  # BlockingIOError: paho retries later
            if not data:
                return b""  # closed by the broker
            self._in, self._pos = data, 0
        start = self._pos
        self._pos = end = min(start + buffer_size, len(self._in))
        return self._in[start:end]

    def send(self, buffer: bytes | bytearray) -> int:
        """Keep ``buffer`` for the next :meth:`flush`; report it all as written."""
        if self._error is not None:
            raise self._error
        self._out += buffer
        return len(buffer)

    def pending(self) -> int:
        """Bytes readable without waiting for the socket (ours, and TLS's decrypted)."""
        buffered = len(self._in) - self._pos
        if isinstance(self.raw, ssl.SSLSocket):
            buffered += self.raw.pending()
        return buffered

    def has_output(self) -> bool:
        """Say whether written bytes still wait for :meth:`flush`."""
        return bool(self._out)

    def flush(self) -> bool:
        """Send what the socket takes now; say whether everything went.

        An error is kept and raised by the next recv(), where paho handles a lost
        connection (closes the socket, calls on_disconnect, reconnects).
        """
        out = self._out
        while out and self._error is None:
            try:
                sent = self.raw.send(out)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False
            except OSError as exc:
                self._error = exc
                return False
            del out[:sent]
        return not out

    def close(self) -> None:
        """Hand over what is buffered (DISCONNECT comes last), then close."""
        if self._out and self._error is None:
            with contextlib.suppress(OSError):
                self.raw.settimeout(self.CLOSE_FLUSH_S)
                self.raw.sendall(self._out)
        self._out.clear()
        self.raw.close()

    def fileno(self) -> int:
        """Return the socket's file descriptor, for select()."""
        return self.raw.fileno()

    def setblocking(self, flag: bool) -> None:  # noqa: FBT001 (socket's API)
        """Set the socket's blocking mode (paho makes it non-blocking)."""
        self.raw.setblocking(flag)


class BufferedPahoClient(Client):
    """paho's Client on a :class:`BufferedSocket`; drive it with :class:`PahoNetworkThread`.

    paho has no public hook for its socket, so this overrides its private
    ``_create_socket`` (paho-mqtt is pinned below 3; tests/test_transport.py fails if
    the hook stops being called). TCP_NODELAY is set here, before CONNECT is sent.
    """

    def _create_socket(self) -> Any:  # noqa: ANN401 (paho's SocketLike is private)
        sock = super()._create_socket()
        if not isinstance(sock, socket.socket):  # websockets: not used by mqfleet
            return sock
        sock.setsockopt(*NODELAY_OPTION)
        return BufferedSocket(sock)


class PahoNetworkThread:
    """Drive a paho client's socket from one thread of ours, with paho's external-loop API.

    Used instead of ``loop_start()`` by the collector, whose ingest rate is bounded by
    this thread. paho's own thread wakes itself through a socket pair for every packet
    another thread queues (each PUBACK the collector sends after a commit) and reads one
    packet per ``select()`` round. Here every socket read and write happens on this
    thread: a packet queued elsewhere only registers a write, which wakes the thread
    once per burst. With a :class:`BufferedPahoClient` a round reads every whole packet
    already received, then flushes that round's acks in one segment.

    Measured on a 2-core VM, one collector process draining queued metrics (bench/,
    same runs): with ``loop_start()`` 14,379 msg/s into SQLite and 16,605 into
    PostgreSQL; this thread on a plain socket 14,806 / 19,637; on a
    :class:`BufferedSocket` 26,381 / 23,848 (a bare paho subscriber: ~17,000).

    Reconnects with :class:`Backoff` (paho's ``loop_forever`` does this for its own
    thread); ``loop_misc`` keeps the keepalive. Call :meth:`start` after
    ``connect_async``, and :meth:`stop` after ``client.disconnect()``.
    """

    #: select() timeout: how late loop_misc (keepalive) may run when nothing happens.
    TICK_S: Final = 1.0
    #: Packets read in one round before writing (acks) and keepalive get their turn.
    MAX_READS_PER_ROUND: Final = 1000

    def __init__(
        self,
        client: Client,
        *,
        name: str,
        backoff: Backoff,
        on_connect_fail: Callable[[OSError], None],
    ) -> None:
        """Prepare the thread; ``on_connect_fail`` runs on it when a connect attempt fails."""
        self._client = client
        self._backoff = backoff
        self._on_connect_fail = on_connect_fail
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)  # noqa: FBT003 (socket's API)
        self._wake_w.setblocking(False)  # noqa: FBT003
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        client.on_socket_register_write = self._register_write

    def start(self) -> None:
        """Start connecting (and reconnecting) on the thread."""
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Make the thread exit once the socket is closed; say whether it did in time.

        After ``client.disconnect()`` the thread first writes what is queued, DISCONNECT
        last, which closes the socket; with no connection it exits at once.
        """
        self._stop.set()
        self.wake()
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        if not alive:
            self._wake_r.close()
            self._wake_w.close()
        return not alive

    def request_stop(self) -> None:
        """Stop reconnecting once the socket closes (callable from the thread itself)."""
        self._stop.set()

    def wake(self) -> None:
        """Interrupt the thread's select() (from any thread)."""
        with contextlib.suppress(OSError):  # full (already awake) or closed
            self._wake_w.send(b"\0")

    def _register_write(self, _client: Client, _userdata: object, _sock: object) -> None:
        self.wake()

    def _run(self) -> None:
        client = self._client
        while True:
            sock = client.socket()
            if sock is None:
                if self._stop.is_set():
                    return
                try:
                    client.reconnect()
                except OSError as exc:
                    self._on_connect_fail(exc)
                    self._stop.wait(self._backoff.next_delay())
                continue
            if not isinstance(sock, socket.socket | BufferedSocket):  # never websockets
                msg = f"unsupported paho transport socket: {type(sock).__name__}"
                raise TypeError(msg)
            self._serve(client, sock)
            if client.socket() is None and not self._stop.is_set():
                # Lost: paho has closed the socket and called on_disconnect.
                self._stop.wait(self._backoff.next_delay())

    def _serve(self, client: Client, sock: socket.socket | BufferedSocket) -> None:
        """Run one connection until its socket is closed."""
        wake_r = self._wake_r
        buffered = sock if isinstance(sock, BufferedSocket) else None
        while client.socket() is sock:
            pending = (
                buffered.pending()
                if buffered is not None
                else sock.pending()
                if isinstance(sock, ssl.SSLSocket)  # decrypted bytes select() cannot see
                else 0
            )
            if pending:
                readable = True
            else:
                # want_write() is read after the last loop_write(): a packet queued
                # since then has registered a write (and woken us) or is seen here.
                flushing = buffered is not None and buffered.has_output()
                wlist = [sock] if flushing or client.want_write() else []
                try:
                    ready, _, _ = select.select([sock, wake_r], wlist, [], self.TICK_S)
                except (OSError, ValueError):  # closed under us by another thread
                    ready = [sock]
                if wake_r in ready:
                    with contextlib.suppress(OSError):
                        wake_r.recv(4096)
                readable = sock in ready
            if readable and not self._read(client, buffered):
                break
            if client.want_write() and client.loop_write() != MQTT_ERR_SUCCESS:
                break
            if buffered is not None:
                buffered.flush()
            if client.loop_misc() != MQTT_ERR_SUCCESS:
                break
            if client.is_connected():
                self._backoff.reset()

    def _read(self, client: Client, buffered: BufferedSocket | None) -> bool:
        """Read one packet, then every whole one already buffered; False if lost."""
        if client.loop_read() != MQTT_ERR_SUCCESS:
            return False
        if buffered is not None:
            for _ in range(self.MAX_READS_PER_ROUND):
                if not buffered.pending() or client.socket() is not buffered:
                    break
                if client.loop_read() != MQTT_ERR_SUCCESS:
                    return False
        return True
