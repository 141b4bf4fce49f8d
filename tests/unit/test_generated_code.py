from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_relay_proto_matches_protos() -> None:
    """Fails when protos/ changed without `python scripts/gen_protos.py`."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_agent_imports_without_server_packages() -> None:
    """The agent's install has no SQLAlchemy, cryptography or bcrypt."""
    code = (
        "import sys\n"
        "for name in ('sqlalchemy', 'cryptography', 'bcrypt', 'aiosqlite', 'alembic'):\n"
        "    sys.modules[name] = None\n"
        "import relay_agent.cli, relay_agent.agent, relay_agent.connection\n"
        "import relay_agent.destinations.http\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_server_imports_without_the_postgres_extra() -> None:
    """`pip install stowhook[server]` (SQLite, what quickstart installs) has no asyncpg."""
    code = (
        "import sys\nsys.modules['asyncpg'] = None\nimport relay_server.cli, relay_server.server\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
