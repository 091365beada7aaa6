"""The queue state machine: applies committed log entries to storage, deterministically.

Pure in the sense of the design: no sockets, no clocks, no threads. Time comes from the entry the
leader stamped; storage is the ``Store`` it is given. Every replica applying the same entries in the
same order reaches the same stored state, so the leader's choices (which message to lease) are made
outside, by ``broker.scheduler``, and only named here.

In memory it keeps what is bounded by activity rather than by queue depth: per-channel counters and
ready heads, the live leases (bounded by consumer credit), and a few counters. Bodies, indexes,
dedup keys and produce ids live in storage.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson

from broker import keys as k
from broker.commands import (
    AckCmd,
    ExpireCmd,
    ExpireDedupCmd,
    LeaseCmd,
    LogCommand,
    LogEntry,
    MembershipCmd,
    NackCmd,
    NoopCmd,
    ProduceCmd,
    PromoteCmd,
    PurgeCmd,
    PurgeDeadCmd,
    RequeueDeadCmd,
)
from broker.keys import Cf
from broker.protocol import ErrorCode, LeaseRef, ProduceItem, channel_name_problem
from broker.ready_head import ReadyHead
from broker.store import Batch, Store

_META_KEY = b"meta"
_MEMBERS_KEY = b"members"
# applied_index, next_seq, next_token, next_chan_id, pid_bucket, last_time_ms, and how many commands of
# entry applied_index + 1 are applied already (a bulk command writes mid-entry; a crash may follow).
_META = struct.Struct(">QQQIQQI")
_CHANNEL = struct.Struct(">I11Q")
# Column families that applying reads back; their pending writes are mirrored in ``_overlays``.
_READ_CFS = (Cf.PIDS, Cf.DEDUP, Cf.READY, Cf.DELAYED)
EXPIRE_DEDUP_BATCH = 10_000
MAX_BACKOFF_SHIFT = 30
_MISSING = object()


@dataclass(slots=True)
class ChannelState:
    """Counters, ready head and delayed-due hint of one channel."""

    chan_id: int
    name: str
    ready: int = 0
    delayed: int = 0
    inflight: int = 0
    dead: int = 0
    produced_total: int = 0
    delivered_total: int = 0
    acked_total: int = 0
    nacked_total: int = 0
    dead_total: int = 0
    expired_total: int = 0
    duplicates_total: int = 0
    head: ReadyHead = field(init=False)
    # The earliest due time among delayed messages; None = unknown (the scheduler scans to learn it).
    next_due_ms: int | None = None

    def __post_init__(self) -> None:
        self.head = ReadyHead(self.chan_id)

    def pack(self) -> bytes:
        """The stored form of the counters."""
        return _CHANNEL.pack(
            self.chan_id,
            self.ready,
            self.delayed,
            self.inflight,
            self.dead,
            self.produced_total,
            self.delivered_total,
            self.acked_total,
            self.nacked_total,
            self.dead_total,
            self.expired_total,
            self.duplicates_total,
        )

    @classmethod
    def unpack(cls, name: str, value: bytes) -> ChannelState:
        """Rebuild from ``pack``'s output."""
        chan_id, *counters = _CHANNEL.unpack(value)
        state = cls(chan_id, name, *counters)
        return state

    def stats(self) -> dict[str, Any]:
        """The counters as a plain dict."""
        return {
            "channel": self.name,
            "ready": self.ready,
            "delayed": self.delayed,
            "in_flight": self.inflight,
            "dead": self.dead,
            "produced_total": self.produced_total,
            "delivered_total": self.delivered_total,
            "acked_total": self.acked_total,
            "nacked_total": self.nacked_total,
            "dead_lettered_total": self.dead_total,
            "lease_expired_total": self.expired_total,
            "duplicates_total": self.duplicates_total,
        }


@dataclass(slots=True)
class Lease:
    """A message handed to one consumer until ack, nack, expiry or release."""

    seq: int
    chan_id: int
    session: bytes
    subscription_id: int
    lease_token: int
    attempt: int
    deadline_ms: int
    max_attempts: int
    retry_backoff_ms: int
    retry_backoff_max_ms: int
    priority: int
    ready_ms: int

    def pack(self) -> bytes:
        """The stored form."""
        return k.pack_lease(
            self.chan_id,
            self.session,
            self.subscription_id,
            self.lease_token,
            self.attempt,
            self.deadline_ms,
            self.max_attempts,
            self.retry_backoff_ms,
            self.retry_backoff_max_ms,
            self.priority,
            self.ready_ms,
        )


@dataclass(frozen=True, slots=True)
class ProduceOutcome:
    """What one produce item resulted in."""

    message_id: str
    duplicate: bool
    code: ErrorCode = ErrorCode.OK
    error: str = ""


@dataclass(frozen=True, slots=True)
class Leased:
    """A lease granted by a LEASE command; the node delivers it to the session."""

    session: bytes
    subscription_id: int
    chan_id: int
    channel: str
    seq: int
    lease_token: int
    attempt: int


CommandResult = list[ProduceOutcome] | list[Leased] | list[ErrorCode] | int | None


def session_key(session: bytes) -> bytes:
    """Sessions are stored in 16 bytes; shorter routing ids are padded."""
    return session.ljust(16, b"\x00")[:16]


class QueueState:
    """Applies log entries to a ``Store`` and answers questions about the queues."""

    def __init__(self, store: Store, *, produce_id_window_ms: int) -> None:
        self.store = store
        self.produce_id_window_ms = max(1, produce_id_window_ms)
        self.applied_index = 0
        self.next_seq = 1
        self.next_token = 1
        self.next_chan_id = 1
        self.pid_bucket = 0
        self.last_time_ms = 0
        self.partial_commands = 0
        # The cluster membership as of the applied index (None until a membership entry is applied).
        self.members: dict[str, tuple[str, str]] | None = None
        self.channels: dict[str, ChannelState] = {}
        self.channels_by_id: dict[int, ChannelState] = {}
        self.leases: dict[int, Lease] = {}
        self.session_leases: dict[bytes, dict[int, Lease]] = {}
        self.subscription_inflight: dict[tuple[bytes, int], int] = {}
        self._dirty: set[int] = set()
        self._batch: Batch = store.batch()
        self._overlays: dict[Cf, dict[bytes, bytes | None]] = {cf: {} for cf in _READ_CFS}
        # Stored produce-id records of the ProduceCmd being applied, read with one multi-get.
        self._stored_pids: dict[bytes, bytes | None] = {}
        self._load()

    # ------------------------------------------------------------------ loading and writing

    def _load(self) -> None:
        meta = self.store.get(Cf.STATE, _META_KEY)
        if meta is not None:
            (
                self.applied_index,
                self.next_seq,
                self.next_token,
                self.next_chan_id,
                self.pid_bucket,
                self.last_time_ms,
                self.partial_commands,
            ) = _META.unpack(meta)
        members = self.store.get(Cf.STATE, _MEMBERS_KEY)
        if members is not None:
            self.members = {str(a): (str(b), str(c)) for a, b, c in bson.decode(members)["members"]}
        for name, value in self.store.scan(Cf.CHANNELS, b"", k.END):
            channel = ChannelState.unpack(name.decode(), value)
            self.channels[channel.name] = channel
            self.channels_by_id[channel.chan_id] = channel
        for key, value in self.store.scan(Cf.LEASES, b"", k.END):
            (seq,) = k.U64.unpack(key)
            self._add_lease(Lease(int(seq), *k.unpack_lease(value)))

    def _flush(self) -> None:
        for chan_id in self._dirty:
            channel = self.channels_by_id[chan_id]
            self._batch.put(Cf.CHANNELS, channel.name.encode(), channel.pack())
        self._dirty.clear()
        self._batch.put(
            Cf.STATE,
            _META_KEY,
            _META.pack(
                self.applied_index,
                self.next_seq,
                self.next_token,
                self.next_chan_id,
                self.pid_bucket,
                self.last_time_ms,
                self.partial_commands,
            ),
        )
        self.store.write(self._batch, sync=False)
        self._batch = self.store.batch()
        for overlay in self._overlays.values():
            overlay.clear()

    def _get(self, cf: Cf, key: bytes) -> bytes | None:
        hit = self._overlays[cf].get(key, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        return self.store.get(cf, key)

    def _put(self, cf: Cf, key: bytes, value: bytes) -> None:
        self._batch.put(cf, key, value)
        overlay = self._overlays.get(cf)
        if overlay is not None:
            overlay[key] = value

    def _delete(self, cf: Cf, key: bytes) -> None:
        self._batch.delete(cf, key)
        overlay = self._overlays.get(cf)
        if overlay is not None:
            overlay[key] = None

    # ------------------------------------------------------------------ applying

    def apply(self, entries: Sequence[tuple[int, LogEntry]]) -> list[list[CommandResult]]:
        """Apply entries (index, entry) in order; one result list per entry, one result per command."""
        results: list[list[CommandResult]] = []
        for index, entry in entries:
            if index <= self.applied_index:
                results.append([None] * len(entry.commands))
                continue
            now_ms = max(entry.time_ms, self.last_time_ms)
            self.last_time_ms = now_ms
            self._roll_pid_bucket(now_ms)
            # Commands a crash interrupted entry ``index`` after are applied already: applying a bulk
            # command again over later commands' changes would undo them (a release, then purged).
            done = self.partial_commands if index == self.applied_index + 1 else 0
            entry_results: list[CommandResult] = [None] * done
            for position in range(done, len(entry.commands)):
                self.partial_commands = position
                entry_results.append(self._apply_command(entry.commands[position], now_ms))
            self.partial_commands = 0
            results.append(entry_results)
            self.applied_index = index
        self._flush()
        return results

    def _apply_command(self, command: LogCommand, now_ms: int) -> CommandResult:
        match command:
            case ProduceCmd(items):
                keys = self._prefetch_pids(items)
                try:
                    return [
                        self._produce(item, now_ms, key, previous_key)
                        for item, (key, previous_key) in zip(items, keys, strict=True)
                    ]
                finally:
                    self._stored_pids = {}
            case LeaseCmd():
                return self._lease(command, now_ms)
            case AckCmd(refs):
                return [self._ack(ref) for ref in refs]
            case NackCmd(items):
                return [
                    self._end_lease(
                        LeaseRef(i.seq, i.lease_token), now_ms, release=i.release, reason=i.reason
                    )
                    for i in items
                ]
            case ExpireCmd(refs, reason):
                return [self._end_lease(ref, now_ms, expired=True, reason=reason) for ref in refs]
            case PromoteCmd(delayed_keys):
                return sum(self._promote(key) for key in delayed_keys)
            case PurgeCmd(channel):
                return self._bulk(self._purge, channel)
            case RequeueDeadCmd(channel):
                return self._bulk(self._requeue_dead, channel, now_ms)
            case PurgeDeadCmd(channel):
                return self._bulk(self._purge_dead, channel)
            case ExpireDedupCmd(until_ms):
                return self._bulk(self._expire_dedup, until_ms)
            case NoopCmd():
                return None
            case MembershipCmd(members):
                self._batch.put(Cf.STATE, _MEMBERS_KEY, bson.encode({"members": [list(m) for m in members]}))
                self.members = {member_id: (client, peer) for member_id, client, peer in members}
                return None

    def _bulk(self, change: Callable[..., int], *args: Any) -> int:
        """Run a bulk command between two writes: it scans the store, which must hold every earlier
        change, and its range deletions are not in the overlays, so later commands must read the store."""
        self._flush()
        result = change(*args)
        self.partial_commands += 1
        self._flush()
        return result

    def _roll_pid_bucket(self, now_ms: int) -> None:
        bucket = now_ms // self.produce_id_window_ms
        if bucket > self.pid_bucket:
            # Produce ids are looked up in the current and the previous bucket; older ones go at once.
            if bucket >= 2:
                self._batch.delete_range(Cf.PIDS, k.U64.pack(0), k.U64.pack(bucket - 1))
            self.pid_bucket = bucket

    def _channel(self, name: str, *, create: bool) -> ChannelState | None:
        channel = self.channels.get(name)
        if channel is None and create:
            channel = ChannelState(self.next_chan_id, name)
            channel.head.reset(empty=True)
            self.next_chan_id += 1
            self.channels[name] = channel
            self.channels_by_id[channel.chan_id] = channel
            self._dirty.add(channel.chan_id)
        return channel

    def _produce(
        self, item: ProduceItem, now_ms: int, pid_key: bytes, previous_key: bytes | None
    ) -> ProduceOutcome:
        produce_id = item.produce_id
        known = self._known_produce_id(pid_key, previous_key)
        if known is not None:
            duplicate, message_id = k.unpack_pid(known)
            return ProduceOutcome(message_id, duplicate)
        channel = self.channels.get(item.channel)
        if channel is None:
            problem = channel_name_problem(item.channel)
            if problem is not None:
                return ProduceOutcome(produce_id, False, ErrorCode.INVALID_CHANNEL, problem)
            channel = self._channel(item.channel, create=True)
            assert channel is not None
        if item.dedup_ms > 0:
            original_id = self._deduplicate(channel, item, now_ms)
            if original_id is not None:
                channel.duplicates_total += 1
                self._dirty.add(channel.chan_id)
                self._put(Cf.PIDS, pid_key, k.pack_pid(True, original_id))
                return ProduceOutcome(original_id, True)
        seq = self.next_seq
        self.next_seq = seq + 1
        chan_id = channel.chan_id
        self._batch.put(
            Cf.MESSAGES,
            k.message_key(chan_id, seq),
            k.pack_message(now_ms, item.priority, produce_id, item.body),
        )
        if item.delay_ms > 0:
            self._insert_delayed(channel, now_ms + item.delay_ms, seq, item.priority, 0)
        else:
            self._insert_ready(channel, item.priority, now_ms, seq, 0)
        pid_record = k.pack_pid(False, produce_id)
        self._batch.put(Cf.PIDS, pid_key, pid_record)
        self._overlays[Cf.PIDS][pid_key] = pid_record
        channel.produced_total += 1
        return ProduceOutcome(produce_id, False)

    def _prefetch_pids(self, items: Sequence[ProduceItem]) -> list[tuple[bytes, bytes | None]]:
        """Read the stored records of every produce id in ``items`` (this bucket and the previous one)
        in one multi-get instead of one lookup per message; the keys (this bucket's, the previous
        one's or None) of each item."""
        bucket = self.pid_bucket
        current = [k.pid_key(bucket, item.produce_id) for item in items]
        keys: list[tuple[bytes, bytes | None]]
        if bucket:
            previous = [k.pid_key(bucket - 1, item.produce_id) for item in items]
            keys = list(zip(current, previous, strict=True))
            wanted = list({*current, *previous})
        else:
            keys = [(key, None) for key in current]
            wanted = list(set(current))
        self._stored_pids = dict(zip(wanted, self.store.multi_get(Cf.PIDS, wanted), strict=True))
        return keys

    def _stored_pid(self, key: bytes) -> bytes | None:
        """A stored produce-id record: prefetched for the current command, else read now."""
        if key in self._stored_pids:
            return self._stored_pids[key]
        return self.store.get(Cf.PIDS, key)

    def _known_produce_id(self, pid_key: bytes, previous_key: bytes | None) -> bytes | None:
        """The record of a produce id seen in this bucket or the previous one (pending writes first)."""
        pending = self._overlays[Cf.PIDS]
        known = pending.get(pid_key)
        if known is not None or previous_key is None:
            return known if known is not None else self._stored_pid(pid_key)
        known = pending.get(previous_key)
        if known is not None:
            return known
        current = self._stored_pid(pid_key)
        return current if current is not None else self._stored_pid(previous_key)

    def _deduplicate(self, channel: ChannelState, item: ProduceItem, now_ms: int) -> str | None:
        """The original message id if ``item`` repeats one within its window; else start a window."""
        dedup_hash = item.dedup_hash or hashlib.sha256(item.body).digest()
        dkey = k.dedup_key(channel.chan_id, dedup_hash)
        previous = self._get(Cf.DEDUP, dkey)
        if previous is not None:
            expires_ms, original_id = k.unpack_dedup(previous)
            if expires_ms > now_ms:
                return original_id
            self._batch.delete(Cf.DEDUP_EXPIRY, k.dedup_expiry_key(expires_ms, channel.chan_id, dedup_hash))
        expires_ms = now_ms + item.dedup_ms
        self._put(Cf.DEDUP, dkey, k.pack_dedup(expires_ms, item.produce_id))
        self._batch.put(Cf.DEDUP_EXPIRY, k.dedup_expiry_key(expires_ms, channel.chan_id, dedup_hash), b"")
        return None

    def _insert_ready(
        self, channel: ChannelState, priority: int, ready_ms: int, seq: int, attempts: int
    ) -> None:
        key = k.ready_key(channel.chan_id, priority, ready_ms, seq)
        self._put(Cf.READY, key, k.pack_attempts(attempts))
        channel.head.insert(key, attempts)
        channel.ready += 1
        self._dirty.add(channel.chan_id)

    def _insert_delayed(
        self, channel: ChannelState, due_ms: int, seq: int, priority: int, attempts: int
    ) -> None:
        self._put(
            Cf.DELAYED, k.delayed_key(channel.chan_id, due_ms, seq), k.pack_delayed_value(priority, attempts)
        )
        channel.delayed += 1
        if channel.next_due_ms is not None:
            channel.next_due_ms = min(channel.next_due_ms, due_ms)
        elif channel.delayed == 1:
            channel.next_due_ms = due_ms
        self._dirty.add(channel.chan_id)

    def _lease(self, command: LeaseCmd, now_ms: int) -> list[Leased]:
        granted: list[Leased] = []
        session = session_key(command.session)
        deadline_ms = now_ms + command.processing_timeout_ms if command.processing_timeout_ms else 0
        for key in command.ready_keys:
            chan_id, priority, ready_ms, seq = k.unpack_ready_key(key)
            channel = self.channels_by_id.get(chan_id)
            if channel is None:
                continue
            attempts = channel.head.attempts.get(key)
            if attempts is None:
                value = self._get(Cf.READY, key)
                if value is None:
                    continue  # purged or leased meanwhile
                attempts = k.unpack_attempts(value)
            self._delete(Cf.READY, key)
            channel.head.remove(key)
            token = self.next_token
            self.next_token += 1
            lease = Lease(
                seq,
                chan_id,
                session,
                command.subscription_id,
                token,
                attempts + 1,
                deadline_ms,
                command.max_attempts,
                command.retry_backoff_ms,
                command.retry_backoff_max_ms,
                priority,
                ready_ms,
            )
            self._batch.put(Cf.LEASES, k.U64.pack(seq), lease.pack())
            self._add_lease(lease)
            channel.ready -= 1
            channel.inflight += 1
            channel.delivered_total += 1
            self._dirty.add(chan_id)
            granted.append(
                Leased(session, command.subscription_id, chan_id, channel.name, seq, token, attempts + 1)
            )
        return granted

    def _add_lease(self, lease: Lease) -> None:
        self.leases[lease.seq] = lease
        self.session_leases.setdefault(lease.session, {})[lease.seq] = lease
        sub = (lease.session, lease.subscription_id)
        self.subscription_inflight[sub] = self.subscription_inflight.get(sub, 0) + 1

    def _take_lease(self, ref: LeaseRef) -> Lease | None:
        lease = self.leases.get(ref.seq)
        if lease is None or lease.lease_token != ref.lease_token:
            return None
        del self.leases[ref.seq]
        by_session = self.session_leases[lease.session]
        del by_session[ref.seq]
        if not by_session:
            del self.session_leases[lease.session]
        sub = (lease.session, lease.subscription_id)
        left = self.subscription_inflight[sub] - 1
        if left:
            self.subscription_inflight[sub] = left
        else:
            del self.subscription_inflight[sub]
        self._batch.delete(Cf.LEASES, k.U64.pack(ref.seq))
        channel = self.channels_by_id[lease.chan_id]
        channel.inflight -= 1
        self._dirty.add(lease.chan_id)
        return lease

    def _ack(self, ref: LeaseRef) -> ErrorCode:
        lease = self._take_lease(ref)
        if lease is None:
            return ErrorCode.STALE_LEASE
        self._delete(Cf.MESSAGES, k.message_key(lease.chan_id, lease.seq))
        self.channels_by_id[lease.chan_id].acked_total += 1
        return ErrorCode.OK

    def _end_lease(
        self, ref: LeaseRef, now_ms: int, *, release: bool = False, expired: bool = False, reason: str = ""
    ) -> ErrorCode:
        lease = self._take_lease(ref)
        if lease is None:
            return ErrorCode.STALE_LEASE
        channel = self.channels_by_id[lease.chan_id]
        if release:
            self._insert_ready(channel, lease.priority, lease.ready_ms, lease.seq, lease.attempt - 1)
            return ErrorCode.OK
        if expired:
            channel.expired_total += 1
        else:
            channel.nacked_total += 1
        if lease.attempt >= lease.max_attempts:
            self._batch.put(
                Cf.DEAD, k.message_key(lease.chan_id, lease.seq), k.pack_dead(lease.attempt, now_ms, reason)
            )
            channel.dead += 1
            channel.dead_total += 1
            return ErrorCode.OK
        backoff_ms = (
            0
            if expired
            else retry_delay_ms(lease.attempt, lease.retry_backoff_ms, lease.retry_backoff_max_ms)
        )
        if backoff_ms:
            self._insert_delayed(channel, now_ms + backoff_ms, lease.seq, lease.priority, lease.attempt)
        else:
            self._insert_ready(channel, lease.priority, lease.ready_ms, lease.seq, lease.attempt)
        return ErrorCode.OK

    def _promote(self, key: bytes) -> int:
        value = self._get(Cf.DELAYED, key)
        if value is None:
            return 0
        chan_id, due_ms, seq = k.unpack_delayed_key(key)
        channel = self.channels_by_id[chan_id]
        priority, attempts = k.unpack_delayed_value(value)
        self._delete(Cf.DELAYED, key)
        channel.delayed -= 1
        channel.next_due_ms = None
        self._insert_ready(channel, priority, due_ms, seq, attempts)
        return 1

    # ------------------------------------------------------------------ bulk commands (they flush, then scan)

    def _purge(self, name: str) -> int:
        channel = self._channel(name, create=False)
        if channel is None:
            return 0
        start, end = k.chan_range(channel.chan_id)
        removed = 0
        for cf in (Cf.READY, Cf.DELAYED):
            for key, _ in self.store.scan(cf, start, end):
                seq = k.unpack_ready_key(key)[3] if cf is Cf.READY else k.unpack_delayed_key(key)[2]
                self._batch.delete(Cf.MESSAGES, k.message_key(channel.chan_id, seq))
                removed += 1
            self._batch.delete_range(cf, start, end)
        channel.ready = channel.delayed = 0
        channel.head.reset(empty=True)
        channel.next_due_ms = None
        self._dirty.add(channel.chan_id)
        return removed

    def _requeue_dead(self, name: str, now_ms: int) -> int:
        channel = self._channel(name, create=False)
        if channel is None:
            return 0
        start, end = k.chan_range(channel.chan_id)
        moved = 0
        for key, _ in self.store.scan(Cf.DEAD, start, end):
            _, seq = k.unpack_chan_seq(key)
            record = self.store.get(Cf.MESSAGES, k.message_key(channel.chan_id, seq))
            if record is None:
                continue
            _, priority, _, _ = k.unpack_message(record)
            self._insert_ready(channel, priority, now_ms, seq, 0)
            moved += 1
        self._batch.delete_range(Cf.DEAD, start, end)
        channel.dead = 0
        self._dirty.add(channel.chan_id)
        return moved

    def _purge_dead(self, name: str) -> int:
        channel = self._channel(name, create=False)
        if channel is None:
            return 0
        start, end = k.chan_range(channel.chan_id)
        removed = 0
        for key, _ in self.store.scan(Cf.DEAD, start, end):
            self._batch.delete(Cf.MESSAGES, key)
            removed += 1
        self._batch.delete_range(Cf.DEAD, start, end)
        channel.dead = 0
        self._dirty.add(channel.chan_id)
        return removed

    def _expire_dedup(self, until_ms: int) -> int:
        forgotten = 0
        for key, _ in self.store.scan(Cf.DEDUP_EXPIRY, b"", k.U64.pack(until_ms + 1), EXPIRE_DEDUP_BATCH):
            expires_ms, dkey = k.split_dedup_expiry_key(key)
            self._batch.delete(Cf.DEDUP_EXPIRY, key)
            record = self.store.get(Cf.DEDUP, dkey)
            if record is not None and k.unpack_dedup(record)[0] == expires_ms:
                self._delete(Cf.DEDUP, dkey)
                forgotten += 1
        return forgotten

    # ------------------------------------------------------------------ questions

    def inflight_of(self, session: bytes, subscription_id: int) -> int:
        """How many leases one subscription holds."""
        return self.subscription_inflight.get((session_key(session), subscription_id), 0)

    def leases_of(self, session: bytes) -> list[LeaseRef]:
        """Every lease a session holds."""
        return [
            LeaseRef(lease.seq, lease.lease_token)
            for lease in self.session_leases.get(session_key(session), {}).values()
        ]

    def overdue_leases(self, now_ms: int) -> list[LeaseRef]:
        """Leases whose processing deadline has passed."""
        return [
            LeaseRef(lease.seq, lease.lease_token)
            for lease in self.leases.values()
            if lease.deadline_ms and lease.deadline_ms <= now_ms
        ]

    def message(self, chan_id: int, seq: int) -> tuple[int, int, str, bytes] | None:
        """(produced_at_ms, priority, message_id, body) of a stored message."""
        record = self.store.get(Cf.MESSAGES, k.message_key(chan_id, seq))
        return None if record is None else k.unpack_message(record)


def retry_delay_ms(attempt: int, base_ms: int, cap_ms: int) -> int:
    """Exponential backoff after failed attempt ``attempt`` (1-based): base * 2^(attempt-1), capped."""
    if base_ms <= 0:
        return 0
    delay = base_ms << min(attempt - 1, MAX_BACKOFF_SHIFT)
    return min(delay, cap_ms) if cap_ms > 0 else delay
