"""Unit tests of the pure queue core: lease order, delay, ack/nack/release, backoff, dead letters, expiry."""

from __future__ import annotations

import pytest

from broker import keys as k
from broker.commands import ExpireCmd, PromoteCmd
from broker.keys import Cf
from broker.protocol import ErrorCode, LeaseRef, NackItem
from broker.queue_state import retry_delay_ms
from broker.store import MemoryStore
from tests.helpers.queue_core import CH, T0, consumer, drain_one_at_a_time, item, message_id, ref, stats
from tests.helpers.simulation import Core, view

pytestmark = pytest.mark.timeout(30)


def state_cfs(store: MemoryStore) -> dict[Cf, dict[bytes, bytes]]:
    """Everything but the applied-index metadata, to compare 'nothing changed'."""
    data = store.snapshot_items()
    data.pop(Cf.STATE)
    data.pop(Cf.LOG)
    return data


# ---------------------------------------------------------------------------------- order


def test_leases_come_by_priority_then_produce_order() -> None:
    # Given messages of mixed priority produced in one entry, before anyone consumes
    core = Core()
    spec = [
        ("a0", 0),
        ("b5", 5),
        ("c0", 0),
        ("d9", 9),
        ("e5", 5),
        ("f-1", -1),
        ("gmax", 2**31 - 1),
        ("hmin", -(2**31)),
    ]
    core.turn(T0, produce=[item(pid, priority=priority) for pid, priority in spec])
    consumer(core, T0)
    # When one consumer takes them one at a time
    order = drain_one_at_a_time(core, T0 + 1)
    # Then higher priority comes first, then produce order
    assert order == ["gmax", "d9", "b5", "e5", "a0", "c0", "f-1", "hmin"]


def test_an_earlier_ready_time_goes_before_an_earlier_produce() -> None:
    # Given "late" produced first but delayed until T0+100, and "soon" produced at T0+50
    core = Core()
    core.turn(T0, produce=[item("late", delay_ms=100)])
    core.turn(T0 + 50, produce=[item("soon")])
    core.turn(T0 + 100)  # promotes "late" with ready time T0+100
    # When a consumer takes them one at a time
    consumer(core, T0 + 200)
    # Then "soon" (ready at T0+50) comes before "late" (ready at T0+100)
    assert drain_one_at_a_time(core, T0 + 200) == ["soon", "late"]


def test_a_redelivered_message_keeps_its_place_in_the_queue() -> None:
    # Given "first" leased, then "second" produced, then "first" released
    core = Core()
    core.turn(T0, produce=[item("first")])
    consumer(core, T0, max_parallel=1)
    (lease,) = core.turn(T0 + 1).leased
    core.turn(T0 + 2, produce=[item("second")])
    core.turn(T0 + 3, nacks=[NackItem(lease.seq, lease.lease_token, True, "")], plan=False)
    # When the consumer drains the queue
    # Then "first" comes back before "second"
    assert drain_one_at_a_time(core, T0 + 4) == ["first", "second"]


# ---------------------------------------------------------------------------------- delay


def test_a_delayed_message_is_promoted_by_the_scheduler_at_its_due_time() -> None:
    # Given a message delayed 500 ms at T0 and a consumer
    core = Core()
    core.turn(T0, produce=[item("d", delay_ms=500)])
    consumer(core, T0)
    assert (stats(core)["delayed"], stats(core)["ready"]) == (1, 0)
    # When the scheduler plans just before the due time
    early = core.turn(T0 + 499)
    # Then nothing is promoted or leased
    assert early.entry is None
    assert stats(core)["delayed"] == 1
    # When it plans at the due time
    due = core.turn(T0 + 500)
    # Then a PromoteCmd moves it to the ready index, with the due time as its ready time
    assert due.entry is not None
    (promote,) = [c for c in due.entry.commands if isinstance(c, PromoteCmd)]
    assert due.result_of(PromoteCmd) == 1
    assert len(promote.delayed_keys) == 1
    (ready_key, attempts) = next(iter(view(core.store).ready.values()))
    assert k.unpack_ready_key(ready_key)[2] == T0 + 500
    assert attempts == 0
    # And the next turn delivers it
    (lease,) = core.turn(T0 + 501).leased
    assert message_id(core, lease) == "d"


def test_a_shorter_delay_produced_after_a_longer_one_is_promoted_at_its_own_time() -> None:
    # Given a message delayed 1000 ms, and once the scheduler knows its due time, one delayed 100 ms
    core = Core()
    core.turn(T0, produce=[item("long", delay_ms=1000)])
    core.turn(T0 + 1)
    core.turn(T0 + 2, produce=[item("short", delay_ms=100)])
    # When the scheduler plans at the short one's due time
    outcome = core.turn(T0 + 102)
    # Then the short one is promoted, the long one still waits
    assert outcome.result_of(PromoteCmd) == 1
    (seq,) = view(core.store).ready
    assert core.state.message(1, seq) is not None
    assert core.state.message(1, seq)[2] == "short"  # type: ignore[index]
    assert stats(core)["delayed"] == 1


def test_promote_ignores_keys_that_are_no_longer_delayed() -> None:
    # Given a delayed message that was promoted already
    core = Core()
    core.turn(T0, produce=[item("d", delay_ms=10)])
    (key,) = [key for key, *_ in view(core.store).delayed.values()]
    assert core.run(T0 + 10, PromoteCmd((key,))) == [1]
    # When the same promote is applied again
    # Then it promotes nothing and the message is ready once
    assert core.run(T0 + 11, PromoteCmd((key,))) == [0]
    assert (stats(core)["ready"], stats(core)["delayed"]) == (1, 0)


def test_the_scheduler_does_not_propose_the_same_promotion_twice_while_pending() -> None:
    # Given a due delayed message
    core = Core()
    core.turn(T0, produce=[item("d", delay_ms=10)])
    # When two turns are planned before the first is applied
    first = core.build(T0 + 10)
    index, entry = core.append(T0 + 10, first)
    second = core.build(T0 + 11)
    # Then only the first promotes it
    assert sum(isinstance(c, PromoteCmd) for c in first) == 1
    assert not any(isinstance(c, PromoteCmd) for c in second)
    core.apply(index, entry)
    assert stats(core)["ready"] == 1


# ---------------------------------------------------------------------------------- nack, release, expiry


def test_retry_delay_is_exponential_and_capped() -> None:
    assert [retry_delay_ms(a, 100, 0) for a in (1, 2, 3, 4)] == [100, 200, 400, 800]
    assert [retry_delay_ms(a, 100, 250) for a in (1, 2, 3, 4)] == [100, 200, 250, 250]
    assert retry_delay_ms(5, 0, 1000) == 0
    assert retry_delay_ms(1_000, 1, 0) == 1 << 30


def test_a_failed_message_is_retried_with_backoff_then_dead_lettered_after_max_attempts() -> None:
    # Given a consumer with 4 attempts, 100 ms backoff capped at 250 ms
    core = Core()
    core.turn(T0, produce=[item("m")])
    consumer(core, T0, max_attempts=4, retry_backoff_ms=100, retry_backoff_max_ms=250)
    now = T0
    # When every attempt fails
    for attempt, backoff in [(1, 100), (2, 200), (3, 250)]:
        now += 1
        core.scheduler.touch(b"w1", now)
        (lease,) = core.turn(now).leased
        assert lease.attempt == attempt
        now += 1
        core.scheduler.touch(b"w1", now)
        nack = core.turn(now, nacks=[NackItem(lease.seq, lease.lease_token, False, "boom")])
        # Then it waits base * 2^(attempt-1), capped, in the delayed index
        assert nack.nack_codes == [ErrorCode.OK]
        ((delayed_key, _, attempts),) = view(core.store).delayed.values()
        assert k.unpack_delayed_key(delayed_key)[1] == now + backoff
        assert attempts == attempt
        assert core.turn(now + backoff - 1).leased == []
        now += backoff
        core.scheduler.touch(b"w1", now)
        core.turn(now)  # promotes
    now += 1
    core.scheduler.touch(b"w1", now)
    (lease,) = core.turn(now).leased
    assert lease.attempt == 4
    core.turn(now + 1, nacks=[NackItem(lease.seq, lease.lease_token, False, "still broken")])
    # Then after the 4th failure it is a dead letter, body kept, never redelivered
    stored = view(core.store)
    assert stored.dead == {lease.seq: (lease.chan_id, 4, now + 1, "still broken")}
    assert lease.seq in stored.messages
    assert (stored.ready, stored.delayed, stored.leases) == ({}, {}, {})
    counters = stats(core)
    assert (counters["dead"], counters["dead_lettered_total"], counters["nacked_total"]) == (1, 1, 4)
    core.scheduler.touch(b"w1", now + 10_000)
    assert core.turn(now + 10_000).leased == []


def test_a_nack_without_backoff_requeues_at_once() -> None:
    # Given a consumer without retry backoff
    core = Core()
    core.turn(T0, produce=[item("m")])
    consumer(core, T0, max_attempts=3)
    (lease,) = core.turn(T0 + 1).leased
    # When it fails the message
    core.turn(T0 + 2, nacks=[NackItem(lease.seq, lease.lease_token, False, "x")], plan=False)
    # Then it is ready again with one attempt counted
    assert [attempts for _, attempts in view(core.store).ready.values()] == [1]
    (again,) = core.turn(T0 + 3).leased
    assert again.attempt == 2


def test_a_release_does_not_count_an_attempt() -> None:
    # Given a message leased with max_attempts 1
    core = Core()
    core.turn(T0, produce=[item("m")])
    consumer(core, T0, max_attempts=1, retry_backoff_ms=1000)
    (lease,) = core.turn(T0 + 1).leased
    # When it is released (not processed), twice
    for step in range(2):
        codes = core.turn(
            T0 + 2 + step * 2, nacks=[NackItem(lease.seq, lease.lease_token, True, "")], plan=False
        )
        assert codes.nack_codes == [ErrorCode.OK]
        # Then it is ready at once with no attempt counted, and redelivered as attempt 1
        assert [attempts for _, attempts in view(core.store).ready.values()] == [0]
        (lease,) = core.turn(T0 + 3 + step * 2).leased
        assert lease.attempt == 1
    counters = stats(core)
    assert (counters["nacked_total"], counters["dead"], counters["delivered_total"]) == (0, 0, 3)


def test_a_silent_session_expires_and_its_leases_go_to_other_workers() -> None:
    # Given w1 (1000 ms session timeout) holding a lease, and w2 waiting
    core = Core(session_timeout_ms=1000)
    core.turn(T0, produce=[item("m")])
    consumer(core, T0, b"w1")
    (lease,) = core.turn(T0).leased
    w2 = core.attach(b"w2", T0)
    core.subscribe(w2, 1, CH)
    # When w1 stays silent exactly its timeout
    core.scheduler.touch(b"w2", T0 + 1000)
    assert core.turn(T0 + 1000).entry is None
    # And then one ms more
    core.scheduler.touch(b"w2", T0 + 1001)
    outcome = core.turn(T0 + 1001)
    # Then its lease expires as a failed attempt and the message goes to w2 as attempt 2
    assert outcome.entry is not None
    (expire,) = [c for c in outcome.entry.commands if isinstance(c, ExpireCmd)]
    assert (expire.refs, expire.reason) == ((ref(lease),), "session expired")
    assert b"w1".ljust(16, b"\x00") not in core.scheduler.sessions
    core.scheduler.touch(b"w2", T0 + 1002)
    (again,) = core.turn(T0 + 1002).leased
    assert (again.session, again.attempt, again.seq) == (b"w2".ljust(16, b"\x00"), 2, lease.seq)
    assert stats(core)["lease_expired_total"] == 1
    # And w1's late ack is refused
    assert core.turn(T0 + 1003, acks=[ref(lease)], plan=False).ack_codes == [ErrorCode.STALE_LEASE]


def test_an_expired_lease_at_max_attempts_is_dead_lettered() -> None:
    # Given a lease of a 1-attempt subscription in a session that then goes silent
    core = Core(session_timeout_ms=100)
    core.turn(T0, produce=[item("m")])
    consumer(core, T0, max_attempts=1)
    (lease,) = core.turn(T0).leased
    # When the session expires
    core.turn(T0 + 101)
    # Then the message is a dead letter with the expiry as its reason
    assert view(core.store).dead == {lease.seq: (lease.chan_id, 1, T0 + 101, "session expired")}
    assert (stats(core)["dead"], stats(core)["in_flight"]) == (1, 0)


def test_a_lease_past_its_processing_deadline_is_expired_even_with_a_live_session() -> None:
    # Given a lease with a 300 ms processing timeout, its session heartbeating
    core = Core(session_timeout_ms=10_000)
    core.turn(T0, produce=[item("m")])
    consumer(core, T0, b"w1", processing_timeout_ms=300, max_attempts=5, retry_backoff_ms=1000)
    (lease,) = core.turn(T0).leased
    core.scheduler.touch(b"w1", T0 + 299)
    assert core.turn(T0 + 299).entry is None
    # When the deadline passes
    core.scheduler.touch(b"w1", T0 + 300)
    outcome = core.turn(T0 + 300)
    # Then the lease is expired (no backoff: an expiry requeues at once) and redelivered as attempt 2
    assert outcome.entry is not None
    (expire,) = [c for c in outcome.entry.commands if isinstance(c, ExpireCmd)]
    assert (expire.refs, expire.reason) == ((ref(lease),), "processing timeout")
    assert [attempts for _, attempts in view(core.store).ready.values()] == [1]
    (again,) = core.turn(T0 + 301).leased
    assert again.attempt == 2 and again.lease_token != lease.lease_token
    # And the slow worker's ack and nack are refused without touching the new lease
    late = core.turn(T0 + 302, acks=[ref(lease)], nacks=[NackItem(lease.seq, lease.lease_token, False, "")])
    assert (late.ack_codes, late.nack_codes) == ([ErrorCode.STALE_LEASE], [ErrorCode.STALE_LEASE])
    assert core.state.leases[lease.seq].lease_token == again.lease_token


def test_stale_acks_and_nacks_change_nothing() -> None:
    # Given a leased message
    core = Core()
    core.turn(T0, produce=[item("m"), item("n")])
    consumer(core, T0, max_parallel=2)
    lease, other = core.turn(T0 + 1).leased
    before = state_cfs(core.store)
    counters_before = core.state.channels[CH].pack()
    # When acks and nacks name a wrong token or an unknown message
    outcome = core.turn(
        T0 + 2,
        acks=[LeaseRef(lease.seq, lease.lease_token + 100), LeaseRef(999, 1)],
        nacks=[
            NackItem(lease.seq, other.lease_token, False, ""),
            NackItem(other.seq, lease.lease_token, True, ""),
        ],
        plan=False,
    )
    # Then each is STALE_LEASE and no stored queue data or counter changed
    assert outcome.ack_codes == [ErrorCode.STALE_LEASE] * 2
    assert outcome.nack_codes == [ErrorCode.STALE_LEASE] * 2
    assert state_cfs(core.store) == before
    assert core.state.channels[CH].pack() == counters_before
    # And an ack of an already-acked lease is stale too
    assert core.turn(T0 + 3, acks=[ref(lease)], plan=False).ack_codes == [ErrorCode.OK]
    assert core.turn(T0 + 4, acks=[ref(lease)], plan=False).ack_codes == [ErrorCode.STALE_LEASE]
    assert stats(core)["acked_total"] == 1


def test_an_ack_and_a_nack_of_one_lease_in_one_entry_settle_it_once() -> None:
    # Given a leased message
    core = Core()
    core.turn(T0, produce=[item("m")])
    consumer(core, T0)
    (lease,) = core.turn(T0 + 1).leased
    # When an ack and a nack of it arrive in the same turn
    outcome = core.turn(T0 + 2, acks=[ref(lease)], nacks=[NackItem(lease.seq, lease.lease_token, True, "")])
    # Then the ack wins and the nack is stale; the message is gone
    assert (outcome.ack_codes, outcome.nack_codes) == ([ErrorCode.OK], [ErrorCode.STALE_LEASE])
    assert view(core.store).messages == {}
