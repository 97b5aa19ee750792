from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttCodeError, MqttConnectError
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from mqfleet.errors import AuthenticationError, BrokerError
from mqfleet.transport import (
    Backoff,
    BufferedSocket,
    MqttClient,
    PahoNetworkThread,
    aiomqtt_client,
    as_broker_error,
    connect_properties,
    is_auth_failure,
    paho_client,
    set_nodelay,
    tls_context,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from paho.mqtt.client import Client

    from mqfleet.localbroker import LocalBroker
    from mqfleet.settings import Settings


# -- Backoff ------------------------------------------------------------------------


def test_backoff_grows_within_jittered_bounds_and_caps() -> None:
    backoff = Backoff(initial_s=0.5, maximum_s=30.0, _rng=random.Random(1))  # noqa: S311 - jitter, not crypto
    for attempt in range(20):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delay = backoff.next_delay()
        # Never immediate (no reconnect storm), never above the cap.
        assert ceiling / 2 <= delay <= ceiling
    assert backoff.attempt == 20


def test_backoff_reset_starts_again() -> None:
    backoff = Backoff(initial_s=1.0, maximum_s=8.0)
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0
    assert 0.5 <= backoff.next_delay() <= 1.0


def test_backoff_jitter_spreads_clients() -> None:
    rngs = [random.Random(seed) for seed in range(20)]  # noqa: S311 - jitter, not crypto
    delays = {Backoff(_rng=rng).next_delay() for rng in rngs}
    assert len(delays) > 10


def test_backoff_survives_many_attempts() -> None:
    # A week of failed reconnects must not overflow the exponent.
    backoff = Backoff()
    backoff.attempt = 5000
    assert 15.0 <= backoff.next_delay() <= 30.0


# -- errors -------------------------------------------------------------------------


def connack(name: str) -> ReasonCode:
    return ReasonCode(PacketTypes.CONNACK, name)


@pytest.mark.parametrize(
    "exc",
    [
        MqttConnectError(connack("Bad user name or password")),
        MqttConnectError(connack("Not authorized")),
        MqttConnectError(connack("Banned")),
        MqttConnectError(5),
    ],
)
def test_auth_failures_are_recognised(
    make_settings: Callable[..., Settings], exc: Exception
) -> None:
    assert is_auth_failure(exc)
    error = as_broker_error(exc, make_settings(broker_url="mqtt://bob:hunter2@h:1883"))
    assert isinstance(error, AuthenticationError)
    assert "refused the credentials" in str(error)
    assert "hunter2" not in str(error)


@pytest.mark.parametrize(
    "exc",
    [
        MqttConnectError(connack("Server unavailable")),
        # paho's MQTTErrorCode 4 is "no connection", not a 3.1.1 CONNACK code 4.
        MqttCodeError(MQTTErrorCode.MQTT_ERR_NO_CONN, "Could not publish message"),
        MqttCodeError(MQTTErrorCode.MQTT_ERR_CONN_REFUSED, "Could not subscribe"),
        aiomqtt.MqttError("Operation timed out"),
        ConnectionRefusedError(111, "Connection refused"),
        OSError("Network is unreachable"),
    ],
)
def test_other_failures_are_retryable(
    make_settings: Callable[..., Settings], exc: Exception
) -> None:
    assert not is_auth_failure(exc)
    error = as_broker_error(exc, make_settings(broker_url="mqtt://h:1883"))
    assert type(error) is BrokerError
    assert str(error).startswith("cannot reach broker mqtt://h:1883")


# -- client construction ------------------------------------------------------------


def test_connect_properties(make_settings: Callable[..., Settings]) -> None:
    props = connect_properties(make_settings(), session_expiry_s=3600, receive_maximum=500)
    assert props is not None
    assert props.SessionExpiryInterval == 3600
    assert props.ReceiveMaximum == 500
    assert connect_properties(make_settings(mqtt_version="3.1.1"), session_expiry_s=5) is None


def test_tls_only_for_mqtts(make_settings: Callable[..., Settings]) -> None:
    assert tls_context(make_settings()) is None
    ctx = tls_context(make_settings(broker_url="mqtts://broker.example"))
    assert ctx is not None
    assert ctx.check_hostname


def test_paho_client_carries_credentials(make_settings: Callable[..., Settings]) -> None:
    client = paho_client(
        make_settings(broker_url="mqtt://u:p@h:1"), client_id="c1", manual_ack=True
    )
    assert client._client_id == b"c1"
    assert client._username == b"u"
    assert client._password == b"p"
    assert client._manual_ack


@pytest.mark.integration
async def test_aiomqtt_client_round_trip_with_nodelay(
    mosquitto: LocalBroker, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(broker_url=mosquitto.url)
    async with aiomqtt_client(settings, identifier="t-async") as client:
        sock = client._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        await client.subscribe("t/x", qos=1)
        await client.publish("t/x", b"hello", qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert message.payload == b"hello"
                break


# -- MqttClient: cancellations are never swallowed ---------------------------------


async def _cancel_as_the_puback_lands(client: aiomqtt.Client) -> str:
    """Publish QoS 1 and cancel the publishing task in the loop step its PUBACK lands in.

    The cancel is queued right behind the wake-up that aiomqtt's on_publish schedules,
    which is the window where Python 3.11's ``asyncio.wait_for`` drops a cancellation.
    """
    task: asyncio.Task[None] | None = None
    loop = asyncio.get_running_loop()
    on_publish = client._client.on_publish

    def acknowledged(*args: object) -> None:
        on_publish(*args)  # type: ignore[misc]
        assert task is not None
        loop.call_soon(task.cancel)

    async def publish_then_carry_on() -> None:
        await client.publish("t/cancel", b"x", qos=1)
        await asyncio.sleep(30)  # only reached when the cancellation was swallowed

    client._client.on_publish = acknowledged
    task = asyncio.create_task(publish_then_carry_on())
    await asyncio.wait([task], timeout=0.5)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return "swallowed"
    return "cancelled" if task.cancelled() else f"ended: {task.exception()!r}"


@pytest.mark.integration
async def test_a_cancel_that_lands_with_the_puback_cancels_the_publish(
    mosquitto: LocalBroker, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(broker_url=mosquitto.url)
    async with aiomqtt_client(settings, identifier="t-cancel") as client:
        assert isinstance(client, MqttClient)
        outcomes = {await _cancel_as_the_puback_lands(client) for _ in range(5)}
    assert outcomes == {"cancelled"}


@pytest.mark.integration
@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12's wait_for keeps cancellations")
async def test_plain_aiomqtt_swallows_that_cancel_on_python_311(mosquitto: LocalBroker) -> None:
    """Why MqttClient exists: when this stops failing to cancel, it can go."""
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-plain") as client:
        outcome = await _cancel_as_the_puback_lands(client)
    assert outcome == "swallowed"


async def test_mqtt_client_waits_keep_aiomqtt_timeouts() -> None:
    client = MqttClient("127.0.0.1", 1, timeout=0.05)  # never connected: waits only
    never = asyncio.Event()
    with pytest.raises(aiomqtt.MqttError, match=r"^Operation timed out$"):
        await client._wait_for(never.wait(), timeout=None)  # the client's default
    with pytest.raises(aiomqtt.MqttError, match=r"^Operation timed out$"):
        await client._wait_for(never.wait(), timeout=0.01)
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.1, done.set_result, 7)
    assert await client._wait_for(done, timeout=math.inf) == 7  # inf: no limit


def test_mqtt_client_replaces_the_wait_aiomqtt_has() -> None:
    # The override is a no-op if aiomqtt renames the method: fail loudly instead.
    assert "_wait_for" in vars(aiomqtt.Client)
    assert MqttClient._wait_for is not aiomqtt.Client._wait_for


@pytest.mark.integration
@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_paho_client_connects_and_sets_nodelay(
    mosquitto: LocalBroker, make_settings: Callable[..., Settings], version: str
) -> None:
    settings = make_settings(broker_url=mosquitto.url, mqtt_version=version)
    client = paho_client(settings, client_id=f"t-paho-{version}")
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect(
        mosquitto.host,
        mosquitto.port,
        keepalive=settings.keepalive_s,
        properties=connect_properties(settings, session_expiry_s=60),
    )
    client.loop_start()
    try:
        assert connected.wait(10)
        set_nodelay(client)
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.integration
async def test_unreachable_broker_is_a_broker_error(make_settings: Callable[..., Settings]) -> None:
    from mqfleet.localbroker import free_port  # noqa: PLC0415

    settings = make_settings(broker_url=f"mqtt://127.0.0.1:{free_port()}")
    with pytest.raises(aiomqtt.MqttError) as info:
        async with aiomqtt_client(settings, identifier="t-none", timeout_s=5):
            pass
    error = as_broker_error(info.value, settings)
    assert type(error) is BrokerError


# -- PahoNetworkThread ---------------------------------------------------------------


def _threaded_client(
    settings: Settings, client_id: str, fails: list[OSError], *, buffered: bool = True
) -> tuple[Client, PahoNetworkThread, threading.Event, list[bytes]]:
    client = paho_client(settings, client_id=client_id, buffered=buffered)
    connected = threading.Event()
    received: list[bytes] = []

    def on_connect(c: Client, *_args: object) -> None:
        c.subscribe("t/echo", qos=1)
        connected.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_args: connected.clear()
    client.on_message = lambda _c, _u, message: received.append(bytes(message.payload))
    broker = settings.broker
    client.connect_async(broker.host, broker.port, keepalive=settings.keepalive_s)
    net = PahoNetworkThread(
        client,
        name=f"t-{client_id}",
        backoff=Backoff(initial_s=0.1, maximum_s=0.2),
        on_connect_fail=fails.append,
    )
    return client, net, connected, received


def _wait(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.integration
@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "plain-socket"])
def test_network_thread_carries_publishes_from_other_threads(
    mosquitto: LocalBroker,
    make_settings: Callable[..., Settings],
    buffered: bool,  # noqa: FBT001 (a pytest parameter)
) -> None:
    settings = make_settings(broker_url=mosquitto.url)
    fails: list[OSError] = []
    client, net, connected, received = _threaded_client(settings, "t-net", fails, buffered=buffered)
    net.start()
    try:
        assert connected.wait(10)
        sock = client.socket()
        # The private hook BufferedPahoClient overrides is still called by paho.
        assert isinstance(sock, BufferedSocket) is buffered
        raw = sock.raw if isinstance(sock, BufferedSocket) else sock
        if buffered:
            assert isinstance(raw, socket.socket)
            assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # Published from this thread and from another one: only the network thread
        # writes, woken by the registered write.
        infos = [client.publish("t/echo", b"main", qos=1)]
        other = threading.Thread(
            target=lambda: infos.extend(
                client.publish("t/echo", str(i).encode(), qos=1) for i in range(500)
            )
        )
        other.start()
        other.join()
        assert _wait(lambda: len(received) == 501)
        assert all(info.is_published() for info in infos)
        assert sorted(received[1:], key=int) == [str(i).encode() for i in range(500)]
        assert fails == []
    finally:
        client.disconnect()
        assert net.stop(10)
    assert client.socket() is None


@pytest.mark.integration
def test_network_thread_reconnects_after_a_broker_restart(
    mosquitto: LocalBroker, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(broker_url=mosquitto.url)
    fails: list[OSError] = []
    client, net, connected, received = _threaded_client(settings, "t-net-restart", fails)
    net.start()
    try:
        assert connected.wait(10)
        mosquitto.stop()
        assert _wait(lambda: not connected.is_set())
        assert _wait(lambda: len(fails) >= 1)  # refused while the broker is down
        mosquitto.start()
        assert connected.wait(15)
        client.publish("t/echo", b"again", qos=1)
        assert _wait(lambda: received == [b"again"])
    finally:
        client.disconnect()
        assert net.stop(10)


@pytest.mark.integration
def test_network_thread_stops_while_the_broker_is_unreachable(
    make_settings: Callable[..., Settings],
) -> None:
    from mqfleet.localbroker import free_port  # noqa: PLC0415

    settings = make_settings(broker_url=f"mqtt://127.0.0.1:{free_port()}")
    fails: list[OSError] = []
    _client, net, _connected, _received = _threaded_client(settings, "t-net-none", fails)
    net.start()
    assert _wait(lambda: len(fails) >= 2)  # it keeps retrying, with backoff
    assert all(isinstance(exc, ConnectionRefusedError) for exc in fails)
    assert net.stop(5)  # and stops at once, not after its backoff


# -- BufferedSocket ------------------------------------------------------------------


@pytest.fixture
def socket_pair() -> Iterator[tuple[BufferedSocket, socket.socket]]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)  # noqa: FBT003 (socket's API)
    buffered = BufferedSocket(ours)
    yield buffered, peer
    for sock in (ours, peer):
        sock.close()


def test_buffered_socket_serves_small_reads_from_one_large_read(
    socket_pair: tuple[BufferedSocket, socket.socket],
) -> None:
    buffered, peer = socket_pair
    with pytest.raises(BlockingIOError):
        buffered.recv(1)  # nothing yet: paho retries when select() says readable
    peer.sendall(b"\x30\x05hello\x40\x02")
    time.sleep(0.05)
    assert buffered.recv(1) == b"\x30"
    assert buffered.pending() == 8  # read at once, though paho asked for one byte
    assert buffered.recv(1) == b"\x05"
    assert buffered.recv(5) == b"hello"
    assert buffered.recv(10) == b"\x40\x02"  # never more than what was read
    assert buffered.pending() == 0
    peer.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    assert buffered.recv(1) == b""  # the broker closed: paho sees the connection lost


def test_buffered_socket_writes_only_on_flush(
    socket_pair: tuple[BufferedSocket, socket.socket],
) -> None:
    buffered, peer = socket_pair
    peer.setblocking(False)  # noqa: FBT003
    assert buffered.send(b"\x40\x02\x00\x01") == 4
    assert buffered.send(bytearray(b"\x40\x02\x00\x02")) == 4
    assert buffered.has_output()
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    assert buffered.flush()
    assert not buffered.has_output()
    time.sleep(0.05)
    assert peer.recv(100) == b"\x40\x02\x00\x01\x40\x02\x00\x02"  # in order, together


def test_buffered_socket_keeps_what_a_full_socket_does_not_take(
    socket_pair: tuple[BufferedSocket, socket.socket],
) -> None:
    buffered, peer = socket_pair
    data = os.urandom(4 * 1024 * 1024)
    buffered.send(data)
    assert not buffered.flush()  # the kernel's buffers are full; the rest waits
    assert buffered.has_output()
    received = bytearray()
    peer.settimeout(5)
    while len(received) < len(data):
        received += peer.recv(1 << 20)
        buffered.flush()
    assert bytes(received) == data
    assert not buffered.has_output()


def test_buffered_socket_reports_a_failed_flush_on_the_next_read(
    socket_pair: tuple[BufferedSocket, socket.socket],
) -> None:
    buffered, _peer = socket_pair
    buffered.raw.close()  # as good as a reset connection: send() fails
    buffered.send(b"\x40\x02\x00\x01")
    assert not buffered.flush()
    with pytest.raises(OSError, match="Bad file descriptor"):
        buffered.recv(1)  # where paho handles a lost connection
    with pytest.raises(OSError, match="Bad file descriptor"):
        buffered.send(b"x")


def test_buffered_socket_hands_over_its_output_when_closed(
    socket_pair: tuple[BufferedSocket, socket.socket],
) -> None:
    buffered, peer = socket_pair
    buffered.send(b"\xe0\x00")  # DISCONNECT, written by paho just before close()
    buffered.close()
    peer.settimeout(5)
    assert peer.recv(10) == b"\xe0\x00"
    assert peer.recv(10) == b""
