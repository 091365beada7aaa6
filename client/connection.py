"""The client's one connection to the cluster: a DEALER socket with heartbeats, batching and retries.

Paranoid Pirate style: both sides heartbeat on the traffic socket and any frame counts as a sign of
life; a node silent for ``LIVENESS`` heartbeats is abandoned for the next endpoint. Every request
carries ids that make it safe to send again (produce ids, lease tokens), so after a reconnect, a
NOT_LEADER answer or a lost frame the connection simply sends everything in flight again, until each
caller's own deadline.

Produces, acks and nacks issued in the same event-loop iteration travel in one frame. The socket is a
plain (non-asyncio) ZeroMQ socket whose file descriptor the event loop watches: replies resolve the
callers' futures straight from the reader callback, with no task in between.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from broker import protocol as p
from client.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    NotLeaderError,
    SessionUnknownError,
    error_from_code,
)

log = logging.getLogger("zbroker.client")

LIVENESS = 3
RESEND_AFTER_S = 3.0
CONNECT_TIMEOUT_S = 2.0
MAX_BATCH_ITEMS = 1000
EARLY_FLUSH_ITEMS = 32
RETRY_PAUSE_S = 0.05
DEFAULT_REQUEST_TIMEOUT_S = 30.0
REDIRECT_PAUSE_S = 0.05
MAX_REDIRECT_PAUSE_S = 0.1  # between attempts while no node answers as leader (an election)
_RETRIABLE_CODES = frozenset({p.ErrorCode.NOT_LEADER, p.ErrorCode.UNAVAILABLE, p.ErrorCode.SESSION_UNKNOWN})
_BATCHED = (p.Command.PRODUCE, p.Command.ACK, p.Command.NACK)


class ConnectionState(Enum):
    """Where the connection is in its life."""

    IDLE = "idle"
    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"


@dataclass(slots=True)
class _Item:
    """One produce, ack or nack in a batch, with its caller's future and deadline."""

    wire: Any
    future: asyncio.Future[Any]
    deadline: float


@dataclass(slots=True)
class _Request:
    """A frame awaiting its reply; re-sent as is until answered or past its deadline.

    A single request resolves ``future`` with the reply; a batch resolves each item's future.
    """

    command: p.Command
    payload: dict[str, Any]
    future: asyncio.Future[dict[str, Any]] | None
    items: list[_Item] | None = None
    sent_at: float = 0.0
    sends: int = 0


@dataclass(slots=True)
class _Batcher:
    """Items of one kind gathered during an event-loop iteration."""

    command: p.Command
    items: list[_Item] = field(default_factory=list)
    scheduled: bool = False


class Connection:
    """A session with one node of the cluster at a time, following the leader."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        session_timeout_s: float,
        client_name: str,
        on_deliver: Callable[[p.Deliver], None],
        on_session: Callable[[], Awaitable[None]],
        admin: bool = False,
    ) -> None:
        if not endpoints:
            raise BrokerConnectionError("no endpoints given: pass e.g. 'tcp://127.0.0.1:7101'")
        self.endpoints = list(endpoints)
        self.session_timeout_s = session_timeout_s
        self.client_name = client_name
        self.admin = admin
        self.routing_id = b"Z" + os.urandom(15)
        self.state = ConnectionState.IDLE
        self.node_id = ""
        self.max_message_bytes = 16 << 20
        self.heartbeat_interval_s = 1.0
        self._on_deliver = on_deliver
        self._on_session = on_session
        self._endpoint_index = 0
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rids = itertools.count(1)
        self._inflight: dict[int, _Request] = {}
        self._batchers = {command: _Batcher(command) for command in _BATCHED}
        self._welcome: asyncio.Future[p.Welcome] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._redirected = False  # the last failed HELLO was answered with the leader's endpoint
        self._last_received = 0.0

    # ------------------------------------------------------------------ life cycle

    async def start(self, timeout_s: float) -> None:
        """Connect to the first node that answers; raise ``BrokerConnectionError`` if none does."""
        if self.state is not ConnectionState.IDLE:
            return
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        while not await self._connect_once():
            if time.monotonic() >= deadline:
                self.state = ConnectionState.IDLE
                raise BrokerConnectionError(
                    f"no zbroker node answered as leader at {', '.join(self.endpoints)} "
                    f"within {timeout_s:g}s; is `brokerctl serve` running there?"
                )
            await asyncio.sleep(REDIRECT_PAUSE_S)
        self._keepalive_task = asyncio.create_task(self._keepalive(), name="zbroker-keepalive")

    async def close(self) -> None:
        """Say goodbye (the node releases this session's leases at once) and close the socket."""
        if self.state is ConnectionState.CLOSED:
            return
        if self.state is ConnectionState.READY:
            self._send(p.BYE_FRAME)
        self.state = ConnectionState.CLOSED
        for task in (self._keepalive_task, self._reconnecting):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._close_socket()
        closed = BrokerConnectionError("the connection was closed")
        for request in self._inflight.values():
            _fail_request(request, closed)
        self._inflight.clear()
        for batcher in self._batchers.values():
            _fail_items(batcher.items, closed)
            batcher.items.clear()

    def _close_socket(self) -> None:
        loop_open = self._loop is not None and not self._loop.is_closed()
        if self._monitor is not None:
            if loop_open:
                assert self._loop is not None
                self._loop.remove_reader(self._monitor.FD)
            self._monitor.close(0)
            self._monitor = None
        if self._socket is not None:
            if loop_open:
                assert self._loop is not None
                self._loop.remove_reader(self._socket.FD)
            self._socket.disable_monitor()
            self._socket.close(0)
            self._socket = None

    def _on_monitor(self) -> None:
        """The TCP connection under the socket dropped: a dead node is noticed now, not after heartbeats."""
        monitor = self._monitor
        while monitor is not None and monitor is self._monitor:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            kind = event["event"]
            if kind == zmq.EVENT_DISCONNECTED and self.state is ConnectionState.READY:
                self._reconnect(f"lost the connection to node {self.node_id}")
                return
            if kind == zmq.EVENT_CONNECT_RETRIED and self._welcome is not None and not self._welcome.done():
                # Nothing listens there (a dead node): try the next endpoint now rather than time out.
                self._welcome.set_exception(BrokerConnectionError("connection refused"))
                return

    def _follow(self, endpoint: str | None) -> None:
        """Point at the leader's endpoint when known, else at the next endpoint of the list."""
        if endpoint:
            if endpoint not in self.endpoints:
                self.endpoints.append(endpoint)
            self._endpoint_index = self.endpoints.index(endpoint)
        else:
            self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)

    async def _connect_once(self) -> bool:
        """Open a socket to the current endpoint and exchange HELLO/WELCOME; on failure point elsewhere."""
        assert self._loop is not None
        self.state = ConnectionState.CONNECTING
        self._close_socket()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self.routing_id)
        socket.setsockopt(zmq.SNDHWM, 100_000)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        self._monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        self._loop.add_reader(self._monitor.FD, self._on_monitor)
        socket.connect(self.endpoints[self._endpoint_index])
        self._socket = socket
        self._loop.add_reader(socket.FD, self._on_readable)
        self._welcome = self._loop.create_future()
        try:
            socket.send_multipart(
                p.encode_hello(int(self.session_timeout_s * 1000), self.client_name, admin=self.admin),
                zmq.NOBLOCK,
            )
            self._loop.call_soon(self._on_readable)
            # A ZeroMQ socket's FD signals only after its events were read once: without this first
            # read, a refused connection or a dropped one is seen by the keepalive timer, not at once.
            self._loop.call_soon(self._on_monitor)
            welcome = await asyncio.wait_for(asyncio.shield(self._welcome), CONNECT_TIMEOUT_S)
        except NotLeaderError as exc:
            self._close_socket()
            tried = self.endpoints[self._endpoint_index]
            self._follow(exc.leader_endpoint)
            self._redirected = bool(exc.leader_endpoint) and exc.leader_endpoint != tried
            return False
        except (TimeoutError, zmq.ZMQError, BrokerConnectionError):
            self._close_socket()
            self._follow(None)
            return False
        self.node_id = welcome.node_id
        self.max_message_bytes = welcome.max_message_bytes
        self.heartbeat_interval_s = max(welcome.heartbeat_interval_ms / 1000, 0.01)
        self._last_received = time.monotonic()
        self.state = ConnectionState.READY
        await self._on_session()
        for rid, request in list(self._inflight.items()):
            self._send_request(rid, request)
        for batcher in self._batchers.values():
            if batcher.items:
                self._flush_batch(batcher)
        return True

    def _reconnect(self, reason: str, endpoint: str | None = None) -> None:
        """Start moving to another node (the leader's endpoint when known) unless already doing so."""
        if self.state is ConnectionState.CLOSED or (self._reconnecting and not self._reconnecting.done()):
            return
        self._follow(endpoint)
        log.info("reconnecting to %s: %s", self.endpoints[self._endpoint_index], reason)
        self.state = ConnectionState.CONNECTING
        self._reconnecting = asyncio.create_task(self._reconnect_loop(), name="zbroker-reconnect")

    async def _reconnect_loop(self) -> None:
        """Try nodes until one welcomes us as leader. A redirect to the leader's endpoint is followed at
        once (one in a row: stale views may point in a circle); otherwise wait a little longer each
        time, up to ``MAX_REDIRECT_PAUSE_S``, so a client finds the new leader soon after an election."""
        pause = REDIRECT_PAUSE_S
        followed = False
        while self.state is not ConnectionState.CLOSED:
            self._redirected = False
            if await self._connect_once():
                return
            if self._redirected and not followed:
                followed = True
                continue
            followed = False
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_REDIRECT_PAUSE_S)

    async def _keepalive(self) -> None:
        """Send heartbeats, detect a silent node, re-send what was not answered, expire what is late."""
        while self.state is not ConnectionState.CLOSED:
            await asyncio.sleep(min(self.heartbeat_interval_s, 0.5))
            self._on_readable()  # a safety net should a read edge ever be missed
            self._on_monitor()
            now = time.monotonic()
            self._expire(now)
            if self.state is not ConnectionState.READY:
                continue
            if now - self._last_received > LIVENESS * self.heartbeat_interval_s:
                self._reconnect(f"node {self.node_id} silent for {now - self._last_received:.1f}s")
                continue
            self._send(p.HEARTBEAT_FRAME)
            for rid, request in list(self._inflight.items()):
                if now - request.sent_at > RESEND_AFTER_S:
                    self._send_request(rid, request)

    def _expire(self, now: float) -> None:
        for rid, request in list(self._inflight.items()):
            if request.items is None:
                continue
            for item in request.items:
                if item.deadline <= now and not item.future.done():
                    item.future.set_exception(BrokerTimeoutError("no answer from the cluster in time"))
            if all(item.future.done() for item in request.items):
                del self._inflight[rid]

    # ------------------------------------------------------------------ sending

    def _send(self, frames: list[bytes]) -> None:
        socket = self._socket
        if socket is None:
            return
        try:
            socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # queue full or socket gone: the resend timer tries again
            log.debug("send failed: %s", exc)
            return
        # Sending may consume the socket's read edge; look for replies that arrived meanwhile.
        if int(socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN and self._loop is not None:
            self._loop.call_soon(self._on_readable)

    def _send_request(self, rid: int, request: _Request) -> None:
        request.sent_at = time.monotonic()
        request.sends += 1
        if self.state is ConnectionState.READY:
            self._send(p.encode(request.command, {"rid": rid, **request.payload}))

    async def request(
        self, command: p.Command, payload: dict[str, Any], timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    ) -> dict[str, Any]:
        """Send one request and wait for its reply, re-sending it after reconnects, up to ``timeout_s``."""
        if self.state is ConnectionState.CLOSED:
            raise BrokerConnectionError("the connection is closed")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        rid = next(self._rids)
        request = _Request(command, payload, future)
        self._inflight[rid] = request
        self._send_request(rid, request)
        try:
            return await asyncio.wait_for(future, max(timeout_s, 0.001))
        except TimeoutError:
            raise BrokerTimeoutError(
                f"{command.name} got no answer from the cluster within {timeout_s:g}s "
                f"(last node: {self.node_id or 'none'})"
            ) from None
        finally:
            self._inflight.pop(rid, None)

    def enqueue(
        self, command: p.Command, wire: Any, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    ) -> asyncio.Future[Any]:
        """Add one item to this loop iteration's PRODUCE, ACK or NACK batch; its future gets the answer."""
        if self.state is ConnectionState.CLOSED:
            raise BrokerConnectionError("the connection is closed")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        batcher = self._batchers[command]
        batcher.items.append(_Item(wire, future, time.monotonic() + timeout_s))
        if len(batcher.items) >= EARLY_FLUSH_ITEMS:
            # Send part of a large burst now so the node works on it while the rest is being prepared.
            self._flush_batch(batcher)
        elif not batcher.scheduled:
            batcher.scheduled = True
            self._loop.call_soon(self._flush_batch, batcher)
        return future

    def _flush_batch(self, batcher: _Batcher) -> None:
        batcher.scheduled = False
        if self.state is not ConnectionState.READY:
            return  # sent by _connect_once once a session exists
        items = [item for item in batcher.items if not item.future.done()]
        batcher.items.clear()
        measure = batcher.command is p.Command.PRODUCE
        while items:
            chunk: list[_Item] = []
            size = 0
            for item in items:
                item_bytes = len(item.wire[2]) if measure else 32
                if chunk and (len(chunk) >= MAX_BATCH_ITEMS or size + item_bytes > self.max_message_bytes):
                    break
                chunk.append(item)
                size += item_bytes
            items = items[len(chunk) :]
            rid = next(self._rids)
            request = _Request(batcher.command, {"items": [item.wire for item in chunk]}, None, chunk)
            self._inflight[rid] = request
            self._send_request(rid, request)

    def _retry_later(self, command: p.Command, items: list[_Item]) -> None:
        def requeue() -> None:
            batcher = self._batchers[command]
            batcher.items.extend(items)
            self._flush_batch(batcher)

        assert self._loop is not None
        self._loop.call_later(RETRY_PAUSE_S, requeue)

    # ------------------------------------------------------------------ receiving

    def _on_readable(self) -> None:
        socket = self._socket
        while socket is not None and socket is self._socket:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            self._last_received = time.monotonic()
            try:
                frame = p.decode_node(frames)
            except p.FrameError as exc:
                log.warning("ignored a malformed frame from the node: %s", exc.message)
                continue
            try:
                self._dispatch(frame)
            except Exception:  # a bug in one answer must not stop the reader
                log.exception("failed to handle a frame from the node")

    def _dispatch(self, frame: p.NodeFrame) -> None:
        match frame:
            case p.Deliver():
                self._on_deliver(frame)
            case p.Reply(rid, result):
                request = self._inflight.get(rid)
                if request is None:
                    return
                if request.items is None:
                    if request.future is not None and not request.future.done():
                        request.future.set_result(result)
                    return
                del self._inflight[rid]
                self._answer_items(request, result)
            case p.Heartbeat():
                pass
            case p.Welcome():
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_result(frame)
            case p.Error(rid, code, message, leader):
                self._on_error(rid, code, message, leader)

    def _answer_items(self, request: _Request, result: dict[str, Any]) -> None:
        assert request.items is not None
        is_produce = request.command is p.Command.PRODUCE
        answers = result.get("r") if is_produce else result.get("codes")
        if not isinstance(answers, list) or len(answers) != len(request.items):
            _fail_items(
                request.items, BrokerError(f"the node answered {request.command.name} with a malformed reply")
            )
            return
        retry: list[_Item] = []
        for item, answer in zip(request.items, answers, strict=True):
            if item.future.done():
                continue
            code = answer[2] if is_produce else answer
            if code in _RETRIABLE_CODES:
                retry.append(item)
            elif code == p.ErrorCode.STALE_LEASE and request.command is p.Command.ACK and request.sends > 1:
                # An ack sent again (after a reconnect or failover) whose first copy was applied finds no
                # lease any more: it is done, not refused.
                item.future.set_result(int(p.ErrorCode.OK))
            else:
                item.future.set_result(answer)
        if retry:
            self._retry_later(request.command, retry)

    def _on_error(self, rid: int, code: p.ErrorCode, message: str, leader: str) -> None:
        error = error_from_code(code, message, leader or None)
        welcome = self._welcome
        if (
            self.state is ConnectionState.CONNECTING
            and welcome is not None
            and not welcome.done()
            and isinstance(error, NotLeaderError)
        ):
            welcome.set_exception(error)  # HELLO went to a follower: _connect_once follows the hint
            return
        if isinstance(error, NotLeaderError):
            self._reconnect(f"node {self.node_id} is not the leader", error.leader_endpoint)
            return  # the request stays in flight and is re-sent to the leader
        if isinstance(error, SessionUnknownError):
            # The node restarted or forgot us: say HELLO again, re-subscribe, re-send what is in flight.
            if self.state is ConnectionState.READY:
                self.state = ConnectionState.CONNECTING
                self._reconnecting = asyncio.create_task(self._reconnect_loop(), name="zbroker-rehello")
            return
        request = self._inflight.get(rid)
        if request is None:
            log.warning("node %s refused a frame: %s", self.node_id, message)
            return
        if error.retriable:
            return  # re-sent by the keepalive timer
        del self._inflight[rid]
        _fail_request(request, error)


def _fail_items(items: list[_Item], error: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)


def _fail_request(request: _Request, error: BaseException) -> None:
    if request.future is not None and not request.future.done():
        request.future.set_exception(error)
    if request.items is not None:
        _fail_items(request.items, error)
