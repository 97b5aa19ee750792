"""Pure rendering of CLI output: tables, ages, JSON documents, run blocks (no I/O).

JSON field names are part of the CLI's contract (docs/CLI.md): add fields, never rename.
Times in JSON are RFC 3339 UTC with a ``Z``; in tables they are ages ("12s ago").

This runs over every row of ``mqfleet nodes`` (10,000 nodes, issue 5: the whole process in
300 ms), so the per-row work is kept small: JSON is written by msgspec (the rows and their
times encoded as they are, no dict per row), tables are padded by one format string per
line, and colour codes are made once per status.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import click
import msgspec

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from mqfleet.cli.outcomes import RunReport, TargetOutcome
    from mqfleet.store.queries import CommandDetail, CommandRow, MetricRow, NodeDetail, NodeRow

__all__ = [
    "STALE_FACTOR",
    "command_detail_text",
    "command_json",
    "commands_table",
    "dumps",
    "format_age",
    "format_duration_ms",
    "metric_json",
    "metrics_json",
    "metrics_table",
    "node_detail_json",
    "node_detail_text",
    "node_json",
    "nodes_json",
    "nodes_table",
    "progress_line",
    "queued_notice",
    "rfc3339",
    "run_json",
    "run_summary",
    "safe_text",
    "stale_nodes",
    "stale_warning",
    "style_state",
    "target_block",
    "use_colour",
]

#: A node the collector keeps "online" must be heard from within 3 intervals (the
#: collector's own heartbeat timeout); beyond that plus a grace, nothing is recording.
STALE_FACTOR: Final = 3.0
_STALE_GRACE: Final = timedelta(seconds=30)
_DEFAULT_INTERVAL_S: Final = 10.0

_COLOURS: Final[Mapping[str, str]] = {
    "online": "green",
    "success": "green",
    "offline": "red",
    "failed": "red",
    "timeout": "red",
    "no_answer": "red",
    "error": "yellow",
    "pending": "yellow",
    "running": "yellow",
    "waiting": "yellow",
    "queued": "yellow",
    "sent": "cyan",
}
# C0 controls except tab/newline, DEL and C1 controls: a result must not be able to
# move the cursor, retitle the terminal or clear the screen of whoever reads it.
_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Lone surrogates (from a JSON "\udcff" escape) cannot be encoded for any terminal.
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")


def use_colour(stream: Any, environ: Mapping[str, str]) -> bool:  # noqa: ANN401 - any text stream
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    if environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def style_state(state: str, *, colour: bool, text: str | None = None) -> str:
    """Render a status (``text`` if given, padded by the caller) in its colour."""
    shown = state if text is None else text
    fg = _COLOURS.get(state)
    if not colour or fg is None:
        return shown
    return click.style(shown, fg=fg, bold=True if state in {"failed", "no_answer"} else None)


def safe_text(text: str) -> str:
    """Make output terminal-safe: escape control characters, replace lone surrogates."""
    text = _SURROGATE_RE.sub("\ufffd", text)
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _field(text: str) -> str:
    """Make a node-supplied field (hostname, reason, ...) terminal-safe; fast when clean."""
    return text if text.isprintable() else safe_text(text)


def rfc3339(value: datetime | None) -> str | None:
    """RFC 3339 UTC with a ``Z`` (None stays None)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def format_age(then: datetime | None, now: datetime) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago``; ``in 5m`` for the future; ``never``."""
    if then is None:
        return "never"
    seconds = (now - then).total_seconds()
    future = seconds < -1  # tolerate a second of clock skew between hosts
    seconds = abs(seconds)
    if seconds < 60:  # noqa: PLR2004 - one minute
        amount = f"{int(seconds)}s"
    elif seconds < 3600:  # noqa: PLR2004 - one hour
        amount = f"{int(seconds // 60)}m"
    elif seconds < 86400:  # noqa: PLR2004 - one day
        amount = f"{int(seconds // 3600)}h"
    else:
        amount = f"{int(seconds // 86400)}d"
    return f"in {amount}" if future else f"{amount} ago"


def format_duration_ms(ms: int | None) -> str:
    """``850 ms``, ``1.2 s``, ``2m 03s``; ``-`` when unknown."""
    if ms is None:
        return "-"
    if ms < 1000:  # noqa: PLR2004 - one second
        return f"{ms} ms"
    if ms < 60_000:  # noqa: PLR2004 - one minute
        return f"{ms / 1000:.1f} s"
    minutes, seconds = divmod(ms // 1000, 60)
    return f"{minutes}m {seconds:02d}s"


def _number(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{suffix}"


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    state_column: int | None = None,
    colour: bool = False,
) -> str:
    """Left-aligned columns separated by two spaces; ``state_column`` is coloured."""
    widths = [len(h) for h in headers]
    for i, column in enumerate(zip(*rows, strict=True)):
        widths[i] = max(widths[i], *map(len, column))
    last = len(headers) - 1
    # One format string pads a whole line (the last column is not padded): far cheaper
    # than a call per cell over 10,000 rows.
    specs = ["{}" if i == last else f"{{:<{w}}}" for i, w in enumerate(widths)]
    lines = ["  ".join(specs).format(*headers).rstrip()]
    if not colour or state_column is None:
        line = "  ".join(specs).format
        lines += [line(*row).rstrip() for row in rows]
    else:
        # Pad first, then colour: ANSI codes have no width on screen. A status takes a
        # handful of values, so each is padded and styled once.
        width = 0 if state_column == last else widths[state_column]
        specs[state_column] = "{}"
        line = "  ".join(specs).format
        styled: dict[str, str] = {}
        for row in rows:
            cells = list(row)
            state = cells[state_column]
            text = styled.get(state)
            if text is None:
                text = styled[state] = style_state(state, colour=True, text=state.ljust(width))
            cells[state_column] = text
            lines.append(line(*cells).rstrip())
    return "\n".join(lines)


def _plain_json(document: object) -> str:
    # The stdlib encoder, for what msgspec refuses: a lone surrogate (from a "\udcff"
    # escape in an agent's JSON) cannot be UTF-8, and the stdlib keeps it for the output
    # stream to replace. to_builtins turns rows and times into what json.dumps takes,
    # times exactly as msgspec writes them.
    import json  # noqa: PLC0415 - rarely needed

    return json.dumps(msgspec.to_builtins(document), indent=2, ensure_ascii=False)


def dumps(document: object) -> str:
    """Serialise a CLI JSON document: indented, UTF-8, keys in insertion order.

    ``document`` holds JSON values, rows of :mod:`mqfleet.store.queries` (objects of their
    fields, in order) and aware UTC datetimes (RFC 3339 with a ``Z``). msgspec writes it
    as ``json.dumps(indent=2, ensure_ascii=False)`` did, ~15x faster; the one difference
    is the form of floats in exponent notation (``1e-07`` is now ``1e-7``, the same value).
    """
    try:
        return msgspec.json.format(msgspec.json.encode(document), indent=2).decode()
    except UnicodeEncodeError:
        return _plain_json(document)


# -- nodes ---------------------------------------------------------------------------
def node_json(node: NodeRow) -> dict[str, Any]:
    """One node as a JSON object."""
    return {
        "node_id": node.node_id,
        "hostname": node.hostname,
        "ip_address": node.ip_address,
        "os_info": node.os_info,
        "status": node.status,
        "status_reason": node.status_reason,
        "last_heartbeat": rfc3339(node.last_heartbeat),
        "registered_at": rfc3339(node.registered_at),
        "updated_at": rfc3339(node.updated_at),
        "session": node.session,
        "interval_s": node.interval_s,
        "agent_version": node.agent_version,
    }


def nodes_json(nodes: Sequence[NodeRow]) -> dict[str, Any]:
    """Build the ``mqfleet nodes --json`` document (for :func:`dumps`).

    The rows go in as they are: a :class:`NodeRow`'s fields are the documented NODE object
    of :func:`node_json`, in the same order (tests/cli/test_render.py checks that both
    agree), and msgspec encodes them without a dict per node.
    """
    return {"nodes": nodes}


def stale_nodes(nodes: Sequence[NodeRow], now: datetime) -> list[NodeRow]:
    """Nodes marked online that nobody has heard from for 3 intervals plus a grace.

    The collector marks such nodes offline itself, so their existence means the collector
    is not running (or not keeping up): the table is out of date.
    """
    # "now - heartbeat > limit" as "heartbeat < now - limit": one cut-off per interval
    # (a fleet has few), one comparison per node.
    cutoffs: dict[float | None, datetime | None] = {}
    stale = []
    for node in nodes:
        if node.status != "online":
            continue
        if node.interval_s in cutoffs:
            cutoff = cutoffs[node.interval_s]
        else:
            seconds = STALE_FACTOR * (node.interval_s or _DEFAULT_INTERVAL_S)
            try:
                cutoff = now - timedelta(seconds=seconds) - _STALE_GRACE
            except OverflowError:  # a limit reaching before year 1: nothing is that old
                cutoff = None
            cutoffs[node.interval_s] = cutoff
        heartbeat = node.last_heartbeat
        if heartbeat is None or (cutoff is not None and heartbeat < cutoff):
            stale.append(node)
    return stale


def stale_warning(stale: Sequence[NodeRow], now: datetime) -> str | None:
    """Word the warning for :func:`stale_nodes` (None when everything is fresh)."""
    if not stale:
        return None
    newest = max((n.last_heartbeat for n in stale if n.last_heartbeat), default=None)
    return (
        f"warning: {len(stale)} node(s) shown online were last heard {format_age(newest, now)}"
        " or earlier: is 'mqfleet collector' running? The data may be out of date."
    )


def nodes_table(nodes: Sequence[NodeRow], now: datetime, *, colour: bool) -> str:
    """Render the ``mqfleet nodes`` table."""
    if not nodes:
        return "no nodes yet: start an agent ('mqfleet agent') and the collector"
    rows = [
        [
            n.node_id,
            n.status,
            format_age(n.last_heartbeat, now),
            _field(n.hostname),
            _field(n.ip_address),
            _field(n.agent_version or "-"),
            _field(n.status_reason or ""),
        ]
        for n in nodes
    ]
    headers = ["NODE", "STATUS", "LAST SEEN", "HOSTNAME", "IP", "AGENT", "REASON"]
    return render_table(headers, rows, state_column=1, colour=colour)


def metric_json(metric: MetricRow) -> dict[str, Any]:
    """One metrics sample as a JSON object."""
    return {
        "node_id": metric.node_id,
        "metric_time": rfc3339(metric.metric_time),
        "cpu_usage": metric.cpu_usage,
        "memory_usage": metric.memory_usage,
        "disk_usage": metric.disk_usage,
        "load_average": metric.load_average,
    }


def metrics_json(node_id: str, metrics: Sequence[MetricRow]) -> dict[str, Any]:
    """Build the ``mqfleet metrics --json`` document (for :func:`dumps`).

    As :func:`nodes_json`: a :class:`MetricRow`'s fields are the METRIC object of
    :func:`metric_json`, in order, so the rows are encoded as they are.
    """
    return {"node_id": node_id, "metrics": metrics}


def node_detail_json(detail: NodeDetail, *, window: str) -> dict[str, Any]:
    """Build the ``mqfleet show --json`` document."""
    return {
        "node": node_json(detail.node),
        "latest_metric": metric_json(detail.latest_metric) if detail.latest_metric else None,
        "metrics_window": window,
        "metrics_in_window": detail.recent_metric_count,
        "commands": dict(sorted(detail.command_counts.items())),
    }


def node_detail_text(detail: NodeDetail, now: datetime, *, colour: bool, window: str) -> str:
    """Render the ``mqfleet show`` text."""
    n = detail.node
    status = style_state(n.status, colour=colour)
    if n.status_reason:
        status += f" ({_field(n.status_reason)})"
    lines = [
        f"node:          {n.node_id}",
        f"status:        {status}",
        f"last seen:     {format_age(n.last_heartbeat, now)}"
        + (f" ({rfc3339(n.last_heartbeat)})" if n.last_heartbeat else ""),
        f"hostname:      {_field(n.hostname)}",
        f"ip address:    {_field(n.ip_address)}",
        f"os:            {_field(n.os_info or '-')}",
        f"agent:         {_field(n.agent_version or '-')} (session {n.session})",
        f"interval:      {_number(n.interval_s, ' s')}",
        f"registered:    {format_age(n.registered_at, now)} ({rfc3339(n.registered_at)})",
    ]
    m = detail.latest_metric
    if m is None:
        lines.append("latest metric: none")
    else:
        lines.append(
            f"latest metric: {format_age(m.metric_time, now)}: cpu {_number(m.cpu_usage, '%')}"
            f"  mem {_number(m.memory_usage, '%')}  disk {_number(m.disk_usage, '%')}"
            f"  load {_number(m.load_average)}"
        )
    lines.append(f"samples ({window}): {detail.recent_metric_count}")
    counts = ", ".join(f"{n} {s}" for s, n in sorted(detail.command_counts.items()))
    lines.append(f"commands:      {counts or 'none'}")
    return "\n".join(lines)


def metrics_table(metrics: Sequence[MetricRow], now: datetime) -> str:
    """Render the ``mqfleet metrics`` table, newest first."""
    if not metrics:
        return "no metrics in this window"
    rows = [
        [
            rfc3339(m.metric_time) or "",
            format_age(m.metric_time, now),
            _number(m.cpu_usage),
            _number(m.memory_usage),
            _number(m.disk_usage),
            _number(m.load_average),
        ]
        for m in metrics
    ]
    return render_table(["TIME", "AGE", "CPU%", "MEM%", "DISK%", "LOAD"], rows)


# -- commands ------------------------------------------------------------------------
def command_json(command: CommandRow) -> dict[str, Any]:
    """One command (with its result's headline) as a JSON object."""
    return {
        "command_id": command.command_id,
        "node_id": command.target_node_id,
        "command_text": command.command_text,
        "status": command.status,
        "exit_code": command.exit_code,
        "created_at": rfc3339(command.created_at),
        "started_at": rfc3339(command.started_at),
        "completed_at": rfc3339(command.completed_at),
        "expires_at": rfc3339(command.expires_at),
        "execution_time_ms": command.execution_time_ms,
        "timeout_s": command.timeout_s,
        "issuer": command.issuer,
        "batch_id": command.batch_id,
        "error": command.error,
    }


def _one_line(text: str, width: int) -> str:
    flat = safe_text(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def commands_table(commands: Sequence[CommandRow], now: datetime, *, colour: bool) -> str:
    """Render the ``mqfleet commands`` table, newest first."""
    if not commands:
        return "no commands"
    rows = [
        [
            c.command_id,
            c.target_node_id,
            c.status,
            "-" if c.exit_code is None else str(c.exit_code),
            format_age(c.created_at, now),
            format_duration_ms(c.execution_time_ms),
            _one_line(c.command_text, 40),
        ]
        for c in commands
    ]
    headers = ["COMMAND ID", "NODE", "STATUS", "EXIT", "CREATED", "DURATION", "COMMAND"]
    return render_table(headers, rows, state_column=2, colour=colour)


def command_detail_json(detail: CommandDetail) -> dict[str, Any]:
    """Build the ``mqfleet result --json`` document."""
    doc = command_json(detail.command)
    doc["result"] = (
        {
            "exit_code": detail.command.exit_code,
            "stdout": detail.stdout or "",
            "stderr": detail.stderr or "",
            "stdout_truncated": detail.stdout_truncated,
            "stderr_truncated": detail.stderr_truncated,
            "execution_time_ms": detail.command.execution_time_ms,
            "error": detail.command.error,
            "received_at": rfc3339(detail.result_created_at),
        }
        if detail.has_result
        else None
    )
    return doc


def _output_section(name: str, text: str, *, truncated: bool) -> list[str]:
    if not text and not truncated:
        return []
    body = safe_text(text).rstrip("\n")
    note = " (truncated by the agent: head and tail kept)" if truncated else ""
    return [f"--- {name}{note}", body] if body else [f"--- {name}{note}"]


def command_detail_text(detail: CommandDetail, now: datetime, *, colour: bool) -> str:
    """Render the ``mqfleet result`` text: header fields, then the full output."""
    c = detail.command
    lines = [
        f"command:   {c.command_id}",
        f"node:      {c.target_node_id}",
        f"status:    {style_state(c.status, colour=colour)}",
        f"exit code: {'-' if c.exit_code is None else c.exit_code}",
        f"command:   {safe_text(c.command_text)}",
        f"issuer:    {c.issuer or '-'}" + (f" (batch {c.batch_id})" if c.batch_id else ""),
        f"created:   {format_age(c.created_at, now)} ({rfc3339(c.created_at)})",
        f"started:   {rfc3339(c.started_at) or '-'}",
        f"completed: {rfc3339(c.completed_at) or '-'}",
        f"duration:  {format_duration_ms(c.execution_time_ms)}",
        f"expires:   {rfc3339(c.expires_at) or '-'}",
    ]
    if c.error:
        lines.append(f"error:     {safe_text(c.error)}")
    if not detail.has_result:
        lines.append("no result yet")
    else:
        lines += _output_section("stdout", detail.stdout or "", truncated=detail.stdout_truncated)
        lines += _output_section("stderr", detail.stderr or "", truncated=detail.stderr_truncated)
    return "\n".join(lines)


# -- run -----------------------------------------------------------------------------
def progress_line(report: RunReport) -> str:
    """``7/10 done: 6 ok, 1 failed, 3 waiting`` over the targets being waited for."""
    counts = report.counts()
    awaited = report.awaited()
    done = sum(1 for t in awaited if t.finished)
    failed = counts["failed"] + counts["timeout"] + counts["no_answer"]
    waiting = counts["waiting"] + counts["running"]
    line = f"{done}/{len(awaited)} done: {counts['success']} ok, {failed} failed, {waiting} waiting"
    return line + (f", {counts['queued']} queued" if counts["queued"] else "")


def target_block(target: TargetOutcome, *, colour: bool) -> str:
    """One node's result: a header line, then stdout, stderr and the error if any."""
    state = target.state.replace("_", " ")
    parts = [target.node_id, style_state(target.state, colour=colour, text=state)]
    if target.exit_code is not None:
        parts.append(f"exit {target.exit_code}")
    if target.execution_time_ms is not None:
        parts.append(format_duration_ms(target.execution_time_ms))
    parts.append(target.command_id)
    lines = [" | ".join(parts)]
    lines += _output_section("stdout", target.stdout, truncated=target.stdout_truncated)
    lines += _output_section("stderr", target.stderr, truncated=target.stderr_truncated)
    if target.error:
        lines.append(f"error: {safe_text(target.error)}")
    return "\n".join(lines)


def queued_notice(target: TargetOutcome, expires_at: datetime) -> str:
    """Say that a target is offline and its command queued."""
    return (
        f"queued: node {target.node_id} is offline; delivered when it returns before "
        f"{rfc3339(expires_at)} (command {target.command_id})"
    )


def run_summary(report: RunReport) -> str:
    """Render the closing line of ``run``: ``10 targets: 8 ok, 1 failed, 1 queued``."""
    counts = report.counts()
    order = ["success", "failed", "timeout", "no_answer", "waiting", "running", "queued", "sent"]
    labels = {"success": "ok", "no_answer": "no answer"}
    parts = [f"{counts[s]} {labels.get(s, s)}" for s in order if counts[s]]
    noun = "target" if len(report.targets) == 1 else "targets"
    return f"{len(report.targets)} {noun}: " + ", ".join(parts)


#: Keys of the ``summary`` object of ``run --json``, always all present.
_SUMMARY_STATES: Final = ("success", "failed", "timeout", "no_answer", "queued", "sent")


def _target_json(target: TargetOutcome) -> dict[str, Any]:
    return {
        "node_id": target.node_id,
        "command_id": target.command_id,
        "status": target.state,
        "exit_code": target.exit_code,
        "started_at": rfc3339(target.started_at),
        "completed_at": rfc3339(target.completed_at),
        "execution_time_ms": target.execution_time_ms,
        "stdout": target.stdout,
        "stderr": target.stderr,
        "stdout_truncated": target.stdout_truncated,
        "stderr_truncated": target.stderr_truncated,
        "error": target.error,
    }


def run_json(report: RunReport) -> dict[str, Any]:
    """Build the ``mqfleet run --json`` document."""
    counts = report.counts()
    return {
        "batch_id": report.batch_id,
        "command_text": report.command_text,
        "issuer": report.issuer,
        "created_at": rfc3339(report.created_at),
        "expires_at": rfc3339(report.expires_at),
        "timeout_s": report.timeout_s,
        "exit_code": int(report.exit_code()),
        "summary": {"targets": len(report.targets), **{s: counts[s] for s in _SUMMARY_STATES}},
        "results": [_target_json(t) for t in report.targets],
    }
