"""The CLI's documented exit codes (docs/ARCHITECTURE.md and docs/CLI.md).

Defined in :mod:`mqfleet.runtime`, which the click-free ``mqfleet-agent`` shares.
"""

from __future__ import annotations

from mqfleet.runtime import ExitCode, exit_code_for

__all__ = ["ExitCode", "exit_code_for"]
