"""The Raft log's small durable state: term and vote, where the log starts, an install under way.

Kept in one file of two fixed slots, written alternately with ``pwrite`` + ``fdatasync``: a write torn
by a crash spoils only the slot being written (its CRC fails) and the other slot still holds the
previous state; the slot with the highest valid sequence number wins. One fsync per change, no rename.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from cluster.messages import HardState

_SLOT_BYTES = 512
# crc, sequence, term, snapshot index, snapshot term, installing?, its index, its term, vote length
_SLOT = struct.Struct(">IQQQQ?QQH")
_MAX_VOTE_BYTES = _SLOT_BYTES - _SLOT.size


@dataclass(frozen=True, slots=True)
class LogState:
    """What the log keeps besides its entries."""

    term: int = 0
    voted_for: str | None = None
    snapshot_index: int = 0
    snapshot_term: int = 0
    installing: tuple[int, int] | None = None  # (index, term) of a snapshot replacing the state machine

    @property
    def hard_state(self) -> HardState:
        """The term and vote."""
        return HardState(self.term, self.voted_for)

    def with_hard_state(self, hard: HardState) -> LogState:
        """This state with another term and vote."""
        return replace(self, term=hard.term, voted_for=hard.voted_for)


def _encode(state: LogState, sequence: int) -> bytes:
    vote = (state.voted_for or "").encode()
    if len(vote) > _MAX_VOTE_BYTES:
        raise ValueError(f"node id {state.voted_for!r} is longer than {_MAX_VOTE_BYTES} bytes")
    installing = state.installing or (0, 0)
    body = (
        _SLOT.pack(
            0,
            sequence,
            state.term,
            state.snapshot_index,
            state.snapshot_term,
            state.installing is not None,
            *installing,
            len(vote),
        )[4:]
        + vote
    )
    return (struct.pack(">I", zlib.crc32(body)) + body).ljust(_SLOT_BYTES, b"\0")


def _decode(slot: bytes) -> tuple[int, LogState] | None:
    if len(slot) < _SLOT.size:
        return None
    fields = _SLOT.unpack_from(slot)
    crc, sequence, term, snap_index, snap_term, installing, inst_index, inst_term, vote_len = fields
    body = slot[4 : _SLOT.size + vote_len]
    if vote_len > _MAX_VOTE_BYTES or zlib.crc32(body) != crc:
        return None
    vote = slot[_SLOT.size : _SLOT.size + vote_len].decode() or None
    state = LogState(term, vote, snap_index, snap_term, (inst_index, inst_term) if installing else None)
    return sequence, state


class LogStateFile:
    """Reads the state at open; ``save`` makes a new one durable before returning."""

    def __init__(self, path: Path) -> None:
        existed = path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.state = LogState()
        self._sequence = 0
        if existed:
            found = [
                decoded
                for slot in (0, 1)
                if (decoded := _decode(os.pread(self._fd, _SLOT_BYTES, slot * _SLOT_BYTES))) is not None
            ]
            if found:
                self._sequence, self.state = max(found, key=lambda pair: pair[0])
        else:
            self.save(self.state)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the new file's name must survive a crash too
            finally:
                os.close(directory)

    def save(self, state: LogState) -> None:
        """Write ``state`` to the older slot and fsync it."""
        self._sequence += 1
        os.pwrite(self._fd, _encode(state, self._sequence), (self._sequence % 2) * _SLOT_BYTES)
        os.fdatasync(self._fd)
        self.state = state

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)
