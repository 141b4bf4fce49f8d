from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

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


@pytest.fixture
def agents(relay: harness.Relay):  # type: ignore[no-untyped-def]
    started: list[harness.Agent] = []

    def start(forward: str, *extra: str, **options: str) -> harness.Agent:
        agent = harness.start_agent(relay, forward, *extra, **options)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.kill()
