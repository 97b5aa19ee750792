"""The ``mqfleet`` command line: click commands, with rendering kept apart from I/O.

Errors of the :mod:`mqfleet.errors` tree and usage errors are printed as one line
(``mqfleet: error: ...``) with the exit codes of :class:`~mqfleet.cli.exitcodes.ExitCode`.
"""

from mqfleet.cli.app import cli, main

__all__ = ["cli", "main"]
