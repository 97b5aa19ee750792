"""The fleet ACL and password file enforced by a real mosquitto (MQTT 5 clients).

Publishes are QoS 1 so the broker answers each one: reason code 0 (success) or 16 (no
matching subscribers) when allowed, 135 (not authorized) when the ACL denies it.
"""

from __future__ import annotations

import pytest

from mqfleet.protocol import Topics
from mqfleet.security import (
    COLLECTOR_ACCOUNT,
    OPERATOR_ACCOUNT,
    add_account,
    generate_token,
    reload_broker,
    remove_account,
)

from .conftest import wait_for

pytestmark = pytest.mark.integration

ALLOWED = {0, 16}  # success / no matching subscribers
NOT_AUTHORIZED = 135
T = Topics()


def test_anonymous_and_wrong_token_are_refused(secured_broker) -> None:
    assert secured_broker.connect(None).connack == NOT_AUTHORIZED
    assert secured_broker.connect("node-a", "not-the-token").connack == NOT_AUTHORIZED
    # A token is bound to its account: node-b's token does not open node-a.
    assert secured_broker.connect("node-a", secured_broker.tokens["node-b"]).connack != 0
    assert secured_broker.connect("node-a").connack == 0


def test_agent_publishes_only_its_own_topics(secured_broker) -> None:
    a = secured_broker.connect("node-a")
    assert a.publish(T.status("node-a"), retain=True) in ALLOWED
    assert a.publish(T.metrics("node-a")) in ALLOWED
    assert a.publish(T.result("node-a", "c1")) in ALLOWED

    assert a.publish(T.status("node-b"), retain=True) == NOT_AUTHORIZED
    assert a.publish(T.metrics("node-b")) == NOT_AUTHORIZED
    assert a.publish(T.result("node-b", "c1")) == NOT_AUTHORIZED
    assert a.publish(T.collector_status()) == NOT_AUTHORIZED


def test_agent_can_never_publish_a_command(secured_broker) -> None:
    a = secured_broker.connect("node-a")
    assert a.publish(T.commands("node-a")) == NOT_AUTHORIZED
    assert a.publish(T.commands("node-b")) == NOT_AUTHORIZED


def test_client_id_cannot_borrow_another_nodes_rights(secured_broker) -> None:
    # Rights follow the authenticated username (%u), never the self-chosen client id.
    a = secured_broker.connect("node-a", client_id="node-b")
    assert a.connack == 0
    assert a.publish(T.status("node-b")) == NOT_AUTHORIZED
    assert a.publish(T.metrics("node-b")) == NOT_AUTHORIZED


def test_agent_reads_only_its_own_commands(secured_broker) -> None:
    a = secured_broker.connect("node-a")
    a.subscribe(T.commands("node-b"))
    a.subscribe(T.all_commands())
    a.subscribe(T.all_metrics())
    a.subscribe(T.commands("node-a"))
    b = secured_broker.connect("node-b")
    operator = secured_broker.connect(OPERATOR_ACCOUNT)

    assert operator.publish(T.commands("node-b"), b"for b") in ALLOWED
    assert b.publish(T.metrics("node-b")) in ALLOWED
    # Published last: once A has it, anything A could have received has arrived.
    assert operator.publish(T.commands("node-a"), b"for a") == 0
    wait_for(lambda: T.commands("node-a") in a.topics_received(), "node-a's own command")

    assert {m.payload for m in a.messages} == {b"for a"}
    assert all("node-b" not in topic for topic in a.topics_received())


def test_agent_reads_its_own_status_for_the_stale_will_check(secured_broker) -> None:
    a = secured_broker.connect("node-a")
    assert a.publish(T.status("node-a"), b"online", retain=True) in ALLOWED
    a.subscribe(T.status("node-a"))
    wait_for(lambda: T.status("node-a") in a.topics_received(), "own retained status")


def test_operator_publishes_commands_and_reads_everything(secured_broker) -> None:
    operator = secured_broker.connect(OPERATOR_ACCOUNT)
    operator.subscribe(f"{T.prefix}/#")
    a = secured_broker.connect("node-a")
    assert a.publish(T.result("node-a", "c1"), b"result") in ALLOWED
    assert operator.publish(T.commands("node-a")) in ALLOWED
    wait_for(lambda: T.result("node-a", "c1") in operator.topics_received(), "a result")
    # The operator cannot pose as a node.
    assert operator.publish(T.status("node-a")) == NOT_AUTHORIZED
    assert operator.publish(T.metrics("node-a")) == NOT_AUTHORIZED
    assert operator.publish(T.collector_status()) == NOT_AUTHORIZED


def test_collector_reads_all_and_publishes_commands_and_its_status(secured_broker) -> None:
    collector = secured_broker.connect(COLLECTOR_ACCOUNT)
    collector.subscribe(f"{T.prefix}/#")
    a = secured_broker.connect("node-a")
    assert a.publish(T.metrics("node-a"), b"m") in ALLOWED
    wait_for(lambda: T.metrics("node-a") in collector.topics_received(), "a metric")
    assert collector.publish(T.commands("node-a")) in ALLOWED
    assert collector.publish(T.collector_status(), retain=True) in ALLOWED
    assert collector.publish(T.status("node-a")) == NOT_AUTHORIZED
    assert collector.publish(T.result("node-a", "c1")) == NOT_AUTHORIZED


def test_provision_and_revoke_take_effect_on_sighup(secured_broker) -> None:
    token = generate_token()
    assert add_account(secured_broker.password_file, "node-c", token)
    assert secured_broker.connect("node-c", token).connack == NOT_AUTHORIZED  # not reloaded
    assert reload_broker(secured_broker.pid_file)
    wait_for(
        lambda: secured_broker.connect("node-c", token).connack == 0,
        "node-c accepted after reload",
    )
    c = secured_broker.clients[-1]
    assert c.publish(T.metrics("node-c")) in ALLOWED

    assert remove_account(secured_broker.password_file, "node-c")
    assert reload_broker(secured_broker.pid_file)
    # Mosquitto re-checks connected clients on reload: the revoked session is closed.
    wait_for(c.disconnected.is_set, "revoked node-c's connection to be closed")
    wait_for(
        lambda: secured_broker.connect("node-c", token).connack == NOT_AUTHORIZED,
        "node-c refused after revoke",
    )
    # Other accounts are untouched.
    assert secured_broker.connect("node-a").connack == 0
