"""The mqfleet agent: status lifecycle, metric probes and the command executor.

It never imports the database layer (``mqfleet.store``), SQLAlchemy or SQLModel.
"""

from mqfleet.agent.service import AgentService, run_agent

__all__ = ["AgentService", "run_agent"]
