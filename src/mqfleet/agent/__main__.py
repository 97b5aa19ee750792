"""``mqfleet-agent`` (or ``python -m mqfleet.agent``): the agent alone, as nodes run it.

The same agent as ``mqfleet agent``, started without the operator's CLI: no click and
none of the CLI's modules, which is about 1.3 MiB less resident memory on every node
(issue 5's footprint target). The systemd unit and docs/INSTALL.md use it. Settings,
flags, one-line errors and exit codes are those of ``mqfleet agent``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from mqfleet import __version__
from mqfleet.runtime import (
    ExitCode,
    configure_logging,
    one_line,
    parse_duration,
    report_failure,
    safe_streams,
    serve,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import timedelta

__all__ = ["build_parser", "main"]

PROG = "mqfleet-agent"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and the documented exit code."""

    def error(self, message: str) -> NoReturn:
        """Print ``mqfleet-agent: error: ...`` and exit 2 (usage)."""
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """Build the command line of ``mqfleet-agent`` (the flags of ``mqfleet agent``)."""
    parser = _Parser(
        prog=PROG,
        description="Run the mqfleet agent for this machine until SIGTERM/SIGINT.",
        epilog="Settings: flags > MQFLEET_* environment > TOML config file > defaults.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config file (default: $MQFLEET_CONFIG, else the user config dir).",
    )
    parser.add_argument(
        "--broker", dest="broker_url", metavar="URL", help="mqtt[s]://[user:pass@]host:port"
    )
    parser.add_argument(
        "--prefix", dest="topic_prefix", metavar="PREFIX", help="Topic prefix (fleet/v1)."
    )
    parser.add_argument(
        "--mqtt-version",
        choices=["5", "3.1.1"],
        help="MQTT protocol version (5; 3.1.1 for brokers without MQTT 5).",
    )
    parser.add_argument(
        "--node-id", metavar="NODE", help="This node's id (default: the host name)."
    )
    parser.add_argument(
        "--interval",
        type=_duration,
        metavar="DURATION",
        help="Seconds between metric samples: 10s, 1m.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="Debug logging; tracebacks for bugs."
    )
    parser.add_argument("--version", action="version", version=f"{PROG}, version {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point of ``mqfleet-agent``."""
    safe_streams()
    args = build_parser().parse_args(argv)
    try:
        import logging  # noqa: PLC0415 - after the usage checks, like everything below

        from mqfleet.agent import run_agent  # noqa: PLC0415
        from mqfleet.settings import load_settings  # noqa: PLC0415

        interval: timedelta | None = args.interval
        settings = load_settings(
            args.config,
            broker_url=args.broker_url,
            topic_prefix=args.topic_prefix,
            mqtt_version=args.mqtt_version,
            node_id=args.node_id,
            metrics_interval_s=interval.total_seconds() if interval else None,
        )
        configure_logging(verbose=args.verbose, level=logging.INFO)
        serve(run_agent, settings)
        code = int(ExitCode.OK)
    except KeyboardInterrupt:  # Ctrl-C before the service took over the signals
        sys.stderr.write(f"{PROG}: interrupted\n")
        code = ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        code = report_failure(PROG, exc, verbose=args.verbose)
    sys.exit(code)


if __name__ == "__main__":
    main()
