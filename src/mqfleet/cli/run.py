"""``mqfleet run``: publish one command per target node and wait for the results.

Order matters: the result topics are subscribed *before* any command is published, so a
fast node cannot answer before we listen. Offline targets are not waited for: the
collector keeps their command ``pending`` and republishes it when the node returns.
"""

from __future__ import annotations

import getpass
import math
import os
import socket
import sys
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Final, Literal

import click

from mqfleet.cli import render
from mqfleet.cli.app import CliState, open_store, pass_state
from mqfleet.cli.durations import DURATION
from mqfleet.cli.outcomes import RunReport, TargetOutcome
from mqfleet.errors import ConfigError, MqfleetError, ProtocolError, UnknownNodeError
from mqfleet.protocol import (
    CommandFinished,
    CommandRequest,
    decode_collector_status,
    decode_result,
    encode,
    utc_now,
    validate_node_id,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import aiomqtt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mqfleet.settings import Settings
    from mqfleet.store.queries import NodeRow

__all__ = ["RESULT_MARGIN_S", "RunView", "dispatch", "run"]

#: Extra wait beyond ``--timeout`` for a result: the agent's kill grace (5 s by default),
#: queueing behind other commands on the node, and delivery.
RESULT_MARGIN_S: Final = 10.0
#: Protocol v1 caps ``timeout_s`` at a week.
_MAX_TIMEOUT: Final = timedelta(days=7)
#: Filters per SUBSCRIBE packet and publishes in flight at once, for runs over many nodes.
_CHUNK: Final = 500
#: Protocol v1 caps ``command_text`` (a script belongs on the node, not in a message).
_MAX_COMMAND_CHARS: Final = 65536
#: Node states in which an agent is connected and will answer now.
_REACHABLE: Final = frozenset({"online", "error"})


def _issuer() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"[:255]


class RunView:
    """Prints what ``run`` learns: blocks as results arrive, a live line on a terminal."""

    def __init__(self, *, as_json: bool, wait: bool) -> None:
        """Write JSON only at the end with ``as_json``; a progress line only on a terminal."""
        self.as_json = as_json
        self.wait = wait
        self.colour = render.use_colour(sys.stdout, os.environ)
        self.live = not as_json and wait and sys.stderr.isatty() and not os.environ.get("CI")
        self._line_shown = False
        self._warned: set[str] = set()

    def clear_line(self) -> None:
        """Erase the live progress line, if shown."""
        if self._line_shown:
            click.echo("\r\x1b[K", nl=False, err=True)
            self._line_shown = False

    def published(self, report: RunReport) -> None:
        """Say which targets are queued; with --no-wait, print ``id<TAB>node<TAB>state`` lines."""
        if self.as_json:
            return
        for target in report.targets:
            if target.state == "queued":
                # With --no-wait stdout is only the id lines, for scripts: notices go aside.
                click.echo(render.queued_notice(target, report.expires_at), err=not self.wait)
            if not self.wait:
                click.echo(f"{target.command_id}\t{target.node_id}\t{target.state}")

    def progress(self, report: RunReport) -> None:
        """Redraw the live progress line."""
        if self.live:
            click.echo("\r\x1b[K" + render.progress_line(report), nl=False, err=True)
            self._line_shown = True

    def finished(self, target: TargetOutcome, report: RunReport) -> None:
        """Print one node's block as soon as its result arrives."""
        if self.as_json:
            return
        self.clear_line()
        click.echo(render.target_block(target, colour=self.colour) + "\n")
        self.progress(report)

    def warn(self, key: str, text: str) -> None:
        """Print a warning on stderr, once per ``key``."""
        if key in self._warned:
            return
        self._warned.add(key)
        self.clear_line()
        click.echo(f"mqfleet: warning: {text}", err=True)

    def done(self, report: RunReport) -> None:
        """Print the blocks of targets that never answered, the summary or the JSON."""
        self.clear_line()
        if self.as_json:
            click.echo(render.dumps(render.run_json(report)))
            return
        for target in report.targets:
            if target.state == "no_answer":
                click.echo(render.target_block(target, colour=self.colour) + "\n")
        if self.wait:
            click.echo(render.run_summary(report))


async def _publish_all(
    client: aiomqtt.Client, settings: Settings, requests: Sequence[CommandRequest]
) -> None:
    import asyncio  # noqa: PLC0415 - lean start-up of the read commands, which never need it

    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415 - lean start-up
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    properties = None
    if settings.mqtt_version == "5" and requests:
        # MQTT 5 spec 3.3.2.3.3: the broker drops the message once this many seconds
        # pass, so a node returning after expires_at never even receives it.
        left = (requests[0].expires_at - utc_now()).total_seconds()
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.MessageExpiryInterval = max(1, math.ceil(left))
    for start in range(0, len(requests), _CHUNK):
        chunk = requests[start : start + _CHUNK]
        await asyncio.gather(
            *(
                client.publish(
                    settings.topics.commands(req.node_id),
                    encode(req),
                    qos=1,
                    retain=False,  # a retained command would run again on every resubscribe
                    properties=properties,
                )
                for req in chunk
            )
        )


class _ResultInbox:
    """Matches incoming messages to the targets being waited for."""

    def __init__(self, settings: Settings, report: RunReport, view: RunView) -> None:
        self.topics = settings.topics
        self.report = report
        self.view = view
        self.awaited = {t.command_id: t for t in report.awaited()}
        self.remaining = len(self.awaited)

    def absorb(self, topic: str, payload: bytes) -> Literal["started", "finished"] | None:
        """Take one message; say whether a target started or finished."""
        try:
            parsed = self.topics.parse(topic)
            if parsed.kind == "collector_status":
                self._check_collector(payload)
                return None
            target = self.awaited.get(parsed.command_id or "")
            if parsed.kind != "result" or target is None or target.finished:
                return None
            news = decode_result(payload)
        except ProtocolError as exc:
            self.view.warn(topic, f"ignoring a malformed message: {exc}")
            return None
        if news.node_id != target.node_id:
            return None
        if isinstance(news, CommandFinished):
            target.record(news)
            self.remaining -= 1
            self.view.finished(target, self.report)
            return "finished"
        target.mark_started(news.started_at)
        self.view.progress(self.report)
        return "started"

    def _check_collector(self, payload: bytes) -> None:
        if payload and decode_collector_status(payload).status == "offline":
            self.view.warn(
                "collector",
                "the collector is offline: nothing records these commands "
                "and queued ones are not redelivered until it returns",
            )


async def _collect_results(client: aiomqtt.Client, inbox: _ResultInbox, timeout_s: float) -> None:
    import asyncio  # noqa: PLC0415 - see _publish_all

    loop = asyncio.get_running_loop()
    inbox.view.progress(inbox.report)
    try:
        async with asyncio.timeout(timeout_s + RESULT_MARGIN_S) as deadline:
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                news = inbox.absorb(message.topic.value, payload)
                if news == "finished" and inbox.remaining == 0:
                    return
                if news == "started":
                    # The node's time limit starts now: wait for it, plus the margin.
                    when = loop.time() + timeout_s + RESULT_MARGIN_S
                    current = deadline.when()
                    if current is not None and when > current:
                        deadline.reschedule(when)
    except TimeoutError:
        pass
    finally:
        inbox.report.give_up()


async def dispatch(
    settings: Settings,
    report: RunReport,
    requests: Sequence[CommandRequest],
    view: RunView,
    *,
    wait: bool,
) -> None:
    """Subscribe to the results, publish every request, then wait for the answers."""
    import aiomqtt  # noqa: PLC0415 - lean start-up for the read commands

    from mqfleet.transport import aiomqtt_client, as_broker_error  # noqa: PLC0415

    client = aiomqtt_client(settings, identifier=f"mqfleet-cli-{uuid.uuid4().hex[:16]}")
    topics = settings.topics
    try:
        async with client:
            if wait:
                filters = [(topics.result(t.node_id, t.command_id), 1) for t in report.awaited()]
                filters.append((topics.collector_status(), 1))
                for start in range(0, len(filters), _CHUNK):
                    await client.subscribe(filters[start : start + _CHUNK])
            await _publish_all(client, settings, requests)
            view.published(report)
            if wait and report.awaited():
                inbox = _ResultInbox(settings, report, view)
                await _collect_results(client, inbox, report.timeout_s)
    except aiomqtt.MqttError as exc:
        raise as_broker_error(exc, settings) from exc


def _resolve_targets(
    settings: Settings, node_ids: Sequence[str], *, all_nodes: bool, pattern: str | None
) -> list[NodeRow]:
    from mqfleet.store.queries import list_nodes, match_nodes, nodes_by_id  # noqa: PLC0415

    with open_store(settings) as reader:
        if node_ids:
            wanted = list(dict.fromkeys(node_ids))  # keep order, drop repeats
            found = nodes_by_id(reader, wanted)
            unknown = [n for n in wanted if n not in found]
            if unknown:
                raise UnknownNodeError(unknown)
            return [found[n] for n in wanted]
        if all_nodes:
            targets = list_nodes(reader)
            if not targets:
                raise click.UsageError("the fleet has no nodes yet: nothing to run on")
            return targets
        assert pattern is not None  # noqa: S101 - guaranteed by the option checks
        targets = match_nodes(reader, pattern)
        if not targets:
            raise click.UsageError(f"no node matches {pattern!r}")
        return targets


def _signing_key(settings: Settings) -> Ed25519PrivateKey | None:
    """Load the operator's key; None only with the explicit insecure opt-out."""
    from mqfleet.cli.localfleet import operator_private_key_file  # noqa: PLC0415
    from mqfleet.security.signing import load_private_key  # noqa: PLC0415

    path = operator_private_key_file(settings)
    if path is not None:
        return load_private_key(path)
    if not settings.insecure_unsigned_commands:
        raise ConfigError(
            "no operator private key to sign the command with: run 'mqfleet keys init' "
            "(or set operator_private_key_file); agents refuse unsigned commands"
        )
    click.echo(
        "mqfleet: warning: sending UNSIGNED commands (insecure_unsigned_commands): only "
        "agents that run with insecure_unsigned_commands and no public key accept them",
        err=True,
    )
    return None


def _sign(key: Ed25519PrivateKey | None, requests: list[CommandRequest]) -> list[CommandRequest]:
    if key is None:
        return requests
    from mqfleet.security.signing import sign_command  # noqa: PLC0415

    return [sign_command(req, key) for req in requests]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-n", "--node", "node_ids", multiple=True, metavar="NODE", help="Target (repeat).")
@click.option("--all", "all_nodes", is_flag=True, help="Every node of the fleet.")
@click.option("--match", "pattern", metavar="GLOB", help="Nodes whose id matches, e.g. 'web-*'.")
@click.option(
    "--timeout", type=DURATION, default="60s", show_default=True, help="Time limit on the node."
)
@click.option(
    "--expires",
    type=DURATION,
    default="10m",
    show_default=True,
    help="Drop the command if not delivered by then (offline nodes).",
)
@click.option("--no-wait", is_flag=True, help="Print the command ids and return at once.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document at the end.")
@click.option(
    "--insecure-unsigned",
    is_flag=True,
    help="DEVELOPMENT ONLY: send unsigned commands when no operator key exists.",
)
@click.argument("command", nargs=-1, required=True)
@pass_state
def run(
    state: CliState,
    *,
    insecure_unsigned: bool,
    node_ids: tuple[str, ...],
    pattern: str | None,
    timeout: timedelta,
    expires: timedelta,
    command: tuple[str, ...],
    all_nodes: bool,
    no_wait: bool,
    as_json: bool,
) -> int:
    """Run a shell command on nodes: mqfleet run -n web-1 -- uptime.

    The words after -- are joined with spaces and run by /bin/sh on each node (as ssh
    does). Exit 0 if every target succeeded, 1 if any failed, timed out or did not
    answer, 4 if none failed but some are offline and their command is queued.
    """
    if sum((bool(node_ids), all_nodes, pattern is not None)) != 1:
        raise click.UsageError("choose the targets with exactly one of -n/--node, --all, --match")
    command_text = " ".join(command)
    if not command_text.strip():
        raise click.UsageError("the command is empty")
    if len(command_text) > _MAX_COMMAND_CHARS:
        raise click.UsageError(f"the command is longer than {_MAX_COMMAND_CHARS} characters")
    if timeout > _MAX_TIMEOUT:
        raise click.BadParameter("at most 7d", param_hint="'--timeout'")
    for node_id in node_ids:
        try:
            validate_node_id(node_id)
        except ProtocolError as exc:
            raise click.BadParameter(str(exc), param_hint="'-n/--node'") from None
    settings = state.settings(insecure_unsigned_commands=insecure_unsigned or None)
    key = _signing_key(settings)  # before anything else: no key, no command
    targets = _resolve_targets(settings, node_ids, all_nodes=all_nodes, pattern=pattern)

    created_at = utc_now()
    report = RunReport(
        batch_id=str(uuid.uuid4()),
        command_text=command_text,
        issuer=_issuer(),
        created_at=created_at,
        expires_at=created_at + expires,
        timeout_s=timeout.total_seconds(),
    )
    requests: list[CommandRequest] = []
    for node in targets:
        command_id = str(uuid.uuid4())
        requests.append(
            CommandRequest(
                command_id=command_id,
                node_id=node.node_id,
                command_text=command_text,
                timeout_s=report.timeout_s,
                created_at=created_at,
                expires_at=report.expires_at,
                issuer=report.issuer,
                batch_id=report.batch_id,
            )
        )
        outcome = TargetOutcome(node.node_id, command_id, "sent" if no_wait else "waiting")
        if node.status not in _REACHABLE:
            outcome.state = "queued"
        report.targets.append(outcome)
    requests = _sign(key, requests)

    import asyncio  # noqa: PLC0415 - see _publish_all

    view = RunView(as_json=as_json, wait=not no_wait)
    try:
        asyncio.run(dispatch(settings, report, requests, view, wait=not no_wait))
    except MqfleetError:
        view.clear_line()  # leave the terminal line clean before the error
        raise
    view.done(report)
    return report.exit_code()
