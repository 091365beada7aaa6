"""A replica group of one: an entry is committed as soon as it is fsynced on this node."""

from __future__ import annotations

from broker.store import Store
from cluster.log import LogStore

SINGLE_NODE_TERM = 1


class LocalLog:
    """The log of a single-node group; ``propose`` returns once the entry is committed."""

    def __init__(self, store: Store, *, fsync: bool = True) -> None:
        self.log = LogStore(store)
        self.fsync = fsync
        self.commit_index = self.log.last_index

    def propose(self, payload: bytes) -> int:
        """Append one entry durably and commit it; returns its index."""
        index = self.log.append(SINGLE_NODE_TERM, [payload], sync=self.fsync)
        self.commit_index = index
        return index

    def committed_since(self, applied_index: int) -> list[tuple[int, bytes]]:
        """Committed entries after ``applied_index`` as (index, payload), e.g. to replay at start-up."""
        return [
            (index, payload) for index, _, payload in self.log.read(applied_index + 1, self.commit_index + 1)
        ]

    def compact(self, through_index: int) -> None:
        """Drop entries that are applied and durable."""
        self.log.compact(through_index)
