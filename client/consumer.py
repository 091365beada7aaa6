"""A consumer: runs a handler for each delivered message, acks on return, nacks on raise."""

from __future__ import annotations

import asyncio
import datetime
import enum
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from broker import protocol as p
from client.errors import BrokerError, InvalidArgumentError, PayloadValidationError
from client.message import QueueMessage

if TYPE_CHECKING:
    from client.queue import BrokerQueue, BrokerQueueChannel

T = TypeVar("T")
Handler = Callable[..., Awaitable[None] | None]

log = logging.getLogger("zbroker.consumer")

SETTLE_TIMEOUT_S = 30.0
UNSUBSCRIBE_TIMEOUT_S = 5.0


class ConsumerState(enum.Enum):
    """Where a consumer is in its life."""

    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


def _handler_arity(handler: Handler) -> int:
    """1 for ``handler(data)``, 2 for ``handler(data, message)``."""
    try:
        parameters = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return 1
    positional = [
        param
        for param in parameters
        if param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if any(param.kind is inspect.Parameter.VAR_POSITIONAL for param in parameters) or len(positional) >= 2:
        return 2
    if len(positional) == 1:
        return 1
    raise InvalidArgumentError("a handler takes (data) or (data, message)")


def _is_async(handler: Handler) -> bool:
    call = getattr(handler, "__call__", None)  # noqa: B004 - a callable object with an async __call__
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


def _message(delivery: p.Delivery, data: Any) -> QueueMessage[Any]:
    """The ``QueueMessage`` a two-argument handler gets beside the data."""
    return QueueMessage(
        delivery.message_id,
        delivery.channel,
        data,
        delivery.attempt,
        datetime.datetime.fromtimestamp(delivery.produced_at_ms / 1000, datetime.UTC),
        delivery.seq,
        delivery.lease_token,
    )


class Consumer(Generic[T]):
    """Handles messages of one channel in the background; ``close()`` finishes in-flight work."""

    def __init__(
        self,
        queue: BrokerQueue,
        channel: BrokerQueueChannel[T],
        handler: Handler,
        max_parallel: int,
        processing_timeout_ms: int,
    ) -> None:
        self.queue = queue
        self.channel = channel
        self.handler = handler
        self.max_parallel = max_parallel
        self.processing_timeout_ms = processing_timeout_ms
        self.state = ConsumerState.STARTING
        self.handled = 0
        self.failed = 0
        self._arity = _handler_arity(handler)
        self._async = _is_async(handler)
        self._executor = (
            None
            if self._async
            else ThreadPoolExecutor(max_parallel, thread_name_prefix=f"zbroker-{channel.name}")
        )
        self._tasks: set[asyncio.Task[None]] = set()
        # (seq, lease_token) of deliveries being handled: a node re-sends a session's leases when it
        # re-attaches, and those already in hand must not run twice.
        self._active: set[tuple[int, int]] = set()
        self.subscription_id = queue.register(self)

    def __repr__(self) -> str:
        return f"Consumer({self.channel.name!r}, max_parallel={self.max_parallel}, {self.state.value})"

    def _subscribe_payload(self) -> dict[str, Any]:
        channel = self.channel
        return {
            "sub": self.subscription_id,
            "channel": channel.name,
            "max_parallel": self.max_parallel,
            "max_attempts": channel.max_attempts,
            "retry_backoff_ms": channel.retry_backoff_ms,
            "retry_backoff_max_ms": channel.retry_backoff_max_ms,
            "processing_timeout_ms": self.processing_timeout_ms,
        }

    async def start(self) -> None:
        """Subscribe; deliveries start flowing right after."""
        try:
            await self.queue.connection.request(
                p.Command.SUBSCRIBE, self._subscribe_payload(), SETTLE_TIMEOUT_S
            )
        except BaseException:
            self.queue.unregister(self.subscription_id)
            raise
        self.state = ConsumerState.RUNNING

    def resubscribe(self) -> None:
        """Subscribe again on a new or re-attached session (after a reconnect or failover)."""
        if self.state is not ConsumerState.RUNNING:
            return
        task = asyncio.create_task(
            self.queue.connection.request(p.Command.SUBSCRIBE, self._subscribe_payload())
        )
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def on_deliver(self, deliveries: tuple[p.Delivery, ...]) -> None:
        """Start handling delivered messages (or hand them back when closing)."""
        for delivery in deliveries:
            if self.state in (ConsumerState.CLOSING, ConsumerState.CLOSED):
                self._settle_later(
                    p.Command.NACK, (delivery.seq, delivery.lease_token, True, "consumer closing")
                )
                continue
            key = (delivery.seq, delivery.lease_token)
            if key in self._active:
                continue
            self._active.add(key)
            task = asyncio.create_task(self._process(delivery))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, key))

    def _finished(self, key: tuple[int, int], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._active.discard(key)

    def _settle_later(self, command: p.Command, wire: Any) -> asyncio.Future[Any]:
        future = self.queue.connection.enqueue(command, wire)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def _process(self, delivery: p.Delivery) -> None:
        try:
            data = self.channel.codec.decode(delivery.body)
        except PayloadValidationError as exc:
            await self._settle(p.Command.NACK, delivery, False, str(exc))
            return
        args = (data,) if self._arity == 1 else (data, _message(delivery, data))
        timeout = self.processing_timeout_ms / 1000 if self.processing_timeout_ms else None
        try:
            if self._async:
                running = self.handler(*args)
            else:
                running = asyncio.get_running_loop().run_in_executor(self._executor, self.handler, *args)  # type: ignore[arg-type]
            if timeout is None:
                await running  # type: ignore[misc]
            else:
                await asyncio.wait_for(running, timeout)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            # Cancelled from outside (the event loop is shutting down): hand the message back.
            await asyncio.shield(self._settle(p.Command.NACK, delivery, True, "consumer cancelled"))
            raise
        except TimeoutError:
            self.failed += 1
            await self._settle(p.Command.NACK, delivery, False, f"processing timeout after {timeout:g}s")
        except Exception as exc:  # the handler's failure is the message's failure: retry or dead-letter
            self.failed += 1
            log.debug("handler failed on message %s: %r", delivery.message_id, exc)
            await self._settle(p.Command.NACK, delivery, False, f"{type(exc).__name__}: {exc}")
        else:
            self.handled += 1
            await self._settle(p.Command.ACK, delivery)

    async def _settle(
        self, command: p.Command, delivery: p.Delivery, release: bool = False, reason: str = ""
    ) -> None:
        wire: Any = (
            (delivery.seq, delivery.lease_token)
            if command is p.Command.ACK
            else (delivery.seq, delivery.lease_token, release, reason[: p.MAX_REASON_CHARS])
        )
        try:
            code = await self.queue.connection.enqueue(command, wire, SETTLE_TIMEOUT_S)
        except BrokerError as exc:
            log.warning("could not %s message %s: %s", command.name.lower(), delivery.message_id, exc)
            return
        if code == p.ErrorCode.STALE_LEASE:
            log.warning(
                "%s of message %s refused: its lease expired or moved to another worker",
                command.name.lower(),
                delivery.message_id,
            )

    async def close(self, grace_s: float | None = None) -> None:
        """Stop taking messages, finish in-flight ones (acking them), release anything delivered after.

        With ``grace_s``, handlers still running after that many seconds are cancelled and their
        messages released for immediate redelivery elsewhere (a worker's graceful shutdown).
        """
        if self.state in (ConsumerState.CLOSING, ConsumerState.CLOSED):
            return
        self.state = ConsumerState.CLOSING
        try:
            await self.queue.connection.request(
                p.Command.UNSUBSCRIBE, {"sub": self.subscription_id}, UNSUBSCRIBE_TIMEOUT_S
            )
        except BrokerError as exc:
            log.warning("unsubscribe of %s failed: %s", self.channel.name, exc)
        if self._tasks:
            running = list(self._tasks)
            _, late = await asyncio.wait(running, timeout=grace_s)
            for task in late:
                task.cancel()  # _process releases the message as it is cancelled
            await asyncio.gather(*running, return_exceptions=True)
        self.state = ConsumerState.CLOSED
        self.queue.unregister(self.subscription_id)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
