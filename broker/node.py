"""The node process: a ROUTER loop around the log, the queue state machine and the scheduler.

One loop turn: wait for frames or the next timer; decode every frame that arrived; turn them and the
scheduler's plan into log commands; append them as ONE log entry (one fsynced write: group commit);
apply the committed entry; answer producers, deliver leases. Nothing is answered before the entry
holding it is durable.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bson
import zmq

from broker import protocol as p
from broker.admin import AdminHandler
from broker.commands import (
    AckCmd,
    LeaseCmd,
    LogCommand,
    LogEntry,
    NackCmd,
    ProduceCmd,
    decode_entry,
    encode_entry,
)
from broker.keys import Cf, message_key, unpack_message
from broker.queue_state import CommandResult, Leased, ProduceOutcome, QueueState, session_key
from broker.scheduler import Scheduler, Session, Subscription
from broker.store import RocksStore
from cluster.local import LocalLog
from config import Settings

log = logging.getLogger("zbroker.node")

MAX_FRAMES_PER_TURN = 2000
COMPACT_EVERY_ENTRIES = 256
COMPACT_EVERY_BYTES = 8 << 20
SESSION_ID_BYTES = 16
MIN_SESSION_TIMEOUT_MS = 100
MAX_SESSION_TIMEOUT_MS = 3_600_000

ResultCallback = Callable[[CommandResult], None]


def now_ms() -> int:
    """Wall-clock milliseconds: the time the leader stamps into log entries."""
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Turn:
    """Commands gathered during one loop turn, each with what to do with its result."""

    commands: list[LogCommand] = field(default_factory=list)
    callbacks: list[ResultCallback | None] = field(default_factory=list)
    produce: list[p.ProduceItem] = field(default_factory=list)
    produce_waiters: list[tuple[bytes, int, list[Any], list[int]]] = field(default_factory=list)
    acks: list[p.LeaseRef] = field(default_factory=list)
    ack_waiters: list[tuple[bytes, int, int]] = field(default_factory=list)
    nacks: list[p.NackItem] = field(default_factory=list)
    nack_waiters: list[tuple[bytes, int, int]] = field(default_factory=list)
    closing: list[Session] = field(default_factory=list)

    def add(self, command: LogCommand, callback: ResultCallback | None = None) -> None:
        self.commands.append(command)
        self.callbacks.append(callback)


class Node:
    """One zbroker node serving clients on its ROUTER socket."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        node = settings.node
        self.node_id = node.id
        self.max_message_bytes = node.max_message_bytes
        self.session_timeout_ms = int(node.session_timeout_s * 1000)
        self.heartbeat_interval_ms = int(node.heartbeat_interval_s * 1000)
        self.store = RocksStore(node.data_dir)
        self.state = QueueState(self.store, produce_id_window_ms=int(node.produce_id_window_s * 1000))
        self.log = LocalLog(self.store, fsync=node.fsync)
        self.scheduler = Scheduler(self.state, default_session_timeout_ms=self.session_timeout_ms)
        self.admin = AdminHandler(self)
        self.counters: dict[str, int] = {
            "frames_received": 0,
            "frames_rejected": 0,
            "items_rejected": 0,
            "entries_appended": 0,
        }
        self.started_at_ms = now_ms()
        self._stopping = False
        self._turn = _Turn()
        # Frames to send at the end of the turn; a DELIVER carries its leases, released if it cannot go.
        self._outbox: list[tuple[list[bytes], list[p.NackItem] | None]] = []
        self._undelivered: list[p.NackItem] = []
        self._durable_applied = self.state.applied_index
        self._log_bytes_since_compaction = 0
        self._replay()
        self.scheduler.adopt_leased_sessions(now_ms())
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Refuse (rather than silently drop) frames to unknown or full peers, so undeliverable
        # deliveries can be released at once instead of holding their leases.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, 100_000)
        self.router.setsockopt(zmq.RCVHWM, 100_000)
        self.router.setsockopt(zmq.MAXMSGSIZE, 4 * self.max_message_bytes + (1 << 20))
        self.router.setsockopt(zmq.HEARTBEAT_IVL, self.heartbeat_interval_ms)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * self.heartbeat_interval_ms)
        self.router.bind(node.client_endpoint)
        log.info(
            "node %s serving clients on %s (data in %s, %d channels, %d leases restored)",
            self.node_id,
            node.client_endpoint,
            node.data_dir,
            len(self.state.channels),
            len(self.state.leases),
        )

    # ------------------------------------------------------------------ lifecycle

    def _replay(self) -> None:
        pending = self.log.committed_since(self.state.applied_index)
        if pending:
            log.info(
                "replaying %d committed log entries after index %d", len(pending), self.state.applied_index
            )
            self.state.apply([(index, decode_entry(payload)) for index, payload in pending])

    def stop(self) -> None:
        """Ask the loop to finish its turn and shut down (safe from a signal handler)."""
        self._stopping = True

    def run(self) -> None:
        """Serve until ``stop`` is called."""
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self.close()

    def close(self) -> None:
        """Release the socket and the database; everything acknowledged is already durable."""
        if self.router.closed:
            return
        self.router.close(0)
        self.store.sync_wal()
        self.store.close()
        log.info("node %s stopped", self.node_id)

    # ------------------------------------------------------------------ the loop turn

    def run_once(self) -> None:
        """One loop turn."""
        now = now_ms()
        timeout = (
            0 if self.scheduler.has_work() else max(0, min(self.scheduler.next_timer_ms(now) - now, 100))
        )
        if self.router.poll(timeout, zmq.POLLIN):
            self._drain()
        now = now_ms()
        turn = self._turn
        if turn.produce:
            turn.add(ProduceCmd(tuple(turn.produce)), self._answer_produce(turn.produce_waiters))
        if turn.acks:
            ack = AckCmd(tuple(turn.acks))
            self.scheduler.note_settle(ack)
            turn.add(ack, self._answer_acks(turn.ack_waiters))
        if turn.nacks:
            nack = NackCmd(tuple(turn.nacks))
            self.scheduler.note_settle(nack)
            turn.add(nack, self._answer_acks(turn.nack_waiters))
        if self._undelivered:
            undelivered = NackCmd(tuple(self._undelivered))
            self._undelivered = []
            self.scheduler.note_settle(undelivered)
            turn.add(undelivered)
        for session in turn.closing:  # after this turn's acks, so a session's last acks still count
            release = self.scheduler.close(session)
            if release is not None:
                turn.add(release)
        for command in self.scheduler.plan(now):
            turn.add(command, self._deliver if isinstance(command, LeaseCmd) else None)
        if turn.commands:
            self._commit(turn, now)
        self._turn = _Turn()
        self._flush_outbox()

    def _commit(self, turn: _Turn, now: int) -> None:
        entry = LogEntry(now, tuple(turn.commands))
        durable_before = self.state.applied_index
        payload = encode_entry(entry)
        index = self.log.propose(payload)
        self._log_bytes_since_compaction += len(payload)
        self.counters["entries_appended"] += 1
        self.scheduler.proposed(index)
        self._durable_applied = durable_before
        # A group of one: the entry is committed once it is on disk, so apply it now.
        (results,) = self.state.apply([(index, entry)])
        self.scheduler.applied(index)
        for result, callback in zip(results, turn.callbacks, strict=True):
            if callback is not None:
                callback(result)
        if (
            index - self.log.log.first_index >= COMPACT_EVERY_ENTRIES
            or self._log_bytes_since_compaction >= COMPACT_EVERY_BYTES
        ):
            self.compact_log()

    def compact_log(self) -> None:
        """Drop log entries whose effects are applied and durable (covered by a later synced append)."""
        self.log.compact(self._durable_applied)
        self._log_bytes_since_compaction = 0

    def _drain(self) -> None:
        router = self.router
        for _ in range(MAX_FRAMES_PER_TURN):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.counters["frames_received"] += 1
            routing_id = frames[0]
            try:
                frame = p.decode_client(frames[1:])
                self._handle(routing_id, frame)
            except p.FrameError as exc:
                self.counters["frames_rejected"] += 1
                log.debug("rejected frame from %s: %s", routing_id.hex(), exc.message)
                self._send(routing_id, p.encode_error(exc.request_id, exc.code, exc.message))
            except Exception:  # a bug handling one frame must not take the node down
                self.counters["frames_rejected"] += 1
                log.exception("failed to handle a frame from %s", routing_id.hex())
                self._send(
                    routing_id,
                    p.encode_error(0, p.ErrorCode.INTERNAL, "the node failed to handle this frame"),
                )

    def _send(self, routing_id: bytes, frames: list[bytes], leases: list[p.NackItem] | None = None) -> None:
        self._outbox.append(([routing_id, *frames], leases))

    def _flush_outbox(self) -> None:
        router = self.router
        for message, leases in self._outbox:
            try:
                router.send_multipart(message, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                # Peer gone or its queue full. A reply is re-requested by the client; a delivery's leases
                # are released next turn so the messages go to a consumer that can take them.
                log.debug("could not send a frame to %s: %s", message[0].hex(), exc)
                if leases:
                    self._undelivered.extend(leases)
        self._outbox.clear()

    # ------------------------------------------------------------------ frames

    def _handle(self, routing_id: bytes, frame: p.ClientFrame) -> None:
        now = now_ms()
        session = self.scheduler.touch(routing_id, now)
        match frame:
            case p.Produce():
                self._take_produce(routing_id, frame)
            case p.Ack(rid, refs):
                self._turn.acks.extend(refs)
                self._turn.ack_waiters.append((routing_id, rid, len(refs)))
            case p.Nack(rid, items):
                self._turn.nacks.extend(items)
                self._turn.nack_waiters.append((routing_id, rid, len(items)))
            case p.Heartbeat():
                if session is None:
                    raise p.FrameError(p.ErrorCode.SESSION_UNKNOWN, "no session for this client: send HELLO")
                self._send(routing_id, p.HEARTBEAT_FRAME)
            case p.Hello(timeout_ms, _):
                if len(routing_id) != SESSION_ID_BYTES or routing_id[:1] == b"\x00":
                    raise p.FrameError(
                        p.ErrorCode.INVALID_ARGUMENT,
                        f"HELLO needs a routing id of exactly {SESSION_ID_BYTES} bytes not starting with 0: "
                        "it names the session",
                    )
                timeout_ms = timeout_ms or self.session_timeout_ms
                timeout_ms = min(max(timeout_ms, MIN_SESSION_TIMEOUT_MS), MAX_SESSION_TIMEOUT_MS)
                attached = self.scheduler.attach(routing_id, timeout_ms, now)
                welcome = {
                    "node": self.node_id,
                    "session_timeout_ms": timeout_ms,
                    "heartbeat_ms": min(self.heartbeat_interval_ms, max(timeout_ms // 3, 10)),
                    "max_message_bytes": self.max_message_bytes,
                    "leader": self.settings.node.client_endpoint,
                }
                self._send(routing_id, p.encode(p.Command.WELCOME, welcome))
                self._redeliver(attached)
            case p.Subscribe(rid):
                if session is None:
                    raise p.FrameError(
                        p.ErrorCode.SESSION_UNKNOWN, "SUBSCRIBE needs a session: send HELLO", rid
                    )
                problem = p.channel_name_problem(frame.channel)
                if problem is not None:
                    raise p.FrameError(p.ErrorCode.INVALID_CHANNEL, problem, rid)
                self.scheduler.subscribe(
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
                self._send(routing_id, p.encode_reply(rid, {}))
            case p.Unsubscribe(rid, subscription_id):
                existed = session is not None and self.scheduler.unsubscribe(session, subscription_id)
                self._send(routing_id, p.encode_reply(rid, {"existed": existed}))
            case p.Bye():
                if session is not None:
                    self._turn.closing.append(session)
            case p.Admin(rid, op, args):
                self.admin.handle(routing_id, rid, op, args)

    def _take_produce(self, routing_id: bytes, frame: p.Produce) -> None:
        results: list[Any] = [None] * len(frame.items)
        slots: list[int] = []
        for position, item in enumerate(frame.items):
            problem = p.channel_name_problem(item.channel)
            if problem is not None:
                results[position] = [item.produce_id, False, int(p.ErrorCode.INVALID_CHANNEL), problem]
            elif len(item.body) > self.max_message_bytes:
                results[position] = [
                    item.produce_id,
                    False,
                    int(p.ErrorCode.MESSAGE_TOO_LARGE),
                    f"message is {len(item.body)} bytes; this node accepts at most {self.max_message_bytes}",
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
                self._turn.produce.append(item)
                continue
            self.counters["items_rejected"] += 1
        if slots:
            self._turn.produce_waiters.append((routing_id, frame.request_id, results, slots))
        else:
            self._send(routing_id, p.encode_reply(frame.request_id, {"r": results}))

    # ------------------------------------------------------------------ answers

    def _answer_produce(self, waiters: list[tuple[bytes, int, list[Any], list[int]]]) -> ResultCallback:
        def answer(result: CommandResult) -> None:
            assert isinstance(result, list)
            outcomes = iter(result)
            for routing_id, rid, results, slots in waiters:
                for position in slots:
                    outcome = next(outcomes)
                    assert isinstance(outcome, ProduceOutcome)
                    results[position] = [
                        outcome.message_id,
                        outcome.duplicate,
                        int(outcome.code),
                        outcome.error,
                    ]
                self._send(routing_id, p.encode_reply(rid, {"r": results}))

        return answer

    def _answer_acks(self, waiters: list[tuple[bytes, int, int]]) -> ResultCallback:
        def answer(result: CommandResult) -> None:
            assert isinstance(result, list)
            position = 0
            for routing_id, rid, count in waiters:
                codes = [int(code) for code in result[position : position + count]]  # type: ignore[arg-type]
                position += count
                self._send(routing_id, p.encode_reply(rid, {"codes": codes}))

        return answer

    def _deliver(self, result: CommandResult) -> None:
        assert isinstance(result, list)
        if not result:
            return
        first = result[0]
        assert isinstance(first, Leased)
        session = self.scheduler.sessions.get(first.session)
        if session is None or session.routing_id is None:
            return  # the session went away; the leases expire with it
        self._send_deliveries(session.routing_id, first.subscription_id, result)  # type: ignore[arg-type]

    def _redeliver(self, session: Session) -> None:
        """Send a (re-)attached session every lease it holds again: deliveries may have been lost with the
        old connection, and a session holding leases it does not know of would stall on its credit.
        Clients ignore deliveries they are already handling (same seq and lease token)."""
        held = self.state.session_leases.get(session.session)
        if not held or session.routing_id is None:
            return
        by_subscription: dict[int, list[Leased]] = {}
        for lease in held.values():
            channel = self.state.channels_by_id[lease.chan_id]
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
        records = self.store.multi_get(
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
        self._send(routing_id, p.encode_deliver(subscription_id, rows), undelivered)

    def send_reply(self, routing_id: bytes, rid: int, result: dict[str, Any]) -> None:
        """Queue a reply to an admin request."""
        self._send(routing_id, p.encode_reply(rid, result))

    def send_error(self, routing_id: bytes, rid: int, code: p.ErrorCode, message: str) -> None:
        """Queue an error answer (a refused request: counted)."""
        self.counters["frames_rejected"] += 1
        self._send(routing_id, p.encode_error(rid, code, message))

    def propose(self, command: LogCommand, callback: ResultCallback) -> None:
        """Add an admin command to this turn's entry."""
        self._turn.add(command, callback)

    def session_for(self, routing_id: bytes) -> bytes:
        """The session key of a routing id."""
        return session_key(routing_id)

    @property
    def pid(self) -> int:
        """This process's id."""
        return os.getpid()
