"""The collector's database side: decode a batch of messages and commit it in one go.

Everything here is synchronous and runs on the collector's single database thread, so
the writer, the staleness check, command expiry and retention never race each other
for a row (and one collector process never sees two writers of its own at once).

Several collectors (or the workers of ``collector --workers N``) may share one database
(docs/SCALING.md). Every write that moves a state is therefore conditional in its own
WHERE clause (session, command status, heartbeat), which PostgreSQL re-checks after
waiting for a concurrent transaction's row lock: of two collectors applying the same
change, exactly one wins, and only the winner redelivers, expires or reports. On SQLite
(one host) each transaction holds the write lock from its ``BEGIN IMMEDIATE``
(store.engine's writer engines), so collectors' transactions simply run one by one.

Every write is idempotent: a batch that is retried after a transient error, or a QoS 1
message the broker delivers twice, never creates a second row or moves a state back.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError

from mqfleet.errors import ProtocolError
from mqfleet.protocol import (
    COMMAND_TERMINAL_STATUSES,
    ERROR_NOT_DELIVERED,
    REASON_HEARTBEAT_TIMEOUT,
    CommandFinished,
    CommandRequest,
    CommandStarted,
    MetricsReport,
    ParsedTopic,
    StatusReport,
    Topics,
    decode_command,
    decode_metrics,
    decode_result,
    decode_status,
    truncate_for_log,
    utc_now,
)
from mqfleet.store.models import Command, CommandResult, Node, NodeMetric, UTCDateTime, metadata
from mqfleet.store.reader import postgres_time, sqlite_time_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from sqlalchemy.engine import Connection, Dialect, Engine

__all__ = [
    "EXPIRED_ERROR",
    "HEARTBEAT_TIMEOUT",
    "UNKNOWN_IP",
    "BatchOutcome",
    "Inbound",
    "Redelivery",
    "StoreWriter",
]

log = logging.getLogger(__name__)

#: ``status_reason`` of a node that went silent for 3 x its interval.
HEARTBEAT_TIMEOUT: Final = REASON_HEARTBEAT_TIMEOUT
#: ``command_results.error`` of a command that stayed pending until it expired.
EXPIRED_ERROR: Final = ERROR_NOT_DELIVERED
#: ``ip_address`` of a node known only from its metrics (the column is NOT NULL).
UNKNOWN_IP: Final = "unknown"
#: A node is silent after this many intervals without a message.
SILENCE_INTERVALS: Final = 3

_NODES: Final = metadata.tables[Node.__tablename__]
_METRICS: Final = metadata.tables[NodeMetric.__tablename__]
_COMMANDS: Final = metadata.tables[Command.__tablename__]
_RESULTS: Final = metadata.tables[CommandResult.__tablename__]
_LIVE_STATUSES: Final = ("online", "error")
_TOPIC_CACHE_SIZE: Final = 100_000
#: What the metrics insert binds per row, in the table's column order (``id`` is the key).
_METRIC_COLUMNS: Final = (
    "node_id",
    "metric_time",
    "cpu_usage",
    "memory_usage",
    "disk_usage",
    "load_average",
    "created_at",
    "session",
    "seq",
)


#: Node ids per ``IN (...)`` lookup: far below SQLite's and PostgreSQL's parameter limits.
_LOOKUP_CHUNK: Final = 500


class Inbound(NamedTuple):
    """One MQTT message as paho handed it over, waiting for its row to be committed."""

    # A named tuple, not a frozen dataclass: paho's thread makes one per message, and
    # a tuple costs a third of the frozen dataclass's __init__.

    #: None when the topic was not valid UTF-8 (paho raises on access).
    topic: str | None
    payload: bytes
    mid: int
    qos: int
    #: True when the broker replayed a retained message on (re)subscribe.
    retain: bool
    #: ``time.time()`` when paho handed it over: the node's heartbeat.
    received_at: float
    #: The broker connection it arrived on; an ack is only valid on that connection.
    generation: int


@dataclass(frozen=True, slots=True)
class Redelivery:
    """A pending command to publish again because its node came back."""

    command_id: str
    topic: str
    payload: bytes
    #: Seconds until ``expires_at`` (MQTT 5 Message Expiry Interval), at least 1.
    expires_in_s: int


@dataclass(slots=True)
class BatchOutcome:
    """What committing one batch did, for the collector's counters and follow-ups."""

    metrics: int = 0
    statuses: int = 0
    commands: int = 0
    results: int = 0
    invalid: int = 0
    skipped: int = 0
    redeliveries: list[Redelivery] = field(default_factory=list)


class _Decoded(NamedTuple):
    # A named tuple: one per message, cheaper to make than a frozen dataclass.
    kind: str
    report: MetricsReport | StatusReport | CommandRequest | CommandStarted | CommandFinished
    received_at: datetime
    retain: bool
    payload: bytes
    topic: str


def _clean(text: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; JSON can ("\u0000"). Store the replacement
    # character on every backend so both show the same thing.
    return None if text is None else text.replace("\x00", "\ufffd")


class _MetricsInsert:
    """The metrics ``INSERT ... ON CONFLICT DO NOTHING``, compiled once, fed bound rows.

    Metrics are nearly every row the collector writes. SQLAlchemy still writes the SQL
    (ON CONFLICT, PostgreSQL's casts), but the rows skip its per-row parameter
    processing, which was the database thread's hottest Python work, done holding the
    GIL that paho's network thread (the bottleneck) needs. Rows are tuples in
    ``_METRIC_COLUMNS`` order with times bound by :attr:`bind_time` as ``UTCDateTime``
    binds them (tests/collector/test_metrics_insert.py reads both back alike).

    * SQLite: the driver's ``executemany`` of the tuples (``sqlite3`` binds them in C).
    * PostgreSQL: one statement that unnests one array per column. psycopg's
      ``executemany`` costs several microseconds of Python per row even in pipeline
      mode, and its text arrays one regex per element; binary arrays (``%b``) are
      dumped in C: about a third of the CPU per row, and one round trip per batch.
    """

    def __init__(self, dialect: Dialect) -> None:
        """Compile the insert for ``dialect`` (SQLite or PostgreSQL)."""
        names = list(_METRIC_COLUMNS)
        statement: postgresql.Insert | sqlite.Insert
        if dialect.name == "postgresql":
            arrays = [
                sa.bindparam(name, type_=postgresql.ARRAY(_METRICS.c[name].type)) for name in names
            ]
            sample = sa.func.unnest(*arrays).table_valued(*names).render_derived(name="sample")
            statement = postgresql.insert(_METRICS).from_select(names, sa.select(sample))
            self.bind_time: Callable[[datetime], object] = postgres_time
        else:
            statement = sqlite.insert(_METRICS)
            self.bind_time = sqlite_time_text
        self._by_column = dialect.name == "postgresql"
        if not dialect.positional:
            # Compile for a positional paramstyle: psycopg takes %s with a sequence.
            dialect = type(dialect)(paramstyle="format")  # type: ignore[call-arg]
        compiled = statement.on_conflict_do_nothing(
            index_elements=["node_id", "session", "seq"]
        ).compile(dialect=dialect, column_keys=names, for_executemany=True)
        if compiled.positiontup != names:
            msg = f"the metrics insert binds {compiled.positiontup}, not {names}"
            raise RuntimeError(msg)
        sql = str(compiled)
        if self._by_column:
            if "%%" in sql or sql.count("%s") != len(names):
                msg = f"unexpected placeholders in the metrics insert: {sql}"
                raise RuntimeError(msg)
            sql = sql.replace("%s", "%b")  # psycopg: send this parameter in binary
        self.sql = sql

    def execute(self, conn: Connection, rows: list[tuple[object, ...]]) -> None:
        """Insert ``rows`` (not empty); a sample already stored is skipped."""
        if self._by_column:
            columns = tuple(list(column) for column in zip(*rows, strict=True))
            conn.exec_driver_sql(self.sql, columns)
        else:
            conn.exec_driver_sql(self.sql, rows)


def _skip(msg: Inbound, reason: str) -> None:
    log.warning(
        "skipped message on %s: %s; payload %s",
        truncate_for_log(msg.topic or "<topic not UTF-8>"),
        reason,
        truncate_for_log(msg.payload),
    )


class StoreWriter:
    """Applies decoded fleet messages to the database; one instance per collector."""

    def __init__(self, engine: Engine, *, topics: Topics, default_interval_s: float) -> None:
        """Write through ``engine``; ``default_interval_s`` applies to nodes without one."""
        self._engine = engine
        self._topics = topics
        self._default_interval_s = default_interval_s
        # Topics repeat (one per node and kind): parse each once.
        self._parsed_topics: dict[str, ParsedTopic] = {}
        self._dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self._insert_metrics = _MetricsInsert(engine.dialect)
        self._insert_node = self._dialect.insert(_NODES).on_conflict_do_nothing(
            index_elements=["node_id"]
        )
        self._insert_command = self._dialect.insert(_COMMANDS).on_conflict_do_nothing(
            index_elements=["command_id"]
        )
        self._insert_result = self._dialect.insert(_RESULTS).on_conflict_do_nothing(
            index_elements=["command_id"]
        )
        self._build_command_statements()
        hb = sa.bindparam("b_hb", type_=UTCDateTime())
        self._touch_heartbeat = (
            sa.update(_NODES)
            .where(_NODES.c.node_id == sa.bindparam("b_node"))
            .where(sa.or_(_NODES.c.last_heartbeat.is_(None), _NODES.c.last_heartbeat < hb))
            .values(last_heartbeat=hb)
        )

    def _build_command_statements(self) -> None:
        """Build the command path's statements once, with bound parameters.

        Built per message, each statement cost SQLAlchemy ~0.3 ms of construction and
        cache-key work: 3,000 messages of a 1,000-node ``run --all`` took ~3 s to store.
        Reused, each is compiled and keyed once.
        """
        cid: sa.BindParameter[str] = sa.bindparam("b_cid")
        time_type = UTCDateTime()
        self._known_nodes = sa.select(_NODES.c.node_id).where(
            _NODES.c.node_id.in_(sa.bindparam("b_nodes", expanding=True))
        )
        self._select_command = sa.select(
            _COMMANDS.c.status, _COMMANDS.c.started_at, _COMMANDS.c.payload
        ).where(_COMMANDS.c.command_id == cid)
        # What only the command message knows, over a placeholder its result made.
        self._fill_command = (
            sa.update(_COMMANDS)
            .where(_COMMANDS.c.command_id == cid)
            .values(
                command_text=sa.bindparam("b_text"),
                created_at=sa.bindparam("b_created", type_=time_type),
                expires_at=sa.bindparam("b_expires", type_=time_type),
                timeout_s=sa.bindparam("b_timeout"),
                issuer=sa.bindparam("b_issuer"),
                batch_id=sa.bindparam("b_batch"),
                payload=sa.bindparam("b_payload"),
            )
        )
        # Forward only, re-checked by the UPDATE itself (see _advance_command); a None
        # start keeps the one the row has.
        finish = (
            sa.update(_COMMANDS)
            .where(_COMMANDS.c.command_id == cid)
            .where(_COMMANDS.c.status.not_in(COMMAND_TERMINAL_STATUSES))
            .values(
                status=sa.bindparam("b_status"),
                started_at=sa.func.coalesce(
                    sa.bindparam("b_started", type_=time_type), _COMMANDS.c.started_at
                ),
                completed_at=sa.bindparam("b_completed", type_=time_type),
            )
        )
        self._finish_command = finish
        self._start_command = finish.where(_COMMANDS.c.status == "pending")
        self._late_start = (
            sa.update(_COMMANDS)
            .where(_COMMANDS.c.command_id == cid)
            .where(_COMMANDS.c.started_at.is_(None))
            .values(started_at=sa.bindparam("b_started", type_=time_type))
        )

    # -- the batch ------------------------------------------------------------------
    def write_batch(self, batch: Sequence[Inbound]) -> BatchOutcome:
        """Decode and commit ``batch``; invalid messages are logged, counted and skipped.

        Raises SQLAlchemy errors other than integrity/data errors: the caller retries
        the whole batch (nothing of it is acknowledged yet, and every write is
        idempotent).
        """
        outcome = BatchOutcome()
        decoded = self._decode(batch, outcome)
        if not decoded:
            return outcome
        try:
            with self._engine.begin() as conn:
                self._apply(conn, decoded, outcome)
        except (IntegrityError, DataError) as exc:
            # One message the database refuses must not hold the others back: write
            # them one per transaction and skip only the ones refused on their own.
            log.warning(
                "database refused a batch of %d (%s); writing it message by message",
                len(decoded),
                str(exc.orig).splitlines()[0] if exc.orig else exc,
            )
            outcome = BatchOutcome(invalid=outcome.invalid)
            for item in decoded:
                try:
                    with self._engine.begin() as conn:
                        self._apply(conn, [item], outcome)
                except (IntegrityError, DataError) as item_exc:
                    outcome.invalid += 1
                    log.warning(
                        "database refused message on %s: %s; payload %s",
                        truncate_for_log(item.topic),
                        str(item_exc.orig).splitlines()[0] if item_exc.orig else item_exc,
                        truncate_for_log(item.payload),
                    )
        return outcome

    def _decode(self, batch: Sequence[Inbound], outcome: BatchOutcome) -> list[_Decoded]:
        decoded: list[_Decoded] = []
        for msg in batch:
            if msg.topic is None:
                outcome.invalid += 1
                _skip(msg, "topic is not valid UTF-8")
                continue
            try:
                item = self._decode_one(msg, msg.topic)
            except ProtocolError as exc:
                outcome.invalid += 1
                _skip(msg, str(exc))
                continue
            if item is not None:
                decoded.append(item)
        return decoded

    def _decode_one(self, msg: Inbound, topic: str) -> _Decoded | None:
        parsed = self._parsed_topics.get(topic)
        if parsed is None:
            parsed = self._topics.parse(topic)
            if len(self._parsed_topics) >= _TOPIC_CACHE_SIZE:
                self._parsed_topics.clear()
            self._parsed_topics[topic] = parsed
        report: MetricsReport | StatusReport | CommandRequest | CommandStarted | CommandFinished
        if parsed.kind == "metrics":
            report = decode_metrics(msg.payload)
        elif parsed.kind == "status":
            report = decode_status(msg.payload)
        elif parsed.kind == "commands":
            report = decode_command(msg.payload)
        elif parsed.kind == "result":
            report = decode_result(msg.payload)
            if report.command_id != parsed.command_id:
                raise ProtocolError(
                    f"command_id {report.command_id!r} does not match the topic's "
                    f"{parsed.command_id!r}"
                )
        else:  # our own collector status: not fleet data
            return None
        if report.node_id != parsed.node_id:
            raise ProtocolError(
                f"node_id {report.node_id!r} does not match the topic's {parsed.node_id!r}"
            )
        received = datetime.fromtimestamp(msg.received_at, UTC)
        return _Decoded(parsed.kind, report, received, msg.retain, msg.payload, topic)

    def _apply(self, conn: Connection, items: Iterable[_Decoded], outcome: BatchOutcome) -> None:
        heartbeats: dict[str, datetime] = {}
        metrics: list[tuple[MetricsReport, datetime]] = []
        items = list(items)
        # The nodes commands and results name, looked up once for the batch (a node born
        # later in the batch is looked up again, see _node_exists).
        named = {
            i.report.node_id
            for i in items
            if isinstance(i.report, (CommandRequest, CommandStarted, CommandFinished))
        }
        known = self._existing_nodes(conn, named)
        # Status, commands and results in arrival order; metrics after them in bulk, so
        # a birth in the same batch registers its node before the metrics need it.
        for item in items:
            report = item.report
            if isinstance(report, MetricsReport):
                metrics.append((report, item.received_at))
            elif isinstance(report, StatusReport):
                outcome.statuses += 1
                self._apply_status(conn, report, item, heartbeats, outcome)
            elif isinstance(report, CommandRequest):
                outcome.commands += 1
                self._record_command(conn, report, item, outcome, known)
            else:
                outcome.results += 1
                self._apply_result(conn, report, item, outcome, known)
                heartbeats[report.node_id] = max(
                    item.received_at, heartbeats.get(report.node_id, item.received_at)
                )
        if metrics:
            outcome.metrics += len(metrics)
            self._write_metrics(conn, metrics, heartbeats)
        if heartbeats:
            # In node order: several collectors (--workers, collector_group) then lock the
            # same rows in the same order and cannot deadlock each other on PostgreSQL.
            conn.execute(
                self._touch_heartbeat,
                [{"b_node": node, "b_hb": hb} for node, hb in sorted(heartbeats.items())],
            )

    # -- nodes ----------------------------------------------------------------------
    def _apply_status(
        self,
        conn: Connection,
        report: StatusReport,
        item: _Decoded,
        heartbeats: dict[str, datetime],
        outcome: BatchOutcome,
    ) -> None:
        now = utc_now()
        row = conn.execute(
            sa.select(_NODES.c.session, _NODES.c.status, _NODES.c.status_reason).where(
                _NODES.c.node_id == report.node_id
            )
        ).first()
        known = {
            "hostname": _clean(report.hostname),
            "ip_address": _clean(report.ip_address),
            "os_info": _clean(report.os_info),
            "interval_s": report.interval_s,
            "agent_version": _clean(report.agent_version),
        }
        if row is None:
            values = {k: v for k, v in known.items() if v is not None}
            values.setdefault("hostname", report.node_id)
            values.setdefault("ip_address", UNKNOWN_IP)
            inserted = conn.execute(
                self._insert_node.values(
                    node_id=report.node_id,
                    status=report.status,
                    session=report.session,
                    status_reason=_clean(report.reason),
                    registered_at=now,
                    updated_at=now,
                    last_heartbeat=item.received_at,
                    **values,
                )
            )
            if inserted.rowcount:
                log.info("node %s registered (%s)", report.node_id, report.status)
                return
            # Another collector registered it a moment ago (from this birth or from a
            # metric that reached it first): apply this status over its row.
            row = conn.execute(
                sa.select(_NODES.c.session, _NODES.c.status, _NODES.c.status_reason).where(
                    _NODES.c.node_id == report.node_id
                )
            ).first()
            if row is None:  # deleted meanwhile: nothing to update
                return
        if report.session < row.session:
            # The classic race: an old connection's Will arrives after the new birth.
            log.debug("ignored stale %s status of %s", report.status, report.node_id)
            return
        if (
            item.retain
            and report.session == row.session
            and (
                report.status == row.status
                or (report.status == "online" and row.status_reason == HEARTBEAT_TIMEOUT)
            )
        ):
            # A retained replay (we resubscribed) that tells us nothing new; it is
            # not a sign of life, so it must not revive a node that went silent.
            return
        values = {k: v for k, v in known.items() if v is not None}
        update = (
            sa.update(_NODES)
            .where(_NODES.c.node_id == report.node_id)
            .values(
                status=report.status,
                session=report.session,
                status_reason=_clean(report.reason),
                updated_at=now,
                **values,
            )
        )
        # Conditional on the session the row holds *now*, not when we read it: several
        # collectors apply every status, and PostgreSQL re-checks the WHERE clause of an
        # UPDATE that waited for another transaction's row lock. So an older session
        # never overwrites a newer one, and exactly one collector advances a session
        # (and so redelivers the node's pending commands once).
        advanced = report.session > row.session
        if advanced:
            advanced = bool(conn.execute(update.where(_NODES.c.session < report.session)).rowcount)
        if (
            not advanced
            and not conn.execute(update.where(_NODES.c.session == report.session)).rowcount
        ):
            log.debug("ignored stale %s status of %s", report.status, report.node_id)
            return
        if not item.retain:
            heartbeats[report.node_id] = max(
                item.received_at, heartbeats.get(report.node_id, item.received_at)
            )
        if report.status == "online" and advanced:
            outcome.redeliveries.extend(self._pending_commands(conn, report.node_id, now))

    def _write_metrics(
        self,
        conn: Connection,
        metrics: list[tuple[MetricsReport, datetime]],
        heartbeats: dict[str, datetime],
    ) -> None:
        node_ids = {report.node_id for report, _ in metrics}
        rows = conn.execute(
            sa.select(
                _NODES.c.node_id,
                _NODES.c.status,
                _NODES.c.session,
                _NODES.c.status_reason,
                _NODES.c.last_heartbeat,
                _NODES.c.interval_s,
            ).where(_NODES.c.node_id.in_(node_ids))
        ).all()
        known = {row.node_id: row for row in rows}
        # The session of each node that is offline only for its silence, read off the
        # rows once per batch, not once per sample.
        silent = {
            row.node_id: row.session
            for row in rows
            if row.status == "offline" and row.status_reason == HEARTBEAT_TIMEOUT
        }
        now = utc_now()
        bind_time = self._insert_metrics.bind_time
        # created_at: one now() per batch (the column default is a Python now() per row,
        # not the server's, so CURRENT_TIMESTAMP text never appears here), bound once.
        created_at = bind_time(now)
        revive: set[str] = set()
        created: set[str] = set()
        rows_out: list[tuple[object, ...]] = []
        for report, received in metrics:
            node_id = report.node_id
            if node_id not in known and node_id not in created:
                # Metrics from a node whose birth we never saw: register it from what
                # we know; its birth fills in the rest when it comes.
                conn.execute(
                    self._insert_node.values(
                        node_id=node_id,
                        hostname=node_id,
                        ip_address=UNKNOWN_IP,
                        status="online",
                        session=report.session,
                        registered_at=now,
                        updated_at=now,
                        last_heartbeat=received,
                    )
                )
                created.add(node_id)
                log.info("node %s registered from its metrics", node_id)
            elif silent.get(node_id) == report.session:
                # Silence was the only evidence against it: fresh samples from the same
                # connection prove it alive (a hung agent recovered, or we were away).
                revive.add(node_id)
            prev = heartbeats.get(node_id)
            if prev is None or received > prev:
                heartbeats[node_id] = received
            rows_out.append(  # in _METRIC_COLUMNS order
                (
                    node_id,
                    bind_time(report.ts),
                    report.cpu_usage,
                    report.memory_usage,
                    report.disk_usage,
                    report.load_average,
                    created_at,
                    report.session,
                    report.seq,
                )
            )
        for node_id, row in known.items():
            # A heartbeat a fraction of an interval old is fresh enough for the 3 x
            # interval silence check: skipping its UPDATE halves the writes of a busy
            # batch (a backlog drain carries many samples per node).
            hb = heartbeats.get(node_id)
            if hb is not None and row.last_heartbeat is not None and node_id not in revive:
                slack = min(1.0, (row.interval_s or self._default_interval_s) / 4)
                if (hb - row.last_heartbeat).total_seconds() < slack:
                    del heartbeats[node_id]
        if revive:
            conn.execute(
                sa.update(_NODES)
                .where(_NODES.c.node_id.in_(revive))
                .where(_NODES.c.status_reason == HEARTBEAT_TIMEOUT)
                .values(status="online", status_reason=None, updated_at=now)
            )
        self._insert_metrics.execute(conn, rows_out)

    def _pending_commands(self, conn: Connection, node_id: str, now: datetime) -> list[Redelivery]:
        rows = conn.execute(
            sa.select(_COMMANDS.c.command_id, _COMMANDS.c.payload, _COMMANDS.c.expires_at)
            .where(_COMMANDS.c.target_node_id == node_id)
            .where(_COMMANDS.c.status == "pending")
            .where(_COMMANDS.c.payload.is_not(None))
            .where(_COMMANDS.c.expires_at > now)
            .order_by(_COMMANDS.c.created_at, _COMMANDS.c.id)
        ).all()
        topic = self._topics.commands(node_id)
        return [
            Redelivery(
                command_id=row.command_id,
                topic=topic,
                payload=row.payload.encode(),
                expires_in_s=max(1, math.ceil((row.expires_at - now).total_seconds())),
            )
            for row in rows
        ]

    def _existing_nodes(self, conn: Connection, node_ids: set[str]) -> set[str]:
        found: set[str] = set()
        ids = sorted(node_ids)
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start : start + _LOOKUP_CHUNK]
            found.update(conn.execute(self._known_nodes, {"b_nodes": chunk}).scalars())
        return found

    def _node_exists(self, conn: Connection, node_id: str, known: set[str]) -> bool:
        # Nodes are never deleted by the collector, so one seen in this transaction
        # stays; one not seen yet may have been born earlier in this batch.
        if node_id in known:
            return True
        if self._existing_nodes(conn, {node_id}):
            known.add(node_id)
            return True
        return False

    # -- commands -------------------------------------------------------------------
    def _record_command(
        self,
        conn: Connection,
        report: CommandRequest,
        item: _Decoded,
        outcome: BatchOutcome,
        known: set[str],
    ) -> None:
        if not self._node_exists(conn, report.node_id, known):
            outcome.skipped += 1
            log.warning("command %s for unknown node %s skipped", report.command_id, report.node_id)
            return
        details = {
            "command_text": _clean(report.command_text),
            "created_at": report.created_at,
            "expires_at": report.expires_at,
            "timeout_s": report.timeout_s,
            "issuer": _clean(report.issuer),
            "batch_id": report.batch_id,
            "payload": item.payload.decode("utf-8", "replace"),
        }
        row = conn.execute(self._select_command, {"b_cid": report.command_id}).first()
        if row is None:
            conn.execute(
                self._insert_command,
                {
                    "command_id": report.command_id,
                    "target_node_id": report.node_id,
                    "status": "pending",
                    **details,
                },
            )
        elif row.payload is None:
            # Its result came first and made a placeholder: fill in what only the
            # command knows, and leave the status where the result put it.
            conn.execute(
                self._fill_command,
                {
                    "b_cid": report.command_id,
                    "b_text": details["command_text"],
                    "b_created": details["created_at"],
                    "b_expires": details["expires_at"],
                    "b_timeout": details["timeout_s"],
                    "b_issuer": details["issuer"],
                    "b_batch": details["batch_id"],
                    "b_payload": details["payload"],
                },
            )
        # else: a duplicate (QoS 1 redelivery or our own republish): nothing to do.

    def _apply_result(
        self,
        conn: Connection,
        report: CommandStarted | CommandFinished,
        item: _Decoded,
        outcome: BatchOutcome,
        known: set[str],
    ) -> None:
        if not self._node_exists(conn, report.node_id, known):
            outcome.skipped += 1
            log.warning(
                "result of command %s from unknown node %s skipped",
                report.command_id,
                report.node_id,
            )
            return
        row = conn.execute(self._select_command, {"b_cid": report.command_id}).first()
        completed_at = report.completed_at if isinstance(report, CommandFinished) else None
        if row is None:
            # The result overtook its command: record what we know; the command
            # message fills in the rest without moving the status back.
            inserted = conn.execute(
                self._insert_command,
                {
                    "command_id": report.command_id,
                    "command_text": "",
                    "target_node_id": report.node_id,
                    "status": report.status,
                    "created_at": item.received_at,
                    "started_at": report.started_at,
                    "completed_at": completed_at,
                },
            )
            if not inserted.rowcount:  # another collector recorded it a moment ago
                row = conn.execute(self._select_command, {"b_cid": report.command_id}).first()
        if row is not None:
            self._advance_command(conn, report, row, completed_at)
        if isinstance(report, CommandFinished):
            conn.execute(
                self._insert_result,
                {
                    "command_id": report.command_id,
                    "stdout": _clean(report.stdout),
                    "stderr": _clean(report.stderr),
                    "exit_code": report.exit_code,
                    "execution_time_ms": report.execution_time_ms,
                    "created_at": item.received_at,
                    "error": _clean(report.error),
                    "stdout_truncated": report.stdout_truncated,
                    "stderr_truncated": report.stderr_truncated,
                },
            )

    def _advance_command(
        self,
        conn: Connection,
        report: CommandStarted | CommandFinished,
        row: sa.Row[Any, Any, Any],
        completed_at: datetime | None,
    ) -> None:
        # Forward only (pending -> running -> terminal), and re-checked by the UPDATE
        # itself: with several collectors, a "running" and the final result of one
        # command may be written at the same moment by two of them.
        if row.status not in COMMAND_TERMINAL_STATUSES and (
            isinstance(report, CommandFinished) or row.status == "pending"
        ):
            moved = (
                self._finish_command if isinstance(report, CommandFinished) else self._start_command
            )
            conn.execute(
                moved,
                {
                    "b_cid": report.command_id,
                    "b_status": report.status,
                    "b_started": report.started_at,  # None keeps the row's
                    "b_completed": completed_at,
                },
            )
        elif row.started_at is None and report.started_at is not None:
            # A late "running" may still tell us when it started.
            conn.execute(
                self._late_start, {"b_cid": report.command_id, "b_started": report.started_at}
            )

    # -- periodic work --------------------------------------------------------------
    def mark_stale(self, now: datetime, listening_since: datetime) -> list[str]:
        """Mark online/error nodes silent for 3 x their interval offline; return their ids.

        ``listening_since`` is when the collector (re)connected: a node is never blamed
        for silence the collector could not have heard.
        """
        with self._engine.begin() as conn:
            rows = conn.execute(
                sa.select(_NODES.c.node_id, _NODES.c.last_heartbeat, _NODES.c.interval_s).where(
                    _NODES.c.status.in_(_LIVE_STATUSES)
                )
            ).all()
            candidates = []
            for row in rows:
                seen = max(row.last_heartbeat or listening_since, listening_since)
                limit = SILENCE_INTERVALS * (row.interval_s or self._default_interval_s)
                if (now - seen).total_seconds() > limit:
                    candidates.append(row)
            stale = []
            for row in candidates:
                # Only if nothing moved since we looked: another collector may have
                # stored a fresh heartbeat, or marked it already (then it reports it).
                heard = (
                    _NODES.c.last_heartbeat.is_(None)
                    if row.last_heartbeat is None
                    else _NODES.c.last_heartbeat == row.last_heartbeat
                )
                marked = conn.execute(
                    sa.update(_NODES)
                    .where(_NODES.c.node_id == row.node_id)
                    .where(_NODES.c.status.in_(_LIVE_STATUSES))
                    .where(heard)
                    .values(status="offline", status_reason=HEARTBEAT_TIMEOUT, updated_at=now)
                )
                if marked.rowcount:
                    stale.append(row.node_id)
        return stale

    def expire_commands(self, now: datetime) -> list[str]:
        """Time out commands still pending at their ``expires_at``; return their ids."""
        with self._engine.begin() as conn:
            # UPDATE ... RETURNING (PostgreSQL; SQLite >= 3.35): only the rows this
            # transaction moved come back, so of several collectors exactly one expires
            # a command and writes its result.
            expired = list(
                conn.scalars(
                    sa.update(_COMMANDS)
                    .where(_COMMANDS.c.status == "pending")
                    .where(_COMMANDS.c.expires_at <= now)
                    .values(status="timeout", completed_at=now)
                    .returning(_COMMANDS.c.command_id)
                )
            )
            if expired:
                conn.execute(
                    self._insert_result,
                    [
                        {
                            "command_id": command_id,
                            "stdout": "",
                            "stderr": "",
                            "exit_code": None,
                            "execution_time_ms": 0,
                            "created_at": now,
                            "error": EXPIRED_ERROR,
                            "stdout_truncated": False,
                            "stderr_truncated": False,
                        }
                        for command_id in expired
                    ],
                )
        return expired

    def prune_metrics(self, cutoff: datetime, limit: int) -> int:
        """Delete at most ``limit`` metrics older than ``cutoff`` in one transaction."""
        with self._engine.begin() as conn:
            oldest = (
                sa.select(_METRICS.c.id)
                .where(_METRICS.c.metric_time < cutoff)
                .limit(limit)
                .scalar_subquery()
            )
            result = conn.execute(sa.delete(_METRICS).where(_METRICS.c.id.in_(oldest)))
            return int(result.rowcount or 0)
