"""``BrokerAdmin``: inspect and manage queues and the cluster (``brokerctl`` is a thin shell over it)."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any

from broker import protocol as p
from client.connection import Connection
from client.durations import Duration, duration_ms
from client.errors import InvalidChannelError
from client.queue import endpoints_of


def _time(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counters of one queue: current depths and running totals."""

    channel: str
    ready: int
    delayed: int
    in_flight: int
    dead: int
    consumers: int
    produced_total: int
    delivered_total: int
    acked_total: int
    nacked_total: int
    dead_lettered_total: int
    lease_expired_total: int
    duplicates_total: int
    produce_rate: float = 0.0
    ack_rate: float = 0.0

    @classmethod
    def from_wire(cls, row: dict[str, Any]) -> QueueStats:
        """Build from the node's answer, ignoring fields this client does not know."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})


@dataclass(frozen=True, slots=True)
class PeekedMessage:
    """A ready message seen without leasing it; ``data`` is the stored payload, untyped."""

    id: str
    seq: int
    priority: int
    attempts: int
    produced_at: datetime.datetime
    ready_at: datetime.datetime
    data: Any


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that failed ``max_attempts`` times, with the last reason."""

    id: str
    seq: int
    priority: int
    attempts: int
    produced_at: datetime.datetime
    dead_at: datetime.datetime
    reason: str
    data: Any


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node's role and progress."""

    id: str
    client_endpoint: str
    peer_endpoint: str
    role: str
    term: int
    commit_index: int
    applied_index: int
    lag: int
    pid: int


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """Every node of the cluster and which one leads."""

    leader: str | None
    nodes: tuple[NodeStatus, ...]


class BrokerAdmin:
    """Administrative client: ``async with BrokerAdmin(endpoints) as admin: await admin.queues()``."""

    def __init__(self, endpoints: str | Sequence[str], *, timeout: Duration = 10.0) -> None:
        self.endpoints = endpoints_of(endpoints)
        self.timeout_s = duration_ms(timeout, name="timeout") / 1000
        self._connection: Connection | None = None

    async def __aenter__(self) -> BrokerAdmin:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to the cluster."""
        if self._connection is None:
            connection = Connection(
                self.endpoints,
                session_timeout_s=60.0,
                client_name="brokeradmin",
                on_deliver=lambda frame: None,
                on_session=_nothing,
                admin=True,
            )
            await connection.start(self.timeout_s)
            self._connection = connection

    async def close(self) -> None:
        """Close the connection."""
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        await self.connect()
        assert self._connection is not None
        return await self._connection.request(p.Command.ADMIN, {"op": op, "args": args}, self.timeout_s)

    @staticmethod
    def _name(name: str) -> str:
        problem = p.channel_name_problem(name)
        if problem is not None:
            raise InvalidChannelError(problem)
        return name

    async def ping(self) -> dict[str, Any]:
        """The answering node's id, pid and role."""
        return await self._call("ping")

    async def cluster_status(self, *, local: bool = False) -> ClusterStatus:
        """Nodes, roles, terms, commit and applied indexes, lag, pids and the leader (the leader's view;
        with ``local``, the view of the node this admin is connected to)."""
        result = await self._call("cluster_status", local=local)
        nodes = tuple(
            NodeStatus(**{f.name: row[f.name] for f in fields(NodeStatus)}) for row in result["nodes"]
        )
        return ClusterStatus(result.get("leader"), nodes)

    async def queues(self) -> list[QueueStats]:
        """Counters of every queue."""
        result = await self._call("queues")
        return [QueueStats.from_wire(row) for row in result["queues"]]

    async def stats(self, name: str) -> QueueStats:
        """Counters of one queue (``NotFoundError`` if it never had a message)."""
        result = await self._call("stats", name=self._name(name))
        return QueueStats.from_wire(result["stats"])

    async def peek(self, name: str, n: int = 10) -> list[PeekedMessage]:
        """The next ``n`` ready messages in delivery order, without leasing them."""
        result = await self._call("peek", name=self._name(name), n=n)
        return [
            PeekedMessage(
                row["id"],
                row["seq"],
                row["priority"],
                row["attempts"],
                _time(row["produced_at_ms"]),
                _time(row["ready_at_ms"]),
                row["data"],
            )
            for row in result["messages"]
        ]

    async def compact(self) -> tuple[int, int]:
        """Compact the answering node's storage now; returns its disk bytes before and after."""
        result = await self._call("compact")
        return int(result["disk_bytes_before"]), int(result["disk_bytes_after"])

    async def purge(self, name: str) -> int:
        """Delete every ready and delayed message of a queue; returns how many."""
        result = await self._call("purge", name=self._name(name))
        return int(result["purged"])

    async def dead_letters(self, name: str, n: int = 100) -> list[DeadLetter]:
        """Up to ``n`` dead letters of a queue."""
        result = await self._call("dead_letters", name=self._name(name), n=n)
        return [
            DeadLetter(
                row["id"],
                row["seq"],
                row["priority"],
                row["attempts"],
                _time(row["produced_at_ms"]),
                _time(row["dead_at_ms"]),
                row["reason"],
                row["data"],
            )
            for row in result["dead_letters"]
        ]

    async def requeue_dead(self, name: str) -> int:
        """Move every dead letter of a queue back to ready with a fresh attempt count; returns how many."""
        result = await self._call("requeue_dead", name=self._name(name))
        return int(result["requeued"])

    async def transfer_leadership(self, node_id: str) -> str:
        """Ask the leader to hand leadership to ``node_id``; returns the node it moves to."""
        result = await self._call("leader_transfer", node=node_id)
        return str(result.get("transferring_to") or result.get("leader"))

    async def add_node(self, node_id: str, client_endpoint: str, peer_endpoint: str) -> list[str]:
        """Add a member to the cluster (start it first); returns the new member list."""
        result = await self._call(
            "node_add", id=node_id, client_endpoint=client_endpoint, peer_endpoint=peer_endpoint
        )
        return [str(member) for member in result["members"]]

    async def remove_node(self, node_id: str) -> list[str]:
        """Remove a member from the cluster; returns the new member list."""
        result = await self._call("node_remove", id=node_id)
        return [str(member) for member in result["members"]]

    async def purge_dead(self, name: str) -> int:
        """Delete every dead letter of a queue; returns how many."""
        result = await self._call("purge_dead", name=self._name(name))
        return int(result["purged"])


async def _nothing() -> None:
    return None
