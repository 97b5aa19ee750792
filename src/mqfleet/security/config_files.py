"""Files that hold secrets: atomic 0600 writes, permission checks, agent config files.

Tokens and private keys live in files only (never in logs, ``--json`` output or argv).
Every such file is written whole or not at all (temporary file + fsync + rename, then an
fsync of the directory), created with mode 0600 from the first byte, so a crash or a
concurrent reader never sees a half-written or briefly world-readable secret.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import quote, urlsplit, urlunsplit

from mqfleet.errors import ConfigError
from mqfleet.security.tokens import validate_node_account, validate_token
from mqfleet.settings import BrokerAddress

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "PRIVATE_FILE_MODE",
    "TomlValue",
    "broker_url_with_credentials",
    "check_private_file",
    "render_agent_config",
    "render_toml",
    "warn_if_exposed",
    "write_agent_config",
    "write_private_file",
]

log = logging.getLogger(__name__)

#: Owner read/write only.
PRIVATE_FILE_MODE: Final = 0o600
_GROUP_OR_WORLD: Final = stat.S_IRWXG | stat.S_IRWXO

#: A value :func:`render_toml` can write.
TomlValue = str | int | float | bool | Path


def write_private_file(path: Path, data: bytes | str, *, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` (default 0600).

    An existing file's owner and group are kept when we may (running as root), so
    rewriting the broker's password file does not lock the broker out of it.
    Raises :class:`ConfigError` with a one-line message when the file cannot be written.
    """
    payload = data.encode() if isinstance(data, str) else data
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        previous = path.stat() if path.exists() else None
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    try:
        # mkstemp creates the file 0600 already; chmod states the final mode explicitly.
        os.fchmod(fd, mode)
        if previous is not None and os.geteuid() == 0:
            os.fchown(fd, previous.st_uid, previous.st_gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        _fsync_directory(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_private_file(path: Path) -> str | None:
    """Return a one-line warning if ``path`` is group/world-accessible, else None."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if mode & _GROUP_OR_WORLD:
        return (
            f"{path} holds secrets but is accessible by group/others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    return None


def warn_if_exposed(path: Path, logger: logging.Logger | None = None) -> bool:
    """Log a warning if ``path`` is group/world-accessible; return whether it is."""
    warning = check_private_file(path)
    if warning is not None:
        (logger or log).warning("%s", warning)
    return warning is not None


def broker_url_with_credentials(broker_url: str, *, username: str, password: str) -> str:
    """``broker_url`` with ``username:password@`` set (replacing any credentials in it)."""
    BrokerAddress.parse(broker_url)  # one-line ConfigError on a bad URL
    parts = urlsplit(broker_url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal: urlsplit strips the brackets
        host = f"[{host}]"
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _toml_string(value: str) -> str:
    out = ['"']
    for char in value:
        if char in {'"', "\\"}:
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # noqa: PLR2004 - control characters
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_value(key: str, value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"setting {key} must be a finite number")
        return repr(value)
    return _toml_string(str(value))


def render_toml(values: Mapping[str, TomlValue], *, header: str = "") -> str:
    """Render flat ``key = value`` TOML (the shape of mqfleet's config file)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for key, value in values.items():
        if not key.replace("_", "").isalnum() or not key.isascii():
            raise ConfigError(f"invalid config key {key!r}")
        lines.append(f"{key} = {_toml_value(key, value)}")
    return "\n".join(lines) + "\n"


def render_agent_config(
    *,
    node_id: str,
    broker_url: str,
    token: str,
    operator_public_key_file: Path | None = None,
    topic_prefix: str | None = None,
    ca_file: Path | None = None,
    extra: Mapping[str, TomlValue] | None = None,
) -> str:
    """Render one agent's TOML config: its node id, broker URL with its token, and more.

    Keys are :class:`mqfleet.settings.Settings` field names; ``extra`` adds more of them.
    The token is placed in the broker URL's password, where the settings look for it.
    """
    validate_node_account(node_id)
    validate_token(token)
    values: dict[str, TomlValue] = {
        "node_id": node_id,
        "broker_url": broker_url_with_credentials(broker_url, username=node_id, password=token),
    }
    if topic_prefix is not None:
        values["topic_prefix"] = topic_prefix
    if ca_file is not None:
        values["ca_file"] = Path(ca_file).resolve()
    if operator_public_key_file is not None:
        values["operator_public_key_file"] = Path(operator_public_key_file).resolve()
    values.update(extra or {})
    header = (
        f"mqfleet agent config for node {node_id}.\n"
        "Holds the node's broker token: keep it mode 0600, never share or log it."
    )
    return render_toml(values, header=header)


def write_agent_config(
    path: Path,
    *,
    node_id: str,
    broker_url: str,
    token: str,
    operator_public_key_file: Path | None = None,
    topic_prefix: str | None = None,
    ca_file: Path | None = None,
    extra: Mapping[str, TomlValue] | None = None,
) -> Path:
    """Write the agent's config (see :func:`render_agent_config`) to ``path`` with mode 0600."""
    text = render_agent_config(
        node_id=node_id,
        broker_url=broker_url,
        token=token,
        operator_public_key_file=operator_public_key_file,
        topic_prefix=topic_prefix,
        ca_file=ca_file,
        extra=extra,
    )
    write_private_file(path, text)
    return path
