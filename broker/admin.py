"""Administrative requests: read-only questions answered at once, changes proposed as log commands."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import bson
from pydantic import ValidationError

from broker import keys as k
from broker.commands import PurgeCmd, PurgeDeadCmd, RequeueDeadCmd
from broker.keys import Cf
from broker.protocol import ErrorCode, channel_name_problem
from broker.queue_state import ChannelState, CommandResult
from cluster.replica import monotonic_ms
from config import ClusterMember

if TYPE_CHECKING:
    from broker.node import Node

MAX_PEEK = 1000
MAX_REPLY_BODY_BYTES = 8 << 20  # peek and dead-letter listings stop early rather than build huge frames


class AdminError(Exception):
    """Raised when an admin request cannot be answered; carries the wire code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _decode_body(body: bytes) -> Any:
    try:
        return bson.decode(body).get("v")
    except Exception:  # a stored body the admin cannot decode is shown raw rather than failing the listing
        return body


class RateTracker:
    """Produce and ack rates per channel over the last ``window_s`` seconds, from sampled totals."""

    def __init__(self, window_s: float = 10.0, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque(
            maxlen=int(window_s / every_s) + 1
        )
        self._next = 0.0

    def sample(self, now_s: float, channels: dict[str, ChannelState]) -> None:
        """Record the totals (at most every ``every_s``; call every loop turn)."""
        if now_s < self._next:
            return
        self._next = now_s + self.every_s
        self._samples.append((now_s, {c.name: (c.produced_total, c.acked_total) for c in channels.values()}))

    def rates(self, name: str) -> tuple[float, float]:
        """(produced per second, acked per second) of a channel; zeros until two samples exist."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        (start, first), (end, last) = self._samples[0], self._samples[-1]
        before, after = first.get(name, (0, 0)), last.get(name, (0, 0))
        elapsed = max(end - start, 1e-9)
        return (after[0] - before[0]) / elapsed, (after[1] - before[1]) / elapsed


class AdminHandler:
    """Answers ADMIN frames for one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.rates = RateTracker()

    def handle(self, routing_id: bytes, rid: int, op: str, args: dict[str, Any]) -> None:
        """Answer or propose one admin request."""
        try:
            method = getattr(self, f"op_{op}", None)
            if method is None:
                raise AdminError(ErrorCode.UNKNOWN_COMMAND, f"unknown admin operation {op!r}")
            result = method(routing_id, rid, args)
        except AdminError as exc:
            self.node.send_error(routing_id, rid, exc.code, str(exc))
            return
        if result is not None:
            self.node.send_reply(routing_id, rid, result)

    # ------------------------------------------------------------------ helpers

    def _channel(self, args: dict[str, Any], *, must_exist: bool = True) -> ChannelState | None:
        name = args.get("name")
        problem = channel_name_problem(name)
        if problem is not None:
            raise AdminError(ErrorCode.INVALID_CHANNEL, problem)
        assert isinstance(name, str)
        channel = self.node.state.channels.get(name)
        if channel is None and must_exist:
            raise AdminError(ErrorCode.NOT_FOUND, f"no queue named {name!r} on this node")
        return channel

    def _limit(self, args: dict[str, Any], default: int) -> int:
        limit = args.get("n", default)
        if type(limit) is not int or not 0 < limit <= MAX_PEEK:
            raise AdminError(ErrorCode.INVALID_ARGUMENT, f"'n' must be an integer in 1..{MAX_PEEK}")
        return limit

    def _stats(self, channel: ChannelState) -> dict[str, Any]:
        stats = channel.stats()
        stats["consumers"] = self.node.scheduler.consumers_of(channel.name)
        stats["produce_rate"], stats["ack_rate"] = (round(rate, 1) for rate in self.rates.rates(channel.name))
        return stats

    # ------------------------------------------------------------------ reads

    def op_ping(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> dict[str, Any]:
        """Liveness and identity of the node."""
        replica = self.node.replica
        return {
            "node": self.node.node_id,
            "pid": self.node.pid,
            "role": replica.core.role.value,
            "leader": replica.leader_id or "",
        }

    def op_queues(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> dict[str, Any]:
        """Counters of every queue."""
        return {
            "queues": [
                self._stats(channel)
                for channel in sorted(self.node.state.channels.values(), key=lambda c: c.name)
            ]
        }

    def op_stats(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> dict[str, Any]:
        """Counters of one queue."""
        channel = self._channel(args)
        assert channel is not None
        return {"stats": self._stats(channel)}

    def op_peek(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> dict[str, Any]:
        """The next ``n`` ready messages in delivery order, without leasing them."""
        channel = self._channel(args)
        assert channel is not None
        limit = self._limit(args, 10)
        start, end = k.chan_range(channel.chan_id)
        store = self.node.store
        rows = list(store.scan(Cf.READY, start, end, limit))
        records = store.multi_get(
            Cf.MESSAGES, [k.message_key(channel.chan_id, k.unpack_ready_key(key)[3]) for key, _ in rows]
        )
        messages: list[dict[str, Any]] = []
        body_bytes = 0
        for (key, value), record in zip(rows, records, strict=True):
            if record is None:
                continue
            body_bytes += len(record)
            if messages and body_bytes > MAX_REPLY_BODY_BYTES:
                break
            _, priority, ready_ms, seq = k.unpack_ready_key(key)
            produced_at_ms, _, message_id, body = k.unpack_message(record)
            messages.append(
                {
                    "id": message_id,
                    "seq": seq,
                    "priority": priority,
                    "ready_at_ms": ready_ms,
                    "produced_at_ms": produced_at_ms,
                    "attempts": k.unpack_attempts(value),
                    "data": _decode_body(body),
                }
            )
        return {"messages": messages}

    def op_dead_letters(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> dict[str, Any]:
        """Up to ``n`` dead letters of a queue with why they died."""
        channel = self._channel(args)
        assert channel is not None
        limit = self._limit(args, 100)
        start, end = k.chan_range(channel.chan_id)
        store = self.node.store
        rows = list(store.scan(Cf.DEAD, start, end, limit))
        records = store.multi_get(Cf.MESSAGES, [key for key, _ in rows])
        letters: list[dict[str, Any]] = []
        body_bytes = 0
        for (key, value), record in zip(rows, records, strict=True):
            if record is None:
                continue
            body_bytes += len(record)
            if letters and body_bytes > MAX_REPLY_BODY_BYTES:
                break
            attempts, dead_at_ms, reason = k.unpack_dead(value)
            produced_at_ms, priority, message_id, body = k.unpack_message(record)
            letters.append(
                {
                    "id": message_id,
                    "seq": k.unpack_chan_seq(key)[1],
                    "priority": priority,
                    "attempts": attempts,
                    "dead_at_ms": dead_at_ms,
                    "reason": reason,
                    "produced_at_ms": produced_at_ms,
                    "data": _decode_body(body),
                }
            )
        return {"dead_letters": letters}

    def op_cluster_status(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> dict[str, Any]:
        """Every member with its role and progress, as this node sees them, and who leads."""
        node = self.node
        replica = node.replica
        now = monotonic_ms()
        fresh_ms = 3 * replica.core.config.election_timeout_ms
        statuses: dict[str, dict[str, Any]] = {node.node_id: node.status()}
        for peer, (reported, seen_ms) in replica.peer_status.items():
            if now - seen_ms <= fresh_ms:
                statuses[peer] = reported
        highest_commit = max(int(reported.get("commit", 0)) for reported in statuses.values())
        nodes = []
        for member_id, (client_endpoint, peer_endpoint) in sorted(
            replica.members.items()
        ):  # current membership
            known = statuses.get(member_id)
            info: dict[str, Any] = known or {}
            applied = int(info.get("applied", 0))
            nodes.append(
                {
                    "id": member_id,
                    "client_endpoint": client_endpoint,
                    "peer_endpoint": peer_endpoint,
                    # A leader hears from every member; a follower only from the leader, so for it the
                    # other followers are "unknown" rather than unreachable.
                    "role": str(info.get("role", "unknown"))
                    if known
                    else ("unreachable" if replica.is_leader else "unknown"),
                    "term": int(info.get("term", 0)),
                    "commit_index": int(info.get("commit", 0)),
                    "applied_index": applied,
                    "lag": max(0, highest_commit - applied) if known else 0,
                    "pid": int(info.get("pid", 0)),
                }
            )
        return {
            "leader": replica.leader_id,
            "nodes": nodes,
            "counters": {**node.counters, **replica.counters},
        }

    def op_compact(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> dict[str, Any]:
        """Compact storage now (RocksDB also does this on its own); returns disk bytes before and after."""
        store, log = self.node.store, self.node.log_store
        before = store.disk_bytes() + log.disk_bytes()
        self.node.compact_now()
        store.compact_all()
        return {"disk_bytes_before": before, "disk_bytes_after": store.disk_bytes() + log.disk_bytes()}

    def _membership_change_allowed(self) -> None:
        core = self.node.replica.core
        if core.membership_pending():
            raise AdminError(
                ErrorCode.UNAVAILABLE, "another membership change is still being committed; try again shortly"
            )

    def op_node_add(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> dict[str, Any] | None:
        """Add a member (started beforehand with a config listing it); answered once the change applies."""
        node_id, client_endpoint, peer_endpoint = (
            args.get(key) for key in ("id", "client_endpoint", "peer_endpoint")
        )
        try:
            ClusterMember.model_validate(
                {"id": node_id, "client_endpoint": client_endpoint, "peer_endpoint": peer_endpoint}
            )
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise AdminError(ErrorCode.INVALID_ARGUMENT, f"invalid member: {problems}") from None
        assert (
            isinstance(node_id, str) and isinstance(client_endpoint, str) and isinstance(peer_endpoint, str)
        )
        members = self.node.replica.members
        if members.get(node_id) == (client_endpoint, peer_endpoint):
            return {"members": sorted(members)}  # already done (a retried request)
        if node_id in members:
            raise AdminError(
                ErrorCode.INVALID_ARGUMENT, f"{node_id!r} is already a member, with other endpoints"
            )
        self._membership_change_allowed()
        self.node.change_membership({**members, node_id: (client_endpoint, peer_endpoint)}, routing_id, rid)
        return None

    def op_node_remove(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> dict[str, Any] | None:
        """Remove a member; answered once the change applies (a removed leader then steps down)."""
        node_id = args.get("id")
        members = self.node.replica.members
        if not isinstance(node_id, str):
            raise AdminError(ErrorCode.INVALID_ARGUMENT, "'id' must be a node id")
        if node_id not in members:
            return {"members": sorted(members)}  # not a member (any more): nothing to do
        if len(members) == 1:
            raise AdminError(ErrorCode.INVALID_ARGUMENT, "cannot remove the last member")
        self._membership_change_allowed()
        self.node.change_membership({m: e for m, e in members.items() if m != node_id}, routing_id, rid)
        return None

    def op_leader_transfer(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> dict[str, Any]:
        """Hand leadership to the member named ``node`` (it must be caught up within an election timeout)."""
        target = args.get("node")
        replica = self.node.replica
        if not isinstance(target, str) or target not in replica.members:
            raise AdminError(ErrorCode.INVALID_ARGUMENT, f"'node' must be one of {sorted(replica.members)}")
        if target == self.node.node_id:
            return {"leader": target}
        replica.transfer_leadership(target, monotonic_ms())
        return {"transferring_to": target}

    # ------------------------------------------------------------------ changes (log commands)

    def _propose_count(self, routing_id: bytes, rid: int, command: Any, key: str) -> None:
        def answer(result: CommandResult) -> None:
            self.node.send_reply(routing_id, rid, {key: result})

        self.node.propose_admin(command, answer, routing_id, rid)

    def op_purge(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> None:
        """Delete every ready and delayed message of a queue."""
        channel = self._channel(args)
        assert channel is not None
        self._propose_count(routing_id, rid, PurgeCmd(channel.name), "purged")

    def op_requeue_dead(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> None:
        """Move a queue's dead letters back to ready."""
        channel = self._channel(args)
        assert channel is not None
        self._propose_count(routing_id, rid, RequeueDeadCmd(channel.name), "requeued")

    def op_purge_dead(self, routing_id: bytes, rid: int, args: dict[str, Any]) -> None:
        """Delete a queue's dead letters."""
        channel = self._channel(args)
        assert channel is not None
        self._propose_count(routing_id, rid, PurgeDeadCmd(channel.name), "purged")
