"""The agent's session counter: strictly increasing across connections and restarts.

Every new connection of a node carries a fresh ``session`` number in its birth, its Will
and its metrics. A receiver that holds session N ignores any status from a session below
N, which defeats the race where an old connection's Will lands after the new birth
(Sparkplug B's ``bdSeq`` solves the same problem). For that the number must never go
back, not even after a crash: it is written atomically (temporary file, fsync, rename,
fsync of the directory) before the connection that uses it is attempted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import TYPE_CHECKING, Final

from mqfleet.errors import AgentStateError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = ["SESSION_FILE_NAME", "SessionCounter", "ensure_state_dir"]

log = logging.getLogger(__name__)

SESSION_FILE_NAME: Final = "session"
_LOCK_FILE_NAME: Final = "session.lock"
#: The state dir holds the command journal too: nobody else on the machine may read it.
_STATE_DIR_MODE: Final = 0o700
#: A session number is a positive integer; anything longer than this is not ours.
_MAX_FILE_BYTES: Final = 32


def ensure_state_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if missing; raise :class:`AgentStateError` if unusable."""
    try:
        if not path.is_dir():
            path.mkdir(mode=_STATE_DIR_MODE, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask: set it explicitly on the leaf we made.
            path.chmod(_STATE_DIR_MODE)
    except OSError as exc:
        raise AgentStateError(f"cannot create agent state dir {path}: {exc.strerror}") from exc
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise AgentStateError(f"agent state dir {path} is not readable and writable")
    return path


class SessionCounter:
    """The last session number used by this node, kept in ``<state dir>/session``."""

    def __init__(self, state_dir: Path) -> None:
        """Keep the counter in ``state_dir`` (created on first use, mode 0700)."""
        self._dir = state_dir
        self.path = state_dir / SESSION_FILE_NAME

    def current(self) -> int:
        """Return the last allocated session number (0 when none was ever allocated)."""
        try:
            raw = self.path.read_bytes()[: _MAX_FILE_BYTES + 1]
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise AgentStateError(f"cannot read session file {self.path}: {exc.strerror}") from exc
        text = raw.decode("ascii", "replace").strip()
        if len(raw) > _MAX_FILE_BYTES or not text.isdecimal() or not text.isascii():
            raise AgentStateError(
                f"session file {self.path} is corrupt ({text[:20]!r}): "
                "remove it only if this node's old sessions can be forgotten"
            )
        return int(text)

    def allocate(self) -> int:
        """Return a session number greater than every one returned before, durably."""
        with self._locked():
            session = self.current() + 1
            self._write(session)
        log.debug("allocated session %d", session)
        return session

    def advance_past(self, seen: int) -> None:
        """Make the next :meth:`allocate` return more than ``seen`` (a session seen elsewhere).

        The broker may remember a session newer than our file, e.g. after the state dir
        was lost (a container without a volume): receivers would ignore every status of
        ours as stale until our numbers pass theirs.
        """
        with self._locked():
            if self.current() < seen:
                self._write(seen)
                log.info("session counter advanced to %d", seen)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        ensure_state_dir(self._dir)
        # The lock serialises read-modify-write if two processes share a state dir.
        try:
            lock = (self._dir / _LOCK_FILE_NAME).open("a")
        except OSError as exc:
            raise AgentStateError(f"cannot lock {self._dir}: {exc.strerror}") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, session: int) -> None:
        tmp = self.path.with_name(f".{SESSION_FILE_NAME}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, f"{session}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(self.path)
            # Persist the rename itself, or a power cut could bring the old number back.
            dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise AgentStateError(f"cannot write session file {self.path}: {exc.strerror}") from exc
