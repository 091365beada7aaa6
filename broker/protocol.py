"""The zbroker wire protocol, version 1: the one place that knows how frames look.

Every ZeroMQ message between a client's DEALER and a node's ROUTER has exactly two frames:

    frame 0  header   4 bytes: b"ZB", protocol version (1), command code (``Command``)
    frame 1  payload  one BSON document whose fields depend on the command

The ROUTER's routing-id frame comes before them on the node side. ``docs/protocol.md`` describes every
command's fields. Decoding checks every field's presence and type and returns a frozen dataclass;
anything else raises ``FrameError`` carrying the ``ErrorCode`` to answer with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import bson
from bson.errors import BSONError
from bson.int64 import Int64

PROTOCOL_VERSION = 1
MAGIC = b"ZB"
HEADER_BYTES = 4
MAX_CHANNEL_NAME_CHARS = 200
MAX_PRODUCE_ID_CHARS = 64
MAX_HASH_BYTES = 256
MAX_REASON_CHARS = 1000
PRIORITY_MIN = -(2**31)
PRIORITY_MAX = 2**31 - 1
_U32_MAX = 2**32 - 1
# BSON int64 values decode as ``bson.int64.Int64`` (an int subclass); bool, also an int subclass, is not one.
_INTS = frozenset({int, Int64})
_U63_MAX = 2**63 - 1

_CHANNEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]*(/[A-Za-z0-9_][A-Za-z0-9_.:\-]*)*")


class Command(IntEnum):
    """The kind of a frame, carried in the last byte of the header."""

    # client -> node
    HELLO = 1
    HEARTBEAT = 2
    PRODUCE = 3
    SUBSCRIBE = 4
    UNSUBSCRIBE = 5
    ACK = 6
    NACK = 7
    BYE = 8
    ADMIN = 9
    # node -> client
    WELCOME = 20
    REPLY = 21
    DELIVER = 22
    ERROR = 23


class ErrorCode(IntEnum):
    """Why a node refused a frame or a part of it; ``client.errors`` maps each to an exception."""

    OK = 0
    MALFORMED_FRAME = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_COMMAND = 3
    INVALID_CHANNEL = 4
    MESSAGE_TOO_LARGE = 5
    INVALID_ARGUMENT = 6
    SESSION_UNKNOWN = 7
    STALE_LEASE = 8
    NOT_LEADER = 9
    UNAVAILABLE = 10
    INTERNAL = 11
    NOT_FOUND = 12
    INVALID_PAYLOAD = 13


class FrameError(Exception):
    """Raised when a frame cannot be decoded; carries the code the node answers with."""

    def __init__(self, code: ErrorCode, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# --------------------------------------------------------------------------- client -> node frames


@dataclass(frozen=True, slots=True)
class Hello:
    """Opens or re-attaches the session named by the sender's routing id."""

    session_timeout_ms: int
    client_name: str
    admin: bool = False  # an admin-only connection: any node accepts it and answers what it can


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Says the sender is alive; answered with a heartbeat."""


@dataclass(frozen=True, slots=True)
class ProduceItem:
    """One message to enqueue; ``dedup_ms`` > 0 asks for EXACTLY_ONCE over that window."""

    produce_id: str
    channel: str
    body: bytes
    priority: int
    delay_ms: int
    dedup_ms: int
    dedup_hash: bytes | None


@dataclass(frozen=True, slots=True)
class Produce:
    """A batch of messages to enqueue; answered with one result per item, in order."""

    request_id: int
    items: tuple[ProduceItem, ...]


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Starts (or updates) a consumer on a channel with ``max_parallel`` credit."""

    request_id: int
    subscription_id: int
    channel: str
    max_parallel: int
    max_attempts: int
    retry_backoff_ms: int
    retry_backoff_max_ms: int
    processing_timeout_ms: int


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stops a consumer; its leases stay until acked, nacked or the session ends."""

    request_id: int
    subscription_id: int


@dataclass(frozen=True, slots=True)
class LeaseRef:
    """Names one delivery: the message's sequence number and the lease token it came with."""

    seq: int
    lease_token: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Settles deliveries as done; answered with one error code per item."""

    request_id: int
    items: tuple[LeaseRef, ...]


@dataclass(frozen=True, slots=True)
class NackItem:
    """One delivery given back: ``release`` = not processed (no attempt counted), else failed."""

    seq: int
    lease_token: int
    release: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Nack:
    """Gives deliveries back for retry (with backoff) or immediate redelivery (``release``)."""

    request_id: int
    items: tuple[NackItem, ...]


@dataclass(frozen=True, slots=True)
class Bye:
    """Ends the session: every lease it holds is released at once."""


@dataclass(frozen=True, slots=True)
class Admin:
    """An administrative request such as ``stats`` or ``purge``; see ``docs/protocol.md``."""

    request_id: int
    op: str
    args: dict[str, Any]


ClientFrame = Hello | Heartbeat | Produce | Subscribe | Unsubscribe | Ack | Nack | Bye | Admin


# --------------------------------------------------------------------------- node -> client frames


@dataclass(frozen=True, slots=True)
class Welcome:
    """Answers HELLO with the session's terms."""

    node_id: str
    session_timeout_ms: int
    heartbeat_interval_ms: int
    max_message_bytes: int
    leader_endpoint: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The successful answer to a request; ``result``'s shape depends on the request."""

    request_id: int
    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One leased message as a consumer receives it."""

    seq: int
    lease_token: int
    attempt: int
    message_id: str
    produced_at_ms: int
    channel: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """Messages leased to one subscription."""

    subscription_id: int
    deliveries: tuple[Delivery, ...]


@dataclass(frozen=True, slots=True)
class Error:
    """A refusal: ``request_id`` is 0 when the frame was too broken to carry one."""

    request_id: int
    code: ErrorCode
    message: str
    leader_endpoint: str


NodeFrame = Welcome | Heartbeat | Reply | Deliver | Error


# --------------------------------------------------------------------------- validation helpers


_VALID_NAMES: set[str] = set()
_VALID_NAMES_KEPT = 4096


def channel_name_problem(name: object) -> str | None:
    """Say what is wrong with a channel name, or None when it is valid."""
    if isinstance(name, str) and name in _VALID_NAMES:
        return None
    problem = _channel_name_problem(name)
    if problem is None:
        if len(_VALID_NAMES) >= _VALID_NAMES_KEPT:
            _VALID_NAMES.clear()
        _VALID_NAMES.add(name)  # type: ignore[arg-type]
    return problem


def _channel_name_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"channel name must be a string, got {type(name).__name__}"
    if not name:
        return "channel name must not be empty"
    if len(name) > MAX_CHANNEL_NAME_CHARS:
        return f"channel name is {len(name)} characters; at most {MAX_CHANNEL_NAME_CHARS} are allowed"
    if _CHANNEL_NAME.fullmatch(name) is None:
        return (
            f"channel name {name!r} is invalid: use letters, digits and _ . : - in segments "
            "separated by single '/', not starting with '/', '.', ':' or '-'"
        )
    return None


def _header(command: Command) -> bytes:
    return MAGIC + bytes((PROTOCOL_VERSION, command))


_HEADERS = {command: _header(command) for command in Command}


def encode(command: Command, payload: dict[str, Any]) -> list[bytes]:
    """Encode one frame as its two ZeroMQ parts."""
    return [_HEADERS[command], bson.encode(payload)]


def decode_header(header: bytes) -> Command:
    """Check a header frame and return its command, or raise ``FrameError``."""
    if len(header) != HEADER_BYTES or header[:2] != MAGIC:
        raise FrameError(
            ErrorCode.MALFORMED_FRAME, "frame 0 is not a zbroker header (b'ZB', version, command)"
        )
    if header[2] != PROTOCOL_VERSION:
        raise FrameError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {header[2]} is not supported; this node speaks version {PROTOCOL_VERSION}",
        )
    try:
        return Command(header[3])
    except ValueError:
        raise FrameError(ErrorCode.UNKNOWN_COMMAND, f"unknown command code {header[3]}") from None


def _payload(frames: list[bytes]) -> dict[str, Any]:
    if len(frames) != 2:
        raise FrameError(
            ErrorCode.MALFORMED_FRAME, f"a frame has 2 parts (header, BSON payload), got {len(frames)}"
        )
    try:
        doc = bson.decode(frames[1])
    except (BSONError, ValueError, TypeError, OverflowError) as exc:
        raise FrameError(ErrorCode.MALFORMED_FRAME, f"frame 1 is not a valid BSON document: {exc}") from None
    return doc


class _Fields:
    """Reads typed fields from a decoded payload, naming the field in every error."""

    __slots__ = ("doc", "request_id", "where")

    def __init__(self, doc: dict[str, Any], where: str) -> None:
        self.doc = doc
        self.where = where
        self.request_id = 0

    def fail(self, message: str, code: ErrorCode = ErrorCode.MALFORMED_FRAME) -> FrameError:
        return FrameError(code, f"{self.where}: {message}", self.request_id)

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int:
        value = self.doc.get(name, default)
        if value is None:
            raise self.fail(f"field {name!r} is missing")
        if type(value) not in _INTS:
            raise self.fail(f"field {name!r} must be an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise self.fail(f"field {name!r} = {value} is outside {low}..{high}", ErrorCode.INVALID_ARGUMENT)
        return int(value)

    def string(self, name: str, max_chars: int, default: str | None = None) -> str:
        value = self.doc.get(name, default)
        if value is None:
            raise self.fail(f"field {name!r} is missing")
        if not isinstance(value, str):
            raise self.fail(f"field {name!r} must be a string, got {type(value).__name__}")
        if len(value) > max_chars:
            raise self.fail(
                f"field {name!r} is longer than {max_chars} characters", ErrorCode.INVALID_ARGUMENT
            )
        return value

    def array(self, name: str, max_items: int) -> list[Any]:
        value = self.doc.get(name)
        if not isinstance(value, list):
            raise self.fail(f"field {name!r} must be an array")
        if not value:
            raise self.fail(f"field {name!r} must not be empty", ErrorCode.INVALID_ARGUMENT)
        if len(value) > max_items:
            raise self.fail(
                f"field {name!r} has {len(value)} items; at most {max_items}", ErrorCode.INVALID_ARGUMENT
            )
        return value

    def request(self) -> int:
        self.request_id = self.integer("rid", 1, _U32_MAX)
        return self.request_id


MAX_BATCH_ITEMS = 10_000


def _bytes_of(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, bytes | bytearray) else None


def decode_client(frames: list[bytes]) -> ClientFrame:
    """Decode a client's frame (without the routing id), or raise ``FrameError``."""
    command = decode_header(frames[0]) if frames else decode_header(b"")
    doc = _payload(frames)
    fields = _Fields(doc, command.name)
    match command:
        case Command.HELLO:
            admin = doc.get("admin", False)
            if not isinstance(admin, bool):
                raise fields.fail("field 'admin' must be a boolean")
            return Hello(
                fields.integer("session_timeout_ms", 0, 3_600_000, 0), fields.string("client", 200, ""), admin
            )
        case Command.HEARTBEAT:
            return Heartbeat()
        case Command.PRODUCE:
            rid = fields.request()
            items = tuple(
                _produce_item(fields, row, i) for i, row in enumerate(fields.array("items", MAX_BATCH_ITEMS))
            )
            return Produce(rid, items)
        case Command.SUBSCRIBE:
            rid = fields.request()
            return Subscribe(
                rid,
                fields.integer("sub", 1, _U32_MAX),
                fields.string("channel", 10 * MAX_CHANNEL_NAME_CHARS),
                fields.integer("max_parallel", 1, 100_000),
                fields.integer("max_attempts", 1, 1_000_000),
                fields.integer("retry_backoff_ms", 0, 86_400_000),
                fields.integer("retry_backoff_max_ms", 0, 86_400_000),
                fields.integer("processing_timeout_ms", 0, 86_400_000, 0),
            )
        case Command.UNSUBSCRIBE:
            rid = fields.request()
            return Unsubscribe(rid, fields.integer("sub", 1, _U32_MAX))
        case Command.ACK:
            rid = fields.request()
            refs = tuple(_lease_ref(fields, row) for row in fields.array("items", MAX_BATCH_ITEMS))
            return Ack(rid, refs)
        case Command.NACK:
            rid = fields.request()
            return Nack(rid, tuple(_nack_item(fields, row) for row in fields.array("items", MAX_BATCH_ITEMS)))
        case Command.BYE:
            return Bye()
        case Command.ADMIN:
            rid = fields.request()
            args = doc.get("args", {})
            if not isinstance(args, dict):
                raise fields.fail("field 'args' must be a document")
            return Admin(rid, fields.string("op", 64), args)
        case _:
            raise FrameError(ErrorCode.UNKNOWN_COMMAND, f"{command.name} is sent by nodes, not clients")


_MAX_DELAY_MS = 10 * 365 * 86_400_000
_MAX_DEDUP_MS = 365 * 86_400_000
_PRODUCE_FIELDS = ("id", "channel", "body", "priority", "delay_ms", "dedup_ms", "hash")


def _produce_item(fields: _Fields, row: Any, index: int) -> ProduceItem:
    """A produce item is the array [id, channel, body, priority, delay_ms, dedup_ms, hash | null]."""
    if type(row) is list and len(row) == 7:
        produce_id, channel, body, priority, delay_ms, dedup_ms, dedup_hash = row
        if (
            type(produce_id) is str
            and 0 < len(produce_id) <= MAX_PRODUCE_ID_CHARS
            and produce_id.isascii()
            and type(channel) is str
            and type(body) is bytes
            and type(priority) in _INTS
            and PRIORITY_MIN <= priority <= PRIORITY_MAX
            and type(delay_ms) in _INTS
            and 0 <= delay_ms <= _MAX_DELAY_MS
            and type(dedup_ms) in _INTS
            and 0 <= dedup_ms <= _MAX_DEDUP_MS
            and (dedup_hash is None or (type(dedup_hash) is bytes and 0 < len(dedup_hash) <= MAX_HASH_BYTES))
        ):
            return ProduceItem(
                produce_id, channel, body, int(priority), int(delay_ms), int(dedup_ms), dedup_hash
            )
    raise _produce_item_error(fields, row, index)


def _produce_item_error(fields: _Fields, row: Any, index: int) -> FrameError:
    """Say precisely what is wrong with a produce item that failed the fast check."""
    where = f"items[{index}]"
    if not isinstance(row, list) or len(row) != 7:
        return fields.fail(f"{where} must be the array [{', '.join(_PRODUCE_FIELDS)}]")
    item = _Fields(dict(zip(_PRODUCE_FIELDS, row, strict=True)), f"{fields.where} {where}")
    item.request_id = fields.request_id
    if not isinstance(row[2], bytes):
        return item.fail("field 'body' must be binary")
    if row[6] is not None and not (isinstance(row[6], bytes) and 0 < len(row[6]) <= MAX_HASH_BYTES):
        return item.fail(
            f"field 'hash' must be null or 1..{MAX_HASH_BYTES} bytes of binary", ErrorCode.INVALID_ARGUMENT
        )
    try:
        produce_id = item.string("id", MAX_PRODUCE_ID_CHARS)
        if not produce_id or not produce_id.isascii():
            return item.fail(
                f"field 'id' must be 1..{MAX_PRODUCE_ID_CHARS} ASCII characters", ErrorCode.INVALID_ARGUMENT
            )
        item.string("channel", 10 * MAX_CHANNEL_NAME_CHARS)
        item.integer("priority", PRIORITY_MIN, PRIORITY_MAX)
        item.integer("delay_ms", 0, _MAX_DELAY_MS)
        item.integer("dedup_ms", 0, _MAX_DEDUP_MS)
    except FrameError as exc:
        return exc
    return item.fail("invalid item")


def _is_u63(value: Any) -> bool:
    return type(value) in _INTS and 0 <= value <= _U63_MAX


def _lease_ref(fields: _Fields, row: Any) -> LeaseRef:
    if not (isinstance(row, list) and len(row) == 2 and _is_u63(row[0]) and _is_u63(row[1])):
        raise fields.fail("each item must be [seq, lease_token] with non-negative integers")
    return LeaseRef(int(row[0]), int(row[1]))


def _nack_item(fields: _Fields, row: Any) -> NackItem:
    if not (
        isinstance(row, list)
        and len(row) == 4
        and _is_u63(row[0])
        and _is_u63(row[1])
        and isinstance(row[2], bool)
        and isinstance(row[3], str)
    ):
        raise fields.fail("each item must be [seq, lease_token, release: bool, reason: string]")
    return NackItem(int(row[0]), int(row[1]), row[2], row[3][:MAX_REASON_CHARS])


_ERROR_CODES = frozenset(int(code) for code in ErrorCode)
_DELIVERY_TYPES = ((int, Int64), (int, Int64), (int, Int64), (str,), (int, Int64), (str,), (bytes,))


def _delivery(fields: _Fields, row: Any) -> Delivery:
    if not (
        type(row) is list
        and len(row) == 7
        and all(type(value) in types for value, types in zip(row, _DELIVERY_TYPES, strict=True))
    ):
        raise fields.fail(
            "each row of 'm' must be [seq, lease_token, attempt, id, produced_at_ms, channel, body]"
        )
    return Delivery(int(row[0]), int(row[1]), int(row[2]), row[3], int(row[4]), row[5], row[6])


def decode_node(frames: list[bytes]) -> NodeFrame:
    """Decode a node's frame on the client side, or raise ``FrameError``."""
    command = decode_header(frames[0]) if frames else decode_header(b"")
    doc = _payload(frames)
    fields = _Fields(doc, command.name)
    match command:
        case Command.WELCOME:
            return Welcome(
                fields.string("node", 200),
                fields.integer("session_timeout_ms", 0, 2**62),
                fields.integer("heartbeat_ms", 0, 2**62),
                fields.integer("max_message_bytes", 0, 2**62),
                fields.string("leader", 1000, ""),
            )
        case Command.HEARTBEAT:
            return Heartbeat()
        case Command.REPLY:
            return Reply(fields.integer("rid", 0, _U32_MAX), doc)
        case Command.DELIVER:
            rows = doc.get("m")
            if not isinstance(rows, list):
                raise fields.fail("field 'm' must be an array")
            return Deliver(fields.integer("sub", 0, _U32_MAX), tuple(_delivery(fields, row) for row in rows))
        case Command.ERROR:
            code = fields.integer("code", 0, 255)
            return Error(
                fields.integer("rid", 0, _U32_MAX, 0),
                ErrorCode(code) if code in _ERROR_CODES else ErrorCode.INTERNAL,
                fields.string("message", 100_000, ""),
                fields.string("leader", 1000, ""),
            )
        case _:
            raise FrameError(ErrorCode.UNKNOWN_COMMAND, f"{command.name} is sent by clients, not nodes")


# --------------------------------------------------------------------------- encoders


def encode_hello(session_timeout_ms: int, client_name: str, *, admin: bool = False) -> list[bytes]:
    """Encode HELLO."""
    return encode(
        Command.HELLO, {"session_timeout_ms": session_timeout_ms, "client": client_name, "admin": admin}
    )


HEARTBEAT_FRAME = encode(Command.HEARTBEAT, {})
BYE_FRAME = encode(Command.BYE, {})


def encode_produce(request_id: int, items: list[list[Any]]) -> list[bytes]:
    """Encode PRODUCE; each item is [id, channel, body, priority, delay_ms, dedup_ms, hash | None]."""
    return encode(Command.PRODUCE, {"rid": request_id, "items": items})


def encode_ack(request_id: int, refs: list[tuple[int, int]]) -> list[bytes]:
    """Encode ACK for (seq, lease_token) pairs."""
    return encode(Command.ACK, {"rid": request_id, "items": refs})


def encode_nack(request_id: int, items: list[tuple[int, int, bool, str]]) -> list[bytes]:
    """Encode NACK for (seq, lease_token, release, reason) rows."""
    return encode(Command.NACK, {"rid": request_id, "items": items})


def encode_error(request_id: int, code: ErrorCode, message: str, leader_endpoint: str = "") -> list[bytes]:
    """Encode ERROR."""
    return encode(
        Command.ERROR, {"rid": request_id, "code": int(code), "message": message, "leader": leader_endpoint}
    )


def encode_reply(request_id: int, result: dict[str, Any]) -> list[bytes]:
    """Encode REPLY; the result's fields sit beside ``rid``."""
    return encode(Command.REPLY, {"rid": request_id, **result})


def encode_deliver(
    subscription_id: int, rows: list[tuple[int, int, int, str, int, str, bytes]]
) -> list[bytes]:
    """Encode DELIVER; each row is (seq, lease_token, attempt, message_id, produced_at_ms, channel, body)."""
    return encode(Command.DELIVER, {"sub": subscription_id, "m": rows})
