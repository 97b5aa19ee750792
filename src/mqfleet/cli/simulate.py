"""``mqfleet simulate``: a fleet of simulated agents in one process, for trials and scale.

The simulator is imported inside the command only, so other commands never load it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import click

from mqfleet.cli.app import CliState, pass_state
from mqfleet.cli.durations import DURATION
from mqfleet.cli.exitcodes import ExitCode
from mqfleet.runtime import configure_logging, serve

if TYPE_CHECKING:
    from datetime import timedelta

    from mqfleet.settings import Settings

__all__ = ["simulate"]

log = logging.getLogger(__name__)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--nodes",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="How many simulated agents.",
)
@click.option("--interval", type=DURATION, help="Seconds between metric samples (default 10s).")
@click.option(
    "--prefix",
    "node_prefix",
    default="sim-",
    show_default=True,
    help="Node ids are PREFIX00001, PREFIX00002, ...",
)
@click.option("--seed", type=int, help="Seed of the simulated values (repeatable runs).")
@pass_state
def simulate(
    state: CliState,
    nodes: int,
    interval: timedelta | None,
    node_prefix: str,
    seed: int | None,
) -> int:
    """Run NODES simulated agents until SIGTERM/SIGINT (try dashboards and scale safely).

    Each one speaks the real protocol over its own MQTT connection: retained birth and
    Will, metrics with plausible values, and answers to commands. A simulated node runs
    only true, false, echo, hostname, exit N and sleep N; anything else exits 127.
    """
    settings = state.settings(metrics_interval_s=interval.total_seconds() if interval else None)
    configure_logging(verbose=state.verbose, level=logging.INFO)
    from mqfleet.simulator import Fleet, FleetStats  # noqa: PLC0415 - only this command needs it

    # Validate the node ids and the interval now, for a one-line usage error.
    Fleet(settings, nodes=nodes, prefix=node_prefix, seed=seed)

    def progress(stats: FleetStats) -> None:
        log.info("%s", stats.line())

    async def simulate_fleet(settings: Settings) -> None:
        from mqfleet.simulator import run_simulator  # noqa: PLC0415 - see above

        await run_simulator(settings, nodes=nodes, prefix=node_prefix, seed=seed, progress=progress)

    serve(simulate_fleet, settings)
    return ExitCode.OK
