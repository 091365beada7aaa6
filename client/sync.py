"""The blocking client: the same surface as ``client.BrokerQueue`` for WSGI apps and scripts.

An event loop runs in a daemon thread; every blocking call hands a coroutine to it and waits.
Handlers run in worker threads (plain functions) or on that loop (``async def``).

    from client.sync import BrokerQueue

    with BrokerQueue("tcp://127.0.0.1:7101") as queue:
        users = queue.channel("user/registered", User)
        users.produce(User(id=1, username="Peter"))
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

from client import admin as async_admin
from client import queue as async_queue
from client.admin import ClusterStatus, DeadLetter, PeekedMessage, QueueStats
from client.consumer import Consumer as AsyncConsumer
from client.consumer import Handler
from client.durations import Duration
from client.message import ProduceResult, QueueMessageProcessing

T = TypeVar("T")
R = TypeVar("R")


class _LoopThread:
    """An asyncio loop in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, R], timeout: float | None = None) -> R:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a blocking zbroker call was made from its own event loop; use client.BrokerQueue"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


class BrokerQueue:
    """Blocking twin of ``client.BrokerQueue``."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        session_timeout: Duration = async_queue.DEFAULT_SESSION_TIMEOUT_S,
        connect_timeout: Duration = 10.0,
        client_name: str | None = None,
    ) -> None:
        self._inner = async_queue.BrokerQueue(
            endpoints,
            session_timeout=session_timeout,
            connect_timeout=connect_timeout,
            client_name=client_name,
        )
        self._loop: _LoopThread | None = None

    def __enter__(self) -> BrokerQueue:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, R]) -> R:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the queue is not connected: use `with` or call connect()")
        return self._loop.run(coro)

    def connect(self) -> None:
        """Connect to the cluster."""
        if self._loop is None:
            self._loop = _LoopThread("zbroker-client")
            try:
                self._loop.run(self._inner.connect())
            except BaseException:
                self._loop.stop()
                self._loop = None
                raise

    def close(self) -> None:
        """Close every consumer (finishing in-flight work), then the connection."""
        if self._loop is not None:
            try:
                self._loop.run(self._inner.close())
            finally:
                self._loop.stop()
                self._loop = None

    @overload
    def channel(self, name: str, data_type: type[T], **options: Any) -> BrokerQueueChannel[T]: ...

    @overload
    def channel(self, name: str, data_type: Any = ..., **options: Any) -> BrokerQueueChannel[Any]: ...

    def channel(self, name: str, data_type: Any = Any, **options: Any) -> BrokerQueueChannel[Any]:
        """A typed channel; the options are those of ``client.BrokerQueue.channel``."""
        return BrokerQueueChannel(self, self._inner.channel(name, data_type, **options))


class BrokerQueueChannel(Generic[T]):
    """Blocking twin of ``client.BrokerQueueChannel``."""

    def __init__(self, queue: BrokerQueue, inner: async_queue.BrokerQueueChannel[T]) -> None:
        self._queue = queue
        self._inner = inner
        self.name = inner.name

    def produce(
        self,
        data: T,
        *,
        delay: Duration | None = None,
        priority: int = 0,
        hash: str | bytes | int | None = None,
        process: QueueMessageProcessing | None = None,
        deduplication_interval: Duration | None = None,
        timeout: float = async_queue.DEFAULT_TIMEOUT_S,
    ) -> ProduceResult:
        """Enqueue one message and block until it is durable."""
        return self._queue._run(
            self._inner.produce(
                data,
                delay=delay,
                priority=priority,
                hash=hash,
                process=process,
                deduplication_interval=deduplication_interval,
                timeout=timeout,
            )
        )

    def consume(
        self, handler: Handler, max_parallel: int = 1, *, processing_timeout: Duration | None = None
    ) -> Consumer[T]:
        """Start consuming in the background; returns at once."""
        inner = self._queue._run(
            self._inner.consume(handler, max_parallel, processing_timeout=processing_timeout)
        )
        return Consumer(self._queue, inner)


class Consumer(Generic[T]):
    """Blocking handle of a background consumer."""

    def __init__(self, queue: BrokerQueue, inner: AsyncConsumer[T]) -> None:
        self._queue = queue
        self._inner = inner

    @property
    def handled(self) -> int:
        """Messages handled successfully so far."""
        return self._inner.handled

    def close(self) -> None:
        """Stop taking messages and block until in-flight ones are finished."""
        self._queue._run(self._inner.close())


class BrokerAdmin:
    """Blocking twin of ``client.BrokerAdmin``."""

    def __init__(self, endpoints: str | Sequence[str], *, timeout: Duration = 10.0) -> None:
        self._inner = async_admin.BrokerAdmin(endpoints, timeout=timeout)
        self._loop = _LoopThread("zbroker-admin")

    def __enter__(self) -> BrokerAdmin:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        try:
            self._loop.run(self._inner.close())
        finally:
            self._loop.stop()

    def cluster_status(self) -> ClusterStatus:
        """Nodes, roles, terms, progress and the leader."""
        return self._loop.run(self._inner.cluster_status())

    def queues(self) -> list[QueueStats]:
        """Counters of every queue."""
        return self._loop.run(self._inner.queues())

    def stats(self, name: str) -> QueueStats:
        """Counters of one queue."""
        return self._loop.run(self._inner.stats(name))

    def peek(self, name: str, n: int = 10) -> list[PeekedMessage]:
        """The next ready messages, without leasing them."""
        return self._loop.run(self._inner.peek(name, n))

    def purge(self, name: str) -> int:
        """Delete every ready and delayed message of a queue."""
        return self._loop.run(self._inner.purge(name))

    def dead_letters(self, name: str, n: int = 100) -> list[DeadLetter]:
        """Dead letters of a queue."""
        return self._loop.run(self._inner.dead_letters(name, n))

    def requeue_dead(self, name: str) -> int:
        """Move a queue's dead letters back to ready."""
        return self._loop.run(self._inner.requeue_dead(name))

    def purge_dead(self, name: str) -> int:
        """Delete a queue's dead letters."""
        return self._loop.run(self._inner.purge_dead(name))
