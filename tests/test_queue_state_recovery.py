"""Unit tests of the pure queue core: reload from the store, log replay, crashes inside an entry."""

from __future__ import annotations

import bson
import pytest

from broker import keys as k
from broker.commands import (
    AckCmd,
    ExpireCmd,
    ExpireDedupCmd,
    LeaseCmd,
    LogEntry,
    NackCmd,
    NoopCmd,
    ProduceCmd,
    PromoteCmd,
    PurgeCmd,
    PurgeDeadCmd,
    RequeueDeadCmd,
)
from broker.keys import Cf
from broker.protocol import ErrorCode, LeaseRef, NackItem
from broker.queue_state import ProduceOutcome, QueueState
from broker.store import Batch, MemoryBatch
from tests.helpers.queue_core import CH, T0, consumer, item, message_id, mixed_channel, ref, stats
from tests.helpers.simulation import Core, view

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------------------------- reload and replay


def test_a_new_queue_state_on_the_same_store_restores_counters_leases_and_sequences() -> None:
    # Given a core with ready, delayed, in-flight, dead messages and a dedup window
    core = Core()
    mixed_channel(core)
    core.turn(T0 + 10, produce=[item("x", body=b"\x05\x00\x00\x00\x00", dedup_ms=60_000)])
    old = core.state
    # When a new QueueState loads the same store
    new = QueueState(core.store, produce_id_window_ms=core.produce_id_window_ms)
    # Then counters, leases and sequence counters match
    assert {n: c.pack() for n, c in new.channels.items()} == {n: c.pack() for n, c in old.channels.items()}
    assert new.leases == old.leases
    assert new.session_leases == old.session_leases
    assert new.subscription_inflight == old.subscription_inflight
    fields = ("applied_index", "next_seq", "next_token", "next_chan_id", "pid_bucket", "last_time_ms")
    assert [getattr(new, f) for f in fields] == [getattr(old, f) for f in fields]
    # And it continues where the old one stopped: deduplication, produce ids and fresh tokens
    core.state = new
    core.scheduler = type(core.scheduler)(new, default_session_timeout_ms=core.session_timeout_ms)
    core.scheduler.adopt_leased_sessions(T0 + 11)  # as the node does at start-up
    outcome = core.turn(
        T0 + 11, produce=[item("x"), item("y", body=b"\x05\x00\x00\x00\x00", dedup_ms=60_000), item("z")]
    )
    assert outcome.produced == [
        ProduceOutcome("x", False),
        ProduceOutcome("x", True),
        ProduceOutcome("z", False),
    ]
    consumer(core, T0 + 11, b"w9", max_parallel=100)
    leased = core.turn(T0 + 12).leased
    assert len(leased) == stats(core)["in_flight"] - 1 == 6
    assert min(lease.lease_token for lease in leased) == old.next_token
    (z,) = [lease for lease in leased if message_id(core, lease) == "z"]
    assert z.seq == old.next_seq


def test_an_entry_at_or_below_the_applied_index_is_not_applied_again() -> None:
    # Given an applied entry that produced a message
    core = Core()
    core.turn(T0, produce=[item("a")])
    entry = core.log[0]
    before = core.store.snapshot_items()
    # When it is applied again (a replay overlapping what was applied)
    results = core.state.apply([(1, entry), (0, LogEntry(T0, (ProduceCmd((item("b"),)),)))])
    # Then it answers None per command and changes nothing
    assert results == [[None], [None]]
    assert core.store.snapshot_items() == before
    assert core.state.applied_index == 1


def test_a_crash_between_append_and_apply_is_replayed_on_restart() -> None:
    # Given a consumer's lease granted and an entry appended (ack + produce) but not applied
    core = Core()
    core.turn(T0, produce=[item("a")])
    consumer(core, T0)
    (lease,) = core.turn(T0 + 1).leased
    commands = core.build(T0 + 2, produce=[item("b")], acks=[ref(lease)])
    core.append(T0 + 2, commands)
    # When the node restarts
    replayed = core.restart(T0 + 3)
    # Then the entry is applied from the log, and the sessions holding leases get a grace period
    assert [index for index, _, _ in replayed] == [3]
    assert replayed[0][2][1] == [ErrorCode.OK]
    assert [m[1] for m in view(core.store).messages.values()] == ["b"]
    assert core.state.applied_index == 3
    assert core.scheduler.sessions == {}  # no leases left, nobody to adopt
    # And a second restart replays nothing
    assert core.restart(T0 + 4) == []


def test_after_a_restart_a_session_with_leases_is_adopted_and_expires_unless_it_returns() -> None:
    # Given w1 holding a lease when the node restarts
    core = Core(session_timeout_ms=500)
    core.turn(T0, produce=[item("a"), item("b")])
    consumer(core, T0, max_parallel=2)
    leases = core.turn(T0).leased
    core.restart(T0 + 1000)
    session = b"w1".ljust(16, b"\x00")
    assert core.scheduler.sessions[session].routing_id is None
    # When w1 re-attaches within the grace period and acks one lease
    core.attach(b"w1", T0 + 1400)
    assert core.turn(T0 + 1400, acks=[ref(leases[0])]).ack_codes == [ErrorCode.OK]
    # Then it keeps its other lease while alive, and loses it once silent
    assert core.turn(T0 + 1900).entry is None
    expired = core.turn(T0 + 1901)
    assert expired.entry is not None and isinstance(expired.entry.commands[0], ExpireCmd)
    assert stats(core)["ready"] == 1


# ---------------------------------------------------------------------------------- log codec


def test_entries_survive_the_log_codec() -> None:
    # Given an entry with every kind of command
    from broker.commands import decode_entry, encode_entry

    entry = LogEntry(
        T0,
        (
            ProduceCmd((item("a", priority=-3, delay_ms=5, dedup_ms=7, dedup_hash=b"h"),)),
            LeaseCmd(b"s", 1, 5, 100, 200, 300, (b"k1", b"k2")),
            AckCmd((LeaseRef(1, 2),)),
            NackCmd((NackItem(1, 2, True, "r"),)),
            ExpireCmd((LeaseRef(3, 4),), "why"),
            PromoteCmd((b"d",)),
            PurgeCmd("c"),
            RequeueDeadCmd("c"),
            PurgeDeadCmd("c"),
            ExpireDedupCmd(9),
            NoopCmd(),
        ),
    )
    # When encoded and decoded
    # Then it is unchanged
    assert decode_entry(encode_entry(entry)) == entry


# ---------------------------------------------------------------------------------- regressions
# Bugs the simulator found (tests/test_queue_simulation.py), fixed in 004e095.


def test_the_duplicates_counter_of_a_duplicate_only_entry_survives_a_restart() -> None:
    # Was: duplicates_total was counted without marking the channel dirty, so it was never saved.
    # Given a message accepted with a deduplication window
    core = Core()
    body = bson.encode({"n": 1})
    core.turn(T0, produce=[item("a", body=body, dedup_ms=1000)])
    # When an entry holds nothing but a duplicate of it
    assert core.turn(T0 + 1, produce=[item("b", body=body, dedup_ms=1000)]).produced[0].duplicate
    assert stats(core)["duplicates_total"] == 1
    # Then the counter is stored: a restarted node still reports it
    reloaded = QueueState(core.store, produce_id_window_ms=core.produce_id_window_ms)
    assert reloaded.channels[CH].duplicates_total == 1


class _Killed(Exception):
    """The node process died inside a store write."""


def test_a_crash_inside_an_entry_after_an_early_bulk_write_replays_without_losing_a_message() -> None:
    # Given a leased message, and an entry: admin purge, the worker's release, the scheduler's dedup sweep
    core = Core()
    core.turn(T0, produce=[item("m")])
    consumer(core, T0)
    (lease,) = core.turn(T0 + 1).leased
    release = NackCmd((NackItem(lease.seq, lease.lease_token, True, ""),))
    index, entry = core.append(T0 + 2, [PurgeCmd(CH), release, ExpireDedupCmd(T0 + 2)])
    # When the node dies in the write that completes the entry (after the sweep's early write)
    write = core.store.write

    def dying_write(batch: Batch, *, sync: bool) -> None:
        assert isinstance(batch, MemoryBatch)
        for _, cf, key, value in batch.ops:
            if cf is Cf.STATE and key == b"meta" and k.U64.unpack_from(value)[0] == index:
                raise _Killed
        write(batch, sync=sync)

    core.store.write = dying_write  # type: ignore[method-assign]
    with pytest.raises(_Killed):
        core.apply(index, entry)
    del core.store.write
    # And restarts, replaying the entry
    core.restart(T0 + 3)
    # Then the state is the entry's: the purge found the message in flight, the release made it ready
    assert core.state.applied_index == index
    assert [m[1] for m in view(core.store).messages.values()] == ["m"]
    assert (stats(core)["ready"], stats(core)["in_flight"]) == (1, 0)
