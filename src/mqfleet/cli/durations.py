"""Durations on the command line: ``30s``, ``10m``, ``1h``, ``7d`` (a bare number is seconds)."""

from __future__ import annotations

from datetime import timedelta
from typing import Final

import click

from mqfleet.runtime import parse_duration

__all__ = ["DURATION", "DurationType", "parse_duration"]  # parse_duration: from mqfleet.runtime


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
