"""Rendering of the fleet's mosquitto acl_file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqfleet.errors import ConfigError
from mqfleet.security import render_acl

REPO = Path(__file__).resolve().parents[2]


def rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_acl_for_the_default_prefix() -> None:
    assert rules(render_acl()) == [
        "pattern readwrite fleet/v1/nodes/%u/status",
        "pattern write fleet/v1/nodes/%u/metrics",
        "pattern write fleet/v1/nodes/%u/results/+",
        "pattern read fleet/v1/nodes/%u/commands",
        "user operator",
        "topic write fleet/v1/nodes/+/commands",
        "topic read fleet/v1/#",
        "user collector",
        "topic read fleet/v1/#",
        "topic write fleet/v1/nodes/+/commands",
        "topic readwrite fleet/v1/collector/status",
    ]


def test_never_grants_by_client_id() -> None:
    assert "%c" not in "\n".join(rules(render_acl()))


def test_patterns_come_before_any_user_line() -> None:
    # Lines before the first "user" apply to anonymous clients in mosquitto; patterns
    # are global wherever they are, but keeping them first makes the file read true.
    lines = rules(render_acl())
    first_user = next(i for i, line in enumerate(lines) if line.startswith("user "))
    assert all(line.startswith("pattern ") for line in lines[:first_user])
    assert not any(line.startswith("pattern ") for line in lines[first_user:])


def test_custom_prefix() -> None:
    text = render_acl("/acme/fleet/")
    assert "pattern write acme/fleet/nodes/%u/metrics" in text
    assert "topic read acme/fleet/#" in text
    assert "fleet/v1" not in text


@pytest.mark.parametrize("prefix", ["a/+/b", "a/#", "", "a%u", "a b", "a\nuser operator"])
def test_unsafe_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigError):
        render_acl(prefix)


def test_shipped_example_is_current() -> None:
    assert (REPO / "broker" / "acl.example").read_text() == render_acl()
