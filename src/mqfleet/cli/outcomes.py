"""What ``mqfleet run`` knows about each target, and the exit code it implies (no I/O)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from mqfleet.cli.exitcodes import ExitCode

if TYPE_CHECKING:
    from datetime import datetime

    from mqfleet.protocol import CommandFinished

__all__ = ["FAILURE_STATES", "FINAL_STATES", "OutcomeState", "RunReport", "TargetOutcome"]

#: ``waiting``: published, no news yet; ``running``: the agent started it; ``queued``: the
#: node is offline, the collector delivers it when the node returns; ``sent``: published
#: and not waited for (``--no-wait``); ``no_answer``: nothing came back before the deadline.
OutcomeState = Literal[
    "waiting", "running", "queued", "sent", "success", "failed", "timeout", "no_answer"
]
FINAL_STATES: Final[frozenset[str]] = frozenset({"success", "failed", "timeout", "no_answer"})
FAILURE_STATES: Final[frozenset[str]] = frozenset({"failed", "timeout", "no_answer"})


@dataclass
class TargetOutcome:
    """One target node of a run and what became of its command."""

    node_id: str
    command_id: str
    state: OutcomeState
    exit_code: int | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    execution_time_ms: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: str | None = None

    @property
    def finished(self) -> bool:
        """Whether nothing more will be learnt about this target in this run."""
        return self.state in FINAL_STATES

    def mark_started(self, started_at: datetime) -> None:
        """Record the agent's ``running`` notice (ignored once final: results may race)."""
        if self.state == "waiting":
            self.state = "running"
            self.started_at = started_at

    def record(self, result: CommandFinished) -> None:
        """Record the final result."""
        self.state = result.status
        self.exit_code = result.exit_code
        self.started_at = result.started_at or self.started_at
        self.completed_at = result.completed_at
        self.execution_time_ms = result.execution_time_ms
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.stdout_truncated = result.stdout_truncated
        self.stderr_truncated = result.stderr_truncated
        self.error = result.error


@dataclass
class RunReport:
    """Everything ``mqfleet run`` reports: the batch and one outcome per target."""

    batch_id: str
    command_text: str
    issuer: str
    created_at: datetime
    expires_at: datetime
    timeout_s: float
    targets: list[TargetOutcome] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        """Count the targets per state."""
        return Counter(target.state for target in self.targets)

    def awaited(self) -> list[TargetOutcome]:
        """Targets this run waits for (published to a node believed online)."""
        return [t for t in self.targets if t.state not in {"queued", "sent"}]

    def give_up(self) -> None:
        """Mark every target still waiting or running as ``no_answer``."""
        for target in self.targets:
            if target.state in {"waiting", "running"}:
                target.state = "no_answer"
                target.error = target.error or "no result before the deadline"

    def exit_code(self) -> ExitCode:
        """0 all succeeded (or were sent), 1 any failure, else 4 if any are queued."""
        states = {target.state for target in self.targets}
        if states & (FAILURE_STATES | {"waiting", "running"}):
            return ExitCode.FAILED
        if "queued" in states:
            return ExitCode.QUEUED
        return ExitCode.OK
