"""docs/PROTOCOL.md stays true: its examples decode and its limits match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mqfleet.protocol import (
    DEFAULT_PREFIX,
    MAX_PAYLOAD_BYTES,
    Topics,
    decode_collector_status,
    decode_command,
    decode_metrics,
    decode_result,
    decode_status,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
TEXT = DOC.read_text()
EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```json\n(.*?)\n```", re.DOTALL)
DECODERS = {
    "status": decode_status,
    "metrics": decode_metrics,
    "collector_status": decode_collector_status,
    "commands": decode_command,
    "result": decode_result,
}
EXAMPLES = EXAMPLE.findall(TEXT)


def test_every_json_block_is_a_checked_example() -> None:
    assert TEXT.count("```json") == len(EXAMPLES)
    assert {kind for kind, _ in EXAMPLES} == set(DECODERS)


@pytest.mark.parametrize(("kind", "payload"), EXAMPLES)
def test_examples_decode(kind: str, payload: str) -> None:
    report = DECODERS[kind](payload.encode())
    assert report.v == 1


def test_documented_size_limits_match_the_code() -> None:
    def human(size: int) -> str:
        return f"{size // (1024 * 1024)} MiB" if size >= 1024 * 1024 else f"{size // 1024} KiB"

    for kind, limit in MAX_PAYLOAD_BYTES.items():
        assert human(limit) in TEXT, f"{kind} limit {human(limit)} not documented"


def test_documented_topics_match_the_builders() -> None:
    topics = Topics()
    assert DEFAULT_PREFIX in TEXT
    for topic in (
        topics.collector_status(),
        topics.all_status(),
        topics.all_metrics(),
        topics.all_commands(),
        topics.all_results(),
    ):
        assert f"`{topic}`" in TEXT, topic
    for leaf in ("status", "metrics", "commands", "results/{command_id}"):
        assert f"`fleet/v1/nodes/{{node_id}}/{leaf}`" in TEXT
