"""Unit tests of the pure queue core: QueueState and Scheduler on a MemoryStore, driven like the node."""

from __future__ import annotations

import hashlib
from typing import Any

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
from broker.protocol import ErrorCode, LeaseRef, NackItem, ProduceItem
from broker.queue_state import Leased, ProduceOutcome, QueueState, retry_delay_ms
from broker.ready_head import ReadyHead
from broker.scheduler import Session
from broker.store import Batch, MemoryBatch, MemoryStore
from tests.helpers.simulation import Core, view

pytestmark = pytest.mark.timeout(30)

T0 = 1_000_000
CH = "jobs"


def item(
    produce_id: str,
    channel: str = CH,
    *,
    body: bytes | None = None,
    priority: int = 0,
    delay_ms: int = 0,
    dedup_ms: int = 0,
    dedup_hash: bytes | None = None,
) -> ProduceItem:
    """A produce item whose body names its produce id unless given."""
    if body is None:
        body = bson.encode({"id": produce_id})
    return ProduceItem(produce_id, channel, body, priority, delay_ms, dedup_ms, dedup_hash)


def message_id(core: Core, lease: Leased) -> str:
    """The id of the message a lease is for."""
    record = core.state.message(lease.chan_id, lease.seq)
    assert record is not None
    return record[2]


def ref(lease: Leased) -> LeaseRef:
    """The reference an ack or nack of ``lease`` names."""
    return LeaseRef(lease.seq, lease.lease_token)


def consumer(core: Core, now_ms: int, name: bytes = b"w1", **options: int) -> Session:
    """A session with one subscription (id 1) on ``CH``."""
    session = core.attach(name, now_ms)
    core.subscribe(session, 1, CH, **options)
    return session


def drain_one_at_a_time(core: Core, now_ms: int, name: bytes = b"w1") -> list[str]:
    """Lease and ack every message through a max_parallel=1 consumer; the ids in delivery order."""
    order: list[str] = []
    acks: list[LeaseRef] = []
    for _ in range(10_000):
        core.scheduler.touch(name, now_ms)
        leased = core.turn(now_ms, acks=acks).leased
        if not leased:
            if not acks:
                return order
            acks = []
            continue
        assert len(leased) == 1
        order.append(message_id(core, leased[0]))
        acks = [ref(leased[0])]
    raise AssertionError("the queue never drained")


def stats(core: Core, channel: str = CH) -> dict[str, Any]:
    """The counters of a channel."""
    return core.state.channels[channel].stats()


def state_cfs(store: MemoryStore) -> dict[Cf, dict[bytes, bytes]]:
    """Everything but the applied-index metadata, to compare 'nothing changed'."""
    data = store.snapshot_items()
    data.pop(Cf.STATE)
    data.pop(Cf.LOG)
    return data


# ---------------------------------------------------------------------------------- produce, lease, ack


def test_a_message_is_produced_leased_once_and_deleted_by_its_ack() -> None:
    # Given a produced message and a consumer
    core = Core()
    produced = core.turn(T0, produce=[item("m1")]).produced
    assert produced == [ProduceOutcome("m1", False)]
    assert view(core.store).messages
    consumer(core, T0)
    # When the scheduler plans a turn
    outcome = core.turn(T0 + 1)
    # Then the message is leased once, attempt 1, and stays in flight
    (lease,) = outcome.leased
    assert (lease.channel, lease.attempt, message_id(core, lease)) == (CH, 1, "m1")
    assert core.turn(T0 + 2).leased == []
    assert stats(core)["in_flight"] == 1
    # When it is acked
    codes = core.turn(T0 + 3, acks=[ref(lease)]).ack_codes
    # Then the message and its lease are gone, and the counters say so
    assert codes == [ErrorCode.OK]
    stored = view(core.store)
    assert (stored.messages, stored.ready, stored.leases) == ({}, {}, {})
    counters = stats(core)
    assert (counters["ready"], counters["in_flight"], counters["produced_total"]) == (0, 0, 1)
    assert (counters["delivered_total"], counters["acked_total"]) == (1, 1)


def test_a_produce_id_sent_twice_in_one_entry_enqueues_once_and_answers_the_same() -> None:
    # Given one entry carrying the same produce id twice (a client retry racing its original)
    core = Core()
    # When it is applied
    produced = core.turn(T0, produce=[item("p1"), item("p1", body=bson.encode({"other": 1}))]).produced
    # Then both get the first answer and one message exists
    assert produced == [ProduceOutcome("p1", False), ProduceOutcome("p1", False)]
    assert len(view(core.store).messages) == 1
    assert stats(core)["produced_total"] == 1


def test_a_retried_produce_id_in_a_later_entry_gets_the_first_answer_and_no_new_message() -> None:
    # Given a produce that was accepted and one that was a duplicate of it
    core = Core()
    body = bson.encode({"v": 1})
    core.turn(T0, produce=[item("a", body=body, dedup_ms=10_000)])
    first_dup = core.turn(T0 + 1, produce=[item("b", body=body, dedup_ms=10_000)]).produced
    assert first_dup == [ProduceOutcome("a", True)]
    # When both produce ids are retried later
    again = core.turn(T0 + 5_000, produce=[item("a", body=body), item("b", body=body)]).produced
    # Then each gets its first answer and nothing new is enqueued or counted
    assert again == [ProduceOutcome("a", False), ProduceOutcome("a", True)]
    assert len(view(core.store).messages) == 1
    assert (stats(core)["produced_total"], stats(core)["duplicates_total"]) == (1, 1)


def test_a_produce_to_an_invalid_channel_is_refused_and_changes_nothing() -> None:
    # Given an empty core
    core = Core()
    # When an item names an invalid channel
    (outcome,) = core.turn(T0, produce=[item("x", channel="/bad")]).produced
    # Then it is refused with a reason and no channel or message exists
    assert outcome.code == ErrorCode.INVALID_CHANNEL and outcome.error
    assert core.state.channels == {}
    assert view(core.store).messages == {}


# ---------------------------------------------------------------------------------- EXACTLY_ONCE


def test_an_exactly_once_duplicate_within_the_window_is_not_enqueued_but_is_after_it() -> None:
    # Given a message accepted at T0 with a 1000 ms deduplication window
    core = Core()
    body = bson.encode({"user": 1})
    assert core.turn(T0, produce=[item("a", body=body, dedup_ms=1000)]).produced[0].duplicate is False
    # When the same payload comes within the window (a repeat does not extend it)
    at_500 = core.turn(T0 + 500, produce=[item("b", body=body, dedup_ms=1000)]).produced
    at_999 = core.turn(T0 + 999, produce=[item("c", body=body, dedup_ms=1000)]).produced
    # Then both are duplicates of the original
    assert at_500 == [ProduceOutcome("a", True)]
    assert at_999 == [ProduceOutcome("a", True)]
    assert len(view(core.store).messages) == 1
    assert stats(core)["duplicates_total"] == 2
    # When it comes once the window has ended
    at_1000 = core.turn(T0 + 1000, produce=[item("d", body=body, dedup_ms=1000)]).produced
    # Then it is a new message, which opens a new window
    assert at_1000 == [ProduceOutcome("d", False)]
    assert core.turn(T0 + 1999, produce=[item("e", body=body, dedup_ms=1000)]).produced == [
        ProduceOutcome("d", True)
    ]
    assert len(view(core.store).messages) == 2


def test_duplicates_in_one_entry_are_caught() -> None:
    # Given two EXACTLY_ONCE items with the same payload in one entry
    core = Core()
    body = bson.encode({"user": 7})
    # When applied
    produced = core.turn(T0, produce=[item("a", body=body, dedup_ms=100), item("b", body=body, dedup_ms=100)])
    # Then the second is a duplicate of the first
    assert produced.produced == [ProduceOutcome("a", False), ProduceOutcome("a", True)]
    assert len(view(core.store).messages) == 1


def test_a_custom_hash_is_the_deduplication_key_instead_of_the_body() -> None:
    # Given a message with hash h1
    core = Core()
    core.turn(T0, produce=[item("a", body=bson.encode({"n": 1}), dedup_ms=1000, dedup_hash=b"h1")])
    # When a different body with the same hash and the same body with another hash come
    produced = core.turn(
        T0 + 1,
        produce=[
            item("b", body=bson.encode({"n": 2}), dedup_ms=1000, dedup_hash=b"h1"),
            item("c", body=bson.encode({"n": 1}), dedup_ms=1000, dedup_hash=b"h2"),
        ],
    ).produced
    # Then the hash decides
    assert produced == [ProduceOutcome("a", True), ProduceOutcome("c", False)]


def test_deduplication_is_per_channel_and_at_least_once_messages_open_no_window() -> None:
    # Given the same payload at least once on "jobs" and exactly once on "other"
    core = Core()
    body = bson.encode({"n": 1})
    produced = core.turn(
        T0,
        produce=[
            item("a", body=body),
            item("b", body=body, dedup_ms=1000),
            item("c", "other", body=body, dedup_ms=1000),
        ],
    ).produced
    # Then none of them is a duplicate
    assert [o.duplicate for o in produced] == [False, False, False]
    # And a later at-least-once copy is enqueued even inside the window
    assert core.turn(T0 + 1, produce=[item("d", body=body)]).produced == [ProduceOutcome("d", False)]
    # While an exactly-once copy on "jobs" is a duplicate of the first exactly-once one
    assert core.turn(T0 + 2, produce=[item("e", body=body, dedup_ms=1000)]).produced == [
        ProduceOutcome("b", True)
    ]


def test_the_default_deduplication_key_is_the_sha256_of_the_body() -> None:
    # Given a message deduplicated by its body
    core = Core()
    body = bson.encode({"n": 1})
    core.turn(T0, produce=[item("a", body=body, dedup_ms=1000)])
    # When another comes with that SHA-256 as its explicit hash
    produced = core.turn(
        T0 + 1,
        produce=[
            item("b", body=bson.encode({"n": 2}), dedup_ms=1000, dedup_hash=hashlib.sha256(body).digest())
        ],
    ).produced
    # Then it is a duplicate
    assert produced == [ProduceOutcome("a", True)]


def test_expire_dedup_forgets_only_windows_that_ended() -> None:
    # Given windows ending at T0+100 (a), T0+500 (b), and a's payload accepted again at T0+150 (ends T0+250)
    core = Core()
    body_a, body_b = bson.encode({"a": 1}), bson.encode({"b": 1})
    core.turn(T0, produce=[item("a", body=body_a, dedup_ms=100), item("b", body=body_b, dedup_ms=500)])
    assert core.turn(T0 + 150, produce=[item("a2", body=body_a, dedup_ms=100)]).produced[0].duplicate is False
    assert len(view(core.store).dedup_expiry) == 2  # a's old expiry entry went with its record
    # When dedup keys that ended by T0+200 are expired
    (forgotten,) = core.run(T0 + 200, ExpireDedupCmd(T0 + 200))
    # Then nothing is forgotten: a's window was renewed to T0+250 and b's is running
    assert forgotten == 0
    assert len(view(core.store).dedup) == 2
    # When those that ended by T0+250 are expired
    (forgotten,) = core.run(T0 + 250, ExpireDedupCmd(T0 + 250))
    # Then only a2's window is forgotten; b still deduplicates
    assert forgotten == 1
    stored = view(core.store)
    assert [record[1] for record in stored.dedup.values()] == ["b"]
    assert len(stored.dedup_expiry) == 1
    assert core.turn(T0 + 300, produce=[item("b2", body=body_b, dedup_ms=500)]).produced == [
        ProduceOutcome("b", True)
    ]


def test_the_scheduler_plans_an_expire_dedup_once_a_window_has_ended() -> None:
    # Given a window ending at T0+100
    core = Core()
    core.turn(T0, produce=[item("a", body=b"\x05\x00\x00\x00\x00", dedup_ms=100)])
    # When the scheduler plans at T0+2000 (past its sweep interval)
    commands = core.build(T0 + 2000)
    # Then it asks to expire dedup keys ended by now
    assert ExpireDedupCmd(T0 + 2000) in commands


# ---------------------------------------------------------------------------------- produce-id buckets


@pytest.mark.parametrize(
    ("first_ms", "retry_ms", "remembered"),
    [
        (10_000, 10_999, True),  # same bucket
        (10_000, 11_000, True),  # next bucket
        (10_999, 11_998, True),  # within one window, across a bucket edge
        (10_000, 11_999, True),  # end of the next bucket: still looked up
        (10_999, 12_000, False),  # two buckets on: forgotten (just over one window later)
        (10_000, 12_000, False),
        (10_000, 50_000, False),
    ],
)
def test_produce_ids_are_remembered_for_at_least_one_window_and_forgotten_after_two_buckets(
    first_ms: int, retry_ms: int, remembered: bool
) -> None:
    # Given a 1000 ms produce-id window and a message produced at first_ms
    core = Core(produce_id_window_ms=1000)
    core.turn(first_ms, produce=[item("p")])
    # When the same produce id is retried at retry_ms
    core.turn(retry_ms, produce=[item("p")])
    # Then it enqueues nothing new while remembered, and a second message once forgotten
    assert len(view(core.store).messages) == (1 if remembered else 2)
    assert stats(core)["produced_total"] == (1 if remembered else 2)


def test_rolling_the_produce_id_bucket_deletes_ids_older_than_the_previous_bucket() -> None:
    # Given ids produced in buckets 10 and 11 of a 1000 ms window
    core = Core(produce_id_window_ms=1000)
    core.turn(10_500, produce=[item("old")])
    core.turn(11_500, produce=[item("recent")])
    assert len(view(core.store).pids) == 2
    # When an entry of bucket 12 is applied
    core.run(12_000, NoopCmd())
    # Then only bucket 11's id is stored
    stored = view(core.store).pids
    assert list(stored) == [k.pid_key(11, "recent")]


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


# ---------------------------------------------------------------------------------- admin


def _mixed_channel(core: Core) -> dict[str, Leased]:
    """3 ready, 2 delayed, 1 in flight, 1 dead on CH, and 1 ready on 'other'."""
    core.turn(T0, produce=[item("dead"), item("flight")])
    consumer(core, T0, max_parallel=2, max_attempts=1)
    dead, flight = core.turn(T0 + 1).leased
    core.turn(T0 + 2, nacks=[NackItem(dead.seq, dead.lease_token, False, "bad")])
    core.scheduler.unsubscribe(core.scheduler.sessions[b"w1".ljust(16, b"\x00")], 1)
    core.turn(
        T0 + 3,
        produce=[
            item("r1"),
            item("r2", priority=3),
            item("r3"),
            item("d1", delay_ms=1000),
            item("d2", delay_ms=5),
            item("o1", "other"),
        ],
    )
    return {"dead": dead, "flight": flight}


def test_purge_deletes_ready_and_delayed_messages_but_keeps_in_flight_and_dead_ones() -> None:
    # Given a channel with ready, delayed, in-flight and dead messages
    core = Core()
    leases = _mixed_channel(core)
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


# ---------------------------------------------------------------------------------- reload and replay


def test_a_new_queue_state_on_the_same_store_restores_counters_leases_and_sequences() -> None:
    # Given a core with ready, delayed, in-flight, dead messages and a dedup window
    core = Core()
    _mixed_channel(core)
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
    # Then the next turn expires the lease nobody will ever receive
    outcome = core.turn(T0 + 2)
    assert outcome.entry is not None and isinstance(outcome.entry.commands[0], ExpireCmd)
    assert core.state.leases == {}
    assert stats(core)["ready"] == 1


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
