"""TLS: certificates made by broker/make-certs.sh, a real mosquitto TLS listener.

The client side is mqfleet.transport.tls_context (hostname checked, CA from settings).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mqfleet.localbroker import LocalBroker
from mqfleet.security import PasswordFile, generate_token, render_acl
from mqfleet.settings import load_settings
from mqfleet.transport import (
    Backoff,
    BufferedSocket,
    PahoNetworkThread,
    paho_client,
    tls_context,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_broker(tmp_path: Path, tls_listener) -> Iterator[tuple[LocalBroker, int, Path, str]]:
    """Mosquitto with an authenticated TLS listener on a free port; yields the CA file."""
    broker = LocalBroker(data_dir=tmp_path / "mosquitto", extra_config=tls_listener.extra_config)
    token = generate_token()
    pwfile = PasswordFile()
    pwfile.set_password("node-a", token)
    pwfile.write(broker.password_file)
    broker.acl_file.write_text(render_acl())
    broker.start()
    try:
        yield broker, tls_listener.port, tls_listener.ca_file, token
    finally:
        broker.stop()


def tls_for(context: ssl.SSLContext | None):
    def apply(client) -> None:
        assert context is not None
        client.tls_set_context(context)

    return apply


def test_tls_connection_works_with_the_ca(tls_broker, mqtt_connect) -> None:
    _, port, ca, token = tls_broker
    settings = load_settings(broker_url=f"mqtts://127.0.0.1:{port}", ca_file=ca)
    client = mqtt_connect(
        "127.0.0.1", port, username="node-a", password=token, tls=tls_for(tls_context(settings))
    )
    assert client.connack == 0
    assert client.publish("fleet/v1/nodes/node-a/metrics") in {0, 16}


def handshake(context: ssl.SSLContext, port: int, server_hostname: str) -> None:
    """A TLS handshake with the broker, as the MQTT clients do it."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=server_hostname),
    ):
        pass


def test_tls_connection_fails_without_the_ca(tls_broker) -> None:
    _, port, _, _ = tls_broker
    settings = load_settings(broker_url=f"mqtts://127.0.0.1:{port}")  # system CAs only
    context = tls_context(settings)
    assert context is not None
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(context, port, "127.0.0.1")


def test_tls_checks_the_hostname(tls_broker) -> None:
    _, port, ca, _ = tls_broker
    settings = load_settings(broker_url=f"mqtts://broker.invalid:{port}", ca_file=ca)
    context = tls_context(settings)
    assert context is not None
    handshake(context, port, "localhost")  # a name the certificate carries
    # Right CA, wrong name: a certificate for another host of the same CA is refused.
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(context, port, "broker.invalid")


def test_secure_example_refuses_anonymous_on_every_listener(tls_broker, mqtt_connect) -> None:
    broker, port, ca, _ = tls_broker
    settings = load_settings(broker_url=f"mqtts://127.0.0.1:{port}", ca_file=ca)
    over_tls = mqtt_connect(
        "127.0.0.1", port, username=None, password=None, tls=tls_for(tls_context(settings))
    )
    assert over_tls.connack == 135
    # The shipped loopback listener was anonymous before; the example closes it too.
    plain = mqtt_connect(broker.host, broker.port, username=None, password=None)
    assert plain.connack == 135


def test_buffered_network_thread_over_tls(tls_broker) -> None:
    # The collector's client (BufferedPahoClient on PahoNetworkThread) over TLS: large
    # reads of decrypted records, writes flushed per round, both ways.
    broker, port, ca, token = tls_broker
    settings = load_settings(broker_url=f"mqtts://node-a:{token}@127.0.0.1:{port}", ca_file=ca)
    client = paho_client(settings, client_id="node-a", buffered=True)
    topic = "fleet/v1/nodes/node-a/status"
    subscribed = threading.Event()
    received: list[bytes] = []
    client.on_subscribe = lambda *_args: subscribed.set()
    client.on_connect = lambda c, *_args: c.subscribe(topic, qos=1)
    client.on_message = lambda _c, _u, message: received.append(bytes(message.payload))
    client.connect_async("127.0.0.1", port, keepalive=30)
    net = PahoNetworkThread(
        client, name="t-tls", backoff=Backoff(initial_s=0.1), on_connect_fail=lambda _exc: None
    )
    net.start()
    try:
        assert subscribed.wait(10)
        assert isinstance(client.socket(), BufferedSocket)
        payloads = [str(i).encode() * 300 for i in range(300)]  # ~250 KB: many TLS records
        infos = [client.publish(topic, payload, qos=1) for payload in payloads]
        deadline = time.monotonic() + 15
        while len(received) < len(payloads) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert received == payloads
        assert all(info.is_published() for info in infos)
    finally:
        client.disconnect()
        assert net.stop(10)
    assert "node-a" in broker.log_text()
