"""Deepkit's own broker-queue cases, against a real node process."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pydantic
import pytest
from typing_extensions import TypedDict

from client import (
    BrokerQueue,
    InvalidChannelError,
    PayloadValidationError,
    QueueMessage,
    QueueMessageProcessing,
)


@dataclasses.dataclass
class User:
    id: int
    username: str


class Order(pydantic.BaseModel):
    order_id: int
    items: list[str]


class Point(TypedDict):
    x: int
    y: int


class Collector:
    """Collects handled messages and lets a test wait for a count."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.messages: list[QueueMessage[Any]] = []
        self._changed = asyncio.Event()

    async def __call__(self, data: Any, message: QueueMessage[Any]) -> None:
        self.items.append(data)
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Any]:
        async def reach() -> None:
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(reach(), timeout_s)
        return self.items


async def test_a_typed_message_round_trips_with_its_metadata(queue: BrokerQueue, channel_name: str) -> None:
    # Given a channel of dataclass User
    channel = queue.channel(channel_name, User)
    seen = Collector()
    await channel.consume(seen)
    # When a user is produced
    result = await channel.produce(User(id=1, username="Peter"))
    # Then the consumer gets an equal User with the message's metadata
    (user,) = await seen.wait_for(1)
    assert user == User(id=1, username="Peter")
    message = seen.messages[0]
    assert message.id == result.id
    assert message.channel == channel_name
    assert message.attempt == 1
    assert message.data == user
    assert result.duplicate is False


@pytest.mark.parametrize(
    ("data_type", "value"),
    [
        (Order, Order(order_id=7, items=["a", "b"])),
        (Point, {"x": 1, "y": 2}),
        (int, 42),
        (list[str], ["x", "y"]),
    ],
)
async def test_pydantic_typeddict_and_plain_types_round_trip(
    queue: BrokerQueue, channel_name: str, data_type: Any, value: Any
) -> None:
    # Given a channel of each supported kind of type
    channel = queue.channel(channel_name, data_type)
    seen = Collector()
    await channel.consume(seen)
    # When a value is produced, then the same value comes back, rebuilt as that type
    await channel.produce(value)
    (received,) = await seen.wait_for(1)
    assert received == value
    assert type(received) is type(value)


async def test_a_payload_of_the_wrong_type_is_refused_before_sending(
    queue: BrokerQueue, channel_name: str
) -> None:
    # Given a User channel
    channel = queue.channel(channel_name, User)
    # When a wrongly typed payload is produced, then it is refused with a clear error
    with pytest.raises(PayloadValidationError, match="id"):
        await channel.produce(User(id="not a number", username="x"))  # type: ignore[arg-type]
    # And nothing reached the node
    with pytest.raises(Exception, match="no queue named"):
        from client import BrokerAdmin

        async with BrokerAdmin(queue.endpoints) as admin:
            await admin.stats(channel_name)


def test_invalid_channel_names_are_refused(queue: BrokerQueue) -> None:
    for bad in ["", "/leading", "double//slash", "spa ce", "x" * 201, "trailing/"]:
        with pytest.raises(InvalidChannelError):
            queue.channel(bad, int)


async def test_exactly_once_drops_an_identical_second_produce(queue: BrokerQueue, channel_name: str) -> None:
    # Given an EXACTLY_ONCE channel
    channel = queue.channel(channel_name, User, process=QueueMessageProcessing.EXACTLY_ONCE)
    # When the same payload is produced twice
    first = await channel.produce(User(id=1, username="Peter"))
    second = await channel.produce(User(id=1, username="Peter"))
    # Then the second is reported as a duplicate of the first and only one message is consumed
    assert not first.duplicate
    assert second.duplicate and second.id == first.id
    seen = Collector()
    await channel.consume(seen)
    await seen.wait_for(1)
    marker = await channel.produce(User(id=2, username="marker"))
    await seen.wait_for(2)
    assert [user.id for user in seen.items] == [1, 2]
    assert seen.messages[1].id == marker.id


async def test_after_the_interval_the_same_payload_is_consumed_again(
    queue: BrokerQueue, channel_name: str
) -> None:
    # Given an EXACTLY_ONCE channel with a short interval
    channel = queue.channel(
        channel_name, User, process=QueueMessageProcessing.EXACTLY_ONCE, deduplication_interval="300ms"
    )
    seen = Collector()
    await channel.consume(seen)
    first = await channel.produce(User(id=1, username="Peter"))
    assert (await channel.produce(User(id=1, username="Peter"))).duplicate
    # When the interval has passed
    await seen.wait_for(1)
    await asyncio.sleep(0.4)
    again = await channel.produce(User(id=1, username="Peter"))
    # Then the same payload is accepted and consumed again
    assert not again.duplicate and again.id != first.id
    await seen.wait_for(2)
    assert [message.id for message in seen.messages] == [first.id, again.id]


async def test_per_produce_exactly_once_overrides_an_at_least_once_channel(
    queue: BrokerQueue, channel_name: str
) -> None:
    # Given an AT_LEAST_ONCE channel
    channel = queue.channel(channel_name, User)
    # When produced twice with process=EXACTLY_ONCE per message
    once = QueueMessageProcessing.EXACTLY_ONCE
    first = await channel.produce(User(id=1, username="Peter"), process=once)
    second = await channel.produce(User(id=1, username="Peter"), process=once)
    # And twice without
    third = await channel.produce(User(id=1, username="Peter"))
    fourth = await channel.produce(User(id=1, username="Peter"))
    # Then only the per-produce EXACTLY_ONCE pair was deduplicated
    assert second.duplicate and not first.duplicate
    assert not third.duplicate and not fourth.duplicate
    seen = Collector()
    await channel.consume(seen)
    await seen.wait_for(3)
    await asyncio.sleep(0.2)
    assert sorted(message.id for message in seen.messages) == sorted([first.id, third.id, fourth.id])


async def test_per_produce_deduplication_interval(queue: BrokerQueue, channel_name: str) -> None:
    # Given an EXACTLY_ONCE channel with a long interval
    channel = queue.channel(
        channel_name, User, process=QueueMessageProcessing.EXACTLY_ONCE, deduplication_interval="1h"
    )
    # When a produce sets its own short interval
    first = await channel.produce(User(id=1, username="Peter"), deduplication_interval="200ms")
    assert (await channel.produce(User(id=1, username="Peter"))).duplicate
    await asyncio.sleep(0.3)
    # Then after that short interval the payload is accepted again
    later = await channel.produce(User(id=1, username="Peter"))
    assert not later.duplicate and later.id != first.id


async def test_a_custom_hash_makes_equal_payloads_distinct(queue: BrokerQueue, channel_name: str) -> None:
    # Given an EXACTLY_ONCE channel
    channel = queue.channel(channel_name, User, process=QueueMessageProcessing.EXACTLY_ONCE)
    # When equal payloads are produced with different hashes, and one hash repeats
    a = await channel.produce(User(id=1, username="Peter"), hash="a")
    b = await channel.produce(User(id=1, username="Peter"), hash="b")
    a_again = await channel.produce(User(id=9, username="Other"), hash="a")
    # Then the hash, not the payload, decides what is a duplicate
    assert not a.duplicate and not b.duplicate
    assert a_again.duplicate and a_again.id == a.id
    seen = Collector()
    await channel.consume(seen)
    await seen.wait_for(2)
    await asyncio.sleep(0.2)
    assert len(seen.items) == 2


async def test_messages_produced_before_any_consumer_are_all_delivered(
    queue: BrokerQueue, channel_name: str
) -> None:
    # Given 500 messages produced while nobody consumes
    channel = queue.channel(channel_name, int)
    await asyncio.gather(*(channel.produce(i) for i in range(500)))
    # When a consumer starts, then every one of them is delivered, once
    seen = Collector()
    await channel.consume(seen, max_parallel=20)
    items = await seen.wait_for(500)
    await asyncio.sleep(0.2)
    assert sorted(items) == list(range(500))


async def test_two_consumers_share_1000_messages_each_handled_exactly_once(
    node: Any, channel_name: str
) -> None:
    # Given two separate clients consuming the same channel
    async with BrokerQueue(node.endpoint) as first, BrokerQueue(node.endpoint) as second:
        seen_first, seen_second = Collector(), Collector()
        await first.channel(channel_name, int).consume(seen_first, max_parallel=10)
        await second.channel(channel_name, int).consume(seen_second, max_parallel=10)
        # When 1000 messages are produced
        producer = first.channel(channel_name, int)
        await asyncio.gather(*(producer.produce(i) for i in range(1000)))

        # Then together they handled each exactly once, and both took part
        async def all_handled() -> None:
            while len(seen_first.items) + len(seen_second.items) < 1000:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(all_handled(), 20)
        await asyncio.sleep(0.3)
        handled = seen_first.items + seen_second.items
        assert sorted(handled) == list(range(1000))
        assert seen_first.items and seen_second.items


async def test_a_plain_function_handler_runs_in_a_thread(queue: BrokerQueue, channel_name: str) -> None:
    import threading

    # Given a plain (sync) handler
    threads: list[str] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def handler(value: int) -> None:
        threads.append(threading.current_thread().name)
        loop.call_soon_threadsafe(done.set)

    channel = queue.channel(channel_name, int)
    await channel.consume(handler)
    # When a message arrives, then the handler ran off the event loop's thread
    await channel.produce(5)
    await asyncio.wait_for(done.wait(), 10)
    assert threads and threads[0] != threading.current_thread().name


async def test_closing_a_consumer_finishes_in_flight_work(queue: BrokerQueue, channel_name: str) -> None:
    # Given a consumer whose handler is slow
    channel = queue.channel(channel_name, int)
    started, finished = asyncio.Event(), []

    async def slow(value: int) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(value)

    consumer = await channel.consume(slow)
    await channel.produce(1)
    await asyncio.wait_for(started.wait(), 10)
    # When it is closed mid-handling
    await consumer.close()
    # Then the in-flight message was finished and acked (nothing left in the queue)
    assert finished == [1]
    from client import BrokerAdmin

    async with BrokerAdmin(queue.endpoints) as admin:
        stats = await admin.stats(channel_name)
    assert (stats.ready, stats.in_flight, stats.acked_total) == (0, 0, 1)
