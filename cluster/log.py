"""The persistent Raft log: entries by index, the hard state, and where the log starts.

Lives in its own RocksDB (column families ``log`` and ``raft``) and is always written with fsync:
an entry or a vote is acknowledged only after this write returns. Each entry is ``term(8) payload``.
Entries up to ``snapshot_index`` are gone: the state machine (or an installed snapshot) covers them.
"""

from __future__ import annotations

import struct

from broker.keys import END, U64, Cf
from broker.store import Store
from cluster.membership import MAGIC
from cluster.messages import Effects, HardState

_SNAPSHOT_KEY = b"snapshot"
_HARD_STATE_KEY = b"hard_state"
_INSTALLING_KEY = b"installing"
_CONFIG_PREFIX = b"cfg"  # + index: membership entries still in the log, so start-up need not scan it
_PAIR = struct.Struct(">QQ")


class LogStore:
    """Append, truncate, read and compact log entries; keep the hard state."""

    def __init__(self, store: Store) -> None:
        self.store = store
        snapshot = store.get(Cf.RAFT, _SNAPSHOT_KEY)
        self.snapshot_index, self.snapshot_term = _PAIR.unpack(snapshot) if snapshot is not None else (0, 0)
        last = store.last_key(Cf.LOG, b"", END)
        self.last_index = max(int(U64.unpack(last)[0]) if last is not None else 0, self.snapshot_index)
        self.bytes_since_compaction = 0

    def hard_state(self) -> HardState:
        """The persisted term and vote (term 0, no vote, for a new node)."""
        value = self.store.get(Cf.RAFT, _HARD_STATE_KEY)
        if value is None:
            return HardState(0, None)
        term = int(U64.unpack_from(value)[0])
        vote = value[8:].decode() or None
        return HardState(term, vote)

    def terms(self) -> list[int]:
        """Terms of entries snapshot_index+1 .. last_index, in order (read once at start-up)."""
        terms = []
        expected = self.snapshot_index + 1
        for key, value in self.store.scan(Cf.LOG, U64.pack(expected), END):
            index = int(U64.unpack(key)[0])
            if index != expected:
                break  # a hole can only follow a torn tail: everything after it is unacknowledged
            terms.append(int(U64.unpack_from(value)[0]))
            expected += 1
        self.last_index = self.snapshot_index + len(terms)
        return terms

    def persist(self, effects: Effects) -> None:
        """Write the hard state, truncation and new entries of ``effects`` in one synced batch."""
        batch = self.store.batch()
        if effects.hard_state is not None:
            hard = effects.hard_state
            batch.put(Cf.RAFT, _HARD_STATE_KEY, U64.pack(hard.term) + (hard.voted_for or "").encode())
        if effects.truncate_from is not None:
            batch.delete_range(Cf.LOG, U64.pack(effects.truncate_from), END)
            batch.delete_range(
                Cf.RAFT, _CONFIG_PREFIX + U64.pack(effects.truncate_from), _CONFIG_PREFIX + END
            )
            self.last_index = min(self.last_index, effects.truncate_from - 1)
        for index, term, payload in effects.append:
            batch.put(Cf.LOG, U64.pack(index), U64.pack(term) + payload)
            if payload.startswith(MAGIC):
                batch.put(Cf.RAFT, _CONFIG_PREFIX + U64.pack(index), payload)
            self.bytes_since_compaction += len(payload)
            self.last_index = max(self.last_index, index)
        self.store.write(batch, sync=True)

    def configs(self) -> list[tuple[int, bytes]]:
        """Membership entries after the snapshot, as (index, payload), oldest first."""
        start = _CONFIG_PREFIX + U64.pack(self.snapshot_index + 1)
        return [
            (int(U64.unpack(key[len(_CONFIG_PREFIX) :])[0]), value)
            for key, value in self.store.scan(Cf.RAFT, start, _CONFIG_PREFIX + END)
            if int(U64.unpack(key[len(_CONFIG_PREFIX) :])[0]) <= self.last_index
        ]

    def payloads(self, start: int, count: int) -> tuple[bytes, ...]:
        """Payloads of entries start .. start+count-1 (which must exist)."""
        found = [value[8:] for _, value in self.store.scan(Cf.LOG, U64.pack(start), U64.pack(start + count))]
        if len(found) != count:
            raise LookupError(f"log entries {start}..{start + count - 1} are not all present")
        return tuple(found)

    def entries(self, start: int, end: int) -> list[tuple[int, int, bytes]]:
        """Entries with start <= index < end as (index, term, payload)."""
        return [
            (int(U64.unpack(key)[0]), int(U64.unpack_from(value)[0]), value[8:])
            for key, value in self.store.scan(Cf.LOG, U64.pack(start), U64.pack(end))
        ]

    def compact(self, through_index: int, term: int) -> None:
        """Delete entries up to and including ``through_index`` (covered by the durable state machine)."""
        if through_index <= self.snapshot_index:
            return
        batch = self.store.batch()
        batch.delete_range(Cf.LOG, U64.pack(0), U64.pack(through_index + 1))
        batch.delete_range(Cf.RAFT, _CONFIG_PREFIX, _CONFIG_PREFIX + U64.pack(through_index + 1))
        batch.put(Cf.RAFT, _SNAPSHOT_KEY, _PAIR.pack(through_index, term))
        self.store.write(batch, sync=True)
        self.snapshot_index, self.snapshot_term = through_index, term
        self.last_index = max(self.last_index, through_index)
        self.bytes_since_compaction = 0

    def begin_install(self, snapshot_index: int, snapshot_term: int) -> None:
        """Record (synced) that a snapshot through ``snapshot_index`` is replacing the state machine."""
        batch = self.store.batch()
        batch.put(Cf.RAFT, _INSTALLING_KEY, _PAIR.pack(snapshot_index, snapshot_term))
        self.store.write(batch, sync=True)

    def finish_interrupted_install(self, applied_index: int) -> None:
        """At start-up: redo the reset a crash cut off after the state machine was replaced."""
        value = self.store.get(Cf.RAFT, _INSTALLING_KEY)
        if value is None:
            return
        index, term = _PAIR.unpack(value)
        if applied_index == index:
            self.reset(index, term)
        else:  # the state machine was not replaced: the log is still the right one
            batch = self.store.batch()
            batch.delete(Cf.RAFT, _INSTALLING_KEY)
            self.store.write(batch, sync=True)

    def reset(self, snapshot_index: int, snapshot_term: int) -> None:
        """Forget every entry: an installed snapshot now covers up to ``snapshot_index``."""
        batch = self.store.batch()
        batch.delete_range(Cf.LOG, U64.pack(0), END)
        batch.delete_range(Cf.RAFT, _CONFIG_PREFIX, _CONFIG_PREFIX + END)
        batch.put(Cf.RAFT, _SNAPSHOT_KEY, _PAIR.pack(snapshot_index, snapshot_term))
        batch.delete(Cf.RAFT, _INSTALLING_KEY)
        self.store.write(batch, sync=True)
        self.snapshot_index, self.snapshot_term = snapshot_index, snapshot_term
        self.last_index = snapshot_index
        self.bytes_since_compaction = 0
