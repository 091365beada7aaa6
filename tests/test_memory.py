"""Guarantee 8: message bodies live in RocksDB, so a node's memory does not grow with queue depth."""

from __future__ import annotations

import asyncio

from broker.launcher import NodeProcess
from client import BrokerAdmin, BrokerQueue

# Python and libraries (~60 MiB) + RocksDB's memtable budget (128 MiB, see broker/store.py) + slack.
RSS_BOUND_BYTES = 256 * 2**20


async def test_queueing_more_bytes_than_the_memory_bound_keeps_rss_under_it(fresh_node: NodeProcess) -> None:
    # Given 150,000 queued messages of 2 KB: 300 MB of bodies, more than the bound itself
    body = bytes(range(256)) * 8
    samples: list[int] = []
    async with BrokerQueue(fresh_node.endpoint) as queue:
        channel = queue.channel("memory/deep", bytes)
        for batch in range(150):
            await asyncio.gather(*(channel.produce(body) for _ in range(1000)))
            if batch % 30 == 29:
                samples.append(fresh_node.rss_bytes())
    async with BrokerAdmin(fresh_node.endpoint) as admin:
        assert (await admin.stats("memory/deep")).ready == 150_000
    # Then the node's resident memory stayed under the bound the whole time
    mib = [f"{sample / 2**20:.0f} MiB" for sample in samples]
    assert max(samples) < RSS_BOUND_BYTES, f"RSS samples {mib} exceed {RSS_BOUND_BYTES / 2**20:.0f} MiB"
