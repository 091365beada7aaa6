"""Storage behaviour of a real node: acked messages free their disk space; the log stays bounded."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from rocksdict import Options, Rdict

from broker.keys import STATE_MACHINE_CFS, Cf
from broker.launcher import NodeProcess
from broker.store import RocksStore
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


def _options_file_sections(path: Path) -> dict[str, str]:
    """Each column family's section of the newest RocksDB OPTIONS file, as text."""
    newest = max(path.glob("OPTIONS-*"), key=lambda file: int(file.name.split("-")[1]))
    sections: dict[str, str] = {}
    name = ""
    for line in newest.read_text().splitlines():
        if line.startswith("[CFOptions ") or line.startswith("[TableOptions/BlockBasedTable "):
            name = line.split('"')[1]
        if name:
            sections[name] = sections.get(name, "") + line + "\n"
    return sections


def test_produce_id_and_dedup_lookups_get_bloom_filters_even_in_a_store_made_without(tmp_path: Path) -> None:
    # Given a state store created by plain rocksdict options (as before the filters existed)
    plain = Options(raw_mode=True)
    plain.create_if_missing(True)
    db = Rdict(str(tmp_path), plain)
    for cf in STATE_MACHINE_CFS:
        db.create_column_family(cf.value, Options(raw_mode=True))
    db.close()
    del db
    assert "bloomfilter" not in _options_file_sections(tmp_path)[Cf.PIDS.value]
    # When the node's store opens it and a produce id is written
    store = RocksStore(tmp_path, STATE_MACHINE_CFS)
    batch = store.batch()
    batch.put(Cf.PIDS, b"id-1", b"\x00m-1")
    store.write(batch, sync=True)
    # Then the mostly-missing lookups have filters, the other families none, and reads still answer
    sections = _options_file_sections(tmp_path)
    for cf in (Cf.PIDS, Cf.DEDUP):
        assert "filter_policy=bloomfilter" in sections[cf.value], cf
        assert "memtable_prefix_bloom_size_ratio=0.1" in sections[cf.value], cf
    assert "filter_policy=bloomfilter" not in sections[Cf.MESSAGES.value]
    assert store.multi_get(Cf.PIDS, [b"id-1", b"id-2"]) == [b"\x00m-1", None]
    store.close()
