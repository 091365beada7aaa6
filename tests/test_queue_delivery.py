"""Delivery rules against a real node: delay, priority, retries, dead letters, timeouts, fencing."""

from __future__ import annotations

import asyncio
import time

import bson

from broker import protocol as p
from broker.launcher import NodeProcess
from client import BrokerAdmin, BrokerQueue, QueueMessage
from tests.helpers.raw import RawClient
from tests.test_queue_basics import Collector


async def test_a_delayed_message_waits_for_its_time(queue: BrokerQueue, channel_name: str) -> None:
    # Given a consumer
    channel = queue.channel(channel_name, str)
    seen = Collector()
    arrived: dict[str, float] = {}

    async def handler(value: str, message: QueueMessage[str]) -> None:
        arrived[value] = time.monotonic()
        await seen(value, message)

    await channel.consume(handler)
    # When one message is delayed by 600ms and another produced right after without delay
    start = time.monotonic()
    await channel.produce("later", delay="600ms")
    await channel.produce("now")
    await seen.wait_for(2)
    # Then the undelayed one came first and the delayed one not before its time
    assert seen.items == ["now", "later"]
    assert arrived["later"] - start >= 0.55


async def test_higher_priority_first_then_produce_order(queue: BrokerQueue, channel_name: str) -> None:
    # Given messages of mixed priority produced before anyone consumes
    channel = queue.channel(channel_name, str)
    for value, priority in [("a0", 0), ("b5", 5), ("c0", 0), ("d9", 9), ("e5", 5), ("f-1", -1)]:
        await channel.produce(value, priority=priority)
    # When one consumer takes them one at a time
    seen = Collector()
    await channel.consume(seen, max_parallel=1)
    # Then they come by priority, and in produce order within a priority
    assert await seen.wait_for(6) == ["d9", "b5", "e5", "a0", "c0", "f-1"]


async def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered_and_requeued(
    queue: BrokerQueue, channel_name: str
) -> None:
    # Given a handler that always raises, 3 attempts and a 100ms backoff base
    channel = queue.channel(channel_name, int, max_attempts=3, retry_backoff="100ms")
    attempts: list[tuple[int, float]] = []
    failing = True
    succeeded = asyncio.Event()

    async def handler(value: int, message: QueueMessage[int]) -> None:
        attempts.append((message.attempt, time.monotonic()))
        if failing:
            raise RuntimeError(f"cannot handle {value}")
        succeeded.set()

    consumer = await channel.consume(handler)
    await channel.produce(7)
    async with BrokerAdmin(queue.endpoints) as admin:
        # When it has failed max_attempts times
        deadline = time.monotonic() + 10
        while (await admin.stats(channel_name)).dead < 1:
            assert time.monotonic() < deadline, f"not dead-lettered; attempts so far {attempts}"
            await asyncio.sleep(0.05)
        # Then it was tried 3 times with growing pauses (>= 100ms, then >= 200ms)
        assert [attempt for attempt, _ in attempts] == [1, 2, 3]
        assert attempts[1][1] - attempts[0][1] >= 0.09
        assert attempts[2][1] - attempts[1][1] >= 0.19
        # And it sits in the dead letters with the reason
        (letter,) = await admin.dead_letters(channel_name)
        assert letter.data == 7 and letter.attempts == 3 and "cannot handle 7" in letter.reason
        stats = await admin.stats(channel_name)
        assert (stats.ready, stats.delayed, stats.in_flight, stats.dead) == (0, 0, 0, 1)
        # When the dead letters are requeued and the handler works again
        failing = False
        assert await admin.requeue_dead(channel_name) == 1
        # Then it is delivered again with a fresh attempt count and handled
        await asyncio.wait_for(succeeded.wait(), 10)
        assert attempts[-1][0] == 1
        assert await admin.dead_letters(channel_name) == []
    await consumer.close()


async def test_processing_timeout_redelivers_a_stuck_message(queue: BrokerQueue, channel_name: str) -> None:
    # Given a channel with a 300ms processing timeout and a handler stuck on the first attempt
    channel = queue.channel(channel_name, int, processing_timeout="300ms", retry_backoff="50ms")
    seen = Collector()

    async def handler(value: int, message: QueueMessage[int]) -> None:
        if message.attempt == 1:
            await asyncio.sleep(30)
        await seen(value, message)

    await channel.consume(handler)
    start = time.monotonic()
    await channel.produce(1)
    # When the timeout passes, then the message is handled on a second attempt
    await seen.wait_for(1, timeout_s=10)
    assert seen.messages[0].attempt == 2
    assert time.monotonic() - start >= 0.3


def test_an_ack_with_a_stale_lease_token_is_refused(node: NodeProcess, channel_name: str) -> None:
    # Given a raw consumer with a 200ms processing deadline, holding a delivery
    raw = RawClient(node.endpoint)
    try:
        raw.hello(session_timeout_ms=10_000)
        body = bson.encode({"v": 1})
        reply = raw.request(p.Command.PRODUCE, {"items": [["stale-1", channel_name, body, 0, 0, 0, None]]})
        assert isinstance(reply, p.Reply) and reply.result["r"][0][2] == 0
        subscribe = {
            "sub": 1,
            "channel": channel_name,
            "max_parallel": 1,
            "max_attempts": 5,
            "retry_backoff_ms": 0,
            "retry_backoff_max_ms": 0,
            "processing_timeout_ms": 200,
        }
        assert isinstance(raw.request(p.Command.SUBSCRIBE, subscribe), p.Reply)
        first = raw.recv_kind(p.Deliver).deliveries[0]
        # When the deadline passes, the node takes the lease back and delivers again with a new token
        second = raw.recv_kind(p.Deliver, timeout_s=5).deliveries[0]
        assert (first.seq, first.attempt, second.attempt) == (second.seq, 1, 2)
        assert second.lease_token != first.lease_token
        # Then an ack with the old token is refused, and one with the current token accepted
        stale = raw.request(p.Command.ACK, {"items": [[first.seq, first.lease_token]]})
        assert isinstance(stale, p.Reply) and stale.result["codes"] == [p.ErrorCode.STALE_LEASE]
        fresh = raw.request(p.Command.ACK, {"items": [[second.seq, second.lease_token]]})
        assert isinstance(fresh, p.Reply) and fresh.result["codes"] == [p.ErrorCode.OK]
    finally:
        raw.close()


async def test_peek_shows_ready_messages_in_delivery_order_without_taking_them(
    queue: BrokerQueue, channel_name: str
) -> None:
    channel = queue.channel(channel_name, str)
    await channel.produce("low")
    await channel.produce("high", priority=3)
    async with BrokerAdmin(queue.endpoints) as admin:
        peeked = await admin.peek(channel_name, 10)
        assert [message.data for message in peeked] == ["high", "low"]
        assert (await admin.stats(channel_name)).ready == 2


async def test_purge_empties_a_queue(queue: BrokerQueue, channel_name: str) -> None:
    channel = queue.channel(channel_name, int)
    await asyncio.gather(*(channel.produce(i) for i in range(50)))
    await channel.produce(99, delay="1h")
    async with BrokerAdmin(queue.endpoints) as admin:
        assert await admin.purge(channel_name) == 51
        stats = await admin.stats(channel_name)
        assert (stats.ready, stats.delayed) == (0, 0)
    # And new messages still flow afterwards
    seen = Collector()
    await channel.consume(seen)
    await channel.produce(1000)
    assert await seen.wait_for(1) == [1000]
