import pytest

from mqfleet.simulator import BUILTINS, run_builtin


@pytest.mark.parametrize(
    ("command", "exit_code", "stdout"),
    [
        ("true", 0, ""),
        ("false", 1, ""),
        ("echo hello   world", 0, "hello world\n"),
        ("echo 'a  b'", 0, "a  b\n"),
        ("hostname", 0, "sim-00001\n"),
        ("exit 3", 3, ""),
        ("exit 300", 44, ""),
        ("", 0, ""),
    ],
)
def test_builtins_answer_like_sh(command, exit_code, stdout):
    result = run_builtin(command, hostname="sim-00001")
    assert (result.exit_code, result.stdout, result.duration_s) == (exit_code, stdout, 0.0)


def test_sleep_takes_its_time_without_blocking():
    assert run_builtin("sleep 1.5", hostname="n").duration_s == 1.5
    assert run_builtin("sleep forever", hostname="n").exit_code == 1
    assert run_builtin("sleep 99999", hostname="n").exit_code == 1


def test_unknown_commands_and_bad_syntax_fail_like_sh():
    missing = run_builtin("uptime -p", hostname="n")
    assert missing.exit_code == 127
    assert "uptime: not found" in missing.stderr
    assert all(name in missing.stderr for name in BUILTINS)
    assert run_builtin("echo 'unbalanced", hostname="n").exit_code == 2
    assert run_builtin("exit x", hostname="n").exit_code == 2
