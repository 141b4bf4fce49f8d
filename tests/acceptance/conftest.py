from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.acceptance import harness


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One quickstart installation, made with the real CLI, copied by every test."""
    home = tmp_path_factory.mktemp("template")
    asyncio.run(harness.Relay(home=home).setup())
    return home


@pytest.fixture
async def relay(tmp_path: pathlib.Path, template: pathlib.Path) -> AsyncIterator[harness.Relay]:
    """A set-up relay installation (not started)."""
    installation = harness.Relay(home=tmp_path)
    await installation.setup(template)
    try:
        yield installation
    finally:
        installation.stop()


@pytest.fixture
async def running(relay: harness.Relay) -> harness.Relay:
    relay.start()
    await relay.wait_ready()
    return relay


def _started(relay: harness.Relay, launch: Callable[..., harness.Agent]):  # type: ignore[no-untyped-def]
    """A starter for agent processes; whatever still runs at the end is killed."""
    started: list[harness.Agent] = []

    def start(*args: Any, **options: Any) -> harness.Agent:
        agent = launch(relay, *args, **options)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.kill()


@pytest.fixture
def agents(relay: harness.Relay):  # type: ignore[no-untyped-def]
    """Start `relay-agent run --forward URL ...` (see harness.start_agent)."""
    yield from _started(relay, harness.start_agent)


@pytest.fixture
def run_agent(relay: harness.Relay):  # type: ignore[no-untyped-def]
    """Start `relay-agent ARGS...` (see harness.start_agent_args)."""
    yield from _started(relay, harness.start_agent_args)
