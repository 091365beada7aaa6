"""Unit tests of the pure queue core: admin commands (purge, requeue and purge of dead letters)."""

from __future__ import annotations

import pytest

from broker import keys as k
from broker.commands import LeaseCmd, PromoteCmd, PurgeCmd, PurgeDeadCmd, RequeueDeadCmd
from broker.protocol import ErrorCode, NackItem
from tests.helpers.queue_core import CH, T0, consumer, drain_one_at_a_time, item, mixed_channel, ref, stats
from tests.helpers.simulation import Core, view

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------------------------- admin


def test_purge_deletes_ready_and_delayed_messages_but_keeps_in_flight_and_dead_ones() -> None:
    # Given a channel with ready, delayed, in-flight and dead messages
    core = Core()
    leases = mixed_channel(core)
    assert [stats(core)[n] for n in ("ready", "delayed", "in_flight", "dead")] == [3, 2, 1, 1]
    # When it is purged
    (removed,) = core.run(T0 + 4, PurgeCmd(CH))
    # Then the 5 waiting messages are gone with their bodies; in-flight, dead and other channels stay
    assert removed == 5
    stored = view(core.store)
    chan = core.state.channels[CH].chan_id
    assert stored.count(chan) == {"ready": 0, "delayed": 0, "inflight": 1, "dead": 1}
    assert sorted(m[1] for m in stored.messages.values()) == ["dead", "flight", "o1"]
    assert [stats(core)[n] for n in ("ready", "delayed", "in_flight", "dead")] == [0, 0, 1, 1]
    assert stats(core, "other")["ready"] == 1
    # And the in-flight one can still be acked, and new messages flow
    assert core.turn(T0 + 5, acks=[ref(leases["flight"])], plan=False).ack_codes == [ErrorCode.OK]
    core.turn(T0 + 6, produce=[item("after")])
    consumer(core, T0 + 6, b"w2")
    assert drain_one_at_a_time(core, T0 + 7, b"w2") == ["after"]
    # And purging an unknown channel does nothing
    assert core.run(T0 + 8, PurgeCmd("nope")) == [0]


def test_requeue_dead_moves_dead_letters_back_with_a_fresh_attempt_count() -> None:
    # Given two dead letters (max_attempts 1)
    core = Core()
    core.turn(T0, produce=[item("a"), item("b")])
    consumer(core, T0, max_parallel=2, max_attempts=1)
    leases = core.turn(T0 + 1).leased
    core.turn(T0 + 2, nacks=[NackItem(le.seq, le.lease_token, False, "x") for le in leases], plan=False)
    assert stats(core)["dead"] == 2
    # When they are requeued
    (moved,) = core.run(T0 + 50, RequeueDeadCmd(CH))
    # Then they are ready, with 0 attempts and the requeue time as their ready time
    assert moved == 2
    stored = view(core.store)
    assert stored.dead == {}
    assert sorted((k.unpack_ready_key(key)[2], a) for key, a in stored.ready.values()) == [(T0 + 50, 0)] * 2
    assert (stats(core)["dead"], stats(core)["ready"]) == (0, 2)
    # And are delivered again as attempt 1
    again = core.turn(T0 + 51).leased
    assert [lease.attempt for lease in again] == [1, 1]


def test_purge_dead_deletes_dead_letters_and_their_bodies() -> None:
    # Given a dead letter and a ready message
    core = Core()
    core.turn(T0, produce=[item("a")])
    consumer(core, T0, max_attempts=1)
    (lease,) = core.turn(T0 + 1).leased
    core.turn(T0 + 2, nacks=[NackItem(lease.seq, lease.lease_token, False, "x")], plan=False)
    core.turn(T0 + 3, produce=[item("b")], plan=False)
    # When dead letters are purged
    (removed,) = core.run(T0 + 4, PurgeDeadCmd(CH))
    # Then the dead one is gone, body included; the ready one stays
    assert removed == 1
    stored = view(core.store)
    assert stored.dead == {}
    assert [m[1] for m in stored.messages.values()] == ["b"]
    assert (stats(core)["dead"], stats(core)["ready"]) == (0, 1)
    assert core.run(T0 + 5, RequeueDeadCmd(CH), PurgeDeadCmd("nope")) == [0, 0]


# ---------------------------------------------------------------------------------- regressions
# Bugs the simulator found (tests/test_queue_simulation.py), fixed in 004e095.


def test_a_purge_and_a_planned_lease_of_a_purged_message_in_one_entry_lease_nothing() -> None:
    # Was: the purge's range deletes bypassed the read overlays, so the lease read the purged row from
    # the store, counters went negative and the final write raised struct.error (on every replay too).
    # Given a ready message and a consumer with credit
    core = Core()
    core.turn(T0, produce=[item("m")])
    consumer(core, T0)
    # When an admin purge arrives in the turn whose plan leases that message
    commands = core.build(T0 + 1, first=[PurgeCmd(CH)])
    assert [type(c) for c in commands] == [PurgeCmd, LeaseCmd]
    index, entry = core.append(T0 + 1, commands)
    results = core.apply(index, entry)
    # Then the purge wins: nothing is leased, the message is gone, the counters are zero
    assert results == [1, []]
    stored = view(core.store)
    assert (stored.messages, stored.ready, stored.leases) == ({}, {}, {})
    assert [stats(core)[n] for n in ("ready", "in_flight", "delivered_total")] == [0, 0, 0]


def test_a_purge_and_a_planned_promotion_of_a_purged_message_in_one_entry_promote_nothing() -> None:
    # Given a delayed message that is due
    core = Core()
    core.turn(T0, produce=[item("m", delay_ms=10)])
    # When an admin purge arrives in the turn whose plan promotes it
    outcome = core.turn(T0 + 10, first=[PurgeCmd(CH)])
    # Then nothing is promoted and the counters are zero
    assert outcome.result_of(PurgeCmd) == 1
    assert outcome.result_of(PromoteCmd) == 0
    assert [stats(core)[n] for n in ("ready", "delayed")] == [0, 0]
    assert view(core.store).messages == {}


def test_a_node_restarts_after_a_purge_raced_a_planned_lease() -> None:
    # Given the purge + lease entry of the test above, durable in the log
    core = Core()
    core.turn(T0, produce=[item("m")])
    consumer(core, T0)
    core.append(T0 + 1, core.build(T0 + 1, first=[PurgeCmd(CH)]))
    # When the node restarts and replays it
    core.restart(T0 + 2)
    # Then it comes up with the message purged
    assert core.state.applied_index == 2
    assert view(core.store).messages == {}
