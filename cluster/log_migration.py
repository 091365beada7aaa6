"""Moving a Raft log kept in RocksDB (zbroker before the segment files) into ``cluster.log``'s files.

The old log lived in ``<data_dir>/log``: column family ``log`` (index -> term + payload) and ``raft``
(hard state, snapshot bounds, an install under way). A node finding it, and no new log, copies it into
a staging folder, syncs it, renames the folder into place and only then deletes the old one: a crash
at any point leaves either the old log or the complete new one.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from pathlib import Path

from broker.keys import END, U64, Cf
from broker.store import RocksStore
from cluster.log import LogStore
from cluster.messages import Effects, HardState

log = logging.getLogger("zbroker.log")

_PAIR = struct.Struct(">QQ")
_COPY_BATCH_ENTRIES = 1_000


def migrate_rocksdb_log(old: Path, new: Path) -> bool:
    """Copy the RocksDB log at ``old`` into segment files at ``new``; True when there was one to copy."""
    if new.exists() or not old.exists():
        if old.exists():
            shutil.rmtree(old)  # the copy was complete (it is in place): the deletion was cut short
        return False
    staging = new.with_name(new.name + ".migrating")
    shutil.rmtree(staging, ignore_errors=True)
    store = RocksStore(old, (Cf.LOG, Cf.RAFT), memtable_bytes=1 << 20)
    target = LogStore(staging)
    try:
        snapshot = store.get(Cf.RAFT, b"snapshot")
        snapshot_index, snapshot_term = _PAIR.unpack(snapshot) if snapshot is not None else (0, 0)
        if snapshot_index:
            target.reset(snapshot_index, snapshot_term)
        hard = store.get(Cf.RAFT, b"hard_state")
        if hard is not None:
            term = int(U64.unpack_from(hard)[0])
            target.persist(Effects(hard_state=HardState(term, hard[8:].decode() or None)))
        installing = store.get(Cf.RAFT, b"installing")
        if installing is not None:
            target.begin_install(*_PAIR.unpack(installing))
        batch: list[tuple[int, int, bytes]] = []
        expected = snapshot_index + 1
        for key, value in store.scan(Cf.LOG, U64.pack(expected), END):
            index = int(U64.unpack(key)[0])
            if index != expected:
                break  # a hole can only follow a torn tail: nothing after it was acknowledged
            batch.append((index, int(U64.unpack_from(value)[0]), value[8:]))
            expected += 1
            if len(batch) >= _COPY_BATCH_ENTRIES:
                target.write(Effects(append=batch))
                batch = []
        target.persist(Effects(append=batch))
        copied = target.last_index - snapshot_index
    finally:
        target.close()
        store.close()
    staging.rename(new)
    directory = os.open(new.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    shutil.rmtree(old)
    log.info("moved the Raft log (%d entries after %d) from RocksDB into %s", copied, snapshot_index, new)
    return True
