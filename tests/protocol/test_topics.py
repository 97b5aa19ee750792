from __future__ import annotations

import pytest

from mqfleet.errors import ProtocolError
from mqfleet.protocol import DEFAULT_PREFIX, ParsedTopic, Topics, validate_node_id


@pytest.fixture
def topics() -> Topics:
    return Topics()


def test_builders_use_the_v1_layout(topics: Topics) -> None:
    assert DEFAULT_PREFIX == "fleet/v1"
    assert topics.status("web-01") == "fleet/v1/nodes/web-01/status"
    assert topics.metrics("web-01") == "fleet/v1/nodes/web-01/metrics"
    assert topics.commands("web-01") == "fleet/v1/nodes/web-01/commands"
    assert topics.result("web-01", "c1") == "fleet/v1/nodes/web-01/results/c1"
    assert topics.collector_status() == "fleet/v1/collector/status"


def test_subscription_filters(topics: Topics) -> None:
    assert topics.all_status() == "fleet/v1/nodes/+/status"
    assert topics.all_metrics() == "fleet/v1/nodes/+/metrics"
    assert topics.all_commands() == "fleet/v1/nodes/+/commands"
    assert topics.all_results() == "fleet/v1/nodes/+/results/+"
    assert topics.node_results("a") == "fleet/v1/nodes/a/results/+"


def test_custom_prefix_is_normalised() -> None:
    topics = Topics("/acme/fleet/v1/")
    assert topics.prefix == "acme/fleet/v1"
    assert topics.status("n") == "acme/fleet/v1/nodes/n/status"
    assert topics.parse("acme/fleet/v1/nodes/n/metrics") == ParsedTopic("metrics", "n")


@pytest.mark.parametrize("prefix", ["", "/", "fleet/+", "fleet/#", "a\0b"])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ProtocolError, match="invalid topic prefix"):
        Topics(prefix)


def test_parse_round_trips_every_builder(topics: Topics) -> None:
    assert topics.parse(topics.status("a.b_c-1")) == ParsedTopic("status", "a.b_c-1")
    assert topics.parse(topics.metrics("n")) == ParsedTopic("metrics", "n")
    assert topics.parse(topics.commands("n")) == ParsedTopic("commands", "n")
    command_id = "0b0d4a8e-4a3b-4d1e-9a5e-1f2d3c4b5a69"
    assert topics.parse(topics.result("n", command_id)) == ParsedTopic("result", "n", command_id)
    assert topics.parse(topics.collector_status()) == ParsedTopic("collector_status")


@pytest.mark.parametrize(
    "node_id",
    ["a", "A" * 64, "web-01", "db_2.example", "0", "-", "..."],
)
def test_valid_node_ids(node_id: str) -> None:
    assert validate_node_id(node_id) == node_id


@pytest.mark.parametrize(
    "node_id",
    ["", "A" * 65, "a/b", "a+b", "a#", "+", "#", "a b", "é", "a\nb", "a\0b", "a:b"],
)
def test_bad_node_ids_are_refused_everywhere(topics: Topics, node_id: str) -> None:
    with pytest.raises(ProtocolError, match="invalid node id"):
        validate_node_id(node_id)
    for build in (topics.status, topics.metrics, topics.commands, topics.node_results):
        with pytest.raises(ProtocolError, match="invalid node id"):
            build(node_id)
    with pytest.raises(ProtocolError, match="invalid node id"):
        topics.result(node_id, "c1")


def test_node_id_error_is_one_line_and_short() -> None:
    with pytest.raises(ProtocolError) as info:
        validate_node_id("x\n" * 500)
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("command_id", ["", "a/b", "+", "#", "x" * 65])
def test_bad_command_ids_are_refused(topics: Topics, command_id: str) -> None:
    with pytest.raises(ProtocolError, match="invalid command id"):
        topics.result("n", command_id)


@pytest.mark.parametrize(
    "topic",
    [
        # wildcards are filters, never topics a message arrives on
        "fleet/v1/nodes/+/status",
        "fleet/v1/nodes/#",
        "fleet/v1/nodes/n/results/+",
        "fleet/v1/nodes/n/results/#",
        "fleet/v1/#",
    ],
)
def test_parse_refuses_wildcards(topics: Topics, topic: str) -> None:
    with pytest.raises(ProtocolError) as info:
        topics.parse(topic)
    assert info.value.topic == topic


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "fleet/v1",
        "fleet/v1/nodes",
        "fleet/v1/nodes/n",
        "fleet/v1/nodes/n/status/extra",
        "fleet/v1/nodes//status",
        "fleet/v1/nodes/n/unknown",
        "fleet/v1/nodes/n/results",
        "fleet/v1/nodes/n/results/c1/extra",
        "fleet/v1/collector",
        "fleet/v1/collector/status/x",
        "fleet/v2/nodes/n/status",
        "other/v1/nodes/n/status",
        "xfleet/v1/nodes/n/status",
        "/fleet/v1/nodes/n/status",
        "$SYS/broker/uptime",
        "fleet/v1/nodes/a b/status",
        "fleet/v1/nodes/" + "a" * 65 + "/status",
    ],
)
def test_parse_refuses_foreign_and_malformed_topics(topics: Topics, topic: str) -> None:
    with pytest.raises(ProtocolError) as info:
        topics.parse(topic)
    assert info.value.topic == topic
    assert "\n" not in str(info.value)


def test_prefix_is_matched_literally() -> None:
    # A "." in the prefix is not a regex wildcard.
    topics = Topics("fleet.v1")
    with pytest.raises(ProtocolError):
        topics.parse("fleetXv1/nodes/n/status")
    assert topics.parse("fleet.v1/nodes/n/status") == ParsedTopic("status", "n")
