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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from unittest import mock

from broker import keys as k
from broker import queue_state
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
from broker.keys import Cf
from broker.protocol import ErrorCode, LeaseRef, NackItem, ProduceItem
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

    @property
    def produced(self) -> list[ProduceOutcome]:
        """Every produce outcome of the turn, in order."""
        return [o for result in self._of(ProduceCmd) for o in result]  # type: ignore[union-attr]

    @property
    def leased(self) -> list[Leased]:
        """Every lease granted in the turn, in order."""
        return [lease for result in self._of(LeaseCmd) for lease in result]  # type: ignore[union-attr]

    @property
    def ack_codes(self) -> list[ErrorCode]:
        """The codes of the turn's ACK command(s)."""
        return [c for result in self._of(AckCmd) for c in result]  # type: ignore[union-attr]

    @property
    def nack_codes(self) -> list[ErrorCode]:
        """The codes of the turn's NACK command(s)."""
        return [c for result in self._of(NackCmd) for c in result]  # type: ignore[union-attr]

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

    messages: dict[int, tuple[int, str, int, bytes]]  # seq -> chan, message id, priority, body
    ready: dict[int, tuple[bytes, int]]  # seq -> ready key, attempts
    delayed: dict[int, tuple[bytes, int, int]]  # seq -> delayed key, priority, attempts
    leases: dict[int, tuple[int, bytes, int, int, int, int, int, int, int, int, int]]
    dead: dict[int, tuple[int, int, int, str]]  # seq -> chan, attempts, dead_at_ms, reason
    dedup: dict[bytes, tuple[int, str]]
    dedup_expiry: set[bytes]
    pids: dict[bytes, bytes]
    channels: dict[str, bytes]
    meta: bytes | None

    def ready_keys(self, chan_id: int) -> list[bytes]:
        """The ready keys of one channel in queue order."""
        return sorted(key for key, _ in self.ready.values() if k.unpack_ready_key(key)[0] == chan_id)

    def count(self, chan_id: int) -> dict[str, int]:
        """How many ready, delayed, in-flight and dead messages a channel has in the store."""
        return {
            "ready": sum(1 for key, _ in self.ready.values() if k.unpack_ready_key(key)[0] == chan_id),
            "delayed": sum(1 for key, *_ in self.delayed.values() if k.unpack_delayed_key(key)[0] == chan_id),
            "inflight": sum(1 for lease in self.leases.values() if lease[0] == chan_id),
            "dead": sum(1 for dead in self.dead.values() if dead[0] == chan_id),
        }

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


def view(store: MemoryStore) -> View:
    """Read the state-machine column families of ``store``."""
    data = store.snapshot_items()
    messages = {}
    for key, value in data[Cf.MESSAGES].items():
        chan_id, seq = k.unpack_chan_seq(key)
        _, priority, message_id, body = k.unpack_message(value)
        messages[seq] = (chan_id, message_id, priority, body)
    ready_seqs = [k.unpack_ready_key(key)[3] for key in data[Cf.READY]]
    _dupes("ready", ready_seqs)
    ready = {
        seq: (key, k.unpack_attempts(value))
        for seq, (key, value) in zip(ready_seqs, data[Cf.READY].items(), strict=True)
    }
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
