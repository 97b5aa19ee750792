"""Fixtures for the security tests: a mosquitto with passwords + ACL, MQTT 5 test clients.

MQTT 5 clients on purpose: mosquitto silently drops a denied publish from a 3.1.1 client,
while an MQTT 5 client gets PUBACK reason code 135 (not authorized) for a QoS 1 publish.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTMessage
from paho.mqtt.enums import MQTTProtocolVersion

from mqfleet.localbroker import LocalBroker
from mqfleet.security import (
    COLLECTOR_ACCOUNT,
    OPERATOR_ACCOUNT,
    PasswordFile,
    generate_token,
    render_acl,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

DEADLINE_S = 15.0


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass
class ProbeClient:
    """A paho MQTT 5 client that records CONNACK, PUBACK, SUBACK codes and messages."""

    client: Client
    connack: int | None = None
    disconnected: threading.Event = field(default_factory=threading.Event)
    pubacks: dict[int, int] = field(default_factory=dict)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    messages: list[MQTTMessage] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes = b"x", *, retain: bool = False) -> int:
        """Publish QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        wait_for(lambda: info.mid in self.pubacks, f"PUBACK on {topic}")
        return self.pubacks[info.mid]

    def subscribe(self, topic: str) -> int:
        """Subscribe QoS 1 and return the SUBACK reason code."""
        _, mid = self.client.subscribe(topic, qos=1)
        wait_for(lambda: mid in self.subacks, f"SUBACK on {topic}")
        return self.subacks[mid][0]

    def topics_received(self) -> list[str]:
        return [m.topic for m in list(self.messages)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect_client(
    host: str,
    port: int,
    *,
    username: str | None,
    password: str | None,
    client_id: str | None = None,
    tls: Callable[[Client], None] | None = None,
) -> ProbeClient:
    """Connect an MQTT 5 client; the returned client's ``connack`` is the CONNACK code."""
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    tc = ProbeClient(client)
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        tls(client)

    def on_connect(c: Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        tc.connack = rc.value
        if rc.is_failure:
            c.disconnect()  # stop paho from retrying refused credentials in the background

    def on_disconnect(c: Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if tc.connack is None:
            tc.connack = rc.value
        tc.disconnected.set()
        c.disconnect()  # a probe never reconnects: each test sees one session

    def on_publish(_c: Client, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        tc.pubacks[mid] = rc.value

    def on_subscribe(_c: Client, _u: Any, mid: int, rcs: Any, _p: Any) -> None:
        tc.subacks[mid] = [rc.value for rc in rcs]

    def on_message(_c: Client, _u: Any, msg: MQTTMessage) -> None:
        tc.messages.append(msg)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    wait_for(lambda: tc.connack is not None, "CONNACK")
    return tc


@dataclass
class SecuredBroker:
    """A running mosquitto with allow_anonymous false, a password file and the fleet ACL."""

    broker: LocalBroker
    password_file: Path
    acl_file: Path
    tokens: dict[str, str]
    clients: list[ProbeClient] = field(default_factory=list)

    def connect(
        self, username: str | None, password: str | None = None, **kwargs: Any
    ) -> ProbeClient:
        if username is not None and password is None:
            password = self.tokens[username]
        tc = connect_client(
            self.broker.host, self.broker.port, username=username, password=password, **kwargs
        )
        self.clients.append(tc)
        return tc

    @property
    def pid_file(self) -> Path:
        return self.broker.data_dir / "mosquitto.pid"


@pytest.fixture
def secured_broker(tmp_path: Path) -> Iterator[SecuredBroker]:
    """The shipped config (auth on), accounts node-a, node-b, operator, collector, fleet ACL."""
    tokens = {
        name: generate_token() for name in ("node-a", "node-b", OPERATOR_ACCOUNT, COLLECTOR_ACCOUNT)
    }
    # No extra config: broker/mosquitto.conf itself turns authentication and the ACL on.
    broker = LocalBroker(data_dir=tmp_path / "mosquitto")
    password_file, acl_file = broker.password_file, broker.acl_file
    pwfile = PasswordFile()
    for name, token in tokens.items():
        pwfile.set_password(name, token)
    pwfile.write(password_file)
    acl_file.write_text(render_acl())
    broker.start()
    secured = SecuredBroker(broker, password_file, acl_file, tokens)
    try:
        yield secured
    finally:
        for tc in secured.clients:
            tc.close()
        broker.stop()


@pytest.fixture
def mqtt_connect() -> Iterator[Callable[..., ProbeClient]]:
    """Connect MQTT 5 probe clients to any broker; all are closed after the test."""
    opened: list[ProbeClient] = []

    def factory(host: str, port: int, **kwargs: Any) -> ProbeClient:
        tc = connect_client(host, port, **kwargs)
        opened.append(tc)
        return tc

    yield factory
    for tc in opened:
        tc.close()
