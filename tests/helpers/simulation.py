"""The queue core driven turn by turn the way ``broker.node`` drives it, without sockets or clocks.

``Core`` holds a ``MemoryStore``, a log (a plain list of entries), a ``QueueState`` and a
``Scheduler``. ``Core.turn`` builds one ``LogEntry`` from a turn's commands in the node's order
(commands gathered while draining frames: BYE releases and admin commands; then the produce batch;
then acks and nacks, each noted with ``Scheduler.note_settle``; then ``Scheduler.plan``), appends it,
applies it and tells the scheduler. ``Core.restart`` is a crash: the state machine and the scheduler
are rebuilt from the store and the log entries after the restored applied index are replayed.

``view`` reads a store into plain dicts, for invariant checks that must not trust the code they check.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from broker import keys as k
from broker import queue_state
from broker.commands import (
    AckCmd,
    ExpireCmd,
    ExpireDedupCmd,
    LeaseCmd,
    LogCommand,
    LogEntry,
    NackCmd,
    NoopCmd,
    ProduceCmd,
    PromoteCmd,
    PurgeCmd,
    PurgeDeadCmd,
    RequeueDeadCmd,
    decode_entry,
    encode_entry,
)
from broker.keys import Cf
from broker.protocol import ErrorCode, LeaseRef, NackItem, ProduceItem, channel_name_problem
from broker.queue_state import CommandResult, Leased, ProduceOutcome, QueueState
from broker.ready_head import ReadyHead
from broker.scheduler import Scheduler, Session, Subscription
from broker.store import MemoryStore


@dataclass(slots=True)
class TurnOutcome:
    """What one turn proposed and what applying it answered."""

    index: int | None
    entry: LogEntry | None
    results: list[CommandResult] = field(default_factory=list)

    def _of(self, kind: type) -> Iterator[CommandResult]:
        assert self.entry is not None or not self.results
        commands = self.entry.commands if self.entry is not None else ()
        for command, result in zip(commands, self.results, strict=True):
            if isinstance(command, kind):
                yield result

    def _items(self, kind: type) -> list[object]:
        items: list[object] = []
        for result in self._of(kind):
            assert isinstance(result, list)
            items.extend(result)
        return items

    @property
    def produced(self) -> list[ProduceOutcome]:
        """Every produce outcome of the turn, in order."""
        return [o for o in self._items(ProduceCmd) if isinstance(o, ProduceOutcome)]

    @property
    def leased(self) -> list[Leased]:
        """Every lease granted in the turn, in order."""
        return [lease for lease in self._items(LeaseCmd) if isinstance(lease, Leased)]

    @property
    def ack_codes(self) -> list[ErrorCode]:
        """The codes of the turn's ACK command(s)."""
        return [c for c in self._items(AckCmd) if isinstance(c, ErrorCode)]

    @property
    def nack_codes(self) -> list[ErrorCode]:
        """The codes of the turn's NACK command(s)."""
        return [c for c in self._items(NackCmd) if isinstance(c, ErrorCode)]

    def result_of(self, kind: type) -> CommandResult:
        """The result of the turn's only command of type ``kind``."""
        (result,) = list(self._of(kind))
        return result


class Core:
    """QueueState + Scheduler on a MemoryStore with a list as the log."""

    def __init__(
        self,
        *,
        produce_id_window_ms: int = 60_000,
        session_timeout_ms: int = 5_000,
        head_capacity: int | None = None,
        store: MemoryStore | None = None,
    ) -> None:
        self.produce_id_window_ms = produce_id_window_ms
        self.session_timeout_ms = session_timeout_ms
        self.head_capacity = head_capacity
        self.store = store if store is not None else MemoryStore()
        self.log: list[LogEntry] = []
        with self._heads():
            self.state = QueueState(self.store, produce_id_window_ms=produce_id_window_ms)
        self.scheduler = Scheduler(self.state, default_session_timeout_ms=session_timeout_ms)

    @contextlib.contextmanager
    def _heads(self) -> Iterator[None]:
        """Channels created or loaded meanwhile get ready heads of ``head_capacity`` keys."""
        if self.head_capacity is None:
            yield
            return
        # ChannelState builds ReadyHead(chan_id) with the default capacity bound at definition time,
        # so patching ready_head.HEAD_CAPACITY would not reach it: swap the factory instead.
        factory = functools.partial(ReadyHead, capacity=self.head_capacity)
        with mock.patch.object(queue_state, "ReadyHead", factory):
            yield

    # ------------------------------------------------------------------ sessions

    def attach(self, routing_id: bytes, now_ms: int, *, timeout_ms: int | None = None) -> Session:
        """HELLO from ``routing_id``."""
        return self.scheduler.attach(routing_id, timeout_ms or self.session_timeout_ms, now_ms)

    def subscribe(
        self,
        session: Session,
        subscription_id: int,
        channel: str,
        *,
        max_parallel: int = 1,
        max_attempts: int = 5,
        retry_backoff_ms: int = 0,
        retry_backoff_max_ms: int = 0,
        processing_timeout_ms: int = 0,
    ) -> Subscription:
        """SUBSCRIBE of a session."""
        subscription = Subscription(
            session.session,
            subscription_id,
            channel,
            max_parallel,
            max_attempts,
            retry_backoff_ms,
            retry_backoff_max_ms,
            processing_timeout_ms,
        )
        self.scheduler.subscribe(session, subscription)
        return subscription

    # ------------------------------------------------------------------ turns

    def build(
        self,
        now_ms: int,
        *,
        first: Sequence[LogCommand] = (),
        produce: Sequence[ProduceItem] = (),
        acks: Sequence[LeaseRef] = (),
        nacks: Sequence[NackItem] = (),
        plan: bool = True,
    ) -> list[LogCommand]:
        """The commands of one turn, in the node's order, with the scheduler's bookkeeping done."""
        commands: list[LogCommand] = list(first)
        if produce:
            commands.append(ProduceCmd(tuple(produce)))
        if acks:
            ack = AckCmd(tuple(acks))
            self.scheduler.note_settle(ack)
            commands.append(ack)
        if nacks:
            nack = NackCmd(tuple(nacks))
            self.scheduler.note_settle(nack)
            commands.append(nack)
        if plan:
            commands.extend(self.scheduler.plan(now_ms))
        return commands

    def append(self, now_ms: int, commands: Sequence[LogCommand]) -> tuple[int, LogEntry]:
        """Append one entry to the log and tell the scheduler; not applied yet."""
        entry = LogEntry(now_ms, tuple(commands))
        self.log.append(entry)
        index = len(self.log)
        self.scheduler.proposed(index)
        return index, entry

    def apply(self, index: int, entry: LogEntry) -> list[CommandResult]:
        """Apply one appended entry."""
        with self._heads():
            (results,) = self.state.apply([(index, entry)])
        self.scheduler.applied(index)
        return results

    def turn(
        self,
        now_ms: int,
        *,
        first: Sequence[LogCommand] = (),
        produce: Sequence[ProduceItem] = (),
        acks: Sequence[LeaseRef] = (),
        nacks: Sequence[NackItem] = (),
        plan: bool = True,
    ) -> TurnOutcome:
        """One loop turn of a single node: build, append, apply."""
        commands = self.build(now_ms, first=first, produce=produce, acks=acks, nacks=nacks, plan=plan)
        if not commands:
            return TurnOutcome(None, None)
        index, entry = self.append(now_ms, commands)
        return TurnOutcome(index, entry, self.apply(index, entry))

    def run(self, now_ms: int, *commands: LogCommand) -> list[CommandResult]:
        """Append and apply an entry of exactly ``commands`` (no plan)."""
        index, entry = self.append(now_ms, commands)
        return self.apply(index, entry)

    # ------------------------------------------------------------------ crashes

    def restart(
        self, now_ms: int, *, one_by_one: bool = False
    ) -> list[tuple[int, LogEntry, list[CommandResult]]]:
        """Crash and restart: rebuild from the store, replay the log after the applied index.

        Entries are replayed from their encoded form, as a node reads them back from its log.
        Returns (index, entry, results) of every replayed entry.
        """
        with self._heads():
            self.state = QueueState(self.store, produce_id_window_ms=self.produce_id_window_ms)
            pending = [
                (index, decode_entry(encode_entry(entry)))
                for index, entry in enumerate(self.log, start=1)
                if index > self.state.applied_index
            ]
            if one_by_one:
                results = [self.state.apply([item])[0] for item in pending]
            else:
                results = self.state.apply(pending) if pending else []
        self.scheduler = Scheduler(self.state, default_session_timeout_ms=self.session_timeout_ms)
        self.scheduler.adopt_leased_sessions(now_ms)
        return [(index, entry, result) for (index, entry), result in zip(pending, results, strict=True)]


# ---------------------------------------------------------------------- reading a store plainly


@dataclass(slots=True)
class View:
    """A store's queue contents as plain dicts keyed by message seq."""

    messages: dict[
        int, tuple[int, str, int, bytes, int]
    ]  # seq -> chan, message id, priority, body, produced_ms
    ready: dict[int, tuple[bytes, int]]  # seq -> ready key, attempts
    delayed: dict[int, tuple[bytes, int, int]]  # seq -> delayed key, priority, attempts
    leases: dict[int, tuple[int, bytes, int, int, int, int, int, int, int, int, int]]
    dead: dict[int, tuple[int, int, int, str]]  # seq -> chan, attempts, dead_at_ms, reason
    dedup: dict[bytes, tuple[int, str]]
    dedup_expiry: set[bytes]
    pids: dict[bytes, bytes]
    channels: dict[str, bytes]
    meta: bytes | None
    _counts: dict[int, dict[str, int]] | None = None
    _ready_keys: dict[int, list[bytes]] | None = None

    def ready_keys(self, chan_id: int) -> list[bytes]:
        """The ready keys of one channel in queue order."""
        if self._ready_keys is None:
            by_chan: dict[int, list[bytes]] = {}
            for key, _ in self.ready.values():
                by_chan.setdefault(int.from_bytes(key[:4], "big"), []).append(key)
            self._ready_keys = {chan: sorted(keys) for chan, keys in by_chan.items()}
        return self._ready_keys.get(chan_id, [])

    def count(self, chan_id: int) -> dict[str, int]:
        """How many ready, delayed, in-flight and dead messages a channel has in the store."""
        if self._counts is None:
            counts: dict[int, dict[str, int]] = {}

            def add(chan: int, index: str) -> None:
                counts.setdefault(chan, {"ready": 0, "delayed": 0, "inflight": 0, "dead": 0})[index] += 1

            for key, _ in self.ready.values():
                add(int.from_bytes(key[:4], "big"), "ready")
            for key, *_ in self.delayed.values():
                add(int.from_bytes(key[:4], "big"), "delayed")
            for lease in self.leases.values():
                add(lease[0], "inflight")
            for dead in self.dead.values():
                add(dead[0], "dead")
            self._counts = counts
        return self._counts.get(chan_id, {"ready": 0, "delayed": 0, "inflight": 0, "dead": 0})

    def where(self, seq: int) -> list[str]:
        """The indexes that hold message ``seq`` (exactly one for a live message)."""
        return [
            name
            for name, index in (
                ("ready", self.ready),
                ("delayed", self.delayed),
                ("leased", self.leases),
                ("dead", self.dead),
            )
            if seq in index
        ]


def _dupes(kind: str, seqs: list[int]) -> None:
    assert len(seqs) == len(set(seqs)), f"a message appears twice in the {kind} index: {sorted(seqs)}"


_MESSAGE_CACHE: dict[bytes, tuple[int, tuple[int, str, int, bytes, int]]] = {}


def view(store: MemoryStore) -> View:
    """Read the state-machine column families of ``store``."""
    data = store.snapshot_items()
    messages = {}
    for key, value in data[Cf.MESSAGES].items():
        parsed = _MESSAGE_CACHE.get(key + value)
        if parsed is None:
            chan_id, seq = k.unpack_chan_seq(key)
            produced_ms, priority, message_id, body = k.unpack_message(value)
            parsed = _MESSAGE_CACHE[key + value] = (seq, (chan_id, message_id, priority, body, produced_ms))
            if len(_MESSAGE_CACHE) > 100_000:
                _MESSAGE_CACHE.clear()
        messages[parsed[0]] = parsed[1]
    # The seq is the last 8 bytes of a ready key (see broker.keys); attempts a big-endian u16.
    ready = {
        int.from_bytes(key[-8:], "big"): (key, int.from_bytes(value, "big"))
        for key, value in data[Cf.READY].items()
    }
    if len(ready) != len(data[Cf.READY]):
        _dupes("ready", [k.unpack_ready_key(key)[3] for key in data[Cf.READY]])
    delayed_seqs = [k.unpack_delayed_key(key)[2] for key in data[Cf.DELAYED]]
    _dupes("delayed", delayed_seqs)
    delayed = {
        seq: (key, *k.unpack_delayed_value(value))
        for seq, (key, value) in zip(delayed_seqs, data[Cf.DELAYED].items(), strict=True)
    }
    leases = {int(k.U64.unpack(key)[0]): k.unpack_lease(value) for key, value in data[Cf.LEASES].items()}
    dead = {}
    for key, value in data[Cf.DEAD].items():
        chan_id, seq = k.unpack_chan_seq(key)
        dead[seq] = (chan_id, *k.unpack_dead(value))
    return View(
        messages=messages,
        ready=ready,
        delayed=delayed,
        leases=leases,
        dead=dead,
        dedup={key: k.unpack_dedup(value) for key, value in data[Cf.DEDUP].items()},
        dedup_expiry=set(data[Cf.DEDUP_EXPIRY]),
        pids=dict(data[Cf.PIDS]),
        channels={name.decode(): value for name, value in data[Cf.CHANNELS].items()},
        meta=data[Cf.STATE].get(b"meta"),
    )


def restored_copy(store: MemoryStore) -> MemoryStore:
    """A new MemoryStore holding the same data (a disk image taken now)."""
    copy = MemoryStore()
    batch = copy.batch()
    for cf, values in store.snapshot_items().items():
        for key, value in values.items():
            batch.put(cf, key, value)
    copy.write(batch, sync=True)
    return copy


# ---------------------------------------------------------------------- a reference model


_COUNTERS = (
    "ready",
    "delayed",
    "inflight",
    "dead",
    "produced_total",
    "delivered_total",
    "acked_total",
    "nacked_total",
    "dead_total",
    "expired_total",
    "duplicates_total",
)


@dataclass(slots=True)
class ModelChannel:
    """What a channel's counters must be."""

    chan_id: int
    name: str
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))


class Model:
    """A second, deliberately naive implementation of the queue semantics of DESIGN.md.

    It applies the same log entries as ``QueueState`` over plain dicts shaped like ``View``, asserts
    that every command result is what the design says, and ``check`` compares the store row by row.
    """

    def __init__(self, produce_id_window_ms: int) -> None:
        self.window_ms = max(1, produce_id_window_ms)
        self.expected = View({}, {}, {}, {}, {}, {}, set(), {}, {}, None)
        self.channels: dict[str, ModelChannel] = {}
        self.by_id: dict[int, ModelChannel] = {}
        self.pids: dict[
            bytes, bytes
        ] = {}  # as stored: pid_key(bucket, id) -> pack_pid(duplicate, message id)
        self.windows: dict[bytes, tuple[int, str]] = {}  # dedup key -> expires_ms, message id
        self.applied_index = 0
        self.next_seq = 1
        self.next_token = 1
        self.next_chan_id = 1
        self.pid_bucket = 0
        self.last_time_ms = 0

    # ------------------------------------------------------------------ applying

    def apply(self, index: int, entry: LogEntry, results: Sequence[CommandResult]) -> None:
        """Apply one entry; assert ``results`` (what QueueState answered) are the design's answers."""
        assert index == self.applied_index + 1, f"entry {index} applied after {self.applied_index}"
        now_ms = max(entry.time_ms, self.last_time_ms)
        self.last_time_ms = now_ms
        bucket = now_ms // self.window_ms
        if bucket > self.pid_bucket:
            oldest = k.U64.pack(bucket - 1) if bucket >= 1 else b""
            self.pids = {key: value for key, value in self.pids.items() if key[:8] >= oldest}
            self.pid_bucket = bucket
        assert len(results) == len(entry.commands)
        for command, result in zip(entry.commands, results, strict=True):
            expected = self._command(command, now_ms)
            assert result == expected, f"{type(command).__name__} answered {result!r}, expected {expected!r}"
        self.applied_index = index

    def _command(self, command: LogCommand, now_ms: int) -> CommandResult:
        match command:
            case ProduceCmd(items):
                return [self._produce(item, now_ms) for item in items]
            case LeaseCmd():
                return self._lease(command, now_ms)
            case AckCmd(refs):
                return [self._ack(ref) for ref in refs]
            case NackCmd(items):
                return [
                    self._end(
                        LeaseRef(i.seq, i.lease_token),
                        now_ms,
                        release=i.release,
                        expired=False,
                        reason=i.reason,
                    )
                    for i in items
                ]
            case ExpireCmd(refs, reason):
                return [self._end(ref, now_ms, release=False, expired=True, reason=reason) for ref in refs]
            case PromoteCmd(keys):
                return sum(self._promote(key) for key in keys)
            case PurgeCmd(name):
                return self._purge(name)
            case RequeueDeadCmd(name):
                return self._requeue_dead(name, now_ms)
            case PurgeDeadCmd(name):
                return self._purge_dead(name)
            case ExpireDedupCmd(until_ms):
                return self._expire_dedup(until_ms)
            case NoopCmd():
                return None
        raise AssertionError(f"unknown command {command!r}")

    def _count(self, chan_id: int, **changes: int) -> None:
        counters = self.by_id[chan_id].counters
        for name, change in changes.items():
            counters[name] += change

    def _produce(self, item: ProduceItem, now_ms: int) -> ProduceOutcome:
        pid_key = k.pid_key(self.pid_bucket, item.produce_id)
        known = self.pids.get(pid_key)
        if known is None and self.pid_bucket:
            known = self.pids.get(k.pid_key(self.pid_bucket - 1, item.produce_id))
        if known is not None:
            duplicate, message_id = k.unpack_pid(known)
            return ProduceOutcome(message_id, duplicate)
        channel = self.channels.get(item.channel)
        if channel is None:
            problem = channel_name_problem(item.channel)
            if problem is not None:
                return ProduceOutcome(item.produce_id, False, ErrorCode.INVALID_CHANNEL, problem)
            channel = ModelChannel(self.next_chan_id, item.channel)
            self.next_chan_id += 1
            self.channels[item.channel] = channel
            self.by_id[channel.chan_id] = channel
        chan_id = channel.chan_id
        if item.dedup_ms > 0:
            dkey = k.dedup_key(chan_id, item.dedup_hash or hashlib.sha256(item.body).digest())
            window = self.windows.get(dkey)
            if window is not None and window[0] > now_ms:
                self._count(chan_id, duplicates_total=1)
                self.pids[pid_key] = k.pack_pid(True, window[1])
                return ProduceOutcome(window[1], True)
            self.windows[dkey] = (now_ms + item.dedup_ms, item.produce_id)
        seq = self.next_seq
        self.next_seq += 1
        self.expected.messages[seq] = (chan_id, item.produce_id, item.priority, item.body, now_ms)
        if item.delay_ms > 0:
            self._to_delayed(chan_id, now_ms + item.delay_ms, seq, item.priority, 0)
        else:
            self._to_ready(chan_id, item.priority, now_ms, seq, 0)
        self.pids[pid_key] = k.pack_pid(False, item.produce_id)
        self._count(chan_id, produced_total=1)
        return ProduceOutcome(item.produce_id, False)

    def _to_ready(self, chan_id: int, priority: int, ready_ms: int, seq: int, attempts: int) -> None:
        self.expected.ready[seq] = (k.ready_key(chan_id, priority, ready_ms, seq), attempts)
        self._count(chan_id, ready=1)

    def _to_delayed(self, chan_id: int, due_ms: int, seq: int, priority: int, attempts: int) -> None:
        self.expected.delayed[seq] = (k.delayed_key(chan_id, due_ms, seq), priority, attempts)
        self._count(chan_id, delayed=1)

    def _lease(self, command: LeaseCmd, now_ms: int) -> list[Leased]:
        granted = []
        session = queue_state.session_key(command.session)
        deadline_ms = now_ms + command.processing_timeout_ms if command.processing_timeout_ms else 0
        for key in command.ready_keys:
            chan_id, priority, ready_ms, seq = k.unpack_ready_key(key)
            ready = self.expected.ready.get(seq)
            if ready is None or ready[0] != key:
                continue
            del self.expected.ready[seq]
            attempt = ready[1] + 1
            token = self.next_token
            self.next_token += 1
            self.expected.leases[seq] = (
                chan_id,
                session,
                command.subscription_id,
                token,
                attempt,
                deadline_ms,
                command.max_attempts,
                command.retry_backoff_ms,
                command.retry_backoff_max_ms,
                priority,
                ready_ms,
            )
            self._count(chan_id, ready=-1, inflight=1, delivered_total=1)
            name = self.by_id[chan_id].name
            granted.append(Leased(session, command.subscription_id, chan_id, name, seq, token, attempt))
        return granted

    def _take(self, ref: LeaseRef) -> tuple[int, bytes, int, int, int, int, int, int, int, int, int] | None:
        lease = self.expected.leases.get(ref.seq)
        if lease is None or lease[3] != ref.lease_token:
            return None
        del self.expected.leases[ref.seq]
        self._count(lease[0], inflight=-1)
        return lease

    def _ack(self, ref: LeaseRef) -> ErrorCode:
        lease = self._take(ref)
        if lease is None:
            return ErrorCode.STALE_LEASE
        del self.expected.messages[ref.seq]
        self._count(lease[0], acked_total=1)
        return ErrorCode.OK

    def _end(self, ref: LeaseRef, now_ms: int, *, release: bool, expired: bool, reason: str) -> ErrorCode:
        lease = self._take(ref)
        if lease is None:
            return ErrorCode.STALE_LEASE
        chan_id, _, _, _, attempt, _, max_attempts, backoff_ms, backoff_max_ms, priority, ready_ms = lease
        if release:
            self._to_ready(chan_id, priority, ready_ms, ref.seq, attempt - 1)
            return ErrorCode.OK
        self._count(chan_id, **({"expired_total": 1} if expired else {"nacked_total": 1}))
        if attempt >= max_attempts:
            self.expected.dead[ref.seq] = (chan_id, attempt, now_ms, reason)
            self._count(chan_id, dead=1, dead_total=1)
            return ErrorCode.OK
        delay_ms = 0
        if not expired and backoff_ms > 0:  # base * 2^(attempt-1), capped
            delay_ms = backoff_ms * 2 ** (attempt - 1)
            if backoff_max_ms > 0:
                delay_ms = min(delay_ms, backoff_max_ms)
        if delay_ms:
            self._to_delayed(chan_id, now_ms + delay_ms, ref.seq, priority, attempt)
        else:
            self._to_ready(chan_id, priority, ready_ms, ref.seq, attempt)
        return ErrorCode.OK

    def _promote(self, key: bytes) -> int:
        chan_id, due_ms, seq = k.unpack_delayed_key(key)
        delayed = self.expected.delayed.get(seq)
        if delayed is None or delayed[0] != key:
            return 0
        del self.expected.delayed[seq]
        self._count(chan_id, delayed=-1)
        self._to_ready(chan_id, delayed[1], due_ms, seq, delayed[2])
        return 1

    def _seqs_of(self, index: dict[int, Any], chan_id: int, chan_of: Callable[[Any], int]) -> list[int]:
        return sorted(seq for seq, row in index.items() if chan_of(row) == chan_id)

    def _purge(self, name: str) -> int:
        channel = self.channels.get(name)
        if channel is None:
            return 0
        chan_id = channel.chan_id
        ready = self._seqs_of(self.expected.ready, chan_id, lambda row: k.unpack_ready_key(row[0])[0])
        delayed = self._seqs_of(self.expected.delayed, chan_id, lambda row: k.unpack_delayed_key(row[0])[0])
        for seq in ready:
            del self.expected.ready[seq]
            del self.expected.messages[seq]
        for seq in delayed:
            del self.expected.delayed[seq]
            del self.expected.messages[seq]
        self._count(chan_id, ready=-len(ready), delayed=-len(delayed))
        return len(ready) + len(delayed)

    def _requeue_dead(self, name: str, now_ms: int) -> int:
        channel = self.channels.get(name)
        if channel is None:
            return 0
        chan_id = channel.chan_id
        dead = self._seqs_of(self.expected.dead, chan_id, lambda row: row[0])
        for seq in dead:
            del self.expected.dead[seq]
            self._to_ready(chan_id, self.expected.messages[seq][2], now_ms, seq, 0)
        self._count(chan_id, dead=-len(dead))
        return len(dead)

    def _purge_dead(self, name: str) -> int:
        channel = self.channels.get(name)
        if channel is None:
            return 0
        chan_id = channel.chan_id
        dead = self._seqs_of(self.expected.dead, chan_id, lambda row: row[0])
        for seq in dead:
            del self.expected.dead[seq]
            del self.expected.messages[seq]
        self._count(chan_id, dead=-len(dead))
        return len(dead)

    def _expire_dedup(self, until_ms: int) -> int:
        ended = [dkey for dkey, (expires_ms, _) in self.windows.items() if expires_ms <= until_ms]
        for dkey in ended:
            del self.windows[dkey]
        return len(ended)

    # ------------------------------------------------------------------ checking

    def check(self, actual: View, state: QueueState) -> None:
        """The store and the in-memory state are exactly what the model expects."""
        expected = self.expected
        for name in ("messages", "ready", "delayed", "leases", "dead"):
            mine, theirs = getattr(expected, name), getattr(actual, name)
            if mine != theirs:
                wrong = {
                    seq: (mine.get(seq, "-"), theirs.get(seq, "-"))
                    for seq in sorted(set(mine) | set(theirs))
                    if mine.get(seq) != theirs.get(seq)
                }
                raise AssertionError(f"{name} index differs (seq: (expected, stored)): {wrong}")
        live = set(expected.messages)
        indexes: tuple[dict[int, Any], ...] = (actual.ready, actual.delayed, actual.leases, actual.dead)
        indexed: set[int] = set().union(*indexes)
        if indexed != live or sum(len(index) for index in indexes) != len(live):
            misplaced = [
                (seq, actual.where(seq)) for seq in sorted(indexed | live) if len(actual.where(seq)) != 1
            ]
            raise AssertionError(f"messages not in exactly one index: {misplaced}")
        dedup = {dkey: window for dkey, window in self.windows.items()}
        assert actual.dedup == dedup, f"dedup records {actual.dedup} != open windows {dedup}"
        expiry = {k.dedup_expiry_key(expires_ms, *_split(dkey)) for dkey, (expires_ms, _) in dedup.items()}
        assert actual.dedup_expiry == expiry, "dedup expiry index does not match the dedup records"
        assert actual.pids == self.pids, f"produce ids stored {sorted(actual.pids)} != {sorted(self.pids)}"
        self._check_counters(actual, state)

    def _check_counters(self, actual: View, state: QueueState) -> None:
        assert set(state.channels) == set(self.channels) == set(actual.channels)
        for name, channel in self.channels.items():
            live = state.channels[name]
            assert live.chan_id == channel.chan_id
            counters = {
                "ready": live.ready,
                "delayed": live.delayed,
                "inflight": live.inflight,
                "dead": live.dead,
            }
            counters |= {n: getattr(live, n) for n in _COUNTERS[4:]}
            assert counters == channel.counters, f"{name} counters {counters} != expected {channel.counters}"
            assert actual.count(channel.chan_id) == {n: channel.counters[n] for n in _COUNTERS[:4]}
            stored = _unpack_counters(name, actual.channels[name])
            assert stored == counters, f"{name} counters stored {stored} differ from memory {counters}"
        meta = (
            self.applied_index,
            self.next_seq,
            self.next_token,
            self.next_chan_id,
            self.pid_bucket,
            self.last_time_ms,
        )
        stored_meta = (
            queue_state._META.unpack(actual.meta)[:6] if actual.meta is not None else (0, 1, 1, 1, 0, 0)
        )
        assert stored_meta == meta, f"stored counters {stored_meta} != expected {meta}"
        fields = ("applied_index", "next_seq", "next_token", "next_chan_id", "pid_bucket", "last_time_ms")
        in_memory = tuple(getattr(state, f) for f in fields)
        assert in_memory == meta, f"in-memory counters {in_memory} != expected {meta}"
        leases = {seq: (seq, *row) for seq, row in self.expected.leases.items()}
        assert {seq: astuple_lease(lease) for seq, lease in state.leases.items()} == leases
        by_session: dict[bytes, set[int]] = {}
        by_sub: dict[tuple[bytes, int], int] = {}
        for seq, row in self.expected.leases.items():
            by_session.setdefault(row[1], set()).add(seq)
            by_sub[(row[1], row[2])] = by_sub.get((row[1], row[2]), 0) + 1
        assert {s: set(leases) for s, leases in state.session_leases.items()} == by_session
        assert state.subscription_inflight == by_sub


def _unpack_counters(name: str, value: bytes) -> dict[str, int]:
    # The stored layout is chan_id then the counters in ChannelState field order (= _COUNTERS).
    return dict(zip(_COUNTERS, queue_state._CHANNEL.unpack(value)[1:], strict=True))


def _split(dkey: bytes) -> tuple[int, bytes]:
    return int(k.U32.unpack_from(dkey)[0]), dkey[4:]


def astuple_lease(lease: queue_state.Lease) -> tuple[object, ...]:
    """A Lease as the tuple (seq, *unpack_lease fields)."""
    return (
        lease.seq,
        lease.chan_id,
        lease.session,
        lease.subscription_id,
        lease.lease_token,
        lease.attempt,
        lease.deadline_ms,
        lease.max_attempts,
        lease.retry_backoff_ms,
        lease.retry_backoff_max_ms,
        lease.priority,
        lease.ready_ms,
    )
