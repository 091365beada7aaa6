"""The persistent log: entries by index in the ``log`` column family, appended with fsync.

Each stored entry is ``term(8) payload``. A cluster of one commits an entry as soon as it is on
disk; the Raft core of a larger cluster decides commit from its followers' acknowledgements.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.keys import END, U64, Cf
from broker.store import Store


class LogStore:
    """Append, read and compact log entries in a ``Store``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        first = store.first_key(Cf.LOG, b"", END)
        last = store.last_key(Cf.LOG, b"", END)
        self.first_index = int(U64.unpack(first)[0]) if first is not None else 1
        self.last_index = int(U64.unpack(last)[0]) if last is not None else self._compacted_index()

    def _compacted_index(self) -> int:
        value = self.store.get(Cf.RAFT, b"compacted")
        return int(U64.unpack(value)[0]) if value is not None else 0

    def append(self, term: int, payloads: Sequence[bytes], *, sync: bool = True) -> int:
        """Append entries after the last one, durably when ``sync``; returns the new last index."""
        batch = self.store.batch()
        index = self.last_index
        prefix = U64.pack(term)
        for payload in payloads:
            index += 1
            batch.put(Cf.LOG, U64.pack(index), prefix + payload)
        self.store.write(batch, sync=sync)
        if self.last_index == 0 or self.first_index > self.last_index:
            self.first_index = self.last_index + 1
        self.last_index = index
        return index

    def read(self, start: int, end: int) -> list[tuple[int, int, bytes]]:
        """Entries with start <= index < end as (index, term, payload)."""
        return [
            (int(U64.unpack(key)[0]), int(U64.unpack_from(value)[0]), value[8:])
            for key, value in self.store.scan(Cf.LOG, U64.pack(start), U64.pack(end))
        ]

    def compact(self, through_index: int) -> None:
        """Delete entries up to and including ``through_index`` (they are applied and durable)."""
        through_index = min(through_index, self.last_index)
        if through_index < self.first_index:
            return
        batch = self.store.batch()
        batch.delete_range(Cf.LOG, U64.pack(0), U64.pack(through_index + 1))
        batch.put(Cf.RAFT, b"compacted", U64.pack(through_index))
        self.store.write(batch, sync=False)
        self.first_index = through_index + 1
