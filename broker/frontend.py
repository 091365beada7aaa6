"""The client side of a node: frames from the client ROUTER become log commands; answers go back.

A loop turn gathers everything clients sent into a ``Turn``: produce items, acks, nacks, closing
sessions, admin changes, each with who waits for the answer. The node proposes the turn as one log
entry and calls the answers when that entry is applied. A node that does not lead answers with
NOT_LEADER and the leader's endpoint, so clients move there and re-send.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import bson
import zmq

from broker import protocol as p
from broker.commands import LogCommand
from broker.keys import Cf, message_key, unpack_message
from broker.queue_state import CommandResult, Leased, ProduceOutcome
from broker.scheduler import Session, Subscription

if TYPE_CHECKING:
    from broker.node import Node

log = logging.getLogger("zbroker.node")

MAX_FRAMES_PER_TURN = 2000
SESSION_ID_BYTES = 16
MIN_SESSION_TIMEOUT_MS = 100
MAX_SESSION_TIMEOUT_MS = 3_600_000
# Admin operations any node answers from its own view; everything else needs the leader.
LOCAL_ADMIN_OPS = frozenset({"ping", "cluster_status"})
MAX_ADMIN_CONNECTIONS = 1024

ResultCallback = Callable[[CommandResult], None]


@dataclass(slots=True)
class Turn:
    """Commands gathered during one loop turn, each with what to do with its result."""

    commands: list[LogCommand] = field(default_factory=list)
    callbacks: list[ResultCallback | None] = field(default_factory=list)
    produce: list[p.ProduceItem] = field(default_factory=list)
    produce_waiters: list[tuple[bytes, int, list[Any], list[int], float]] = field(default_factory=list)
    acks: list[p.LeaseRef] = field(default_factory=list)
    ack_waiters: list[tuple[bytes, int, int]] = field(default_factory=list)
    nacks: list[p.NackItem] = field(default_factory=list)
    nack_waiters: list[tuple[bytes, int, int]] = field(default_factory=list)
    closing: list[Session] = field(default_factory=list)
    # Everyone waiting on this turn's entry: told NOT_LEADER if the entry may never be applied here.
    requesters: list[tuple[bytes, int]] = field(default_factory=list)
    proposed_at: float = 0.0

    def add(self, command: LogCommand, callback: ResultCallback | None = None) -> None:
        """Append a command and what to do with its result."""
        self.commands.append(command)
        self.callbacks.append(callback)


class Frontend:
    """Decodes client frames into the turn and sends answers and deliveries."""

    def __init__(self, node: Node, router: zmq.Socket[bytes]) -> None:
        self.node = node
        self.router = router
        self.turn = Turn()
        # Frames to send at the end of the turn; a DELIVER carries its leases, released if it cannot go.
        self._outbox: list[tuple[list[bytes], list[p.NackItem] | None]] = []
        self.undelivered: list[p.NackItem] = []
        self._admin_ids: set[bytes] = set()

    # ------------------------------------------------------------------ receiving

    def drain(self) -> None:
        """Handle every frame waiting on the client ROUTER (up to a turn's worth)."""
        router = self.router
        counters = self.node.counters
        for _ in range(MAX_FRAMES_PER_TURN):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            counters["frames_received"] += 1
            routing_id = frames[0]
            try:
                frame = p.decode_client(frames[1:])
                if self.node.replica.is_leader:
                    self._handle(routing_id, frame)
                else:
                    self._redirect(routing_id, frame)
            except p.FrameError as exc:
                counters["frames_rejected"] += 1
                log.debug("rejected frame from %s: %s", routing_id.hex(), exc.message)
                self.send(routing_id, p.encode_error(exc.request_id, exc.code, exc.message))
            except Exception:  # a bug handling one frame must not take the node down
                counters["frames_rejected"] += 1
                log.exception("failed to handle a frame from %s", routing_id.hex())
                self.send(
                    routing_id,
                    p.encode_error(0, p.ErrorCode.INTERNAL, "the node failed to handle this frame"),
                )

    def _redirect(self, routing_id: bytes, frame: p.ClientFrame) -> None:
        """A follower answers what it can from its own view and sends everything else to the leader.

        Admin connections (HELLO with ``admin``) are welcome on any node, so ``brokerctl status -e NODE``
        shows that node's view; their other requests are redirected like everyone's."""
        match frame:
            case p.Admin(rid, op, args) if op in LOCAL_ADMIN_OPS:
                # The cluster's status is the leader's view (it hears from every member) unless this
                # node's own view is asked for, or there is no leader to ask.
                wants_leader = op == "cluster_status" and not args.get("local")
                if not (wants_leader and self.node.replica.leader_client_endpoint()):
                    self.node.admin.handle(routing_id, rid, op, args)
                    return
            case p.Hello(admin=True):
                if len(self._admin_ids) >= MAX_ADMIN_CONNECTIONS:
                    self._admin_ids.clear()
                self._admin_ids.add(routing_id)
                self.send(routing_id, p.encode(p.Command.WELCOME, self._welcome(0)))
                return
            case p.Heartbeat() if routing_id in self._admin_ids:
                self.send(routing_id, p.HEARTBEAT_FRAME)
                return
            case p.Bye():
                self._admin_ids.discard(routing_id)
                return
        rid = getattr(frame, "request_id", 0)
        self.not_leader(routing_id, rid)

    def not_leader(self, routing_id: bytes, rid: int) -> None:
        """Tell a client to go to the leader (or to try another node when no leader is known)."""
        leader = self.node.replica.leader_client_endpoint()
        message = f"node {self.node.node_id} is not the leader" + (
            f"; the leader is at {leader}" if leader else ""
        )
        self.send(routing_id, p.encode_error(rid, p.ErrorCode.NOT_LEADER, message, leader))

    def _handle(self, routing_id: bytes, frame: p.ClientFrame) -> None:
        node = self.node
        now = node.wall_ms()
        scheduler = node.scheduler
        session = scheduler.touch(routing_id, now)
        turn = self.turn
        match frame:
            case p.Produce():
                self._take_produce(routing_id, frame)
            case p.Ack(rid, refs):
                turn.acks.extend(refs)
                turn.ack_waiters.append((routing_id, rid, len(refs)))
                turn.requesters.append((routing_id, rid))
            case p.Nack(rid, items):
                turn.nacks.extend(items)
                turn.nack_waiters.append((routing_id, rid, len(items)))
                turn.requesters.append((routing_id, rid))
            case p.Heartbeat():
                if session is None:
                    raise p.FrameError(p.ErrorCode.SESSION_UNKNOWN, "no session for this client: send HELLO")
                self.send(routing_id, p.HEARTBEAT_FRAME)
            case p.Hello(timeout_ms, _):
                if len(routing_id) != SESSION_ID_BYTES or routing_id[:1] == b"\x00":
                    raise p.FrameError(
                        p.ErrorCode.INVALID_ARGUMENT,
                        f"HELLO needs a routing id of exactly {SESSION_ID_BYTES} bytes not starting with 0: "
                        "it names the session",
                    )
                timeout_ms = min(
                    max(timeout_ms or node.session_timeout_ms, MIN_SESSION_TIMEOUT_MS), MAX_SESSION_TIMEOUT_MS
                )
                attached = scheduler.attach(routing_id, timeout_ms, now)
                self.send(routing_id, p.encode(p.Command.WELCOME, self._welcome(timeout_ms)))
                self._redeliver(attached)
            case p.Subscribe(rid):
                if session is None:
                    raise p.FrameError(
                        p.ErrorCode.SESSION_UNKNOWN, "SUBSCRIBE needs a session: send HELLO", rid
                    )
                problem = p.channel_name_problem(frame.channel)
                if problem is not None:
                    raise p.FrameError(p.ErrorCode.INVALID_CHANNEL, problem, rid)
                scheduler.subscribe(
                    session,
                    Subscription(
                        session.session,
                        frame.subscription_id,
                        frame.channel,
                        frame.max_parallel,
                        frame.max_attempts,
                        frame.retry_backoff_ms,
                        frame.retry_backoff_max_ms,
                        frame.processing_timeout_ms,
                    ),
                )
                self.send(routing_id, p.encode_reply(rid, {}))
            case p.Unsubscribe(rid, subscription_id):
                existed = session is not None and scheduler.unsubscribe(session, subscription_id)
                self.send(routing_id, p.encode_reply(rid, {"existed": existed}))
            case p.Bye():
                if session is not None:
                    turn.closing.append(session)
            case p.Admin(rid, op, args):
                node.admin.handle(routing_id, rid, op, args)

    def _welcome(self, timeout_ms: int) -> dict[str, Any]:
        node = self.node
        timeout_ms = timeout_ms or node.session_timeout_ms
        return {
            "node": node.node_id,
            "session_timeout_ms": timeout_ms,
            "heartbeat_ms": min(node.heartbeat_interval_ms, max(timeout_ms // 3, 10)),
            "max_message_bytes": node.max_message_bytes,
            "leader": node.replica.leader_client_endpoint(),
        }

    def _take_produce(self, routing_id: bytes, frame: p.Produce) -> None:
        limit = self.node.max_message_bytes
        results: list[Any] = [None] * len(frame.items)
        slots: list[int] = []
        for position, item in enumerate(frame.items):
            problem = p.channel_name_problem(item.channel)
            if problem is not None:
                results[position] = [item.produce_id, False, int(p.ErrorCode.INVALID_CHANNEL), problem]
            elif len(item.body) > limit:
                results[position] = [
                    item.produce_id,
                    False,
                    int(p.ErrorCode.MESSAGE_TOO_LARGE),
                    f"message is {len(item.body)} bytes; this node accepts at most {limit}",
                ]
            elif not bson.is_valid(item.body):
                results[position] = [
                    item.produce_id,
                    False,
                    int(p.ErrorCode.INVALID_PAYLOAD),
                    "message body is not a valid BSON document",
                ]
            else:
                slots.append(position)
                self.turn.produce.append(item)
                continue
            self.node.counters["items_rejected"] += 1
        if slots:
            self.turn.produce_waiters.append(
                (routing_id, frame.request_id, results, slots, time.perf_counter())
            )
            self.turn.requesters.append((routing_id, frame.request_id))
        else:
            self.send(routing_id, p.encode_reply(frame.request_id, {"r": results}))

    # ------------------------------------------------------------------ answers

    def answer_produce(self, waiters: list[tuple[bytes, int, list[Any], list[int], float]]) -> ResultCallback:
        """The callback answering a turn's producers from the PRODUCE command's outcomes."""

        def answer(result: CommandResult) -> None:
            assert isinstance(result, list)
            outcomes = iter(result)
            now = time.perf_counter()
            latency = self.node.metrics.produce_latency
            for routing_id, rid, results, slots, arrived in waiters:
                latency.observe(now - arrived)
                for position in slots:
                    outcome = next(outcomes)
                    assert isinstance(outcome, ProduceOutcome)
                    results[position] = [
                        outcome.message_id,
                        outcome.duplicate,
                        int(outcome.code),
                        outcome.error,
                    ]
                self.send(routing_id, p.encode_reply(rid, {"r": results}))

        return answer

    def answer_settles(self, waiters: list[tuple[bytes, int, int]]) -> ResultCallback:
        """The callback answering a turn's ACK (or NACK) frames, one code per item."""

        def answer(result: CommandResult) -> None:
            assert isinstance(result, list)
            position = 0
            for routing_id, rid, count in waiters:
                codes = [int(code) for code in result[position : position + count]]  # type: ignore[arg-type]
                position += count
                self.send(routing_id, p.encode_reply(rid, {"codes": codes}))

        return answer

    def deliver(self, result: CommandResult) -> None:
        """Send the leases a LEASE command granted to their session."""
        assert isinstance(result, list)
        if not result:
            return
        first = result[0]
        assert isinstance(first, Leased)
        session = self.node.scheduler.sessions.get(first.session)
        if session is None or session.routing_id is None:
            return  # the session went away; the leases expire with it
        self._send_deliveries(session.routing_id, first.subscription_id, result)  # type: ignore[arg-type]

    def _redeliver(self, session: Session) -> None:
        """Send a (re-)attached session every lease it holds again: deliveries may have been lost with the
        old connection (or the old leader), and a session holding leases it does not know of would stall
        on its credit. Clients ignore deliveries they are already handling (same seq and lease token)."""
        state = self.node.state
        held = state.session_leases.get(session.session)
        if not held or session.routing_id is None:
            return
        by_subscription: dict[int, list[Leased]] = {}
        for lease in held.values():
            channel = state.channels_by_id[lease.chan_id]
            by_subscription.setdefault(lease.subscription_id, []).append(
                Leased(
                    lease.session,
                    lease.subscription_id,
                    lease.chan_id,
                    channel.name,
                    lease.seq,
                    lease.lease_token,
                    lease.attempt,
                )
            )
        for subscription_id, leased in by_subscription.items():
            self._send_deliveries(session.routing_id, subscription_id, leased)

    def _send_deliveries(self, routing_id: bytes, subscription_id: int, leased: list[Leased]) -> None:
        records = self.node.store.multi_get(
            Cf.MESSAGES, [message_key(lease.chan_id, lease.seq) for lease in leased]
        )
        rows = []
        undelivered = []
        for lease, record in zip(leased, records, strict=True):
            if record is None:
                log.error("leased message %d of %s has no body", lease.seq, lease.channel)
                continue
            produced_at_ms, _, message_id, body = unpack_message(record)
            rows.append(
                (lease.seq, lease.lease_token, lease.attempt, message_id, produced_at_ms, lease.channel, body)
            )
            undelivered.append(p.NackItem(lease.seq, lease.lease_token, True, "delivery could not be sent"))
        self.send(routing_id, p.encode_deliver(subscription_id, rows), undelivered)

    # ------------------------------------------------------------------ sending

    def send(self, routing_id: bytes, frames: list[bytes], leases: list[p.NackItem] | None = None) -> None:
        """Queue a frame for the end of the turn."""
        self._outbox.append(([routing_id, *frames], leases))

    def send_reply(self, routing_id: bytes, rid: int, result: dict[str, Any]) -> None:
        """Queue a reply."""
        self.send(routing_id, p.encode_reply(rid, result))

    def send_error(self, routing_id: bytes, rid: int, code: p.ErrorCode, message: str) -> None:
        """Queue an error answer (a refused request: counted)."""
        self.node.counters["frames_rejected"] += 1
        self.send(routing_id, p.encode_error(rid, code, message))

    def flush(self) -> None:
        """Send everything queued this turn."""
        router = self.router
        for message, leases in self._outbox:
            try:
                router.send_multipart(message, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                # Peer gone or its queue full. A reply is re-requested by the client; a delivery's leases
                # are released next turn so the messages go to a consumer that can take them.
                log.debug("could not send a frame to %s: %s", message[0].hex(), exc)
                if leases:
                    self.undelivered.extend(leases)
        self._outbox.clear()
