"""Storage behaviour of a real node: acked messages free their disk space; the log stays bounded."""

from __future__ import annotations

import asyncio
import os

from broker.launcher import NodeProcess
from client import BrokerAdmin, BrokerQueue
from tests.test_queue_basics import Collector


async def test_acked_messages_give_their_disk_space_back(fresh_node: NodeProcess) -> None:
    # Given 4,000 messages of 8 KB (about 32 MB of bodies) produced and all consumed
    async with BrokerQueue(fresh_node.endpoint) as queue:
        channel = queue.channel("storage/big", bytes)
        for _ in range(4):  # random bodies: RocksDB compresses its files, so repetitive ones would hide
            await asyncio.gather(*(channel.produce(os.urandom(8192)) for _ in range(1000)))
        seen = Collector()
        consumer = await channel.consume(seen, max_parallel=100)
        await seen.wait_for(4000, timeout_s=60)
        await consumer.close()
    async with BrokerAdmin(fresh_node.endpoint) as admin:
        stats = await admin.stats("storage/big")
        assert (stats.ready, stats.in_flight, stats.acked_total) == (0, 0, 4000)
        # When storage is compacted
        before, after = await admin.compact()
    # Then the space of the deleted messages (and of the compacted log) is reclaimed
    assert before > 16 * 2**20, f"expected the bodies on disk before compaction, saw {before} bytes"
    # (what stays: the log's current segment file, the state store's WAL and a few SSTs)
    assert after < 24 * 2**20, f"{after} bytes left on disk after compaction"
    assert after < before / 2
    assert fresh_node.data_dir.exists()
