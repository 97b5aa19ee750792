"""Facts about this host that the agent's birth carries: hostname, address, OS."""

from __future__ import annotations

import ipaddress
import logging
import platform
import re
import socket
from typing import Final

__all__ = ["hostname", "ip_address", "os_info"]

log = logging.getLogger(__name__)

#: TEST-NET-1 (RFC 5737): never routed, so "connecting" a UDP socket to it only asks the
#: kernel which source address the default route would use; no packet is sent.
_PROBE_ADDRESS: Final = ("192.0.2.1", 9)
_FALLBACK_ADDRESS: Final = "127.0.0.1"
_MAX_HOSTNAME: Final = 255
_MAX_OS_INFO: Final = 255


def hostname() -> str:
    """Return this machine's host name (at most 255 characters)."""
    return (socket.gethostname() or "localhost")[:_MAX_HOSTNAME]


def _route_source(host: str, port: int) -> str | None:
    """Return the source address the kernel picks to reach ``host:port`` (sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _name, address in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.connect(address)
                local: str = sock.getsockname()[0]
        except OSError:
            continue
        # An IPv6 scope ("fe80::1%eth0") is local detail and would overflow 45 chars.
        return local.split("%", 1)[0]
    return None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def ip_address(broker_host: str, broker_port: int) -> str:
    """Return the address used to reach the broker, else the primary non-loopback one.

    A broker on the loopback interface would make every node say 127.0.0.1, which tells
    the operator nothing, so then the address of the default route is used instead.
    """
    source = _route_source(broker_host, broker_port)
    if source is not None and not _is_loopback(source):
        return source
    primary = _route_source(*_PROBE_ADDRESS)
    if primary is not None and not _is_loopback(primary):
        return primary
    return source or _FALLBACK_ADDRESS


def _kernel_version(release: str) -> str:
    # "6.1.0-18-amd64" -> "6.1": the distribution suffix is noise in a fleet table.
    match = re.match(r"\d+(?:\.\d+)?", release)
    return match.group(0) if match else release


def _distribution() -> str | None:
    try:
        release = platform.freedesktop_os_release()
    except OSError:
        return None
    name = release.get("NAME") or release.get("ID") or ""
    for suffix in (" GNU/Linux", " Linux"):
        name = name.removesuffix(suffix)
    version = release.get("VERSION_ID", "")
    text = f"{name} {version}".strip()
    return text or None


def os_info() -> str:
    """Return a short OS description such as ``Linux 6.1 (Debian 12)``."""
    system = platform.system() or "unknown"
    text = f"{system} {_kernel_version(platform.release())}".strip()
    distribution = _distribution() if system == "Linux" else None
    if distribution:
        text += f" ({distribution})"
    return text[:_MAX_OS_INFO]
