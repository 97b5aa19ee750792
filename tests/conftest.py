"""Shared fixtures: a private mosquitto per test, SQLite and PostgreSQL databases, keys.

Tests never use the machine's own mosquitto (its config is not ours): each broker is
started from the project's broker/mosquitto.conf on a free loopback port. ``mosquitto``
is the open mode for component tests that are not about security (anonymous clients
welcome); ``secure_mosquitto`` runs the production settings (accounts + ACL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion

from mqfleet.localbroker import LocalBroker, free_port
from mqfleet.protocol import CommandRequest, decode_command, encode
from mqfleet.security import (
    COLLECTOR_ACCOUNT,
    OPERATOR_ACCOUNT,
    add_account,
    broker_url_with_credentials,
    generate_token,
    remove_account,
    render_acl,
    sign_command,
)
from mqfleet.security.signing import save_private_key, save_public_key
from mqfleet.settings import Settings, load_settings
from mqfleet.store.engine import create_store_engine, upgrade

POSTGRES_URL = os.environ.get(
    "MQFLEET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def pytest_configure(config: pytest.Config) -> None:
    """Give the processes the tests start a Ctrl-C that works, as a terminal would.

    A job started in the background of a non-interactive shell (a CI runner, ``nohup
    ... &``) starts with SIGINT ignored (POSIX), and an ignored signal is inherited by
    every child: ``mqfleet up`` would then never see the Ctrl-C its test sends. Python's
    own handler is not inherited (exec resets it to the default), so installing it here
    gives each child the default disposition again.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's config, data dir or MQFLEET_* variables."""
    for key in list(os.environ):
        if key.startswith("MQFLEET_") and key != "MQFLEET_TEST_POSTGRES_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[LocalBroker]:
    """A private mosquitto with the project's config, open mode (anonymous clients allowed)."""
    broker = LocalBroker(data_dir=tmp_path / "mosquitto", auth=False)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def can_log_in(host: str, port: int, username: str | None, password: str | None) -> bool:
    """Whether the broker accepts these credentials now (one MQTT 5 CONNECT, no retry).

    ``username=None`` connects anonymously.
    """
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"probe-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
        reconnect_on_failure=False,
    )
    if username is not None:
        client.username_pw_set(username, password)
    answered = threading.Event()
    accepted: list[bool] = []

    def on_connect(_c: Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        accepted.append(not rc.is_failure)
        answered.set()

    client.on_connect = on_connect
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        answered.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return accepted == [True]


@pytest.fixture
def broker_accepts() -> Callable[[str, int, str | None, str | None], bool]:
    """The :func:`can_log_in` check, for tests (conftest modules are not importable)."""
    return can_log_in


@dataclass
class SecureBroker:
    """A mosquitto running the production auth settings, with helpers to manage accounts."""

    broker: LocalBroker
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        """The broker URL without credentials (anonymous: refused)."""
        return self.broker.url

    def url_for(self, account: str) -> str:
        """The broker URL with ``account``'s credentials."""
        return broker_url_with_credentials(
            self.broker.url, username=account, password=self.tokens[account]
        )

    def provision(self, *accounts: str) -> None:
        """Create accounts (new tokens), reload, and wait until the broker accepts them."""
        for account in accounts:
            self.tokens[account] = generate_token()
            add_account(self.broker.password_file, account, self.tokens[account])
        if self.broker.pid is not None:
            self.broker.reload()
            for account in accounts:
                self._wait(lambda a=account: can_log_in(self.host, self.port, a, self.tokens[a]))

    def revoke(self, account: str) -> None:
        """Remove ``account`` and reload the broker (its live connections are closed)."""
        token = self.tokens.pop(account)
        remove_account(self.broker.password_file, account)
        self.broker.reload()
        self._wait(lambda: not can_log_in(self.host, self.port, account, token))

    @staticmethod
    def _wait(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, "the broker did not take the account change"
            time.sleep(0.05)


@pytest.fixture
def secure_mosquitto(tmp_path: Path) -> Iterator[SecureBroker]:
    """Mosquitto with allow_anonymous false, the fleet ACL and accounts operator, collector.

    ``secure_mosquitto.provision("web-1")`` adds node accounts; ``url_for(name)`` gives
    the broker URL with that account's token.
    """
    broker = LocalBroker(data_dir=tmp_path / "secure-mosquitto")
    broker.data_dir.mkdir(parents=True)
    broker.acl_file.write_text(render_acl())
    secure = SecureBroker(broker)
    secure.provision(OPERATOR_ACCOUNT, COLLECTOR_ACCOUNT)
    broker.start()
    try:
        yield secure
    finally:
        broker.stop()


@dataclass
class OperatorKey:
    """A test operator key pair; agents built by ``make_settings`` trust it."""

    private_key: Ed25519PrivateKey
    private_file: Path
    public_file: Path

    def sign(self, request: CommandRequest) -> CommandRequest:
        return sign_command(request, self.private_key)

    def sign_payload(self, payload: bytes) -> bytes:
        return encode(self.sign(decode_command(payload)))


def trust_key(
    private_key: Ed25519PrivateKey, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> OperatorKey:
    """Save a key pair under ``directory`` and point the MQFLEET_OPERATOR_* settings at it."""
    key = OperatorKey(private_key, directory / "operator.key", directory / "operator.pub")
    save_private_key(private_key, key.private_file)
    save_public_key(private_key.public_key(), key.public_file)
    monkeypatch.setenv("MQFLEET_OPERATOR_PRIVATE_KEY_FILE", str(key.private_file))
    monkeypatch.setenv("MQFLEET_OPERATOR_PUBLIC_KEY_FILE", str(key.public_file))
    return key


@pytest.fixture
def operator_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OperatorKey:
    """A fresh operator key pair that agents trust and the CLI signs with (via MQFLEET_*)."""
    return trust_key(Ed25519PrivateKey.generate(), tmp_path / "operator-keys", monkeypatch)


@pytest.fixture
def trusted_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Ed25519PrivateKey], OperatorKey]:
    """Make the CLI sign with, and agents trust, a key the test module made itself."""
    return lambda key: trust_key(key, tmp_path / "operator-keys", monkeypatch)


def _postgres_available() -> str | None:
    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect():
            return None
    except sa.exc.OperationalError as exc:
        return str(exc.orig).strip().splitlines()[0]
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh, empty SQLite database file."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL schema in database ``test``, dropped afterwards."""
    reason = _postgres_available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {reason}")
        pytest.skip(f"PostgreSQL not reachable: {reason}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on each backend in turn."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """A fresh database on each backend, migrated to head."""
    engine = create_store_engine(database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return database_url


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build settings for a test: private state dir, short keepalive, given overrides."""

    def factory(**overrides: Any) -> Settings:
        overrides.setdefault("state_dir", tmp_path / "agent-state" / overrides.get("node_id", "n"))
        overrides.setdefault("keepalive_s", 2)
        return load_settings(**overrides)

    return factory


@dataclass(frozen=True)
class TlsListener:
    """The shipped TLS listener example, pointed at test certificates and a free port."""

    extra_config: str  # append to a LocalBroker's config
    port: int
    ca_file: Path


@pytest.fixture
def tls_listener(tmp_path: Path) -> TlsListener:
    """Certificates made by broker/make-certs.sh and broker/secure.conf.example for them."""
    repo = Path(__file__).resolve().parents[1]
    certs = tmp_path / "certs"
    subprocess.run(
        ["sh", str(repo / "broker" / "make-certs.sh"), str(certs), "localhost", "127.0.0.1"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    # The shipped example, with its paths and port pointed at this test's files, goes on
    # top of the shipped config (authentication on, password file and ACL in the data dir).
    example = (repo / "broker" / "secure.conf.example").read_text()
    example = example.replace("/etc/mosquitto/mqfleet/certs/", f"{certs}/")
    example = example.replace("listener 8883", f"listener {port} 127.0.0.1")
    return TlsListener(extra_config="\n" + example, port=port, ca_file=certs / "ca.crt")
