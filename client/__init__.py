"""zbroker's client: typed channels on a replicated, durable queue.

    from client import BrokerQueue, QueueMessageProcessing

    async with BrokerQueue("tcp://127.0.0.1:7101") as queue:
        users = queue.channel("user/registered", User)
        await users.produce(User(id=1, username="Peter"))
        consumer = await users.consume(handle, max_parallel=8)

``client.sync`` has the same surface, blocking.
"""

from client.admin import BrokerAdmin, ClusterStatus, DeadLetter, NodeStatus, PeekedMessage, QueueStats
from client.consumer import Consumer
from client.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    ConfigError,
    InvalidArgumentError,
    InvalidChannelError,
    MessageTooLargeError,
    NotFoundError,
    NotLeaderError,
    PayloadValidationError,
    ProtocolError,
    StaleLeaseError,
    UnavailableError,
)
from client.message import ProduceResult, QueueMessage, QueueMessageProcessing
from client.queue import BrokerQueue, BrokerQueueChannel
from client.registry import ChannelDefinition

__all__ = [
    "BrokerAdmin",
    "BrokerConnectionError",
    "BrokerError",
    "BrokerQueue",
    "BrokerQueueChannel",
    "BrokerTimeoutError",
    "ChannelDefinition",
    "ClusterStatus",
    "ConfigError",
    "Consumer",
    "DeadLetter",
    "InvalidArgumentError",
    "InvalidChannelError",
    "MessageTooLargeError",
    "NodeStatus",
    "NotFoundError",
    "NotLeaderError",
    "PayloadValidationError",
    "PeekedMessage",
    "ProduceResult",
    "ProtocolError",
    "QueueMessage",
    "QueueMessageProcessing",
    "QueueStats",
    "StaleLeaseError",
    "UnavailableError",
]
