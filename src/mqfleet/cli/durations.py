"""Durations on the command line: ``30s``, ``10m``, ``1h``, ``7d`` (a bare number is seconds)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Final

import click

__all__ = ["DURATION", "DurationType", "parse_duration"]

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE: Final = re.compile(r"(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>[smhd]?)")
_HINT: Final = "use a number with s, m, h or d, e.g. 30s, 10m, 1h, 7d"
#: Far beyond any sensible window, yet within what datetime arithmetic can represent.
_MAX: Final = timedelta(days=36500)


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``/``10m``/``1h``/``7d`` or plain seconds; ValueError says how to fix it."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"invalid duration {text!r}: {_HINT}")
    value = timedelta(seconds=float(match["amount"]) * _UNITS[match["unit"] or "s"])
    if value <= timedelta(0):
        raise ValueError(f"invalid duration {text!r}: must be more than zero")
    if value > _MAX:
        raise ValueError(f"invalid duration {text!r}: at most {_MAX.days} days")
    return value


class DurationType(click.ParamType[timedelta]):
    """A click parameter type for :func:`parse_duration`."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        """Turn the option's text into a timedelta, or fail with a usage error."""
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION: Final = DurationType()
