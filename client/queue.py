"""``BrokerQueue`` and its typed channels: what applications import to produce and consume."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

from broker import protocol as p
from client.codec import TypedCodec, hash_key
from client.connection import Connection
from client.consumer import Consumer, Handler
from client.durations import Duration, duration_ms
from client.errors import (
    BrokerTimeoutError,
    InvalidArgumentError,
    InvalidChannelError,
    MessageTooLargeError,
    error_from_code,
)
from client.message import ProduceResult, QueueMessageProcessing
from client.registry import ChannelDefinition

T = TypeVar("T")

DEFAULT_DEDUPLICATION_INTERVAL = "5m"
DEFAULT_SESSION_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT_S = 30.0


def endpoints_of(endpoints: str | Sequence[str]) -> list[str]:
    """One endpoint or a list of them (a comma-separated string works too)."""
    if isinstance(endpoints, str):
        listed = [part.strip() for part in endpoints.split(",") if part.strip()]
    else:
        listed = [str(endpoint) for endpoint in endpoints]
    if not listed:
        raise InvalidArgumentError("no endpoints given: pass e.g. 'tcp://127.0.0.1:7101'")
    return listed


class BrokerQueue:
    """A client of a zbroker cluster: typed channels to produce to and consume from.

    Use ``async with BrokerQueue(endpoints) as queue:`` or ``await queue.connect()`` / ``await
    queue.close()``. One instance holds one connection (and one consumer session) to the cluster.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        session_timeout: Duration = DEFAULT_SESSION_TIMEOUT_S,
        connect_timeout: Duration = 10.0,
        client_name: str | None = None,
    ) -> None:
        self.endpoints = endpoints_of(endpoints)
        self.session_timeout_s = duration_ms(session_timeout, name="session_timeout") / 1000
        self.connect_timeout_s = duration_ms(connect_timeout, name="connect_timeout") / 1000
        self.client_name = client_name or f"{socket.gethostname()}:{os.getpid()}"
        self._connection: Connection | None = None
        self._consumers: dict[int, Consumer[Any]] = {}
        self._subscription_ids = itertools.count(1)
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count(1)

    async def __aenter__(self) -> BrokerQueue:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to the cluster (the first endpoint that answers, then its leader)."""
        if self._connection is not None:
            return
        connection = Connection(
            self.endpoints,
            session_timeout_s=self.session_timeout_s,
            client_name=self.client_name,
            on_deliver=self._on_deliver,
            on_session=self._on_session,
        )
        await connection.start(self.connect_timeout_s)
        self._connection = connection

    async def close(self) -> None:
        """Close every consumer (finishing in-flight work), then the connection."""
        for consumer in list(self._consumers.values()):
            await consumer.close()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    @property
    def connection(self) -> Connection:
        """The live connection; raises if ``connect`` was not awaited."""
        if self._connection is None:
            raise InvalidArgumentError(
                "the queue is not connected: use `async with` or `await queue.connect()`"
            )
        return self._connection

    @overload
    def channel(self, name: ChannelDefinition[T]) -> BrokerQueueChannel[T]: ...

    @overload
    def channel(
        self,
        name: str,
        data_type: type[T],
        *,
        process: QueueMessageProcessing = ...,
        deduplication_interval: Duration = ...,
        max_attempts: int = ...,
        retry_backoff: Duration = ...,
        retry_backoff_max: Duration = ...,
        processing_timeout: Duration | None = ...,
    ) -> BrokerQueueChannel[T]: ...

    @overload
    def channel(
        self,
        name: str,
        data_type: Any = ...,
        *,
        process: QueueMessageProcessing = ...,
        deduplication_interval: Duration = ...,
        max_attempts: int = ...,
        retry_backoff: Duration = ...,
        retry_backoff_max: Duration = ...,
        processing_timeout: Duration | None = ...,
    ) -> BrokerQueueChannel[Any]: ...

    def channel(
        self,
        name: str | ChannelDefinition[Any],
        data_type: Any = Any,
        *,
        process: QueueMessageProcessing = QueueMessageProcessing.AT_LEAST_ONCE,
        deduplication_interval: Duration = DEFAULT_DEDUPLICATION_INTERVAL,
        max_attempts: int = 5,
        retry_backoff: Duration = "1s",
        retry_backoff_max: Duration = "5m",
        processing_timeout: Duration | None = None,
    ) -> BrokerQueueChannel[Any]:
        """A typed channel; messages are checked against ``data_type`` on produce and rebuilt on consume.

        ``name`` may also be a ``ChannelDefinition`` shared with the workers; its options then apply.
        """
        if isinstance(name, ChannelDefinition):
            return name.bind(self)
        return BrokerQueueChannel(
            self,
            name,
            data_type,
            process=process,
            deduplication_interval=deduplication_interval,
            max_attempts=max_attempts,
            retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max,
            processing_timeout=processing_timeout,
        )

    # ------------------------------------------------------------------ used by channels and consumers

    def next_message_id(self) -> str:
        """A fresh produce id, unique across clients: random prefix and a counter."""
        return f"{self._id_prefix}{next(self._id_counter):012x}"

    def register(self, consumer: Consumer[Any]) -> int:
        """Give a consumer its subscription id."""
        subscription_id = next(self._subscription_ids)
        self._consumers[subscription_id] = consumer
        return subscription_id

    def unregister(self, subscription_id: int) -> None:
        """Forget a closed consumer."""
        self._consumers.pop(subscription_id, None)

    def _on_deliver(self, frame: p.Deliver) -> None:
        consumer = self._consumers.get(frame.subscription_id)
        if consumer is None:
            # Deliveries for a consumer that is gone: hand them back for immediate redelivery.
            for delivery in frame.deliveries:
                self.connection.enqueue(
                    p.Command.NACK, (delivery.seq, delivery.lease_token, True, "consumer closed")
                ).add_done_callback(_ignore_result)
            return
        consumer.on_deliver(frame.deliveries)

    async def _on_session(self) -> None:
        # A new or re-attached session: the node knows no subscriptions yet.
        for consumer in self._consumers.values():
            consumer.resubscribe()


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class BrokerQueueChannel(Generic[T]):
    """A named channel with a payload type and processing options."""

    def __init__(
        self,
        queue: BrokerQueue,
        name: str,
        data_type: Any,
        *,
        process: QueueMessageProcessing,
        deduplication_interval: Duration,
        max_attempts: int,
        retry_backoff: Duration,
        retry_backoff_max: Duration,
        processing_timeout: Duration | None,
    ) -> None:
        problem = p.channel_name_problem(name)
        if problem is not None:
            raise InvalidChannelError(problem)
        if not isinstance(process, QueueMessageProcessing):
            raise InvalidArgumentError(f"process must be a QueueMessageProcessing, got {process!r}")
        if type(max_attempts) is not int or not 1 <= max_attempts <= 65_535:
            raise InvalidArgumentError(f"max_attempts must be an integer in 1..65535, got {max_attempts!r}")
        self.queue = queue
        self.name = name
        self.codec: TypedCodec[T] = TypedCodec(data_type)
        self.process = process
        self.deduplication_interval_ms = duration_ms(deduplication_interval, name="deduplication_interval")
        self.max_attempts = max_attempts
        self.retry_backoff_ms = duration_ms(retry_backoff, name="retry_backoff")
        self.retry_backoff_max_ms = duration_ms(retry_backoff_max, name="retry_backoff_max")
        self.processing_timeout_ms = duration_ms(processing_timeout, name="processing_timeout")

    def __repr__(self) -> str:
        return f"BrokerQueueChannel({self.name!r}, {self.codec.type_name}, {self.process.name})"

    def prepare(
        self,
        data: T,
        *,
        delay: Duration | None = None,
        priority: int = 0,
        hash: str | bytes | int | None = None,
        process: QueueMessageProcessing | None = None,
        deduplication_interval: Duration | None = None,
    ) -> list[Any]:
        """Check and encode one message into its wire form (no I/O)."""
        body = self.codec.encode(data)
        limit = self.queue.connection.max_message_bytes
        if len(body) > limit:
            raise MessageTooLargeError(
                f"message for {self.name!r} is {len(body)} bytes encoded; the node accepts at most {limit}"
            )
        if type(priority) is not int or not p.PRIORITY_MIN <= priority <= p.PRIORITY_MAX:
            raise InvalidArgumentError(f"priority must be a 32-bit signed integer, got {priority!r}")
        mode = process if process is not None else self.process
        dedup_ms = 0
        if mode is QueueMessageProcessing.EXACTLY_ONCE:
            dedup_ms = duration_ms(
                deduplication_interval,
                name="deduplication_interval",
                default_ms=self.deduplication_interval_ms,
            )
            dedup_ms = max(dedup_ms, 1)
        return [
            self.queue.next_message_id(),
            self.name,
            body,
            priority,
            duration_ms(delay, name="delay") if delay is not None else 0,
            dedup_ms,
            hash_key(hash) if hash is not None and dedup_ms else None,
        ]

    async def produce(
        self,
        data: T,
        *,
        delay: Duration | None = None,
        priority: int = 0,
        hash: str | bytes | int | None = None,
        process: QueueMessageProcessing | None = None,
        deduplication_interval: Duration | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> ProduceResult:
        """Enqueue one message; returns once it is durable (or says it was a duplicate)."""
        wire = self.prepare(
            data,
            delay=delay,
            priority=priority,
            hash=hash,
            process=process,
            deduplication_interval=deduplication_interval,
        )
        try:
            answer = await self.queue.connection.enqueue(p.Command.PRODUCE, wire, timeout)
        except BrokerTimeoutError:
            raise BrokerTimeoutError(
                f"produce to {self.name!r} was not acknowledged within {timeout:g}s (message id {wire[0]}); "
                "retrying with the same id is safe"
            ) from None
        message_id, duplicate, code, error = answer
        if code:
            raise error_from_code(code, error)
        return ProduceResult(message_id, bool(duplicate))

    async def consume(
        self, handler: Handler, max_parallel: int = 1, *, processing_timeout: Duration | None = None
    ) -> Consumer[T]:
        """Start consuming in the background with up to ``max_parallel`` messages at once."""
        if type(max_parallel) is not int or not 1 <= max_parallel <= 100_000:
            raise InvalidArgumentError(f"max_parallel must be an integer in 1..100000, got {max_parallel!r}")
        timeout_ms = duration_ms(
            processing_timeout, name="processing_timeout", default_ms=self.processing_timeout_ms
        )
        consumer = Consumer(self.queue, self, handler, max_parallel, timeout_ms)
        await consumer.start()
        return consumer
