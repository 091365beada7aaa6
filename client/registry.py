"""Channel definitions shared by producers and workers, and the registry of worker consumers.

Define a channel once, in a module both sides import:

    # channels.py
    registration = ChannelDefinition("user/registered", User, process=QueueMessageProcessing.EXACTLY_ONCE)

Producers bind it to a connection: ``await queue.channel(registration).produce(user)``. Workers
register handlers with a decorator, and ``brokerctl worker myapp.worker`` runs every one of them:

    # worker.py
    @registration.consumer(max_parallel=8)
    async def send_welcome(user: User, message: QueueMessage[User]) -> None: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from broker.protocol import channel_name_problem
from client.durations import Duration
from client.errors import InvalidArgumentError, InvalidChannelError
from client.message import QueueMessageProcessing

if TYPE_CHECKING:
    from client.queue import BrokerQueue, BrokerQueueChannel

T = TypeVar("T")
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class ConsumerRegistration:
    """A handler registered for a channel, with how many messages it takes at once."""

    definition: ChannelDefinition[Any]
    handler: Callable[..., Any]
    max_parallel: int
    processing_timeout: Duration | None


REGISTRY: list[ConsumerRegistration] = []
"""Every consumer registered with ``@definition.consumer(...)`` in this process, in order."""


@dataclass(frozen=True)
class ChannelDefinition(Generic[T]):
    """A typed channel declared once and shared by producers and workers."""

    name: str
    data_type: Any = Any
    process: QueueMessageProcessing = QueueMessageProcessing.AT_LEAST_ONCE
    deduplication_interval: Duration = "5m"
    max_attempts: int = 5
    retry_backoff: Duration = "1s"
    retry_backoff_max: Duration = "5m"
    processing_timeout: Duration | None = None
    consumers: list[ConsumerRegistration] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        problem = channel_name_problem(self.name)
        if problem is not None:
            raise InvalidChannelError(problem)

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``BrokerQueue.channel`` this definition stands for."""
        return {
            "process": self.process,
            "deduplication_interval": self.deduplication_interval,
            "max_attempts": self.max_attempts,
            "retry_backoff": self.retry_backoff,
            "retry_backoff_max": self.retry_backoff_max,
            "processing_timeout": self.processing_timeout,
        }

    def bind(self, queue: BrokerQueue) -> BrokerQueueChannel[T]:
        """This channel on a connected queue (the same as ``queue.channel(definition)``)."""
        return queue.channel(self.name, self.data_type, **self.options())

    def consumer(
        self, max_parallel: int = 1, *, processing_timeout: Duration | None = None
    ) -> Callable[[H], H]:
        """Register the decorated function as a worker consumer of this channel (see ``brokerctl worker``)."""
        if type(max_parallel) is not int or max_parallel < 1:
            raise InvalidArgumentError(f"max_parallel must be a positive integer, got {max_parallel!r}")

        def register(handler: H) -> H:
            registration = ConsumerRegistration(self, handler, max_parallel, processing_timeout)
            self.consumers.append(registration)
            REGISTRY.append(registration)
            return handler

        return register
