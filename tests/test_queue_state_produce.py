"""Unit tests of the pure queue core: produce, produce-id idempotence and EXACTLY_ONCE deduplication."""

from __future__ import annotations

import hashlib

import bson
import pytest

from broker import keys as k
from broker.commands import ExpireDedupCmd, NoopCmd
from broker.protocol import ErrorCode
from broker.queue_state import ProduceOutcome
from tests.helpers.queue_core import CH, T0, consumer, item, message_id, ref, stats
from tests.helpers.simulation import Core, view

pytestmark = pytest.mark.timeout(30)


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
