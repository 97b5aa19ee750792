from __future__ import annotations

import ipaddress
import platform

from mqfleet.agent import hostinfo


def test_os_info_is_short_and_readable(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "release", lambda: "6.1.0-18-amd64")
    monkeypatch.setattr(
        platform,
        "freedesktop_os_release",
        lambda: {"NAME": "Debian GNU/Linux", "VERSION_ID": "12", "ID": "debian"},
    )
    assert hostinfo.os_info() == "Linux 6.1 (Debian 12)"


def test_os_info_without_os_release(monkeypatch):
    def missing():
        raise OSError(2, "No such file")

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "release", lambda: "5.15.0")
    monkeypatch.setattr(platform, "freedesktop_os_release", missing)
    assert hostinfo.os_info() == "Linux 5.15"


def test_os_info_on_this_machine_fits_the_protocol():
    info = hostinfo.os_info()
    assert info.startswith(platform.system())
    assert len(info) <= 255


def test_ip_address_is_never_loopback_when_another_exists():
    address = hostinfo.ip_address("127.0.0.1", 1883)
    ipaddress.ip_address(address)  # valid
    primary = hostinfo._route_source("192.0.2.1", 9)
    if primary is not None:
        assert address == primary


def test_ip_address_of_an_unresolvable_broker_falls_back():
    address = hostinfo.ip_address("no-such-host.invalid", 1883)
    ipaddress.ip_address(address)


def test_hostname_is_bounded():
    assert 0 < len(hostinfo.hostname()) <= 255
