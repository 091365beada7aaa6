"""The Raft log's files: appends, syncs off the loop, truncation, torn tails, segments, compaction."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cluster.log as log_module
from broker.keys import U64, Cf
from broker.store import RocksStore
from cluster.log import LogStore
from cluster.log_migration import migrate_rocksdb_log
from cluster.log_state import LogState, LogStateFile
from cluster.log_sync import LogSyncError
from cluster.membership import encode_membership
from cluster.messages import Effects, HardState

pytestmark = pytest.mark.timeout(60)


def entries(first: int, last: int, term: int, size: int = 40) -> list[tuple[int, int, bytes]]:
    """Entries first..last of ``term`` whose payloads name them."""
    return [
        (index, term, f"entry {index} term {term} ".encode().ljust(size, b"."))
        for index in range(first, last + 1)
    ]


def append(log: LogStore, rows: list[tuple[int, int, bytes]], *, truncate_from: int | None = None) -> None:
    log.write(Effects(truncate_from=truncate_from, append=list(rows)))


def append_200(log: LogStore) -> None:
    """Entries 1..200 of term 1, written 20 at a time."""
    for first in range(1, 201, 20):
        append(log, entries(first, first + 19, 1))


def one_segment_log(directory: Path, last: int) -> Path:
    """A closed log of entries 1..``last`` of term 1 (durable), and its one segment file."""
    log = LogStore(directory)
    log.persist(Effects(append=entries(1, last, 1)))
    log.close()
    (segment,) = segment_files(directory)
    return segment


def wait_durable(log: LogStore, index: int, timeout_s: float = 10.0) -> None:
    """Poll the log as the node loop does until ``index`` is reported durable."""
    deadline = time.monotonic() + timeout_s
    while log.durable_index < index:
        assert time.monotonic() < deadline, f"index {index} not durable after {timeout_s}s"
        log.request_sync()
        log.poll_synced()
        time.sleep(0.001)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "raft"


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(log_module, "SEGMENT_BYTES", 1024)
    yield


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_entries_hard_state_and_memberships_survive_a_reopen(directory: Path) -> None:
    # Given a log with a vote, ten entries and a membership entry
    log = LogStore(directory)
    membership = encode_membership({"n1": ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")})
    log.persist(Effects(hard_state=HardState(3, "n2"), append=[*entries(1, 10, 3), (11, 3, membership)]))
    log.close()
    # When it is opened again
    log = LogStore(directory)
    # Then everything is there as written
    assert log.hard_state() == HardState(3, "n2")
    assert log.last_index == 11 and log.durable_index == 11
    assert log.terms() == [3] * 11
    assert log.entries(1, 11) == entries(1, 10, 3)
    assert log.configs() == [(11, membership)]
    assert log.payloads(4, 2) == tuple(payload for _, _, payload in entries(4, 5, 3))
    log.close()


def test_a_write_is_durable_only_once_the_sync_thread_reports_it(directory: Path) -> None:
    # Given a log with entries 1..5 durable
    log = LogStore(directory)
    log.persist(Effects(append=entries(1, 5, 1)))
    assert log.durable_index == 5
    # When entries 6..9 are written
    append(log, entries(6, 9, 1))
    # Then they are readable at once, but not durable until a sync was asked for and has finished
    assert log.entries(6, 10) == entries(6, 9, 1)
    assert log.durable_index == 5
    assert log.poll_synced()[0] is None
    wait_durable(log, 9)
    assert log.durable_index == 9
    log.close()


def test_a_sync_in_the_calling_thread_covers_what_the_thread_was_given_and_what_came_after(
    directory: Path, small_segments: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a log whose entries 1..10 were handed to the sync thread, then entries 11..40 written
    # (new segment files among them) without asking for a sync
    synced: list[tuple[int, int]] = []  # (thread, fd)
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append((threading.get_ident(), fd))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    log = LogStore(directory)
    append(log, entries(1, 10, 1))
    log.request_sync()
    append(log, entries(11, 40, 1))
    newest = log._segments[-1].fd
    assert len(segment_files(directory)) > 2
    # When the caller syncs in its own thread (a follower before it answers)
    durable = log.sync_now()
    # Then everything written is durable once it returns, the newest segment synced by the caller
    assert (durable, log.durable_index) == (40, 40)
    assert (threading.get_ident(), newest) in synced
    # and the next poll reports no new index, but the sync's duration
    moved, durations = log.poll_synced()
    assert moved is None and durations
    assert log.sync_now() is None  # nothing new to sync
    log.close()
    assert LogStore(directory).entries(1, 41) == entries(1, 40, 1)


def test_a_failed_fsync_is_fatal_and_claims_nothing(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a log with entries 1..3 durable and 4..6 written
    log = LogStore(directory)
    log.persist(Effects(append=entries(1, 3, 1)))
    append(log, entries(4, 6, 1))

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    # When the disk fails the sync, in the caller's thread and in the sync thread
    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(LogSyncError, match="fsync of the Raft log failed"):
        log.sync_now()
    append(log, entries(7, 7, 1))
    log.request_sync()
    with pytest.raises(LogSyncError):
        while True:  # until the thread has tried (bounded by the test's timeout)
            log.poll_synced()
            time.sleep(0.001)
    # Then nothing after 3 was ever reported durable
    assert log.durable_index == 3


def test_a_truncation_while_a_sync_is_pending_never_reports_the_replaced_entries(directory: Path) -> None:
    # Given entries 1..10 of term 1, of which 1..4 are durable
    log = LogStore(directory)
    log.persist(Effects(append=entries(1, 4, 1)))
    append(log, entries(5, 10, 1))
    # When a new leader's entries replace 6.. before anything more was synced
    append(log, entries(6, 7, 2), truncate_from=6)
    # Then the log holds 1..5 of term 1 and 6..7 of term 2, and durability is reported up to 7 at most
    assert log.entries(1, 20) == entries(1, 5, 1) + entries(6, 7, 2)
    wait_durable(log, 7)
    assert log.durable_index == 7
    log.close()
    assert LogStore(directory).entries(1, 20) == entries(1, 5, 1) + entries(6, 7, 2)


def test_a_torn_tail_is_cut_off_at_the_last_whole_record_and_the_log_goes_on(directory: Path) -> None:
    # Given a log of 20 entries whose last record was torn by a crash
    segment = one_segment_log(directory, 20)
    size = segment.stat().st_size
    os.truncate(segment, size - 7)
    # When it is opened again
    log = LogStore(directory)
    # Then entry 20 is gone, the file ends at entry 19, and new entries follow it and survive
    assert log.last_index == 19
    assert log.entries(1, 30) == entries(1, 19, 1)
    assert segment.stat().st_size < size - 7
    log.persist(Effects(append=entries(20, 22, 2)))
    log.close()
    assert LogStore(directory).entries(1, 30) == entries(1, 19, 1) + entries(20, 22, 2)


def test_garbage_after_the_last_record_is_cut_off(directory: Path) -> None:
    # Given a log whose file got random bytes after its last record
    segment = one_segment_log(directory, 5)
    with segment.open("ab") as file:
        file.write(os.urandom(300))
    # When it is opened again
    log = LogStore(directory)
    # Then it holds the five entries and nothing else
    assert log.last_index == 5 and log.entries(1, 10) == entries(1, 5, 1)
    log.close()


def test_old_records_behind_a_rewrite_that_did_not_reach_the_disk_are_not_taken_back(directory: Path) -> None:
    # Given entries 1..5 of term 1 and 6..10 of term 3 on disk (the last five never committed)
    log = LogStore(directory)
    log.persist(Effects(append=entries(1, 5, 1) + entries(6, 10, 3)))
    log.close()
    (segment,) = segment_files(directory)
    old = segment.read_bytes()
    # And a leader of term 4 replaced 6.. by its own 6..7 of term 2 (records of the same sizes)
    log = LogStore(directory)
    log.persist(Effects(truncate_from=6, append=entries(6, 7, 2)))
    log.close()
    new = segment.read_bytes()
    # When a power cut kept the new records but lost the truncation (old bytes after them)
    segment.write_bytes(new + old[len(new) :])
    # Then the old 8..10 of term 3 do not come back after the new 6..7 (their terms would even look
    # in order): their CRC chain starts from the old 7, so it is broken
    log = LogStore(directory)
    assert log.entries(1, 20) == entries(1, 5, 1) + entries(6, 7, 2)
    log.close()


@pytest.mark.usefixtures("small_segments")
def test_segments_roll_over_and_compaction_deletes_whole_ones(directory: Path) -> None:
    # Given a log of 200 entries in segments of about 1 KiB
    log = LogStore(directory)
    append_200(log)
    log.sync_now()
    files = segment_files(directory)
    assert len(files) > 5
    assert log.entries(1, 201) == entries(1, 200, 1)
    # When entries up to 150 are compacted
    log.compact(150, 1)
    # Then files holding only compacted entries are gone, the rest reads and survives a reopen
    assert len(segment_files(directory)) < len(files)
    assert log.entries(1, 201) == entries(151, 200, 1)
    log.close()
    log = LogStore(directory)
    assert (log.snapshot_index, log.snapshot_term, log.last_index) == (150, 1, 200)
    assert log.terms() == [1] * 50
    assert log.entries(151, 201) == entries(151, 200, 1)
    log.close()


@pytest.mark.usefixtures("small_segments")
def test_a_missing_segment_ends_the_log_before_the_hole(directory: Path) -> None:
    # Given a log of many segments, one in the middle lost
    log = LogStore(directory)
    append_200(log)
    log.close()
    files = segment_files(directory)
    lost = files[3]
    last_before_hole = int(lost.name.removesuffix(".seg")) - 1
    lost.unlink()
    # When it is opened again
    log = LogStore(directory)
    # Then it ends right before the hole and the segments after it are deleted
    assert log.last_index == last_before_hole
    assert segment_files(directory) == files[:3]
    log.close()


@pytest.mark.usefixtures("small_segments")
def test_a_truncation_across_segments_and_compaction_of_everything(directory: Path) -> None:
    # Given 100 entries over several segments
    log = LogStore(directory)
    append(log, entries(1, 100, 1))
    # When a new leader replaces everything from 30 on, then all of it is compacted
    append(log, entries(30, 35, 2), truncate_from=30)
    log.sync_now()
    assert log.entries(1, 200) == entries(1, 29, 1) + entries(30, 35, 2)
    log.compact(35, 2)
    # Then no segment is left, and the next entry starts a new one that survives a reopen
    assert segment_files(directory) == []
    log.persist(Effects(append=entries(36, 40, 2)))
    log.close()
    log = LogStore(directory)
    assert (log.snapshot_index, log.last_index) == (35, 40)
    assert log.entries(1, 100) == entries(36, 40, 2)
    log.close()


def test_an_install_cut_short_by_a_crash_is_finished_at_start_up(directory: Path) -> None:
    # Given a log that began installing a snapshot through 50 and crashed after the state machine
    # was replaced, before the log was reset
    log = LogStore(directory)
    log.persist(Effects(append=entries(1, 10, 1)))
    log.begin_install(50, 4)
    log.close()
    # When it starts with a state machine that applied 50
    log = LogStore(directory)
    log.finish_interrupted_install(50)
    # Then the log starts after the snapshot and holds no entry
    assert (log.snapshot_index, log.snapshot_term, log.last_index, log.terms()) == (50, 4, 50, [])
    assert segment_files(directory) == []
    log.close()
    # And an install that never replaced the state machine is simply forgotten
    log = LogStore(directory)
    log.persist(Effects(append=entries(51, 52, 4)))
    log.begin_install(90, 5)
    log.finish_interrupted_install(52)
    assert (log.snapshot_index, log.last_index) == (50, 52)
    log.close()
    assert LogStore(directory).entries(51, 53) == entries(51, 52, 4)


def test_the_state_file_falls_back_to_the_other_slot_when_the_newest_is_torn(tmp_path: Path) -> None:
    # Given a state file saved three times
    path = tmp_path / "state"
    states = [LogState(term, f"n{term}", term * 10, term) for term in (1, 2, 3)]
    state_file = LogStateFile(path)
    for state in states:
        state_file.save(state)
    state_file.close()
    assert LogStateFile(path).state == states[-1]
    # When the slot of the last save is torn (creation wrote sequence 1, the saves 2, 3, 4: slots
    # alternate, so the last save went to slot 0)
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF
    path.write_bytes(bytes(data))
    # Then the state of the save before it is read
    assert LogStateFile(path).state == states[-2]


def test_a_log_kept_in_rocksdb_by_an_older_zbroker_is_moved_into_segment_files(tmp_path: Path) -> None:
    # Given a data folder with the old RocksDB log: compacted through 3, a vote, entries 4..8
    old, new = tmp_path / "log", tmp_path / "raft"
    store = RocksStore(old, (Cf.LOG, Cf.RAFT), memtable_bytes=1 << 20)
    batch = store.batch()
    batch.put(Cf.RAFT, b"snapshot", struct.pack(">QQ", 3, 2))
    batch.put(Cf.RAFT, b"hard_state", U64.pack(5) + b"n3")
    for index, term, payload in entries(4, 8, 2):
        batch.put(Cf.LOG, U64.pack(index), U64.pack(term) + payload)
    store.write(batch, sync=True)
    store.close()
    # When a node starts on it
    assert migrate_rocksdb_log(old, new)
    # Then the new log holds the same state and entries, and the old folder is gone
    assert not old.exists()
    log = LogStore(new)
    assert (log.snapshot_index, log.snapshot_term, log.hard_state()) == (3, 2, HardState(5, "n3"))
    assert log.entries(1, 100) == entries(4, 8, 2)
    log.close()
    # And a second start finds nothing left to move
    assert not migrate_rocksdb_log(old, new)


def test_with_fsync_off_writes_count_as_durable_as_soon_as_a_sync_is_asked_for(directory: Path) -> None:
    # Given a log opened with fsync = false
    log = LogStore(directory, fsync=False)
    # When entries are written and a sync is asked for
    append(log, entries(1, 3, 1))
    assert log.durable_index == 0
    log.request_sync()
    # Then the next poll reports them durable without waiting for the disk
    assert log.poll_synced()[0] == 3
    log.close()
