"""The commands a simulated node answers: a few shell built-ins, run without a process.

A simulated fleet of thousands of nodes cannot fork a shell per command on one small
machine, and does not need to: ``true``, ``false``, ``echo``, ``hostname``, ``exit N``
and ``sleep N`` give the same results (exit code, output, duration) a real ``/bin/sh``
would. Anything else fails like a missing program does (exit 127), so a dashboard or an
alert rule sees a realistic failure instead of a silent success.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BUILTINS", "ActionResult", "run_builtin"]

#: What /bin/sh exits with when the program is not found.
_NOT_FOUND: Final = 127
_USAGE: Final = 2
#: ``sleep`` longer than this is refused: a simulator must not hold commands for hours.
MAX_SLEEP_S: Final = 3600.0


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What a built-in did: exit code, output, and how long it takes on the node."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    #: Seconds the command runs before it finishes (``sleep``); 0 for the rest.
    duration_s: float = 0.0


def _exit(args: list[str], _hostname: str) -> ActionResult:
    try:
        return ActionResult(int(args[0]) % 256 if args else 0)
    except ValueError:
        return ActionResult(_USAGE, stderr=f"sh: 1: exit: Illegal number: {args[0]}\n")


def _sleep(args: list[str], _hostname: str) -> ActionResult:
    try:
        seconds = float(args[0]) if len(args) == 1 else -1.0
    except ValueError:
        seconds = -1.0
    if not 0.0 <= seconds <= MAX_SLEEP_S:
        return ActionResult(1, stderr=f"sleep: invalid time interval {' '.join(args)!r}\n")
    return ActionResult(0, duration_s=seconds)


_ACTIONS: Final[dict[str, Callable[[list[str], str], ActionResult]]] = {
    "true": lambda _args, _host: ActionResult(0),
    "false": lambda _args, _host: ActionResult(1),
    "echo": lambda args, _host: ActionResult(0, stdout=" ".join(args) + "\n"),
    "hostname": lambda _args, host: ActionResult(0, stdout=host + "\n"),
    "exit": _exit,
    "sleep": _sleep,
}
#: Every command word a simulated node understands.
BUILTINS: Final = tuple(_ACTIONS)


def run_builtin(command_text: str, *, hostname: str) -> ActionResult:
    """Evaluate ``command_text`` as the simulated node ``hostname`` would."""
    try:
        words = shlex.split(command_text)
    except ValueError as exc:  # unbalanced quotes: sh says "Syntax error"
        return ActionResult(_USAGE, stderr=f"sh: 1: Syntax error: {exc}\n")
    if not words:
        return ActionResult(0)
    action = _ACTIONS.get(words[0])
    if action is None:
        return ActionResult(
            _NOT_FOUND,
            stderr=f"sh: 1: {words[0]}: not found "
            f"(a simulated node runs only {', '.join(BUILTINS)})\n",
        )
    return action(words[1:], hostname)
