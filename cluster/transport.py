"""Peer transport: Raft messages between nodes over ZeroMQ.

Every node binds a ROUTER on its ``peer_endpoint`` and connects one DEALER (routing id = its node id)
to each other member's peer endpoint, and sends everything over that DEALER; so a node receives every
message on its ROUTER, the frame's routing id naming the sender. Frames: ``b"ZR" version kind`` then a
BSON payload. Every payload also carries ``i``: the sender's status (pid, role, indexes), which is how
the leader can report the whole cluster in ``cluster_status``. Anything undecodable is dropped and
counted, never fatal.
"""

from __future__ import annotations

import logging
from enum import IntEnum
from typing import Any

import bson
import zmq

from cluster.messages import (
    AppendRequest,
    AppendResponse,
    RaftMessage,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)

log = logging.getLogger("zbroker.peers")

PEER_PROTOCOL_VERSION = 1
_MAGIC = b"ZR"
MAX_PEER_FRAMES_PER_TURN = 5000


class PeerKind(IntEnum):
    """The kind of a peer frame."""

    VOTE_REQUEST = 1
    VOTE_RESPONSE = 2
    APPEND_REQUEST = 3
    APPEND_RESPONSE = 4
    SNAPSHOT_REQUEST = 5
    SNAPSHOT_RESPONSE = 6
    TIMEOUT_NOW = 7
    SNAPSHOT_CHUNK = 8
    SNAPSHOT_CHUNK_ACK = 9


_HEADERS = {kind: _MAGIC + bytes((PEER_PROTOCOL_VERSION, kind)) for kind in PeerKind}


def encode_message(message: RaftMessage) -> tuple[PeerKind, dict[str, Any]]:
    """The kind and BSON-able payload of a Raft message."""
    match message:
        case VoteRequest(term, candidate, last_index, last_term, pre_vote, transfer):
            return PeerKind.VOTE_REQUEST, {
                "t": term,
                "c": candidate,
                "li": last_index,
                "lt": last_term,
                "pv": pre_vote,
                "tr": transfer,
            }
        case VoteResponse(term, granted, pre_vote):
            return PeerKind.VOTE_RESPONSE, {"t": term, "g": granted, "pv": pre_vote}
        case AppendRequest(term, leader, prev_index, prev_term, entry_terms, commit_index, payloads):
            return PeerKind.APPEND_REQUEST, {
                "t": term,
                "l": leader,
                "pi": prev_index,
                "pt": prev_term,
                "et": list(entry_terms),
                "c": commit_index,
                "p": list(payloads),
            }
        case AppendResponse(term, success, match_index, hint_index):
            return PeerKind.APPEND_RESPONSE, {"t": term, "s": success, "m": match_index, "h": hint_index}
        case SnapshotRequest(term, leader, index, snapshot_term):
            return PeerKind.SNAPSHOT_REQUEST, {"t": term, "l": leader, "x": index, "st": snapshot_term}
        case SnapshotResponse(term, match_index):
            return PeerKind.SNAPSHOT_RESPONSE, {"t": term, "m": match_index}
        case TimeoutNow(term, leader):
            return PeerKind.TIMEOUT_NOW, {"t": term, "l": leader}
    raise TypeError(f"not a Raft message: {message!r}")


def decode_message(kind: PeerKind, doc: dict[str, Any]) -> RaftMessage:
    """Rebuild a Raft message; raises KeyError/TypeError/ValueError on a malformed payload."""
    match kind:
        case PeerKind.VOTE_REQUEST:
            return VoteRequest(
                int(doc["t"]), str(doc["c"]), int(doc["li"]), int(doc["lt"]), bool(doc["pv"]), bool(doc["tr"])
            )
        case PeerKind.VOTE_RESPONSE:
            return VoteResponse(int(doc["t"]), bool(doc["g"]), bool(doc["pv"]))
        case PeerKind.APPEND_REQUEST:
            terms = tuple(int(term) for term in doc["et"])
            payloads = tuple(bytes(payload) for payload in doc["p"])
            if len(terms) != len(payloads):
                raise ValueError("append request with mismatched terms and payloads")
            return AppendRequest(
                int(doc["t"]), str(doc["l"]), int(doc["pi"]), int(doc["pt"]), terms, int(doc["c"]), payloads
            )
        case PeerKind.APPEND_RESPONSE:
            return AppendResponse(int(doc["t"]), bool(doc["s"]), int(doc["m"]), int(doc["h"]))
        case PeerKind.SNAPSHOT_REQUEST:
            return SnapshotRequest(int(doc["t"]), str(doc["l"]), int(doc["x"]), int(doc["st"]))
        case PeerKind.SNAPSHOT_RESPONSE:
            return SnapshotResponse(int(doc["t"]), int(doc["m"]))
        case PeerKind.TIMEOUT_NOW:
            return TimeoutNow(int(doc["t"]), str(doc["l"]))
    raise ValueError(f"{kind.name} is not a Raft message")


class PeerTransport:
    """The ROUTER this node listens on and a DEALER to each peer."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        node_id: str,
        bind_endpoint: str,
        peer_endpoints: dict[str, str],
    ) -> None:
        self.node_id = node_id
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.bind(bind_endpoint)
        self._context = context
        self.dealers: dict[str, tuple[str, zmq.Socket[bytes]]] = {}
        self.set_peers(peer_endpoints)
        self.dropped_frames = 0
        self.sent_frames = 0

    def set_peers(self, peer_endpoints: dict[str, str]) -> None:
        """Connect to new peers and drop the ones no longer members (membership changes)."""
        for peer in [peer for peer in self.dealers if peer not in peer_endpoints]:
            self.dealers.pop(peer)[1].close(0)
        for peer, endpoint in peer_endpoints.items():
            known = self.dealers.get(peer)
            if known is not None and known[0] == endpoint:
                continue
            if known is not None:
                known[1].close(0)
            dealer = self._context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.ROUTING_ID, self.node_id.encode())
            # Queue nothing for a peer that is not connected: Raft retransmits what matters, and a stale
            # backlog delivered on reconnect would only be rejected.
            dealer.setsockopt(zmq.IMMEDIATE, 1)
            dealer.setsockopt(zmq.SNDHWM, 1000)
            dealer.setsockopt(zmq.RECONNECT_IVL, 100)
            dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            dealer.setsockopt(zmq.HEARTBEAT_IVL, 500)
            dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2000)
            dealer.connect(endpoint)
            self.dealers[peer] = (endpoint, dealer)

    def send(self, peer: str, kind: PeerKind, payload: dict[str, Any], info: dict[str, Any]) -> bool:
        """Send one frame to a peer; False when it could not be queued (peer unreachable or backed up)."""
        known = self.dealers.get(peer)
        if known is None:
            return False
        dealer = known[1]
        payload["i"] = info
        try:
            dealer.send_multipart([_HEADERS[kind], bson.encode(payload)], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        self.sent_frames += 1
        return True

    def receive(self) -> list[tuple[str, PeerKind, dict[str, Any]]]:
        """Every frame waiting on the ROUTER, decoded to (sender, kind, payload)."""
        received = []
        for _ in range(MAX_PEER_FRAMES_PER_TURN):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                sender = frames[0].decode()
                header = frames[1]
                if (
                    len(frames) != 3
                    or len(header) != 4
                    or header[:2] != _MAGIC
                    or header[2] != PEER_PROTOCOL_VERSION
                ):
                    raise ValueError("not a zbroker peer frame")
                received.append((sender, PeerKind(header[3]), bson.decode(frames[2])))
            except (ValueError, UnicodeDecodeError, IndexError, bson.errors.BSONError) as exc:
                self.dropped_frames += 1
                log.warning("dropped a malformed peer frame: %s", exc)
        return received

    def close(self) -> None:
        """Close every socket."""
        for _, dealer in self.dealers.values():
            dealer.close(0)
        self.router.close(0)
