"""A simulated fleet: thousands of protocol-v1 agents in one process (``mqfleet simulate``).

Like the agent, it never imports the database layer, the collector, the CLI or the agent.
"""

from mqfleet.simulator.actions import BUILTINS, ActionResult, run_builtin
from mqfleet.simulator.fleet import (
    DEFAULT_NODE_PREFIX,
    SIM_CLIENT_ID_PREFIX,
    Fleet,
    FleetStats,
    SimulatedNode,
    run_simulator,
)
from mqfleet.simulator.values import MetricsModel, SimulatedSample

__all__ = [
    "BUILTINS",
    "DEFAULT_NODE_PREFIX",
    "SIM_CLIENT_ID_PREFIX",
    "ActionResult",
    "Fleet",
    "FleetStats",
    "MetricsModel",
    "SimulatedNode",
    "SimulatedSample",
    "run_builtin",
    "run_simulator",
]
