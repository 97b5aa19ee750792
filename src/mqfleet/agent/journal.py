"""The agent's durable command state: the journal of accepted ids and the result outbox.

Both live under ``<agent_state_dir>/commands/`` as one small file per item::

    commands/journal/<command_id>.json          a JournalEntry (state, expires_at, ...)
    commands/outbox/<seq:020d>-<command_id>.json  a result payload, exactly as published

Why files and not ``sqlite3``: every write here is one whole item, so "write a temporary
file, rename it over the old one" is atomic on POSIX file systems without any library.
A crash leaves either the old file or the new one, plus at worst a stray ``.*.tmp``
file, which is ignored and removed on the next open. Items can be inspected and repaired
with ``cat`` and ``rm``. Command ids are ``[A-Za-z0-9_.-]{1,64}`` (protocol v1), safe as
file names as they are.

Durability is chosen per write (``durable=``), because the two failures differ:

- an agent crash (``kill -9``, OOM kill, a bug) loses nothing that reached the kernel:
  a renamed file is in the page cache and every later ``open`` sees it. Every write
  here survives that, fsync or not.
- a power loss (or kernel crash) loses what was not fsync'd. Only a few writes must
  survive it and keep ``durable=True`` (the default): "write, fsync, rename, fsync the
  directory". Which ones, and why the others need not, is decided by the caller
  (``agent.commands``, see its module docstring); each fsync costs from under a
  millisecond on an idle disk to several on a busy one.

Only one process may use a state directory at a time (the agent); nothing here locks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Final, Literal

import msgspec

from mqfleet.errors import AgentStateError
from mqfleet.protocol import CommandRequest  # noqa: TC001 - msgspec needs it at runtime

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "DEFAULT_KEEP_AFTER_EXPIRY",
    "CommandJournal",
    "JournalEntry",
    "JournalState",
    "OutboxItem",
    "ResultOutbox",
]

log = logging.getLogger(__name__)

#: Ids stay this long past ``expires_at``: a duplicate that a slow broker or a skewed
#: clock delivers just after expiry is still recognised instead of earning a spurious
#: "expired before delivery" result for a command that already ran.
DEFAULT_KEEP_AFTER_EXPIRY: Final = timedelta(hours=1)
_SUFFIX: Final = ".json"
_TMP_SUFFIX: Final = ".tmp"
_CORRUPT_SUFFIX: Final = ".corrupt"

JournalState = Literal["accepted", "running", "done"]


#: An aware datetime: decoding refuses one without an offset, ``__post_init__`` too.
_AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class JournalEntry(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What the agent remembers of one command id until it expires."""

    command_id: str
    state: JournalState
    expires_at: _AwareDatetime
    accepted_at: _AwareDatetime
    started_at: _AwareDatetime | None = None
    #: Kept while the command waits, so a restart can queue it again.
    request: CommandRequest | None = None

    def __post_init__(self) -> None:
        """Refuse naive times and an accepted entry without its request.

        msgspec runs this after ``__init__`` and after decoding a file.
        """
        for name, value in (
            ("expires_at", self.expires_at),
            ("accepted_at", self.accepted_at),
            ("started_at", self.started_at),
        ):
            if value is not None and value.utcoffset() is None:
                msg = f"{name} must carry a UTC offset (a naive time is refused)"
                raise ValueError(msg)
        if self.state == "accepted" and self.request is None:
            msg = "an accepted entry needs its request"
            raise ValueError(msg)


_ENTRY_DECODER: Final = msgspec.json.Decoder(JournalEntry)
_ENCODER: Final = msgspec.json.Encoder()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, *, durable: bool) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content.

    With ``durable`` the new content also survives a power loss once this returns.
    """
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    if durable:
        _fsync_dir(path.parent)  # makes the rename itself durable


def _prepare_dir(directory: Path) -> list[Path]:
    """Create ``directory`` (private: outputs may hold secrets); list its items."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        items = []
        for path in directory.iterdir():
            if path.name.startswith(".") and path.name.endswith(_TMP_SUFFIX):
                path.unlink()  # a write that a crash interrupted: never renamed, never valid
            elif path.name.endswith(_SUFFIX):
                items.append(path)
    except OSError as exc:
        raise AgentStateError(f"cannot use state directory {directory}: {exc}") from exc
    return sorted(items)


def _quarantine(path: Path, reason: object) -> None:
    log.error("ignoring unreadable state file %s (kept as %s): %s", path, _CORRUPT_SUFFIX, reason)
    with contextlib.suppress(OSError):
        path.rename(path.with_name(path.name + _CORRUPT_SUFFIX))


class CommandJournal:
    """Map of accepted command ids to their state, kept on disk, pruned after expiry."""

    def __init__(
        self, directory: Path, *, keep_after_expiry: timedelta = DEFAULT_KEEP_AFTER_EXPIRY
    ) -> None:
        """Open (creating it if needed) the journal in ``directory``.

        Args:
            directory: where the entries live; created with mode 0700.
            keep_after_expiry: how long an id is remembered past its ``expires_at``.

        Raises :class:`AgentStateError` when the directory is unusable.

        """
        self._dir = directory
        self._keep = keep_after_expiry
        self._entries: dict[str, JournalEntry] = {}
        for path in _prepare_dir(directory):
            try:
                entry = _ENTRY_DECODER.decode(path.read_bytes())
            except (OSError, msgspec.DecodeError) as exc:  # includes ValidationError
                _quarantine(path, exc)
                continue
            if path.name != _file_name(entry.command_id):
                _quarantine(path, "file name does not match its command id")
                continue
            self._entries[entry.command_id] = entry

    def __contains__(self, command_id: object) -> bool:
        """Whether ``command_id`` was accepted (and not yet pruned)."""
        return command_id in self._entries

    def __len__(self) -> int:
        """Count the remembered ids."""
        return len(self._entries)

    def get(self, command_id: str) -> JournalEntry | None:
        """Return the entry of ``command_id``, if any."""
        return self._entries.get(command_id)

    def entries(self) -> list[JournalEntry]:
        """Return every entry, oldest accepted first."""
        return sorted(self._entries.values(), key=lambda e: (e.accepted_at, e.command_id))

    def record(self, entry: JournalEntry, *, durable: bool = True) -> None:
        """Store ``entry`` (replacing the previous state of its id).

        It survives an agent crash once this returns; with ``durable`` (the default) a
        power loss too.
        """
        try:
            data = _ENCODER.encode(entry)
            _write_atomic(self._dir / _file_name(entry.command_id), data, durable=durable)
        except OSError as exc:
            raise AgentStateError(
                f"cannot write journal entry of command {entry.command_id}: {exc}"
            ) from exc
        self._entries[entry.command_id] = entry

    def prune(self, now: datetime) -> int:
        """Forget finished commands that expired; return how many were removed."""
        expired = [
            entry.command_id
            for entry in self._entries.values()
            if entry.state == "done" and entry.expires_at + self._keep <= now
        ]
        for command_id in expired:
            try:
                (self._dir / _file_name(command_id)).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot prune journal entry of command %s: %s", command_id, exc)
                continue
            del self._entries[command_id]
        # No directory fsync: an unlink undone by a crash is pruned again next time.
        return len(expired)


def _file_name(command_id: str) -> str:
    return f"{command_id}{_SUFFIX}"


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One result waiting for the broker's acknowledgement."""

    seq: int
    command_id: str
    payload: bytes
    path: Path


class ResultOutbox:
    """On-disk FIFO of result payloads; an item goes only once the broker has it."""

    def __init__(self, directory: Path) -> None:
        """Open (creating it if needed) the outbox in ``directory``.

        Raises :class:`AgentStateError` when the directory is unusable.
        """
        self._dir = directory
        self._pending: deque[tuple[int, str]] = deque()
        for path in _prepare_dir(directory):
            seq, sep, command_id = path.name.removesuffix(_SUFFIX).partition("-")
            if not (sep and seq.isdigit() and command_id):
                _quarantine(path, "not an outbox file name")
                continue
            self._pending.append((int(seq), command_id))
        self._pending = deque(sorted(self._pending))
        self._next_seq = self._pending[-1][0] + 1 if self._pending else 1

    def __len__(self) -> int:
        """Count the results not yet acknowledged."""
        return len(self._pending)

    def put(self, command_id: str, payload: bytes, *, durable: bool = True) -> OutboxItem:
        """Append a result payload for ``command_id``; return it as an item.

        It survives an agent crash once this returns; with ``durable`` (the default) a
        power loss too.
        """
        seq = self._next_seq
        path = self._dir / _outbox_name(seq, command_id)
        try:
            _write_atomic(path, payload, durable=durable)
        except OSError as exc:
            raise AgentStateError(f"cannot store result of command {command_id}: {exc}") from exc
        self._next_seq += 1
        self._pending.append((seq, command_id))
        return OutboxItem(seq, command_id, payload, path)

    def peek(self) -> OutboxItem | None:
        """Return the oldest result not yet acknowledged, or None."""
        return self.peek_after(0)

    def peek_after(self, seq: int) -> OutboxItem | None:
        """Return the oldest result not yet acknowledged whose number is above ``seq``."""
        while True:
            # Sorted by number, and only a window's worth is in flight: a short scan.
            key = next((key for key in self._pending if key[0] > seq), None)
            if key is None:
                return None
            path = self._dir / _outbox_name(*key)
            try:
                return OutboxItem(key[0], key[1], path.read_bytes(), path)
            except OSError as exc:
                # Skipping one unreadable result beats blocking every later one forever.
                self._pending.remove(key)
                _quarantine(path, exc)

    def discard(self, item: OutboxItem, reason: object) -> None:
        """Set aside an item that is not a result (kept as ``.corrupt``, never sent)."""
        self._forget(item)
        _quarantine(item.path, reason)

    def _forget(self, item: OutboxItem) -> None:
        key = (item.seq, item.command_id)
        if self._pending and self._pending[0] == key:
            self._pending.popleft()
        elif key in self._pending:
            self._pending.remove(key)

    def remove(self, item: OutboxItem) -> None:
        """Forget ``item`` once the broker has acknowledged it."""
        self._forget(item)
        try:
            # No directory fsync: an unlink undone by a crash only sends a duplicate,
            # which the collector ignores (results move a command forward only).
            item.path.unlink(missing_ok=True)
        except OSError as exc:
            raise AgentStateError(f"cannot remove delivered result {item.path}: {exc}") from exc


def _outbox_name(seq: int, command_id: str) -> str:
    return f"{seq:020d}-{command_id}{_SUFFIX}"
