"""Key-value storage behind the queue state machine and the log: RocksDB, and an in-memory twin.

The state machine only sees ``Store`` and ``Batch``; the node gives it ``RocksStore``, the tests and
the simulator give it ``MemoryStore``. Reads see what the last ``write`` stored, never a pending
batch, so an applier writes its batch before it reads what the batch changed.
"""

from __future__ import annotations

import bisect
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from rocksdict import (
    BlockBasedOptions,
    Checkpoint,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from broker.keys import Cf


class Batch(ABC):
    """Writes that become visible together, atomically, at ``Store.write``."""

    @abstractmethod
    def put(self, cf: Cf, key: bytes, value: bytes) -> None:
        """Set ``key`` to ``value``."""

    @abstractmethod
    def delete(self, cf: Cf, key: bytes) -> None:
        """Remove ``key``."""

    @abstractmethod
    def delete_range(self, cf: Cf, start: bytes, end: bytes) -> None:
        """Remove every key in [start, end)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of operations so far."""


class Store(ABC):
    """Column-family key-value storage with atomic batches."""

    @abstractmethod
    def batch(self) -> Batch:
        """A new empty batch for this store."""

    @abstractmethod
    def write(self, batch: Batch, *, sync: bool) -> None:
        """Apply ``batch`` atomically; with ``sync`` it is on disk when this returns."""

    @abstractmethod
    def get(self, cf: Cf, key: bytes) -> bytes | None:
        """The value of ``key``, or None."""

    @abstractmethod
    def multi_get(self, cf: Cf, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of ``keys``, None where missing."""

    @abstractmethod
    def scan(self, cf: Cf, start: bytes, end: bytes, limit: int = 0) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs with start <= key < end in key order; ``limit`` 0 = all."""

    def first_key(self, cf: Cf, start: bytes, end: bytes) -> bytes | None:
        """The smallest key in [start, end), or None."""
        for key, _ in self.scan(cf, start, end, 1):
            return key
        return None

    @abstractmethod
    def last_key(self, cf: Cf, start: bytes, end: bytes) -> bytes | None:
        """The largest key in [start, end), or None."""

    def count(self, cf: Cf, start: bytes, end: bytes) -> int:
        """How many keys lie in [start, end) (a scan: for start-up and tests, not hot paths)."""
        return sum(1 for _ in self.scan(cf, start, end))

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release for most stores
        """Release the store's resources."""


# --------------------------------------------------------------------------- in memory


class MemoryBatch(Batch):
    """A batch recorded as a list of operations."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, Cf, bytes, bytes]] = []

    def put(self, cf: Cf, key: bytes, value: bytes) -> None:
        self.ops.append(("put", cf, key, value))

    def delete(self, cf: Cf, key: bytes) -> None:
        self.ops.append(("del", cf, key, b""))

    def delete_range(self, cf: Cf, start: bytes, end: bytes) -> None:
        self.ops.append(("range", cf, start, end))

    def __len__(self) -> int:
        return len(self.ops)


class MemoryStore(Store):
    """Sorted in-memory storage with the semantics of ``RocksStore``; for tests and simulation."""

    def __init__(self) -> None:
        self._data: dict[Cf, dict[bytes, bytes]] = {cf: {} for cf in Cf}
        self._sorted: dict[Cf, list[bytes]] = {cf: [] for cf in Cf}
        self.writes = 0

    def batch(self) -> MemoryBatch:
        return MemoryBatch()

    def write(self, batch: Batch, *, sync: bool) -> None:
        assert isinstance(batch, MemoryBatch)
        self.writes += 1
        for op, cf, key, value in batch.ops:
            data, order = self._data[cf], self._sorted[cf]
            if op == "put":
                if key not in data:
                    bisect.insort(order, key)
                data[key] = value
            elif op == "del":
                if data.pop(key, None) is not None:
                    del order[bisect.bisect_left(order, key)]
            else:
                lo, hi = bisect.bisect_left(order, key), bisect.bisect_left(order, value)
                for doomed in order[lo:hi]:
                    del data[doomed]
                del order[lo:hi]

    def get(self, cf: Cf, key: bytes) -> bytes | None:
        return self._data[cf].get(key)

    def multi_get(self, cf: Cf, keys: Sequence[bytes]) -> list[bytes | None]:
        data = self._data[cf]
        return [data.get(key) for key in keys]

    def scan(self, cf: Cf, start: bytes, end: bytes, limit: int = 0) -> Iterator[tuple[bytes, bytes]]:
        data, order = self._data[cf], self._sorted[cf]
        lo, hi = bisect.bisect_left(order, start), bisect.bisect_left(order, end)
        keys = order[lo:hi] if not limit else order[lo : min(hi, lo + limit)]
        for key in keys:
            yield key, data[key]

    def last_key(self, cf: Cf, start: bytes, end: bytes) -> bytes | None:
        order = self._sorted[cf]
        lo, hi = bisect.bisect_left(order, start), bisect.bisect_left(order, end)
        return order[hi - 1] if hi > lo else None

    def snapshot_items(self) -> dict[Cf, dict[bytes, bytes]]:
        """A deep copy of all data, for comparing replicas in tests."""
        return {cf: dict(values) for cf, values in self._data.items()}


# --------------------------------------------------------------------------- RocksDB


class RocksBatch(Batch):
    """A batch that writes straight into a rocksdict ``WriteBatch``."""

    def __init__(self, handles: dict[Cf, Any]) -> None:
        self._handles = handles
        self._batch = WriteBatch(raw_mode=True)
        self._ops = 0

    def put(self, cf: Cf, key: bytes, value: bytes) -> None:
        self._batch.put(key, value, self._handles[cf])
        self._ops += 1

    def delete(self, cf: Cf, key: bytes) -> None:
        self._batch.delete(key, self._handles[cf])
        self._ops += 1

    def delete_range(self, cf: Cf, start: bytes, end: bytes) -> None:
        self._batch.delete_range(start, end, self._handles[cf])
        self._ops += 1

    def __len__(self) -> int:
        return self._ops


# Families read by point lookups that mostly miss (is this produce id / dedup hash known?): a Bloom
# filter in the memtable and in every table file answers most misses without a search (measured here:
# a missing key in a 200,000-key family 1.6 -> 0.4 us). The table filters stay in memory, 10 bits a
# key: 1.25 MB per million produce ids in the window (produce ids expire with ``produce_id_window``).
_LOOKUP_FAMILIES = frozenset({Cf.PIDS, Cf.DEDUP})


def _options(write_buffer_bytes: int) -> Options:
    options = Options(raw_mode=True)
    options.set_write_buffer_size(write_buffer_bytes)
    options.set_max_write_buffer_number(3)
    options.set_level_compaction_dynamic_level_bytes(True)
    return options


def _family_options(family: str) -> Options:
    options = _options(8 << 20)
    if family in _LOOKUP_FAMILIES:
        options.set_memtable_prefix_bloom_ratio(0.1)
        options.set_memtable_whole_key_filtering(True)
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        options.set_block_based_table_factory(table)
    return options


class RocksStore(Store):
    """One RocksDB with the given column families and a cap on memory.

    A node has two: the Raft log (``Cf.LOG``, ``Cf.RAFT``), written with fsync, and the state machine
    (``STATE_MACHINE_CFS``), written without (the log replays what a crash loses), which is also what
    a snapshot copies.
    """

    def __init__(
        self,
        path: Path,
        families: tuple[Cf, ...] = tuple(Cf),
        *,
        memtable_bytes: int = 128 << 20,
        recycle_wal_files: int = 0,
    ) -> None:
        path.mkdir(parents=True, exist_ok=True)
        options = _options(16 << 20)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        # All column families share one WAL; cap it so a rarely written family cannot pin it forever,
        # and cap all memtables together so memory does not grow with the number of families.
        options.set_max_total_wal_size(64 << 20)
        options.set_db_write_buffer_size(memtable_bytes)
        options.set_max_background_jobs(2)
        options.increase_parallelism(2)
        # A store written with fsync reuses its WAL files: an fsync that does not grow the file skips a
        # journal commit (p99 halved with several nodes syncing on one disk). Each kept file costs disk.
        if recycle_wal_files:
            options.set_recycle_log_file_num(recycle_wal_files)
        self.path = path
        self.families = families
        # Open every existing family with this code's options (not those it was created with).
        existing = Rdict.list_cf(str(path), Options(raw_mode=True)) if (path / "CURRENT").exists() else []
        self._db = Rdict(
            str(path), options, column_families={name: _family_options(name) for name in existing}
        )
        self._families: dict[Cf, Rdict] = {}
        for cf in families:
            self._families[cf] = (
                self._db.get_column_family(cf.value)
                if cf.value in existing
                else self._db.create_column_family(cf.value, _family_options(cf.value))
            )
        self._handles: dict[Cf, Any] = {cf: self._db.get_column_family_handle(cf.value) for cf in families}
        self._sync = WriteOptions()
        self._sync.sync = True
        self._nosync = WriteOptions()

    def batch(self) -> RocksBatch:
        return RocksBatch(self._handles)

    def write(self, batch: Batch, *, sync: bool) -> None:
        assert isinstance(batch, RocksBatch)
        if batch._ops:
            self._db.write(batch._batch, self._sync if sync else self._nosync)

    def sync_wal(self) -> None:
        """Make every write so far durable."""
        self._db.flush_wal(True)

    def get(self, cf: Cf, key: bytes) -> bytes | None:
        return cast(bytes | None, self._families[cf].get(key))

    def multi_get(self, cf: Cf, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        return cast(list[bytes | None], self._families[cf].get(list(keys)))

    def scan(self, cf: Cf, start: bytes, end: bytes, limit: int = 0) -> Iterator[tuple[bytes, bytes]]:
        read_options = ReadOptions()
        read_options.set_iterate_upper_bound(end)
        items = cast(
            Iterator[tuple[bytes, bytes]], self._families[cf].items(from_key=start, read_opt=read_options)
        )
        for produced, (key, value) in enumerate(items, start=1):
            yield key, value
            if produced == limit:
                return

    def last_key(self, cf: Cf, start: bytes, end: bytes) -> bytes | None:
        for key in cast(Iterator[bytes], self._families[cf].keys(backwards=True, from_key=end)):
            if key >= end:
                continue
            return key if key >= start else None
        return None

    def checkpoint(self, path: Path) -> None:
        """A consistent copy of the database at ``path`` (hard links where possible)."""
        Checkpoint(self._db).create_checkpoint(str(path))

    def compact_all(self) -> None:
        """Flush every memtable and compact every column family: space of deleted keys is reclaimed now."""
        for family in self._families.values():
            family.flush(True)
            family.compact_range(None, None)

    def disk_bytes(self) -> int:
        """Total size of the database's files on disk."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def close(self) -> None:
        self._families.clear()
        self._handles.clear()
        self._db.close()

    @staticmethod
    def destroy(path: Path) -> None:
        """Delete a database folder."""
        shutil.rmtree(path, ignore_errors=True)
