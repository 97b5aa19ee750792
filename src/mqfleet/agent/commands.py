"""Command handling on the agent: exactly-once acceptance, execution, result outbox.

The life of a command on this node:

1. :meth:`CommandService.accept` decodes the payload. Undecodable payloads are logged
   (truncated) and dropped. A command id already in the journal is a duplicate (QoS 1
   redelivery, collector redelivery, a replay) and is ignored, across restarts too:
   reporting it would overwrite the real command's result. Then, before anything else,
   the operator's signature is checked (``security.CommandVerifier``): an unsigned,
   forged or altered command, one signed for another node and one not matching the
   optional allowlist is refused (``failed``, with the reason as error, logged here);
   one whose ``expires_at`` has passed is reported ``timeout`` with error "expired
   before delivery". None of them ever runs. Refusals of payloads whose signature is
   missing or wrong are not journaled (their id and expiry are attacker-chosen: they
   must neither burn a genuine command's id nor grow the journal) and their reports are
   rate-limited. Anything else is journaled as ``accepted`` before it is queued, so
   nothing runs unrecorded.

   Without ``operator_public_key_file`` every command is refused, unless the
   development switch ``insecure_unsigned_commands`` is on (logged loudly at start-up).
2. :meth:`CommandService.run_loop` starts queued commands in arrival order, at most
   ``max_concurrent_commands`` at once. It journals ``running`` before spawning, reports
   ``running`` once spawned, and the final result when done (see ``agent.executor``). A
   command that expired while it waited for a slot is reported ``timeout`` with error
   "expired before it could start" instead of running late.
3. Every result goes to the on-disk outbox first; :meth:`CommandService.deliver_loop`
   publishes the outbox in order (a few results in flight at once) and deletes an item
   only once its ``publish`` returned (PUBACK), so a broker outage or an agent crash
   loses no result. A crash may resend a result; the collector ignores duplicates (a
   command only moves forward).
4. :meth:`CommandService.start` settles what a previous process left: a command journaled
   ``running`` is reported ``failed`` with error "agent restarted" and is never re-run;
   accepted commands that never started are checked again (the trusted key or the
   allowlist may have changed) and queued again, or reported expired or refused.

Durability: what survives which failure
-----------------------------------------
Journal and outbox writes are small whole-file writes (temporary file, rename; see
``agent.journal``). Every one of them survives an agent crash (``kill -9``, OOM kill):
the data is in the kernel's page cache once the rename returns, so exactly-once across
agent crashes needs no fsync at all. fsync only adds survival of a power loss or kernel
crash, and costs from under a millisecond on an idle disk to several on a busy one, so
it is spent only where a power loss could otherwise run a command twice or lose its
result for good:

- ``running`` is journaled **durably (fsync'd) before the shell is spawned**: after a
  power loss a command that may have started is reported ``failed`` ("agent restarted")
  and never re-run. This is the one fsync on a command's critical path. It runs on
  the event loop, as the spawn right after it does: a worker thread would let a later
  command's spawn overtake an earlier one's (starts keep arrival order), and the
  loop has nothing urgent to do in that millisecond.
- ``accepted`` is not fsync'd. A power loss may forget a command that was accepted but
  had not started; nothing ran, no result was sent, so the collector still has it
  ``pending`` and republishes it when the node comes back online: it still runs once.
- results of commands that ran (``running`` and final) are not fsync'd, and ``done`` is
  journaled (not fsync'd either) only once the broker acknowledged the final result.
  So ``done`` never reaches the disk before the result it promises is safe with the
  broker: a power loss before that leaves ``running`` in the journal, and the next
  start reports the command ``failed`` ("agent restarted") unless its final result
  survived in the outbox, which is then sent instead. At worst the collector receives
  a second final result and ignores it (a command only moves forward).
- results of commands that never run (refused, expired, cut short by a restart) are
  fsync'd before ``done`` is journaled: nothing else would report them.

``accept`` stays synchronous and ordered: its one file write takes well under a
millisecond even without the page cache's help.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Literal

from mqfleet.agent.executor import CommandExecutor, Execution, RunAs
from mqfleet.agent.journal import CommandJournal, JournalEntry, OutboxItem, ResultOutbox
from mqfleet.errors import AgentStateError, CommandRefusedError, ConfigError, ProtocolError
from mqfleet.protocol import (
    ERROR_AGENT_RESTARTED,
    ERROR_EXPIRED_BEFORE_DELIVERY,
    ERROR_EXPIRED_BEFORE_START,
    MAX_PAYLOAD_BYTES,
    CommandFinished,
    CommandRequest,
    CommandStarted,
    decode_command,
    decode_result,
    encode,
    truncate_for_log,
    utc_now,
)
from mqfleet.security import ed25519
from mqfleet.security.verify import CommandVerifier

if TYPE_CHECKING:
    from datetime import datetime

    from mqfleet.settings import Settings

__all__ = [
    "AGENT_RESTARTED",
    "EXPIRED_BEFORE_DELIVERY",
    "EXPIRED_BEFORE_START",
    "NOT_ALLOWED_REFUSAL",
    "NO_KEY_REFUSAL",
    "UNAUTHENTICATED_REASONS",
    "CommandService",
    "Publish",
    "build_verifier",
    "resolve_run_as",
]

log = logging.getLogger(__name__)

#: Publishes ``payload`` on ``topic`` with QoS 1, not retained, and returns once the
#: broker has acknowledged it (PUBACK). Raises when the connection is lost.
Publish = Callable[[str, bytes], Awaitable[None]]

EXPIRED_BEFORE_DELIVERY: Final = ERROR_EXPIRED_BEFORE_DELIVERY
EXPIRED_BEFORE_START: Final = ERROR_EXPIRED_BEFORE_START
AGENT_RESTARTED: Final = ERROR_AGENT_RESTARTED
#: Expired ids are pruned from the journal at most this often.
_PRUNE_INTERVAL_S: Final = 60.0
#: Outputs are shrunk down to this many bytes per stream, if need be, to fit a result
#: into the protocol's payload limit (control characters grow six-fold in JSON).
_MIN_OUTPUT_BYTES: Final = 256
_MAX_ERROR_CHARS: Final = 1024
NO_KEY_REFUSAL: Final = (
    "refused: this node trusts no operator key (operator_public_key_file is not set), "
    "so it runs no command"
)
NOT_ALLOWED_REFUSAL: Final = "refused: command does not match this node's command_allowlist"
#: Refusals of payloads whose signature is missing or wrong: nothing in them is genuine,
#: so they are never journaled (see the module docstring).
UNAUTHENTICATED_REASONS: Final = frozenset(
    {"unsigned", "malformed_signature", "unknown_key", "bad_signature", "no_key"}
)
#: At most this many results are reported per window for unauthenticated payloads: a
#: flood of forgeries must not turn into a flood of results. The rest are only logged.
_UNAUTHENTICATED_REPORTS: Final = 30
_UNAUTHENTICATED_WINDOW_S: Final = 60.0
#: Results published before waiting for their PUBACKs. MQTT keeps the QoS 1 messages of
#: one connection in order (MQTT 5 spec 4.6), so the order holds while a command's final
#: result no longer waits one broker round trip for the PUBACK of its ``running``.
_DELIVERY_WINDOW: Final = 8


def _error_text(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def build_verifier(settings: Settings) -> CommandVerifier | None:
    """Build the signature check for ``settings``; None when no public key is configured.

    Raises :class:`ConfigError` (one line) when the key file is missing or not a key.
    """
    if settings.operator_public_key_file is None:
        if settings.insecure_unsigned_commands:
            log.warning(
                "INSECURE: no operator_public_key_file and insecure_unsigned_commands is on: "
                "this node runs UNSIGNED commands from anyone who can publish on its topic"
            )
        else:
            log.warning(
                "no operator_public_key_file is configured: every command will be refused "
                "(copy the operator's public key here, see 'mqfleet keys init')"
            )
        return None
    verifier = CommandVerifier.from_files(
        node_id=settings.node_id, public_key_files=[settings.operator_public_key_file]
    )
    log.info(
        "commands must be signed by operator key %s (checked with %s)",
        ", ".join(verifier.key_ids),
        ed25519.backend().name,
    )
    return verifier


def resolve_run_as(name: str | None) -> RunAs | None:
    """Resolve the user commands run as; None for the agent's own user.

    Raises :class:`ConfigError` when the user does not exist, or when the agent is not
    root and so cannot become it.
    """
    if name is None:
        return None
    run_as = RunAs.lookup(name)
    euid = os.geteuid()
    if run_as.uid == euid:
        return None  # already that user: nothing to drop
    if euid != 0:
        raise ConfigError(
            f"run_as_user {name!r} needs the agent to run as root (it runs as uid {euid}); "
            "run the agent as that user instead, or unset run_as_user"
        )
    log.info("commands run as user %s (uid %d, gid %d)", run_as.name, run_as.uid, run_as.gid)
    return run_as


class _ReportBudget:
    """At most ``limit`` reports per ``window_s`` seconds (a fixed window)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self._limit = limit
        self._window_s = window_s
        self._start = time.monotonic()
        self._used = 0

    def take(self) -> bool:
        now = time.monotonic()
        if now - self._start >= self._window_s:
            self._start, self._used = now, 0
        self._used += 1
        return self._used <= self._limit


class CommandService:
    """Accepts commands for this node, runs each at most once and reports the results."""

    def __init__(self, settings: Settings, *, verifier: CommandVerifier | None = None) -> None:
        """Use ``settings.agent_state_dir`` for the journal and the result outbox.

        ``verifier`` defaults to one for ``settings.operator_public_key_file``. Raises
        :class:`ConfigError` for an unusable key file or ``run_as_user``.
        """
        self._settings = settings
        self._node_id = settings.node_id
        self._dir = settings.agent_state_dir / "commands"
        self._journal: CommandJournal | None = None
        self._outbox: ResultOutbox | None = None
        self._verifier = verifier if verifier is not None else build_verifier(settings)
        self._allowlist = [re.compile(pattern) for pattern in settings.command_allowlist]
        if self._allowlist:
            log.info("commands must match one of %d allowlist patterns", len(self._allowlist))
        self._executor = CommandExecutor(
            output_limit_bytes=settings.output_limit_bytes,
            kill_grace_s=settings.kill_grace_s,
            run_as=resolve_run_as(settings.run_as_user),
        )
        self._queue: asyncio.Queue[CommandRequest] = asyncio.Queue()
        self._outbox_ready = asyncio.Event()
        #: Outbox numbers of final results whose ``done`` is journaled once delivered.
        self._done_on_delivery: dict[int, JournalEntry] = {}
        self._last_prune = time.monotonic()
        self._unauthenticated_reports = _ReportBudget(
            _UNAUTHENTICATED_REPORTS, _UNAUTHENTICATED_WINDOW_S
        )

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Open the journal; report commands cut short by a previous crash. Call once.

        Raises :class:`AgentStateError` when the state directory is unusable.
        """
        if self._journal is not None:
            msg = "CommandService.start() was already called"
            raise RuntimeError(msg)
        self._outbox = ResultOutbox(self._dir / "outbox")
        self._journal = CommandJournal(self._dir / "journal")
        now = utc_now()
        finals = self._final_results_in_outbox()
        for entry in self._journal.entries():
            if entry.state == "running" and entry.command_id in finals:
                # It finished; the crash came before the broker had the result: send that.
                seq = finals[entry.command_id]
                self._done_on_delivery[seq] = self._done(entry, started_at=entry.started_at)
            elif entry.state == "running":
                log.warning("command %s was running when the agent stopped", entry.command_id)
                self._report_unstarted(
                    entry, "failed", AGENT_RESTARTED, started_at=entry.started_at
                )
            elif entry.state == "accepted" and entry.request is not None:
                if entry.expires_at <= now:
                    self._report_unstarted(entry, "timeout", EXPIRED_BEFORE_START)
                    continue
                try:
                    self._check(entry.request)
                except CommandRefusedError as exc:
                    log.warning("command %s: %s", entry.command_id, exc)
                    self._report_unstarted(entry, "failed", str(exc))
                    continue
                log.info("command %s queued again after a restart", entry.command_id)
                self._queue.put_nowait(entry.request)
        self._journal.prune(now)
        if len(self._outbox):
            self._outbox_ready.set()

    def _final_results_in_outbox(self) -> dict[str, int]:
        """Map command ids to the outbox number of their undelivered final result."""
        outbox = self._require_outbox()
        finals: dict[str, int] = {}
        item = outbox.peek_after(0)
        while item is not None:
            try:
                if decode_result(item.payload).status != "running":
                    finals[item.command_id] = item.seq
            except ProtocolError as exc:
                # Results are not fsync'd: a power loss may leave a torn file. The
                # journal still says "running", so "agent restarted" is reported instead.
                outbox.discard(item, exc)
            item = outbox.peek_after(item.seq)
        return finals

    # -- intake ---------------------------------------------------------------------
    def accept(self, payload: bytes) -> None:
        """Take a payload from this node's commands topic; never raises on bad input."""
        journal = self._require_journal()
        try:
            request = decode_command(payload)
        except ProtocolError as exc:
            log.warning("dropping command payload: %s: %s", exc, truncate_for_log(payload))
            return
        if request.command_id in journal:
            log.info("command %s already accepted: duplicate ignored", request.command_id)
            return
        now = utc_now()
        try:
            try:
                self._check(request)
            except CommandRefusedError as exc:
                self._refuse(request, exc, now)
            else:
                # Recorded before it can run: from here on a crash cannot make it run twice.
                # Not fsync'd: see "Durability" in the module docstring.
                journal.record(self._entry(request, now), durable=False)
                self._queue.put_nowait(request)
                log.info("command %s accepted (%d queued)", request.command_id, self._queue.qsize())
        except AgentStateError as exc:
            log.error("dropping command %s: %s", request.command_id, exc)  # noqa: TRY400 - one line
            return
        self._maybe_prune(now)

    def _check(self, request: CommandRequest) -> None:
        """Raise :class:`CommandRefusedError` unless ``request`` may run on this node."""
        if self._verifier is not None:
            self._verifier.check(request)  # signature first, then node id and expiry
        elif not self._settings.insecure_unsigned_commands:
            raise CommandRefusedError(
                NO_KEY_REFUSAL, reason="no_key", command_id=request.command_id
            )
        elif request.node_id != self._node_id:  # development mode: the unsigned checks
            raise CommandRefusedError(
                f"refused: command is for node {request.node_id}, this is {self._node_id}",
                reason="wrong_node",
                command_id=request.command_id,
            )
        elif request.expires_at <= utc_now():
            raise CommandRefusedError(
                "refused: command expired", reason="expired", command_id=request.command_id
            )
        if self._allowlist and not any(p.fullmatch(request.command_text) for p in self._allowlist):
            raise CommandRefusedError(
                NOT_ALLOWED_REFUSAL, reason="not_allowed", command_id=request.command_id
            )

    def _refuse(self, request: CommandRequest, exc: CommandRefusedError, now: datetime) -> None:
        """Log a refusal on this node and report it; never run the command."""
        log.warning("command %s: %s", request.command_id, exc)
        if exc.reason == "expired":
            self._report_unstarted(self._entry(request, now), "timeout", EXPIRED_BEFORE_DELIVERY)
        elif exc.reason in UNAUTHENTICATED_REASONS:
            # Not journaled: see the module docstring. Reported within a budget.
            if self._unauthenticated_reports.take():
                self._put_result(request.command_id, self._refusal_payload(request, str(exc)))
            else:
                log.warning("too many refused commands: not reporting %s", request.command_id)
        else:
            self._report_unstarted(self._entry(request, now), "failed", str(exc))

    def _refusal_payload(self, request: CommandRequest, error: str) -> bytes:
        return encode(
            CommandFinished(
                command_id=request.command_id,
                node_id=self._node_id,
                status="failed",
                completed_at=utc_now(),
                error=_error_text(error),
            )
        )

    # -- execution ------------------------------------------------------------------
    async def run_loop(self) -> None:
        """Execute accepted commands (at most N at once); runs for the agent's lifetime."""
        self._require_journal()
        slots = asyncio.Semaphore(self._settings.max_concurrent_commands)
        async with asyncio.TaskGroup() as group:
            while True:
                request = await self._queue.get()
                # Taking a slot before the next request keeps starts in arrival order.
                await slots.acquire()
                group.create_task(self._run_one(request, slots), name=request.command_id)

    async def _run_one(self, request: CommandRequest, slots: asyncio.Semaphore) -> None:
        try:
            await self._execute(request)
        except AgentStateError as exc:
            # The state directory failed us; the journal decides what a restart reports.
            log.error("command %s: %s", request.command_id, exc)  # noqa: TRY400 - one line
        finally:
            slots.release()

    async def _execute(self, request: CommandRequest) -> None:
        journal = self._require_journal()
        now = utc_now()
        entry = journal.get(request.command_id) or self._entry(request, now)
        if request.expires_at <= now:
            log.warning("command %s expired before it could start", request.command_id)
            self._report_unstarted(entry, "timeout", EXPIRED_BEFORE_START)
            return
        # The one fsync on the way to the spawn (see "Durability").
        running = JournalEntry(
            command_id=entry.command_id,
            state="running",
            expires_at=entry.expires_at,
            accepted_at=entry.accepted_at,
            started_at=now,
        )
        journal.record(running, durable=True)

        def report_started(started_at: datetime) -> None:
            started = CommandStarted(
                command_id=request.command_id,
                node_id=self._node_id,
                status="running",
                started_at=started_at,
            )
            self._put_result(request.command_id, encode(started), durable=False)

        log.info("command %s started", request.command_id)
        execution = await self._executor.run(
            request.command_text,
            timeout_s=request.timeout_s,
            extra_env={"MQFLEET_COMMAND_ID": request.command_id, "MQFLEET_NODE_ID": self._node_id},
            on_start=report_started,
        )
        log.info(
            "command %s finished: %s (exit code %s, %d ms)",
            request.command_id,
            execution.status,
            execution.exit_code,
            execution.execution_time_ms,
        )
        # Outbox before journal: a crash in between resends, it never loses the result.
        # "done" is journaled once the broker has the result (see "Durability").
        item = self._put_result(
            request.command_id, self._finished_payload(request, execution), durable=False
        )
        self._done_on_delivery[item.seq] = self._done(entry, started_at=now)

    def _finished_payload(self, request: CommandRequest, execution: Execution) -> bytes:
        """Encode the final result, shrinking outputs until it fits the payload limit."""
        limit = self._settings.output_limit_bytes
        while True:
            payload = encode(
                CommandFinished(
                    command_id=request.command_id,
                    node_id=self._node_id,
                    status=execution.status,
                    started_at=execution.started_at,
                    completed_at=execution.completed_at,
                    exit_code=execution.exit_code,
                    stdout=execution.stdout.render(limit),
                    stderr=execution.stderr.render(limit),
                    execution_time_ms=execution.execution_time_ms,
                    stdout_truncated=execution.stdout.truncated(limit),
                    stderr_truncated=execution.stderr.truncated(limit),
                    error=_error_text(execution.error) if execution.error else None,
                )
            )
            if len(payload) <= MAX_PAYLOAD_BYTES["result"] or limit <= _MIN_OUTPUT_BYTES:
                return payload
            limit = max(limit // 2, _MIN_OUTPUT_BYTES)
            log.info("command %s: result too big, output cut to %d B", request.command_id, limit)

    # -- delivery -------------------------------------------------------------------
    async def deliver_loop(self, publish: Publish) -> None:
        """Send pending results in order while connected; returns or raises on disconnect.

        Up to ``_DELIVERY_WINDOW`` results are on the wire at once, and each leaves the
        outbox (in order) only once its PUBACK is in: a command's final result does not
        wait for the broker to acknowledge its ``running``.
        """
        outbox = self._require_outbox()
        topics = self._settings.topics
        in_flight: deque[tuple[OutboxItem, asyncio.Task[None]]] = deque()
        last_sent = 0
        try:
            while True:
                # No await between clear() and the look for new items: no put() slips by.
                self._outbox_ready.clear()
                while len(in_flight) < _DELIVERY_WINDOW:
                    item = outbox.peek_after(last_sent)
                    if item is None:
                        break
                    last_sent = item.seq
                    try:
                        topic = topics.result(self._node_id, item.command_id)
                    except ProtocolError as exc:  # a file someone put there by hand
                        log.error("discarding undeliverable result %s: %s", item.path, exc)  # noqa: TRY400
                        self._delivered(item)
                        continue
                    # Tasks start in creation order, so the results go on the wire in order.
                    in_flight.append((item, asyncio.ensure_future(publish(topic, item.payload))))
                if not in_flight:
                    await self._outbox_ready.wait()
                    continue
                more = asyncio.create_task(self._outbox_ready.wait())
                try:
                    await asyncio.wait({in_flight[0][1], more}, return_when=FIRST_COMPLETED)
                finally:
                    more.cancel()
                while in_flight and in_flight[0][1].done():
                    item, task = in_flight.popleft()
                    # A disconnect raises here; this item and the rest stay first in line.
                    task.result()
                    self._delivered(item)
                    log.debug("delivered %s: %s", item.command_id, truncate_for_log(item.payload))
        finally:
            for _, task in in_flight:
                task.cancel()
            # Collects their outcomes too, so none is reported as never retrieved.
            await asyncio.gather(*(task for _, task in in_flight), return_exceptions=True)

    # -- internals ------------------------------------------------------------------
    def _require_journal(self) -> CommandJournal:
        if self._journal is None:
            msg = "CommandService.start() must be awaited first"
            raise RuntimeError(msg)
        return self._journal

    def _require_outbox(self) -> ResultOutbox:
        if self._outbox is None:
            msg = "CommandService.start() must be awaited first"
            raise RuntimeError(msg)
        return self._outbox

    @staticmethod
    def _entry(request: CommandRequest, now: datetime) -> JournalEntry:
        return JournalEntry(
            command_id=request.command_id,
            state="accepted",
            expires_at=request.expires_at,
            accepted_at=now,
            request=request,
        )

    @staticmethod
    def _done(entry: JournalEntry, *, started_at: datetime | None) -> JournalEntry:
        return JournalEntry(
            command_id=entry.command_id,
            state="done",
            expires_at=entry.expires_at,
            accepted_at=entry.accepted_at,
            started_at=started_at,
        )

    def _put_result(self, command_id: str, payload: bytes, *, durable: bool = True) -> OutboxItem:
        item = self._require_outbox().put(command_id, payload, durable=durable)
        self._outbox_ready.set()
        return item

    def _delivered(self, item: OutboxItem) -> None:
        """Forget a result the broker acknowledged; journal ``done`` if it was a final one."""
        self._require_outbox().remove(item)
        done = self._done_on_delivery.pop(item.seq, None)
        if done is None:
            return
        try:
            self._require_journal().record(done, durable=False)
        except AgentStateError as exc:
            # The result is delivered; a restart only reports "agent restarted" in vain.
            log.error("command %s: %s", done.command_id, exc)  # noqa: TRY400 - one line

    def _report_unstarted(
        self,
        entry: JournalEntry,
        status: Literal["failed", "timeout"],
        error: str,
        *,
        started_at: datetime | None = None,
    ) -> None:
        """Report a final result for a command that will not run (now), and journal it."""
        finished = CommandFinished(
            command_id=entry.command_id,
            node_id=self._node_id,
            status=status,
            started_at=started_at,
            completed_at=utc_now(),
            error=_error_text(error),
        )
        # Outbox (fsync'd) before journal: a crash in between resends, it never loses the
        # result; "done" itself need not survive a power loss (see "Durability").
        self._put_result(entry.command_id, encode(finished))
        self._require_journal().record(self._done(entry, started_at=started_at), durable=False)

    def _maybe_prune(self, now: datetime) -> None:
        if time.monotonic() - self._last_prune < _PRUNE_INTERVAL_S:
            return
        self._last_prune = time.monotonic()
        pruned = self._require_journal().prune(now)
        if pruned:
            log.debug("pruned %d expired command ids", pruned)
