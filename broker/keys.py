"""Storage layout: column families and big-endian key and value packing.

Keys are packed big-endian so RocksDB's byte order is queue order:

    messages      chan(4) seq(8)                         -> MessageRecord
    ready         chan(4) inv_priority(4) ready_ms(8) seq(8) -> attempts(2)
    delayed       chan(4) due_ms(8) seq(8)               -> priority(4, signed) attempts(2)
    leases        seq(8)                                 -> LeaseRecord
    dead          chan(4) seq(8)                         -> attempts(2) dead_at_ms(8) reason(utf-8)
    pids          bucket(8) produce_id(utf-8)            -> duplicate(1) message_id(utf-8)
    dedup         chan(4) hash                           -> expires_ms(8) message_id(utf-8)
    dedup_expiry  expires_ms(8) chan(4) hash             -> b""
    channels      name(utf-8)                            -> ChannelRecord
    state         name                                   -> counters (applied index, next seq, ...)
    log           index(8)                               -> log entry (BSON)
    raft          name                                   -> term, vote (synced writes)

``inv_priority`` is ``PRIORITY_MAX - priority`` as unsigned, so higher priorities sort first.
"""

from __future__ import annotations

import struct
from enum import StrEnum

from broker.protocol import PRIORITY_MAX


class Cf(StrEnum):
    """The column families of a node's RocksDB."""

    LOG = "log"
    RAFT = "raft"
    STATE = "state"
    CHANNELS = "channels"
    MESSAGES = "messages"
    READY = "ready"
    DELAYED = "delayed"
    LEASES = "leases"
    DEAD = "dead"
    PIDS = "pids"
    DEDUP = "dedup"
    DEDUP_EXPIRY = "dedup_expiry"


STATE_MACHINE_CFS = (
    Cf.STATE,
    Cf.CHANNELS,
    Cf.MESSAGES,
    Cf.READY,
    Cf.DELAYED,
    Cf.LEASES,
    Cf.DEAD,
    Cf.PIDS,
    Cf.DEDUP,
    Cf.DEDUP_EXPIRY,
)

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
_CHAN_SEQ = struct.Struct(">IQ")
_READY = struct.Struct(">IIQQ")
_DELAYED = struct.Struct(">IQQ")
_DELAYED_VALUE = struct.Struct(">iH")
_ATTEMPTS = struct.Struct(">H")
_DEAD_VALUE = struct.Struct(">HQ")
_DEDUP_VALUE = struct.Struct(">Q")
_MESSAGE_HEADER = struct.Struct(">QiB")  # produced_at_ms, priority, len(message_id)
_LEASE = struct.Struct(">I16sIQHQHIIiQ")
_PRIORITY_BIAS = 2**31
MAX_ATTEMPTS_STORED = 65_535
END = b"\xff" * 8


def chan_prefix(chan_id: int) -> bytes:
    """The key prefix of one channel in the per-channel column families."""
    return U32.pack(chan_id)


def chan_range(chan_id: int) -> tuple[bytes, bytes]:
    """[start, end) of one channel's keys."""
    return U32.pack(chan_id), U32.pack(chan_id + 1)


def message_key(chan_id: int, seq: int) -> bytes:
    """Key of a message body."""
    return _CHAN_SEQ.pack(chan_id, seq)


def unpack_chan_seq(key: bytes) -> tuple[int, int]:
    """(chan_id, seq) of a message or dead-letter key."""
    chan_id, seq = _CHAN_SEQ.unpack(key)
    return int(chan_id), int(seq)


def ready_key(chan_id: int, priority: int, ready_ms: int, seq: int) -> bytes:
    """Key in the ready index: priority (high first), then ready time, then produce order."""
    return _READY.pack(chan_id, PRIORITY_MAX - priority, ready_ms, seq)


def unpack_ready_key(key: bytes) -> tuple[int, int, int, int]:
    """(chan_id, priority, ready_ms, seq) of a ready key."""
    chan_id, inv, ready_ms, seq = _READY.unpack(key)
    return int(chan_id), PRIORITY_MAX - int(inv), int(ready_ms), int(seq)


def delayed_key(chan_id: int, due_ms: int, seq: int) -> bytes:
    """Key in the delayed index: due time, then produce order."""
    return _DELAYED.pack(chan_id, due_ms, seq)


def unpack_delayed_key(key: bytes) -> tuple[int, int, int]:
    """(chan_id, due_ms, seq) of a delayed key."""
    chan_id, due_ms, seq = _DELAYED.unpack(key)
    return int(chan_id), int(due_ms), int(seq)


def pack_delayed_value(priority: int, attempts: int) -> bytes:
    """Value of a delayed entry."""
    return _DELAYED_VALUE.pack(priority, min(attempts, MAX_ATTEMPTS_STORED))


def unpack_delayed_value(value: bytes) -> tuple[int, int]:
    """(priority, attempts) of a delayed entry."""
    priority, attempts = _DELAYED_VALUE.unpack(value)
    return int(priority), int(attempts)


def pack_attempts(attempts: int) -> bytes:
    """Value of a ready entry: how many deliveries the message had so far."""
    return _ATTEMPTS.pack(min(attempts, MAX_ATTEMPTS_STORED))


def unpack_attempts(value: bytes) -> int:
    """Attempts of a ready entry."""
    return int(_ATTEMPTS.unpack(value)[0])


def pack_message(produced_at_ms: int, priority: int, message_id: str, body: bytes) -> bytes:
    """Value of a message: header, id, BSON body."""
    mid = message_id.encode()
    return _MESSAGE_HEADER.pack(produced_at_ms, priority, len(mid)) + mid + body


def unpack_message(value: bytes) -> tuple[int, int, str, bytes]:
    """(produced_at_ms, priority, message_id, body) of a stored message."""
    produced_at_ms, priority, id_len = _MESSAGE_HEADER.unpack_from(value)
    start = _MESSAGE_HEADER.size
    return (
        int(produced_at_ms),
        int(priority),
        value[start : start + id_len].decode(),
        value[start + id_len :],
    )


def pack_dead(attempts: int, dead_at_ms: int, reason: str) -> bytes:
    """Value of a dead letter."""
    return _DEAD_VALUE.pack(min(attempts, MAX_ATTEMPTS_STORED), dead_at_ms) + reason.encode()


def unpack_dead(value: bytes) -> tuple[int, int, str]:
    """(attempts, dead_at_ms, reason) of a dead letter."""
    attempts, dead_at_ms = _DEAD_VALUE.unpack_from(value)
    return int(attempts), int(dead_at_ms), value[_DEAD_VALUE.size :].decode(errors="replace")


def pid_key(bucket: int, produce_id: str) -> bytes:
    """Key remembering a produce id within its time bucket."""
    return U64.pack(bucket) + produce_id.encode()


def pack_pid(duplicate: bool, message_id: str) -> bytes:
    """Value of a produce-id record: the answer the first produce got."""
    return (b"\x01" if duplicate else b"\x00") + message_id.encode()


def unpack_pid(value: bytes) -> tuple[bool, str]:
    """(duplicate, message_id) of a produce-id record."""
    return value[:1] == b"\x01", value[1:].decode()


def dedup_key(chan_id: int, dedup_hash: bytes) -> bytes:
    """Key of an EXACTLY_ONCE deduplication record."""
    return U32.pack(chan_id) + dedup_hash


def pack_dedup(expires_ms: int, message_id: str) -> bytes:
    """Value of a deduplication record."""
    return _DEDUP_VALUE.pack(expires_ms) + message_id.encode()


def unpack_dedup(value: bytes) -> tuple[int, str]:
    """(expires_ms, message_id) of a deduplication record."""
    return int(_DEDUP_VALUE.unpack_from(value)[0]), value[_DEDUP_VALUE.size :].decode()


def dedup_expiry_key(expires_ms: int, chan_id: int, dedup_hash: bytes) -> bytes:
    """Key of the expiry index of deduplication records."""
    return U64.pack(expires_ms) + U32.pack(chan_id) + dedup_hash


def split_dedup_expiry_key(key: bytes) -> tuple[int, bytes]:
    """(expires_ms, dedup key) of an expiry-index key."""
    return int(U64.unpack_from(key)[0]), key[8:]


def pack_lease(
    chan_id: int,
    session: bytes,
    subscription_id: int,
    lease_token: int,
    attempt: int,
    deadline_ms: int,
    max_attempts: int,
    retry_backoff_ms: int,
    retry_backoff_max_ms: int,
    priority: int,
    ready_ms: int,
) -> bytes:
    """Value of a lease record."""
    return _LEASE.pack(
        chan_id,
        session,
        subscription_id,
        lease_token,
        min(attempt, MAX_ATTEMPTS_STORED),
        deadline_ms,
        min(max_attempts, MAX_ATTEMPTS_STORED),
        retry_backoff_ms,
        retry_backoff_max_ms,
        priority,
        ready_ms,
    )


def unpack_lease(value: bytes) -> tuple[int, bytes, int, int, int, int, int, int, int, int, int]:
    """The fields of ``pack_lease``, in order."""
    fields = _LEASE.unpack(value)
    return (
        int(fields[0]),
        bytes(fields[1]),
        int(fields[2]),
        int(fields[3]),
        int(fields[4]),
        int(fields[5]),
        int(fields[6]),
        int(fields[7]),
        int(fields[8]),
        int(fields[9]),
        int(fields[10]),
    )
