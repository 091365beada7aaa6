"""The client's connection notices refused and dropped connections at once, not at a timer's tick."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.launcher import NodeProcess, free_port
from client import BrokerQueue
from client.connection import CONNECT_TIMEOUT_S, ConnectionState

pytestmark = pytest.mark.timeout(60)


async def test_a_dead_first_endpoint_is_skipped_at_once(node: NodeProcess, channel_name: str) -> None:
    # Given an endpoint list whose first entry has nothing listening
    dead = f"tcp://127.0.0.1:{free_port()}"
    # When a client connects
    started = time.monotonic()
    async with BrokerQueue([dead, node.endpoint], connect_timeout=10) as queue:
        connected_s = time.monotonic() - started
        # Then it was refused there and moved on without waiting out the HELLO timeout
        assert queue.connection.node_id == node.node_id
        assert await queue.channel(channel_name, int).produce(1)
    assert connected_s < CONNECT_TIMEOUT_S / 2, f"connected after {connected_s:.2f}s"


async def test_a_killed_node_is_noticed_as_soon_as_its_connection_drops(fresh_node: NodeProcess) -> None:
    # Given a client just connected to a node (its keepalive timer first fires 0.5 s later)
    async with BrokerQueue(fresh_node.endpoint, connect_timeout=10) as queue:
        assert queue.connection.state is ConnectionState.READY
        # When the node is SIGKILLed
        killed_at = time.monotonic()
        fresh_node.kill()
        # Then the client starts looking for a node before that timer could have told it
        while queue.connection.state is ConnectionState.READY:
            assert time.monotonic() - killed_at < 5, "the client never noticed the dropped connection"
            await asyncio.sleep(0.005)
        noticed_s = time.monotonic() - killed_at
    assert noticed_s < 0.3, f"noticed after {noticed_s:.2f}s"
