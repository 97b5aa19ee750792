"""Mosquitto password file: format, round trips with mosquitto_passwd, atomic 0600 writes."""

from __future__ import annotations

import base64
import shutil
import stat
import subprocess
import threading
from typing import TYPE_CHECKING

import pytest

from mqfleet.errors import ConfigError
from mqfleet.security import (
    PasswordFile,
    add_account,
    hash_password,
    reload_broker,
    remove_account,
    verify_password,
)
from mqfleet.security.passwords import DEFAULT_ITERATIONS, SALT_BYTES

if TYPE_CHECKING:
    from pathlib import Path

needs_mosquitto_passwd = pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed"
)


def test_hash_has_mosquitto_2_format() -> None:
    encoded = hash_password("secret")
    empty, alg, iterations, salt, digest = encoded.split("$")
    assert (empty, alg, int(iterations)) == ("", "7", DEFAULT_ITERATIONS)
    assert len(base64.b64decode(salt, validate=True)) == SALT_BYTES
    assert len(base64.b64decode(digest, validate=True)) == 64
    assert hash_password("secret") != encoded  # fresh salt each time


def test_known_vector_from_mosquitto_passwd() -> None:
    # Made with: mosquitto_passwd -b -c FILE user pass (mosquitto 2.0.11)
    line = (
        "$7$101$wjNljpjuOS9lxzz5$XPT75L4p6MIeCrRzMxQ0o8rixYP/EQ7L7LmhmZ5haDI7ifjd+njcGSxWF7H6g"
        "RWuQ0SWhZpSdJ3Ke0RqX3vJFQ=="
    )
    assert verify_password("pass", line)
    assert not verify_password("Pass", line)
    salt = base64.b64decode("wjNljpjuOS9lxzz5")
    assert hash_password("pass", salt=salt) == line


def test_verify_refuses_garbage_without_raising() -> None:
    for encoded in ["", "plain", "$7$x$a$b", "$7$101$!!$??", "$7$0$AAAA$AAAA", "$9$1$a$b"]:
        assert not verify_password("pass", encoded)


@needs_mosquitto_passwd
def test_python_reads_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(path), "node-1", "tok1"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(path), "node-2", "tok2"], check=True)
    subprocess.run(
        ["mosquitto_passwd", "-H", "sha512", "-b", str(path), "legacy", "tok3"], check=True
    )
    pwfile = PasswordFile.read(path)
    assert pwfile.usernames == ["node-1", "node-2", "legacy"]
    assert pwfile.check("node-1", "tok1")
    assert pwfile.check("node-2", "tok2")
    assert pwfile.check("legacy", "tok3")  # the older $6$ format
    assert not pwfile.check("node-1", "tok2")


@needs_mosquitto_passwd
def test_mosquitto_passwd_accepts_what_python_writes(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_account(path, "node-1", "tok1")
    add_account(path, "node-2", "tok2")
    # mosquitto_passwd rewrites the whole file: it must parse every line we wrote.
    subprocess.run(["mosquitto_passwd", "-D", str(path), "node-2"], check=True)
    pwfile = PasswordFile.read(path)
    assert pwfile.usernames == ["node-1"]
    assert pwfile.check("node-1", "tok1")


def test_add_replace_remove_keep_order_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("# managed by mqfleet\n\nalice:$6$c2FsdA==$aGFzaA==\n")
    assert add_account(path, "node-1", "one") is True
    assert add_account(path, "alice", "new") is False  # replaced in place
    pwfile = PasswordFile.read(path)
    assert pwfile.usernames == ["alice", "node-1"]
    assert pwfile.check("alice", "new")
    assert path.read_text().startswith("# managed by mqfleet\n\nalice:$7$101$")

    assert remove_account(path, "alice") is True
    assert remove_account(path, "alice") is False
    assert PasswordFile.read(path).usernames == ["node-1"]
    assert "# managed by mqfleet" in path.read_text()


def test_file_is_written_0600_atomically(tmp_path: Path) -> None:
    path = tmp_path / "broker" / "passwd"
    add_account(path, "node-1", "one")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    add_account(path, "node-2", "two")  # a rewrite tightens a loosened file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["passwd", "passwd.lock"]


def test_explicit_group_readable_mode_for_root_mosquitto_files(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_account(path, "node-1", "one", mode=0o640)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_concurrent_provisioning_loses_no_account(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    names = [f"node-{i}" for i in range(16)]
    threads = [threading.Thread(target=add_account, args=(path, n, n)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pwfile = PasswordFile.read(path)
    assert sorted(pwfile.usernames) == sorted(names)
    assert all(pwfile.check(n, n) for n in names)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("justaname\n", "line 1: expected 'username:hash'"),
        ("a:$7$1$x$y\na:$7$1$x$y\n", "line 2: duplicate account 'a'"),
        (":$7$1$x$y\n", "line 1: expected 'username:hash'"),
    ],
)
def test_malformed_file_is_a_one_line_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "passwd"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        PasswordFile.read(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("username", ["", " padded", "a:b", "new\nline"])
def test_invalid_usernames_are_refused(username: str) -> None:
    with pytest.raises(ConfigError, match="invalid broker username"):
        PasswordFile().set_password(username, "x")


def test_unwritable_location_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot"):
        add_account(blocker / "passwd", "node-1", "x")


def test_missing_file_reads_as_empty(tmp_path: Path) -> None:
    assert PasswordFile.read(tmp_path / "absent").usernames == []
    assert remove_account(tmp_path / "absent", "x") is False
    assert not (tmp_path / "absent").exists()


def test_reload_broker_refuses_bad_or_foreign_pid_files(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    assert reload_broker(pid_file) is False  # missing
    pid_file.write_text("garbage")
    assert reload_broker(pid_file) is False
    pid_file.write_text("1")
    assert reload_broker(pid_file) is False
    # A live process that is not mosquitto is never sent SIGHUP (it would die of it).
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        pid_file.write_text(str(sleeper.pid))
        assert reload_broker(pid_file) is False
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
