"""A bare DEALER speaking the wire protocol, for tests that go beneath the client library."""

from __future__ import annotations

import itertools
import os
from typing import Any

import zmq

from broker import protocol as p


class RawClient:
    """Blocking, one frame at a time; every receive has a timeout."""

    def __init__(self, endpoint: str, routing_id: bytes | None = None) -> None:
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTING_ID, routing_id or b"R" + os.urandom(15))
        self.socket.connect(endpoint)
        self._rids = itertools.count(1)

    def close(self) -> None:
        self.socket.close(0)

    def send(self, command: p.Command, payload: dict[str, Any]) -> None:
        self.socket.send_multipart(p.encode(command, payload))

    def send_raw(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def recv(self, timeout_s: float = 5.0) -> p.NodeFrame:
        if not self.socket.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no frame within {timeout_s}s")
        return p.decode_node(self.socket.recv_multipart())

    def recv_kind(self, kind: type[Any], timeout_s: float = 5.0) -> Any:
        """The next frame of ``kind``, skipping heartbeats and others."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            frame = self.recv(max(deadline - time.monotonic(), 0.001))
            if isinstance(frame, kind):
                return frame

    def hello(self, session_timeout_ms: int = 0) -> p.Welcome:
        self.send(p.Command.HELLO, {"session_timeout_ms": session_timeout_ms, "client": "raw"})
        welcome: p.Welcome = self.recv_kind(p.Welcome)
        return welcome

    def request(
        self, command: p.Command, payload: dict[str, Any], timeout_s: float = 5.0
    ) -> p.Reply | p.Error:
        rid = next(self._rids)
        self.send(command, {"rid": rid, **payload})
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            frame = self.recv(max(deadline - time.monotonic(), 0.001))
            if isinstance(frame, p.Reply | p.Error) and frame.request_id == rid:
                return frame
