"""Log commands: everything that changes queue state, as the leader writes it into the log.

A log entry is one BSON document ``{"t": time_ms, "c": [command, ...]}``; the leader stamps ``t`` and
every replica applies the same entries in the same order to reach the same state. Commands name the
exact keys they touch, so applying needs no choices and no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import bson

from broker.protocol import LeaseRef, NackItem, ProduceItem


class Op(IntEnum):
    """The kind of a log command; the first element of its encoded list."""

    PRODUCE = 1
    LEASE = 2
    ACK = 3
    NACK = 4
    EXPIRE = 5
    PROMOTE = 6
    PURGE = 7
    REQUEUE_DEAD = 8
    EXPIRE_DEDUP = 9
    PURGE_DEAD = 10
    NOOP = 11
    MEMBERSHIP = 12


@dataclass(frozen=True, slots=True)
class ProduceCmd:
    """Enqueue messages (idempotent by produce id, deduplicated in EXACTLY_ONCE mode)."""

    items: tuple[ProduceItem, ...]


@dataclass(frozen=True, slots=True)
class LeaseCmd:
    """Lease ready messages (by ready key) to one subscription of a session."""

    session: bytes
    subscription_id: int
    max_attempts: int
    retry_backoff_ms: int
    retry_backoff_max_ms: int
    processing_timeout_ms: int
    ready_keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AckCmd:
    """Settle leases as processed: the messages are deleted."""

    refs: tuple[LeaseRef, ...]


@dataclass(frozen=True, slots=True)
class NackCmd:
    """Give leases back: released (not processed) or failed (retry with backoff or dead-letter)."""

    items: tuple[NackItem, ...]


@dataclass(frozen=True, slots=True)
class ExpireCmd:
    """End leases whose session died or whose processing deadline passed; counts as a failed attempt."""

    refs: tuple[LeaseRef, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class PromoteCmd:
    """Move due delayed messages (by delayed key) into the ready index."""

    delayed_keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class PurgeCmd:
    """Delete every ready and delayed message of a channel."""

    channel: str


@dataclass(frozen=True, slots=True)
class RequeueDeadCmd:
    """Move every dead letter of a channel back to the ready index with a fresh attempt count."""

    channel: str


@dataclass(frozen=True, slots=True)
class PurgeDeadCmd:
    """Delete every dead letter of a channel."""

    channel: str


@dataclass(frozen=True, slots=True)
class ExpireDedupCmd:
    """Forget deduplication keys whose window ended at or before ``until_ms``."""

    until_ms: int


@dataclass(frozen=True, slots=True)
class NoopCmd:
    """Changes nothing; a new leader commits one to learn what is committed."""


@dataclass(frozen=True, slots=True)
class MembershipCmd:
    """Record the cluster's membership (from a membership entry) in the state machine."""

    members: tuple[tuple[str, str, str], ...]


LogCommand = (
    ProduceCmd
    | LeaseCmd
    | AckCmd
    | NackCmd
    | ExpireCmd
    | PromoteCmd
    | PurgeCmd
    | RequeueDeadCmd
    | PurgeDeadCmd
    | ExpireDedupCmd
    | NoopCmd
    | MembershipCmd
)


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One log entry: the leader's time and the commands of one loop turn."""

    time_ms: int
    commands: tuple[LogCommand, ...]


def _encode_command(command: LogCommand) -> list[Any]:
    match command:
        case ProduceCmd(items):
            return [
                Op.PRODUCE,
                [
                    [i.produce_id, i.channel, i.body, i.priority, i.delay_ms, i.dedup_ms, i.dedup_hash]
                    for i in items
                ],
            ]
        case LeaseCmd(session, sub, max_attempts, backoff, backoff_max, timeout, keys):
            return [Op.LEASE, session, sub, max_attempts, backoff, backoff_max, timeout, list(keys)]
        case AckCmd(refs):
            return [Op.ACK, [[r.seq, r.lease_token] for r in refs]]
        case NackCmd(items):
            return [Op.NACK, [[i.seq, i.lease_token, i.release, i.reason] for i in items]]
        case ExpireCmd(refs, reason):
            return [Op.EXPIRE, [[r.seq, r.lease_token] for r in refs], reason]
        case PromoteCmd(keys):
            return [Op.PROMOTE, list(keys)]
        case PurgeCmd(channel):
            return [Op.PURGE, channel]
        case RequeueDeadCmd(channel):
            return [Op.REQUEUE_DEAD, channel]
        case PurgeDeadCmd(channel):
            return [Op.PURGE_DEAD, channel]
        case ExpireDedupCmd(until_ms):
            return [Op.EXPIRE_DEDUP, until_ms]
        case NoopCmd():
            return [Op.NOOP]
        case MembershipCmd(members):
            return [Op.MEMBERSHIP, [list(member) for member in members]]
    raise TypeError(f"not a log command: {command!r}")


def _decode_command(row: list[Any]) -> LogCommand:
    match Op(row[0]):
        case Op.PRODUCE:
            return ProduceCmd(tuple(ProduceItem(*item) for item in row[1]))
        case Op.LEASE:
            return LeaseCmd(row[1], row[2], row[3], row[4], row[5], row[6], tuple(row[7]))
        case Op.ACK:
            return AckCmd(tuple(LeaseRef(seq, token) for seq, token in row[1]))
        case Op.NACK:
            return NackCmd(tuple(NackItem(*item) for item in row[1]))
        case Op.EXPIRE:
            return ExpireCmd(tuple(LeaseRef(seq, token) for seq, token in row[1]), row[2])
        case Op.PROMOTE:
            return PromoteCmd(tuple(row[1]))
        case Op.PURGE:
            return PurgeCmd(row[1])
        case Op.REQUEUE_DEAD:
            return RequeueDeadCmd(row[1])
        case Op.PURGE_DEAD:
            return PurgeDeadCmd(row[1])
        case Op.EXPIRE_DEDUP:
            return ExpireDedupCmd(row[1])
        case Op.NOOP:
            return NoopCmd()
        case Op.MEMBERSHIP:
            return MembershipCmd(tuple((str(a), str(b), str(c)) for a, b, c in row[1]))


def encode_entry(entry: LogEntry) -> bytes:
    """Serialize a log entry."""
    return bson.encode({"t": entry.time_ms, "c": [_encode_command(c) for c in entry.commands]})


def decode_entry(data: bytes) -> LogEntry:
    """Deserialize a log entry written by ``encode_entry``."""
    doc = bson.decode(data)
    return LogEntry(doc["t"], tuple(_decode_command(row) for row in doc["c"]))
