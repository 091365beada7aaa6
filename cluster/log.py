"""The persistent Raft log: append-only segment files, made durable off the loop.

Layout of the log directory::

    state                      term, vote, where the log starts (``cluster.log_state``)
    00000000000000000001.seg   entries from index 1 on
    00000000000000052311.seg   entries from index 52311 on (a new file every ~64 MiB)

A segment starts with ``magic, first index, chain seed`` and holds records ``crc, length, index, term,
payload``. Each record's CRC covers its header and payload and is seeded with the previous record's
CRC, so the records of one file form a chain: a tail torn by a crash, or old bytes left behind a
truncation whose rewrite did not reach the disk, break the chain and are cut off at start-up. A
tail cut off was never acknowledged: acknowledgements wait for the fsync (``LogSyncer``).

Writing is split in two. ``write`` puts entries in the page cache at once (the node loop goes on, and
a leader sends them to its followers meanwhile); ``request_sync`` hands the files to the sync thread;
``poll_synced`` says up to which index the log is durable now; ``sync_now`` syncs in the calling
thread instead (a follower, whose answers must wait for it anyway). Only the durable index may be
acknowledged: the shell reports it to the core as ``Persisted``. The hard state (term, vote) is
written and synced on the spot, since votes are rare and must not be answered before it is on disk.
"""

from __future__ import annotations

import collections
import os
import struct
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from cluster.log_state import LogState, LogStateFile
from cluster.log_sync import LogSyncer, LogSyncError
from cluster.membership import MAGIC as MEMBERSHIP_MAGIC
from cluster.messages import Effects, HardState

SEGMENT_BYTES = 64 << 20
_SEGMENT_MAGIC = b"zblog\x00\x01\x00"
_SEGMENT_HEADER = struct.Struct(">8sQI4x")  # magic, first index, CRC seed
_RECORD = struct.Struct(">IIQQ")  # crc, payload length, index, term
_SUFFIX = ".seg"


@dataclass(slots=True)
class _Segment:
    """One segment file and where its records start."""

    first: int
    path: Path
    fd: int
    seed: int
    offsets: list[int] = field(default_factory=list)
    size: int = _SEGMENT_HEADER.size
    last_ticket: int = 0  # the last write that touched the file: it may close once that is synced

    @property
    def last(self) -> int:
        """Index of its last record (first - 1 when empty)."""
        return self.first + len(self.offsets) - 1


def _record(index: int, term: int, payload: bytes, seed: int) -> tuple[bytes, int]:
    """A record and its CRC (the next record's seed)."""
    body = _RECORD.pack(0, len(payload), index, term)[4:]
    crc = zlib.crc32(payload, zlib.crc32(body, seed))
    return struct.pack(">I", crc) + body + payload, crc


class LogStore:
    """Append, truncate, read and compact log entries; keep the hard state."""

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.fsync = fsync  # False: writes count as durable at once (``[node] fsync = false``)
        self._dir_fd = os.open(directory, os.O_RDONLY)
        self._state_file = LogStateFile(directory / "state")
        state = self._state_file.state
        self.snapshot_index, self.snapshot_term = state.snapshot_index, state.snapshot_term
        self.last_index = self.snapshot_index
        self.bytes_since_compaction = 0
        self._segments: list[_Segment] = []
        self._terms: list[int] = []  # of entries snapshot_index+1 .. last_index, as found at open
        self._configs: list[tuple[int, bytes]] = []  # membership entries after the snapshot
        self._last_crc = 0
        self._recover()
        # Entries found at start-up may sit in the page cache only (the process was killed, the
        # machine was not): make them durable before any of them is acknowledged again.
        for segment in self._segments:
            os.fdatasync(segment.fd)
        os.fsync(self._dir_fd)
        self._syncer = LogSyncer(self._dir_fd)
        self.written_ticket = 0
        self._requested_ticket = 0
        self.synced_ticket = 0
        self._dirty: set[int] = set()
        self._dirty_directory = False
        self._unsynced: collections.deque[list[int]] = collections.deque()  # [ticket, last index]
        self._closing: list[_Segment] = []
        self._durations: list[float] = []  # of syncs done by ``sync_now``, for ``poll_synced``
        self.durable_index = self.last_index

    # ------------------------------------------------------------------ start-up

    def _recover(self) -> None:
        """Read every segment, keep the longest valid chain after the snapshot, cut off the rest."""
        paths = sorted(self.directory.glob(f"*{_SUFFIX}"))
        expected: int | None = None
        broken = False
        for path in paths:
            if broken:
                path.unlink()
                continue
            segment = self._open_segment(path, expected)
            if segment is None:
                broken = True
                path.unlink()
                continue
            self._segments.append(segment)
            expected = segment.last + 1
            if segment.size < os.fstat(segment.fd).st_size:
                os.ftruncate(segment.fd, segment.size)  # a torn tail: from here on, nothing holds
                broken = True
        # Segments wholly inside the snapshot are garbage a crash left behind during compaction.
        while self._segments and self._segments[0].last <= self.snapshot_index:
            if len(self._segments) == 1 and self._segments[0].last == self.snapshot_index:
                break  # it ends the log exactly at the snapshot: the next append continues it
            gone = self._segments.pop(0)
            os.close(gone.fd)
            gone.path.unlink()
        if self._segments and self._segments[0].first > self.snapshot_index + 1:
            # A hole right after the snapshot: what follows it cannot be trusted to be in order.
            for gone in self._segments:
                os.close(gone.fd)
                gone.path.unlink()
            self._segments, self._terms, self._configs = [], [], []
        if self._segments:
            self.last_index = max(self.snapshot_index, self._segments[-1].last)

    def _open_segment(self, path: Path, expected_first: int | None) -> _Segment | None:
        """Open and index one segment; None when its header is invalid or does not follow the last."""
        fd = os.open(path, os.O_RDWR)
        data = _read_all(fd)
        if len(data) < _SEGMENT_HEADER.size:
            os.close(fd)
            return None
        magic, first, seed = _SEGMENT_HEADER.unpack_from(data)
        if magic != _SEGMENT_MAGIC or (expected_first is not None and first != expected_first):
            os.close(fd)
            return None
        if expected_first is not None and seed != self._last_crc:
            os.close(fd)
            return None
        segment = _Segment(first, path, fd, seed)
        crc, offset, index = seed, _SEGMENT_HEADER.size, first
        last_term = self._terms[-1] if self._terms else 0
        view = memoryview(data)
        while offset + _RECORD.size <= len(data):
            stored_crc, length, record_index, term = _RECORD.unpack_from(data, offset)
            end = offset + _RECORD.size + length
            if end > len(data) or record_index != index or term < last_term:
                break
            header_crc = zlib.crc32(view[offset + 4 : offset + _RECORD.size], crc)
            computed = zlib.crc32(view[offset + _RECORD.size : end], header_crc)
            if computed != stored_crc:
                break
            segment.offsets.append(offset)
            if index > self.snapshot_index:
                self._terms.append(term)
                start = offset + _RECORD.size
                if view[start : start + len(MEMBERSHIP_MAGIC)] == MEMBERSHIP_MAGIC:
                    self._configs.append((index, bytes(view[start:end])))
            crc, offset, index, last_term = computed, end, index + 1, term
        segment.size = offset
        self._last_crc = crc
        return segment

    def hard_state(self) -> HardState:
        """The persisted term and vote (term 0, no vote, for a new node)."""
        return self._state_file.state.hard_state

    def terms(self) -> list[int]:
        """Terms of entries snapshot_index+1 .. last_index, in order (read once at start-up)."""
        return list(self._terms[: max(0, self.last_index - self.snapshot_index)])

    def configs(self) -> list[tuple[int, bytes]]:
        """Membership entries after the snapshot, as (index, payload), oldest first."""
        return [(index, payload) for index, payload in self._configs if index > self.snapshot_index]

    # ------------------------------------------------------------------ writing

    def write(self, effects: Effects) -> None:
        """Sync the hard state of ``effects`` now; write its truncation and entries (not synced yet)."""
        if effects.hard_state is not None and effects.hard_state != self.hard_state():
            self._save_state(self._state_file.state.with_hard_state(effects.hard_state))
        if effects.truncate_from is None and not effects.append:
            return
        self.written_ticket += 1
        if effects.truncate_from is not None and effects.truncate_from <= self.last_index:
            self._truncate(effects.truncate_from)
        self._append(effects.append)
        self._unsynced.append([self.written_ticket, self.last_index])

    def persist(self, effects: Effects) -> None:
        """``write`` and wait until it is durable (start-up and tests; the loop uses ``request_sync``)."""
        self.write(effects)
        self.sync_now()

    def _append(self, entries: list[tuple[int, int, bytes]]) -> None:
        chunks: list[bytes] = []
        segment = self._segments[-1] if self._segments else None
        end = segment.size if segment is not None else 0  # where the next record goes
        for index, term, payload in entries:
            if index != self.last_index + 1:
                raise ValueError(f"entry {index} does not follow the log's last entry {self.last_index}")
            if segment is None or end >= SEGMENT_BYTES:
                if segment is not None:
                    self._flush_chunks(segment, chunks)
                segment = self._new_segment(index)
                end = segment.size
            record, self._last_crc = _record(index, term, payload, self._last_crc)
            segment.offsets.append(end)
            end += len(record)
            chunks.append(record)
            if payload.startswith(MEMBERSHIP_MAGIC):
                self._configs.append((index, payload))
            self.bytes_since_compaction += len(payload)
            self.last_index = index
        if segment is not None:
            self._flush_chunks(segment, chunks)

    def _flush_chunks(self, segment: _Segment, chunks: list[bytes]) -> None:
        if not chunks:
            return
        data = b"".join(chunks)
        chunks.clear()
        _pwrite_all(segment.fd, data, segment.size)
        segment.size += len(data)
        self._touch(segment)

    def _touch(self, segment: _Segment) -> None:
        segment.last_ticket = self.written_ticket
        self._dirty.add(segment.fd)

    def _new_segment(self, first: int) -> _Segment:
        path = self.directory / f"{first:020d}{_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        header = _SEGMENT_HEADER.pack(_SEGMENT_MAGIC, first, self._last_crc)
        _pwrite_all(fd, header, 0)
        segment = _Segment(first, path, fd, self._last_crc)
        self._segments.append(segment)
        self._touch(segment)
        self._dirty_directory = True
        return segment

    def _truncate(self, start: int) -> None:
        """Drop entries from ``start`` on (uncommitted ones a new leader replaces)."""
        while self._segments and self._segments[-1].first > start:
            self._drop(self._segments.pop())
        self.last_index = start - 1
        self.durable_index = min(self.durable_index, start - 1)
        for pending in self._unsynced:
            pending[1] = min(pending[1], start - 1)
        self._configs = [config for config in self._configs if config[0] < start]
        if not self._segments:
            self._last_crc = 0
            return
        segment = self._segments[-1]
        keep = start - segment.first
        if keep < len(segment.offsets):
            segment.size = segment.offsets[keep]
            del segment.offsets[keep:]
            os.ftruncate(segment.fd, segment.size)
            self._touch(segment)
        if segment.offsets:
            self._last_crc = struct.unpack(">I", os.pread(segment.fd, 4, segment.offsets[-1]))[0]
        else:
            self._last_crc = segment.seed

    def _drop(self, segment: _Segment) -> None:
        """Delete a segment; its file closes once no sync in flight uses it."""
        segment.path.unlink()
        self._dirty_directory = True
        self._closing.append(segment)
        self._close_finished()

    def _close_finished(self) -> None:
        still = []
        for segment in self._closing:
            if segment.last_ticket <= self.synced_ticket:
                self._dirty.discard(segment.fd)
                os.close(segment.fd)
            else:
                still.append(segment)
        self._closing = still

    def _save_state(self, state: LogState) -> None:
        self._state_file.save(state)

    # ------------------------------------------------------------------ syncing

    def fileno(self) -> int:
        """Readable when a sync finished: for the node's poller."""
        return self._syncer.fileno()

    def request_sync(self) -> None:
        """Hand everything written so far to the sync thread."""
        if self.written_ticket <= self._requested_ticket:
            return
        if not self.fsync:
            self._requested_ticket = self.written_ticket
            return
        self._syncer.request(self.written_ticket, set(self._dirty), self._dirty_directory)
        self._requested_ticket = self.written_ticket
        self._dirty.clear()
        self._dirty_directory = False

    def poll_synced(self) -> tuple[int | None, list[float]]:
        """The index durable now if it moved since the last call (else None), and the syncs' durations."""
        done, durations = self._syncer.completed()
        if self._durations:
            durations, self._durations = [*self._durations, *durations], []
        return self._advance(done if self.fsync else self._requested_ticket), durations

    def sync_now(self) -> int | None:
        """Make everything written durable before returning, in the calling thread (after a sync the
        thread may still run for files handed to it); the durable index if it moved, as ``poll_synced``."""
        if self.fsync and self.written_ticket > self.synced_ticket:
            if self._requested_ticket > self.synced_ticket:
                self._syncer.wait(self._requested_ticket)
            started = time.perf_counter()
            try:
                for fd in self._dirty:
                    os.fdatasync(fd)
                if self._dirty_directory:
                    os.fsync(self._dir_fd)
            except OSError as exc:
                raise LogSyncError(exc.errno, f"fsync of the Raft log failed: {exc}") from exc
            self._durations.append(time.perf_counter() - started)
            self._dirty.clear()
            self._dirty_directory = False
        self._requested_ticket = max(self._requested_ticket, self.written_ticket)
        return self._advance(self.written_ticket)

    def _advance(self, done: int) -> int | None:
        if done <= self.synced_ticket:
            return None
        self.synced_ticket = done
        moved = None
        while self._unsynced and self._unsynced[0][0] <= done:
            moved = self._unsynced.popleft()[1]
        self._close_finished()
        if moved is None:
            return None
        self.durable_index = moved
        return moved

    # ------------------------------------------------------------------ reading

    def payloads(self, start: int, count: int) -> tuple[bytes, ...]:
        """Payloads of entries start .. start+count-1 (which must exist)."""
        found = self.entries(start, start + count)
        if len(found) != count:
            raise LookupError(f"log entries {start}..{start + count - 1} are not all present")
        return tuple(payload for _, _, payload in found)

    def entries(self, start: int, end: int) -> list[tuple[int, int, bytes]]:
        """Entries with start <= index < end as (index, term, payload)."""
        start = max(start, self.snapshot_index + 1)
        end = min(end, self.last_index + 1)
        found: list[tuple[int, int, bytes]] = []
        for segment in self._segments:
            if start >= end:
                break
            if segment.last < start or not segment.offsets:
                continue
            first = start - segment.first
            last = min(end, segment.last + 1) - segment.first  # exclusive, in this segment
            begin = segment.offsets[first]
            stop = segment.offsets[last] if last < len(segment.offsets) else segment.size
            data = os.pread(segment.fd, stop - begin, begin)
            offset = 0
            while offset < len(data):
                _, length, index, term = _RECORD.unpack_from(data, offset)
                offset += _RECORD.size
                found.append((index, term, data[offset : offset + length]))
                offset += length
            start = segment.first + last
        return found

    # ------------------------------------------------------------------ compaction and snapshots

    def compact(self, through_index: int, term: int) -> None:
        """Forget entries up to and including ``through_index`` (covered by the durable state machine)."""
        if through_index <= self.snapshot_index:
            return
        self._save_state(replace(self._state_file.state, snapshot_index=through_index, snapshot_term=term))
        self.snapshot_index, self.snapshot_term = through_index, term
        if through_index >= self.last_index:
            for segment in self._segments:
                self._drop(segment)
            self._segments = []
            self.last_index = through_index
            self.durable_index = max(self.durable_index, through_index)
        else:
            while len(self._segments) > 1 and self._segments[1].first <= through_index + 1:
                self._drop(self._segments.pop(0))
        self._configs = [config for config in self._configs if config[0] > through_index]
        self.bytes_since_compaction = 0

    def begin_install(self, snapshot_index: int, snapshot_term: int) -> None:
        """Record (synced) that a snapshot through ``snapshot_index`` is replacing the state machine."""
        self._save_state(replace(self._state_file.state, installing=(snapshot_index, snapshot_term)))

    def finish_interrupted_install(self, applied_index: int) -> None:
        """At start-up: redo the reset a crash cut off after the state machine was replaced."""
        installing = self._state_file.state.installing
        if installing is None:
            return
        index, term = installing
        if applied_index == index:
            self.reset(index, term)
        else:  # the state machine was not replaced: the log is still the right one
            self._save_state(replace(self._state_file.state, installing=None))

    def reset(self, snapshot_index: int, snapshot_term: int) -> None:
        """Forget every entry: an installed snapshot now covers up to ``snapshot_index``."""
        for segment in self._segments:
            self._drop(segment)
        self._segments = []
        self._unsynced.clear()
        os.fsync(self._dir_fd)  # the old entries are gone for good before the log says it starts later
        self._save_state(
            replace(
                self._state_file.state,
                snapshot_index=snapshot_index,
                snapshot_term=snapshot_term,
                installing=None,
            )
        )
        self.snapshot_index, self.snapshot_term = snapshot_index, snapshot_term
        self.last_index = self.durable_index = snapshot_index
        self._last_crc = 0
        self._configs = []
        self.bytes_since_compaction = 0

    # ------------------------------------------------------------------ the rest

    def disk_bytes(self) -> int:
        """Bytes the log's files take."""
        return sum(segment.size for segment in self._segments)

    def close(self) -> None:
        """Sync what was written, stop the sync thread, close the files."""
        self.sync_now()
        self._syncer.close()
        for segment in self._segments + self._closing:
            os.close(segment.fd)
        self._segments, self._closing = [], []
        self._state_file.close()
        os.close(self._dir_fd)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 16 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
