"""Unit tests of the queue core's Scheduler and ReadyHead: ready head, credit, pending grants, sessions."""

from __future__ import annotations

import pytest

from broker import keys as k
from broker.commands import ExpireCmd, LeaseCmd, NackCmd
from broker.keys import Cf
from broker.protocol import ErrorCode, LeaseRef, NackItem
from broker.ready_head import ReadyHead
from broker.store import MemoryStore
from tests.helpers.queue_core import CH, T0, consumer, drain_one_at_a_time, item, message_id, ref, stats
from tests.helpers.simulation import Core, view

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------------------------- ready head


def test_ready_head_keeps_the_smallest_keys_and_refills_after_its_bound() -> None:
    # Given a store with 10 ready keys and a head of capacity 3
    store = MemoryStore()
    batch = store.batch()
    keys_in_order = [k.ready_key(1, 0, T0, seq) for seq in range(1, 11)]
    for key in keys_in_order:
        batch.put(Cf.READY, key, k.pack_attempts(0))
    batch.put(Cf.READY, k.ready_key(2, 0, T0, 99), k.pack_attempts(0))  # another channel
    store.write(batch, sync=False)
    head = ReadyHead(1, capacity=3)
    # When it refills
    head.refill(store)
    # Then it holds the first 3 and remembers its bound
    assert head.keys == keys_in_order[:3]
    assert (head.bound, head.complete) == (keys_in_order[2], False)
    # When a smaller key arrives, the largest is dropped and the bound moves down
    smaller = k.ready_key(1, 5, T0, 50)
    head.insert(smaller, 2)
    assert head.keys == [smaller, *keys_in_order[:2]]
    assert head.bound == keys_in_order[1]
    assert head.attempts[smaller] == 2
    # And a key beyond the bound is left on disk
    head.insert(k.ready_key(1, 0, T0 + 1, 1), 0)
    assert len(head.keys) == 3
    # And stays on disk even when the head has room: keys between the bound and it are not in memory
    head.remove(smaller)
    beyond = k.ready_key(1, 0, T0 + 1, 2)
    head.insert(beyond, 0)
    assert beyond not in head.keys
    assert head.keys == keys_in_order[:2]
    # When the head is emptied and refilled, it continues after the bound and stops at the channel's end
    for key in list(head.keys):
        head.remove(key)
    head.refill(store)
    assert head.keys == keys_in_order[2:5]
    for key in list(head.keys):
        head.remove(key)
    head.refill(store)
    assert head.keys == keys_in_order[5:8]
    for key in list(head.keys):
        head.remove(key)
    head.refill(store)
    assert head.keys == keys_in_order[8:]
    assert head.complete


@pytest.mark.parametrize("capacity", [1, 2, 3, 7])
def test_a_small_ready_head_still_delivers_a_deep_queue_in_order(capacity: int) -> None:
    # Given a head of a few keys and 60 messages of mixed priority produced over several entries
    core = Core(head_capacity=capacity)
    specs = [(f"m{n:02}", (n * 7) % 4) for n in range(60)]
    for start in range(0, 60, 12):
        core.turn(T0 + start, produce=[item(pid, priority=p) for pid, p in specs[start : start + 12]])
    assert core.state.channels[CH].head.capacity == capacity
    consumer(core, T0 + 100)
    # When one consumer takes them one at a time
    order = drain_one_at_a_time(core, T0 + 100)
    # Then every message comes, by priority then produce order
    expected = [pid for pid, _ in sorted(specs, key=lambda s: (-s[1], s[0]))]
    assert order == expected


def test_a_small_ready_head_takes_higher_priority_keys_that_arrive_while_it_is_trimmed() -> None:
    # Given a head of 3 over 10 ready priority-0 messages, 2 of them leased
    core = Core(head_capacity=3)
    core.turn(T0, produce=[item(f"low{n}") for n in range(10)])
    consumer(core, T0, max_parallel=2)
    first = core.turn(T0 + 1).leased
    assert [message_id(core, le) for le in first] == ["low0", "low1"]
    # When higher-priority messages and another low one arrive, and a low one is released back
    core.turn(
        T0 + 2,
        produce=[item("high1", priority=5), item("low10"), item("high2", priority=5)],
        nacks=[NackItem(first[1].seq, first[1].lease_token, True, "")],
        acks=[ref(first[0])],
        plan=False,
    )
    # Then delivery takes the high ones first, then the released one, then the rest in order
    core.subscribe(core.scheduler.sessions[b"w1".ljust(16, b"\x00")], 1, CH, max_parallel=1)
    order = drain_one_at_a_time(core, T0 + 3)
    assert order == ["high1", "high2", "low1", *[f"low{n}" for n in range(2, 11)]]


# ---------------------------------------------------------------------------------- scheduler credit


def test_a_subscription_never_gets_more_leases_than_max_parallel() -> None:
    # Given 10 ready messages and a subscription of max_parallel 3
    core = Core()
    core.turn(T0, produce=[item(f"m{n}") for n in range(10)])
    consumer(core, T0, max_parallel=3)
    # When several turns are planned without acks
    counts = [len(core.turn(T0 + n).leased) for n in range(1, 4)]
    # Then it gets 3 once and nothing after
    assert counts == [3, 0, 0]
    assert core.state.inflight_of(b"w1", 1) == 3


def test_pending_grants_count_against_credit_before_they_are_applied() -> None:
    # Given a subscription of max_parallel 2 and 5 ready messages
    core = Core()
    core.turn(T0, produce=[item(f"m{n}") for n in range(5)])
    consumer(core, T0, max_parallel=2)
    # When a turn is proposed but not applied yet, and another is planned
    first = core.build(T0 + 1)
    index, entry = core.append(T0 + 1, first)
    second = core.build(T0 + 2)
    # Then the second grants nothing: the first's grants are pending
    (lease_cmd,) = [c for c in first if isinstance(c, LeaseCmd)]
    assert len(lease_cmd.ready_keys) == 2
    assert not any(isinstance(c, LeaseCmd) for c in second)
    core.apply(index, entry)
    assert core.state.inflight_of(b"w1", 1) == 2


def test_two_subscriptions_are_never_granted_the_same_pending_key() -> None:
    # Given two consumers and 3 ready messages
    core = Core()
    core.turn(T0, produce=[item(f"m{n}") for n in range(3)])
    consumer(core, T0, b"w1", max_parallel=1)
    consumer(core, T0, b"w2", max_parallel=5)
    # When two turns are planned before either is applied
    first = core.build(T0 + 1)
    core.append(T0 + 1, first)
    second = core.build(T0 + 2)
    # Then all keys granted are distinct and no more than the 3 ready
    granted = [key for c in (*first, *second) if isinstance(c, LeaseCmd) for key in c.ready_keys]
    assert len(granted) == len(set(granted)) == 3


def test_an_ack_in_the_same_turn_frees_credit_at_once_without_exceeding_max_parallel() -> None:
    # Given a subscription of max_parallel 2 holding 2 leases, with 4 more ready
    core = Core()
    core.turn(T0, produce=[item(f"m{n}") for n in range(6)])
    consumer(core, T0, max_parallel=2)
    a, b = core.turn(T0 + 1).leased
    # When one is acked twice in the same turn
    outcome = core.turn(T0 + 2, acks=[ref(a), ref(a)])
    # Then the turn grants exactly one more (a duplicate ack frees no extra credit)
    (c,) = outcome.leased
    assert outcome.ack_codes == [ErrorCode.OK, ErrorCode.STALE_LEASE]
    assert core.state.inflight_of(b"w1", 1) == 2
    # When one is nacked, and the other acked with a wrong token, and the acked one acked again
    outcome = core.turn(
        T0 + 3,
        nacks=[NackItem(b.seq, b.lease_token, False, "")],
        acks=[LeaseRef(c.seq, c.lease_token + 1), ref(a)],
    )
    # Then only the valid nack frees credit
    assert outcome.ack_codes == [ErrorCode.STALE_LEASE, ErrorCode.STALE_LEASE]
    assert len(outcome.leased) == 1
    assert core.state.inflight_of(b"w1", 1) == 2


def test_expiries_planned_in_a_turn_free_credit_for_the_same_turn() -> None:
    # Given a subscription with a processing timeout holding its only lease, and more ready
    core = Core(session_timeout_ms=100_000)
    core.turn(T0, produce=[item("a"), item("b")])
    consumer(core, T0, max_parallel=1, processing_timeout_ms=10)
    (lease,) = core.turn(T0).leased
    # When the deadline passes
    outcome = core.turn(T0 + 10)
    # Then the same turn expires it and grants the next one, staying within max_parallel
    assert outcome.entry is not None
    assert [type(c) for c in outcome.entry.commands] == [ExpireCmd, LeaseCmd]
    (next_lease,) = outcome.leased
    assert next_lease.seq != lease.seq
    assert core.state.inflight_of(b"w1", 1) == 1


def test_closing_a_session_releases_its_leases_without_counting_attempts() -> None:
    # Given w1 holding two leases
    core = Core()
    core.turn(T0, produce=[item("a"), item("b")])
    session = consumer(core, T0, max_parallel=2, max_attempts=1)
    core.turn(T0 + 1)
    # When it says goodbye
    release = core.scheduler.close(session)
    assert release is not None
    outcome = core.turn(T0 + 2, first=[release])
    # Then both are ready again with no attempt counted, and the session is gone
    assert outcome.result_of(NackCmd) == [ErrorCode.OK, ErrorCode.OK]
    assert sorted(a for _, a in view(core.store).ready.values()) == [0, 0]
    assert core.scheduler.sessions == {}
    assert (stats(core)["dead"], stats(core)["in_flight"]) == (0, 0)


def test_unsubscribing_keeps_leases_until_they_are_settled() -> None:
    # Given w1 holding a lease
    core = Core()
    core.turn(T0, produce=[item("a"), item("b")])
    session = consumer(core, T0)
    (lease,) = core.turn(T0 + 1).leased
    # When it unsubscribes
    assert core.scheduler.unsubscribe(session, 1)
    # Then it gets nothing more but its lease stays valid
    core.scheduler.touch(b"w1", T0 + 2)
    assert core.turn(T0 + 2, acks=[ref(lease)]).ack_codes == [ErrorCode.OK]
    assert core.turn(T0 + 3).leased == []
    assert not core.scheduler.unsubscribe(session, 1)


# ---------------------------------------------------------------------------------- regressions
# Bugs the simulator found (tests/test_queue_simulation.py), fixed in 004e095.


def test_a_lease_applied_after_its_session_expired_still_expires() -> None:
    # Was: only applied leases were expired with their session; a pending grant applied later stayed
    # leased forever (reachable once entries commit after a replication delay).
    # Given a consumer whose lease grant is proposed but not yet applied (awaiting commit)
    core = Core(session_timeout_ms=100)
    core.turn(T0, produce=[item("m")])
    consumer(core, T0)
    grant = core.append(T0 + 50, core.build(T0 + 50))
    # When the session expires meanwhile, and the grant is applied after that
    expiry = core.append(T0 + 200, core.build(T0 + 200))
    core.apply(*grant)
    core.apply(*expiry)
    assert len(core.state.leases) == 1
    # Then a later turn expires the orphaned lease, so the message is delivered again
    core.turn(T0 + 5_000)
    assert core.state.leases == {}
    assert stats(core)["ready"] == 1


def test_a_lease_applied_after_its_session_said_goodbye_is_expired() -> None:
    # Given a consumer whose lease grant is proposed but not yet applied
    core = Core()
    core.turn(T0, produce=[item("m")])
    session = consumer(core, T0)
    grant = core.append(T0 + 1, core.build(T0 + 1))
    # When the session says goodbye before the grant is applied
    release = core.scheduler.close(session)
    assert release is None  # nothing applied to release yet
    core.apply(*grant)
    assert len(core.state.leases) == 1
    # Then the next turn releases the lease nobody will ever receive (no attempt counted)
    outcome = core.turn(T0 + 2)
    assert outcome.entry is not None and isinstance(outcome.entry.commands[0], NackCmd)
    assert all(item.release for item in outcome.entry.commands[0].items)
    assert core.state.leases == {}
    assert stats(core)["ready"] == 1
