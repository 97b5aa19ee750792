"""Mosquitto's password file in pure Python: hash, read, add/replace, remove, reload.

Format (mosquitto 2, checked against ``mosquitto_passwd`` 2.0.11), one account a line::

    username:$7$<iterations>$<base64 salt>$<base64 hash>

``$7$`` is PBKDF2-HMAC-SHA512 with a 12-byte random salt and 101 iterations by default;
the hash is the 64-byte derived key; base64 is the standard alphabet with padding.
Older ``$6$`` lines (SHA-512 of password + salt) are read and verified, never written.
Lines we do not understand (comments, blank lines) are kept as they are.

Every change is a locked read-modify-write (``fcntl.flock`` on ``<file>.lock``, so two
``mqfleet provision`` runs cannot lose each other's account) and an atomic 0600 rewrite.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from mqfleet.errors import ConfigError
from mqfleet.security.config_files import PRIVATE_FILE_MODE, write_private_file

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "DEFAULT_ITERATIONS",
    "SALT_BYTES",
    "PasswordFile",
    "add_account",
    "hash_password",
    "reload_broker",
    "remove_account",
    "verify_password",
]

log = logging.getLogger(__name__)

#: mosquitto_passwd's default PBKDF2 iteration count (``-I`` changes it there).
DEFAULT_ITERATIONS: Final = 101
#: mosquitto's salt length in bytes.
SALT_BYTES: Final = 12
_SHA512_PBKDF2: Final = "7"
_SHA512_SALTED: Final = "6"
# mosquitto reads a line into a fixed buffer and splits on the first ':'.
_MAX_USERNAME_CHARS: Final = 65535


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def hash_password(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """Hash ``password`` in mosquitto's ``$7$`` format (the part after ``username:``)."""
    if iterations < 1:
        raise ConfigError("PBKDF2 iterations must be at least 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"${_SHA512_PBKDF2}${iterations}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` or ``$6$`` hash; False for unknown formats."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[0] == "" and parts[1] == _SHA512_PBKDF2:  # noqa: PLR2004
            salt, expected = _unb64(parts[3]), _unb64(parts[4])
            iterations = int(parts[2])
            if iterations < 1:
                return False
            actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
        elif len(parts) == 4 and parts[0] == "" and parts[1] == _SHA512_SALTED:  # noqa: PLR2004
            salt, expected = _unb64(parts[2]), _unb64(parts[3])
            actual = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)


def _check_username(username: str) -> None:
    if not username or username != username.strip():
        raise ConfigError(f"invalid broker username {username[:80]!r}: empty or padded")
    if ":" in username or any(ord(c) < 0x20 or ord(c) == 0x7F for c in username):  # noqa: PLR2004
        raise ConfigError(f"invalid broker username {username[:80]!r}: no ':' or control chars")
    if len(username) > _MAX_USERNAME_CHARS:
        raise ConfigError("invalid broker username: too long")


@dataclass
class PasswordFile:
    """The lines of a mosquitto password file, in order; accounts by username."""

    #: Each line is either ``(username, hash)`` or ``(None, raw text)`` (comment, blank).
    lines: list[tuple[str | None, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, *, source: str = "password file") -> PasswordFile:
        """Parse file contents; raise ConfigError on a line mosquitto would misread."""
        lines: list[tuple[str | None, str]] = []
        seen: set[str] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                lines.append((None, raw))
                continue
            username, sep, encoded = stripped.partition(":")
            if not sep or not username or not encoded:
                raise ConfigError(f"{source} line {number}: expected 'username:hash'")
            if username in seen:
                raise ConfigError(f"{source} line {number}: duplicate account {username!r}")
            seen.add(username)
            lines.append((username, encoded))
        return cls(lines)

    @classmethod
    def read(cls, path: Path) -> PasswordFile:
        """Read ``path``; a missing file is an empty password file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read password file {path}: {exc}") from exc
        return cls.parse(text, source=str(path))

    @property
    def usernames(self) -> list[str]:
        """Account names in file order."""
        return [name for name, _ in self.lines if name is not None]

    def __contains__(self, username: object) -> bool:
        """Whether an account named ``username`` exists."""
        return username in self.usernames

    def hash_of(self, username: str) -> str | None:
        """Return the stored hash of ``username``, or None."""
        return next((enc for name, enc in self.lines if name == username), None)

    def set_password(
        self, username: str, password: str, *, iterations: int = DEFAULT_ITERATIONS
    ) -> bool:
        """Add ``username`` or replace its password in place; return True if it was new."""
        _check_username(username)
        encoded = hash_password(password, iterations=iterations)
        for index, (name, _) in enumerate(self.lines):
            if name == username:
                self.lines[index] = (username, encoded)
                return False
        self.lines.append((username, encoded))
        return True

    def remove(self, username: str) -> bool:
        """Remove ``username``; return whether it existed."""
        before = len(self.lines)
        self.lines = [(name, text) for name, text in self.lines if name != username]
        return len(self.lines) != before

    def check(self, username: str, password: str) -> bool:
        """Whether ``password`` is ``username``'s password."""
        encoded = self.hash_of(username)
        return encoded is not None and verify_password(password, encoded)

    def render(self) -> str:
        """Render the file's text."""
        out = [text if name is None else f"{name}:{text}" for name, text in self.lines]
        return "".join(line + "\n" for line in out)

    def write(self, path: Path, *, mode: int = PRIVATE_FILE_MODE) -> None:
        """Write atomically with ``mode`` (0600; 0640 for a ``root:mosquitto`` file)."""
        write_private_file(path, self.render(), mode=mode)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot lock password file {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def add_account(
    path: Path,
    username: str,
    password: str,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    mode: int = PRIVATE_FILE_MODE,
) -> bool:
    """Add or replace one account in the password file at ``path``; True if it was new."""
    path = Path(path)
    with _locked(path):
        pwfile = PasswordFile.read(path)
        created = pwfile.set_password(username, password, iterations=iterations)
        pwfile.write(path, mode=mode)
    return created


def remove_account(path: Path, username: str, *, mode: int = PRIVATE_FILE_MODE) -> bool:
    """Remove one account from the password file at ``path``; return whether it existed."""
    path = Path(path)
    with _locked(path):
        pwfile = PasswordFile.read(path)
        removed = pwfile.remove(username)
        if removed:
            pwfile.write(path, mode=mode)
    return removed


def reload_broker(pid_file: Path) -> bool:
    """Send SIGHUP to the mosquitto named by ``pid_file`` so it rereads passwords and ACLs.

    Returns False (and logs why) when there is no running broker we may signal; the
    caller then tells the operator to reload it by hand (``systemctl reload mosquitto``).
    """
    try:
        pid = int(Path(pid_file).read_text(encoding="ascii").strip())
    except (OSError, ValueError) as exc:
        log.info("cannot read broker pid file %s: %s", pid_file, exc)
        return False
    if pid <= 1:
        log.info("broker pid file %s holds an invalid pid %d", pid_file, pid)
        return False
    # A stale pid file may name an unrelated process by now, and SIGHUP kills most
    # programs: signal only a process that really is mosquitto.
    comm = Path(f"/proc/{pid}/comm")
    try:
        name: str | None = comm.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        name = None if Path("/proc/self").exists() else "mosquitto"  # no procfs: trust it
    if name != "mosquitto":
        log.info("pid %d from %s is not a running mosquitto (%s)", pid, pid_file, name)
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        log.info("cannot signal broker pid %d: %s", pid, exc.strerror or exc)
        return False
    return True
