"""The in-memory head of one channel's ready index: the next messages to deliver, bounded.

A queue on an LSM tree reads from where it deletes, so every scan from the channel's start walks over
the tombstones of messages already leased. The head keeps the first ``capacity`` ready keys in memory
and remembers ``bound``: every ready key <= ``bound`` is in the head. Refills scan from ``bound``
onwards, past the tombstones. New keys below ``bound`` (a higher priority, a redelivery) go into the
head; keys beyond it stay on disk until a refill reaches them. Memory stays O(capacity) per channel
whatever the queue depth.
"""

from __future__ import annotations

import bisect

from broker.keys import Cf, chan_range, unpack_attempts
from broker.store import Store

HEAD_CAPACITY = 1024


class ReadyHead:
    """The first ready keys of one channel with their attempt counts."""

    __slots__ = ("_chan_id", "attempts", "bound", "capacity", "complete", "keys")

    def __init__(self, chan_id: int, capacity: int = HEAD_CAPACITY) -> None:
        self._chan_id = chan_id
        self.capacity = capacity
        self.keys: list[bytes] = []
        self.attempts: dict[bytes, int] = {}
        # Every ready key <= bound is in ``keys``; ``complete`` means every ready key is.
        self.bound: bytes | None = None
        self.complete = False

    def insert(self, key: bytes, attempts: int) -> None:
        """Record a new ready key if it falls inside the head."""
        if not self.complete and (self.bound is None or key > self.bound):
            return
        bisect.insort(self.keys, key)
        self.attempts[key] = attempts
        if len(self.keys) > self.capacity:
            dropped = self.keys.pop()
            del self.attempts[dropped]
            self.complete = False
            self.bound = self.keys[-1]

    def remove(self, key: bytes) -> None:
        """Forget a key that left the ready index."""
        if self.attempts.pop(key, None) is not None:
            del self.keys[bisect.bisect_left(self.keys, key)]

    def reset(self, *, empty: bool) -> None:
        """Forget everything; ``empty`` says the channel has no ready keys at all now."""
        self.keys.clear()
        self.attempts.clear()
        self.bound = None
        self.complete = empty

    def refill(self, store: Store) -> None:
        """Read keys after ``bound`` from the store until the head is full or the channel is exhausted."""
        if self.complete:
            return
        start, end = chan_range(self._chan_id)
        if self.bound is not None:
            start = self.bound + b"\x00"
        wanted = self.capacity - len(self.keys)
        if wanted <= 0:
            return
        got = 0
        for key, value in store.scan(Cf.READY, start, end, wanted):
            self.keys.append(key)
            self.attempts[key] = unpack_attempts(value)
            got += 1
        if got < wanted:
            self.complete = True
        elif self.keys:
            self.bound = self.keys[-1]
