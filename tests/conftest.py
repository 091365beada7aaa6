"""Shared fixtures: a real node process per test module, typed channels with unique names."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.launcher import NodeProcess
from client import BrokerQueue

_names = itertools.count(1)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node shared by a module's tests (each test uses its own channels)."""
    process = NodeProcess(tmp_path_factory.mktemp("node"), session_timeout="2s").start()
    yield process
    process.stop()


@pytest.fixture
def fresh_node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node of the test's own, for tests that kill or restart it."""
    process = NodeProcess(tmp_path, session_timeout="2s").start()
    yield process
    process.kill()


@pytest.fixture
def channel_name(request: pytest.FixtureRequest) -> str:
    """A channel name no other test uses."""
    return f"test/{request.node.name[:80].replace('[', '-').replace(']', '')}-{next(_names)}"


@pytest.fixture
async def queue(node: NodeProcess) -> AsyncIterator[BrokerQueue]:
    """A connected client of the module's node."""
    async with BrokerQueue(node.endpoint, session_timeout="2s") as client:
        yield client
