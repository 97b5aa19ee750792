"""Wire protocol v1 of mqfleet: topics, payload models, encode/decode.

Everything that goes on the wire goes through this package; it depends on pydantic only.
See docs/PROTOCOL.md for the contract in prose.
"""

from mqfleet.protocol.codec import (
    MAX_PAYLOAD_BYTES,
    decode_collector_status,
    decode_command,
    decode_metrics,
    decode_result,
    decode_status,
    encode,
    truncate_for_log,
)
from mqfleet.protocol.payloads import (
    COMMAND_TERMINAL_STATUSES,
    PROTOCOL_VERSION,
    CollectorStatus,
    CommandFinished,
    CommandRequest,
    CommandResultReport,
    CommandStarted,
    CommandStatus,
    MetricsReport,
    NodeStatus,
    StatusReport,
    utc_now,
)
from mqfleet.protocol.topics import (
    DEFAULT_PREFIX,
    NODE_ID_PATTERN,
    ParsedTopic,
    TopicKind,
    Topics,
    validate_node_id,
)

__all__ = [
    "COMMAND_TERMINAL_STATUSES",
    "DEFAULT_PREFIX",
    "MAX_PAYLOAD_BYTES",
    "NODE_ID_PATTERN",
    "PROTOCOL_VERSION",
    "CollectorStatus",
    "CommandFinished",
    "CommandRequest",
    "CommandResultReport",
    "CommandStarted",
    "CommandStatus",
    "MetricsReport",
    "NodeStatus",
    "ParsedTopic",
    "StatusReport",
    "TopicKind",
    "Topics",
    "decode_collector_status",
    "decode_command",
    "decode_metrics",
    "decode_result",
    "decode_status",
    "encode",
    "truncate_for_log",
    "utc_now",
    "validate_node_id",
]
