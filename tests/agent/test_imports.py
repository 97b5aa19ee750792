from __future__ import annotations

import subprocess
import sys

import mqfleet.agent


def test_agent_never_imports_the_database_layer():
    # A fresh interpreter: this test process has the store loaded by other tests.
    code = (
        "import sys, mqfleet.agent, mqfleet.agent.service\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'sqlalchemy', 'sqlmodel',"
        " 'alembic'} or m.startswith('mqfleet.store') or m.startswith('mqfleet.collector'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


def test_public_api():
    assert mqfleet.agent.__all__ == ["AgentService", "run_agent"]
