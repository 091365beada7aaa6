"""A seeded, deterministic simulation of a Raft replica group: ``RaftCore`` driven as the node drives it.

Each node is a ``RaftCore`` plus what ``cluster.replica.Replica`` and ``broker.node.Node`` keep around
it: a durable disk (hard state, log ``index -> (term, payload)``, where the log starts, and the last
synced image of the state machine), a state machine that applies ``produce:<id>`` payloads once per id
(as zbroker's produce ids do), the answers owed to clients by log index, and a one-slot staging area
for an incoming snapshot. A loop turn is ``Node.run_once`` + ``Replica.flush``, step for step: feed the
peer messages, tick, propose the clients' requests (leaders only), then write the merged effects
(the hard state synced at once, entries to the page cache), install a snapshot, send (payloads filled
in from this turn's appends or the log; append answers held until everything written is synced),
hand the writes to the sync thread, which finishes 0..``sync_ms`` later; once it has, report
``Persisted`` and release the held answers of the current term; stream snapshots, apply up to
``min(commit_index, persisted_index)``, answer clients, refuse them on a role change, and compact the
log after applying (keeping a small tail).

The world around them, drawn from the seed: a network that loses, duplicates, delays and reorders
messages; partitions (a node isolated, a minority split off, single directions cut); stalls (a process
that takes no turn for up to 3 s while its messages pile up, leaders preferred); crashes at every
point of a turn (before anything is written, with entries written but not synced, after a sync
finished but before it was reported, after sending, between a snapshot's install and the log's reset,
after applying, between syncing the state machine and compacting the log), as a process kill (the
page cache survives: unsynced log writes and the state machine's writes are kept) or a power cut
(unsynced log writes are torn after a random prefix, the state machine's lost back to a random point
after its last sync, and the log is replayed); restarts from the disk; clocks jumping forward;
leadership transfers; clients that propose to whichever node they believe leads and retry with the
same id on a timeout or NOT_LEADER. A produce is acknowledged only when the node it was proposed to
has applied that index with that payload.

After every step (one tick of the global clock in which every live node may take a turn) the
invariants are checked: one leader per term over the run, applied entries never change, log matching
over the durable logs, every acknowledged produce durable on a majority, no id applied twice, and
the live cores agree with their disks. At the end the world heals and runs quiet: there must be one
leader, a new proposal must commit, every node must apply every acknowledged produce and all state
machines must be equal.
"""

from __future__ import annotations

import collections
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.messages import (
    AppendRequest,
    AppendResponse,
    Compacted,
    Effects,
    HardState,
    Persisted,
    Propose,
    RaftEvent,
    RaftMessage,
    Receive,
    Role,
    SnapshotFailed,
    SnapshotInstalled,
    SnapshotRequest,
    SnapshotResponse,
    Tick,
    TransferLeadership,
)
from cluster.raft import RaftConfig, RaftCore

NOOP = b""
CRASH_POINTS = (
    "received",  # events stepped, nothing written, nothing sent
    "written",  # entries in the page cache (a power cut may tear them), nothing sent
    "installing",  # the snapshot replaced the state machine, the log was not reset yet
    "synced",  # a sync finished (durable), but neither reported to the core nor answered
    "sent",  # sent (a leader's entries before its own fsync), not applied
    "applied",  # applied, the log not compacted
    "compacting",  # the state machine synced, the log not compacted yet
)
TRACE_LINES = 60


class InvariantViolation(AssertionError):
    """Raised when the simulated group breaks a Raft guarantee."""


def produce_payload(produce_id: str) -> bytes:
    """The log payload of one produce."""
    return f"produce:{produce_id}".encode()


def produce_id_of(payload: bytes) -> str | None:
    """The produce id a payload carries (None for the leader's no-op)."""
    return payload[8:].decode() if payload.startswith(b"produce:") else None


# ---------------------------------------------------------------------- state machine and disk


@dataclass(slots=True)
class Machine:
    """The state machine: produce id -> index it was applied at; a second produce of an id is a no-op."""

    applied_index: int = 0
    values: dict[str, int] = field(default_factory=dict)
    applications: collections.Counter[str] = field(default_factory=collections.Counter)
    duplicates: int = 0

    def apply(self, index: int, payload: bytes) -> None:
        """Apply entry ``index``."""
        if index != self.applied_index + 1:
            raise InvariantViolation(f"applied {index} right after {self.applied_index}")
        self.applied_index = index
        produce_id = produce_id_of(payload)
        if produce_id is None:
            return
        if produce_id in self.values:
            self.duplicates += 1
            return
        self.values[produce_id] = index
        self.applications[produce_id] += 1

    def copy(self) -> Machine:
        """An independent copy (a checkpoint)."""
        return Machine(self.applied_index, dict(self.values), self.applications.copy(), self.duplicates)


def _truncate(log: dict[int, tuple[int, bytes]], start: int) -> None:
    for index in [index for index in log if index >= start]:
        del log[index]


@dataclass(slots=True)
class Disk:
    """What survives a crash: ``cluster.log.LogStore`` plus the state machine's last synced image.

    The log has two views. ``log`` is what the node reads: every write lands there at once (the page
    cache). ``durable`` is what its fsyncs made safe; ``pending`` holds the writes since, in order,
    each tagged with its ticket. A sync moves writes up to a ticket into ``durable``. A process kill
    keeps them all (the page cache survives it, and the log is fsynced at start-up); a power cut keeps
    a random prefix of them: a torn tail, cut where the segment's CRC chain breaks.

    ``journal`` holds the entries applied since the state machine's image: written, not synced, so a
    power cut keeps only a prefix of them (a process kill keeps all).
    """

    hard_state: HardState = field(default_factory=lambda: HardState(0, None))
    snapshot_index: int = 0
    snapshot_term: int = 0
    last_index: int = 0
    log: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    durable: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    durable_last_index: int = 0
    pending: list[tuple[int, int, int, bytes]] = field(default_factory=list)  # ticket, index, term, payload
    image: Machine = field(default_factory=Machine)
    journal: list[tuple[int, bytes]] = field(default_factory=list)
    version: int = 0  # bumped by every change of the durable state, so checks can skip unchanged disks
    installing: tuple[int, int] | None = None  # ``LogStore.begin_install``: (index, term), synced

    def write(self, effects: Effects, ticket: int) -> None:
        """``LogStore.write``: the hard state synced now; truncation and appends to the page cache."""
        if effects.hard_state is not None:
            self.version += 1
            self.hard_state = effects.hard_state
        if effects.truncate_from is not None and effects.truncate_from <= self.last_index:
            _truncate(self.log, effects.truncate_from)
            self.last_index = effects.truncate_from - 1
            self.pending.append((ticket, effects.truncate_from, -1, b""))  # term -1: a truncation
        for index, term, payload in effects.append:
            self.log[index] = (term, payload)
            self.last_index = index
            self.pending.append((ticket, index, term, payload))

    def sync(self, ticket: int) -> None:
        """The sync thread finished ``ticket``: writes up to it are durable."""
        done = [write for write in self.pending if write[0] <= ticket]
        if done:
            self.version += 1
            self._make_durable(done)
            del self.pending[: len(done)]

    def _make_durable(self, writes: list[tuple[int, int, int, bytes]]) -> None:
        for _, index, term, payload in writes:
            if term < 0:
                _truncate(self.durable, index)
                self.durable_last_index = min(self.durable_last_index, index - 1)
            else:
                self.durable[index] = (term, payload)
                self.durable_last_index = index

    def lose_unsynced(self, keep: int | None) -> None:
        """A crash: a kill (``keep`` None) keeps every write, a power cut the first ``keep`` of them."""
        self.version += 1
        self._make_durable(self.pending if keep is None else self.pending[:keep])
        self.pending.clear()
        self.log = dict(self.durable)
        self.last_index = self.durable_last_index

    def terms(self) -> list[int]:
        """``LogStore.terms``: the terms after the snapshot, up to the first hole (read at start-up)."""
        terms = []
        index = self.snapshot_index + 1
        while index in self.log:
            terms.append(self.log[index][0])
            index += 1
        self.last_index = self.durable_last_index = index - 1
        return terms

    def compact(self, through_index: int, term: int) -> None:
        """``LogStore.compact``: forget entries up to ``through_index``."""
        self.version += 1
        if through_index <= self.snapshot_index:
            return
        for log in (self.log, self.durable):
            for index in [index for index in log if index <= through_index]:
                del log[index]
        self.snapshot_index, self.snapshot_term = through_index, term
        self.last_index = max(self.last_index, through_index)
        self.durable_last_index = max(self.durable_last_index, through_index)

    def reset(self, snapshot_index: int, snapshot_term: int) -> None:
        """``LogStore.reset``: forget every entry; an installed snapshot covers up to ``snapshot_index``."""
        self.version += 1
        self.log.clear()
        self.durable.clear()
        self.pending.clear()
        self.snapshot_index, self.snapshot_term = snapshot_index, snapshot_term
        self.last_index = self.durable_last_index = snapshot_index

    def sync_machine(self, machine: Machine) -> None:
        """The state machine's writes are synced (``Store.sync_wal``, or an installed snapshot)."""
        self.version += 1
        self.image = machine.copy()
        self.journal.clear()

    def recovered_machine(self, *, keep_journal: int) -> Machine:
        """The state machine as a restart finds it: the synced image and ``keep_journal`` later applies."""
        machine = self.image.copy()
        for index, payload in self.journal[:keep_journal]:
            machine.apply(index, payload)
        del self.journal[keep_journal:]
        return machine


@dataclass(frozen=True, slots=True)
class Transfer:
    """A streamed snapshot: the request the follower's shell builds once every chunk is in, and the data."""

    request: SnapshotRequest
    machine: Machine


Wire = RaftMessage | Transfer


# ---------------------------------------------------------------------- clients


@dataclass(slots=True)
class Request:
    """A produce a client waits on."""

    produce_id: str
    target: str
    deadline_ms: int
    attempts: int = 1


@dataclass(slots=True)
class Client:
    """A producer: one produce in flight, retried with the same id until some node answers it."""

    name: str
    timeout_ms: int
    counter: int = 0
    current: Request | None = None
    retry_at_ms: int | None = None
    retry_hint: str | None = None


# ---------------------------------------------------------------------- nodes


class Node:
    """One replica: its core and shell state in memory, its disk, its clock."""

    def __init__(self, node_id: str, members: tuple[str, ...], config: RaftConfig, seed: int) -> None:
        self.node_id = node_id
        self.members = members
        self.config = config
        self.seed = seed
        self.disk = Disk()
        self.machine = Machine()
        self.up = True
        self.incarnation = 0
        self.clock_offset_ms = 0
        self.restart_at_ms = 0
        self.paused_until_ms = 0  # a stalled process (GC, VM pause, SIGSTOP): no turns, messages pile up
        self.inbox: list[tuple[str, Wire]] = []
        self.requests: list[tuple[Client, str]] = []
        self.transfer_to: str | None = None
        self.armed: tuple[str, int] | None = None  # (point of the turn to crash at, deadline)
        self.waiting: dict[int, tuple[Client, str, bytes]] = {}
        self.staged: Transfer | None = None
        self.pending = Effects()
        self.role_changed = False
        self._reset_sync()
        self.core = self._new_core(0)

    def _reset_sync(self) -> None:
        """``LogStore``'s tickets and ``Replica``'s held answers: memory, gone with the process."""
        self.written_ticket = 0
        self.requested_ticket = 0
        self.synced_ticket = 0
        self.unsynced: collections.deque[list[int]] = collections.deque()  # [ticket, last index]
        self.sync_running: tuple[int, int] | None = None  # (ticket, when it finishes)
        self.held: list[tuple[int, str, RaftMessage]] = []

    def _new_core(self, now_ms: int) -> RaftCore:
        # ``LogStore.finish_interrupted_install``: a crash between replacing the state machine and
        # resetting the log is finished now (or forgotten, when the state machine was not replaced).
        if self.disk.installing is not None:
            index, term = self.disk.installing
            if self.machine.applied_index == index:
                self.disk.reset(index, term)
            self.disk.installing = None
        return RaftCore(
            self.node_id,
            self.members,
            hard_state=self.disk.hard_state,
            snapshot_index=self.disk.snapshot_index,
            snapshot_term=self.disk.snapshot_term,
            log_terms=self.disk.terms(),
            now_ms=now_ms,
            applied_index=self.machine.applied_index,
            config=self.config,
            rng=random.Random(f"{self.seed}-{self.node_id}-{self.incarnation}"),
        )

    def clock(self, world_ms: int) -> int:
        """This node's monotonic clock."""
        return world_ms + self.clock_offset_ms

    def step(self, event: RaftEvent, now_ms: int) -> Effects:
        """``Replica._step``: feed the core, keep its effects for the turn's flush."""
        effects = self.core.step(event, now_ms)
        self.pending.merge(effects)
        return effects

    def crash(self, machine: Machine) -> None:
        """The process dies: everything in memory is gone; the disk and ``machine`` remain."""
        self.up = False
        self.machine = machine
        self.inbox, self.requests, self.waiting = [], [], {}
        self.staged, self.transfer_to, self.armed = None, None, None
        self.pending, self.role_changed = Effects(), False
        self._reset_sync()

    def restart(self, now_ms: int) -> None:
        """Start again from the disk."""
        self.up = True
        self.incarnation += 1
        self.core = self._new_core(now_ms)


# ---------------------------------------------------------------------- the world


@dataclass(frozen=True, slots=True)
class Knobs:
    """A seed's fault and workload settings."""

    loss: float
    duplication: float
    delay_ms: int
    jitter_ms: int
    turn_probability: float
    crash_probability: float
    power_cut_share: float
    partition_probability: float
    heal_probability: float
    clock_jump_probability: float
    transfer_probability: float
    produce_probability: float
    compact_threshold: int
    compact_keep: int
    sync_ms: int  # an fsync takes 0 .. sync_ms

    @classmethod
    def draw(cls, rng: random.Random) -> Knobs:
        """Random settings; some seeds are calm, some are hostile."""
        threshold = rng.choice([4, 8, 16, 40])
        return cls(
            loss=rng.choice([0.0, 0.02, 0.1, 0.25]),
            duplication=rng.choice([0.0, 0.02, 0.1]),
            delay_ms=rng.choice([1, 5, 15]),
            jitter_ms=rng.choice([0, 10, 40, 150]),
            turn_probability=rng.choice([0.6, 0.9, 1.0]),
            crash_probability=rng.choice([0.0, 0.002, 0.006, 0.015]),
            power_cut_share=rng.choice([0.0, 0.3, 0.7]),
            partition_probability=rng.choice([0.0, 0.01, 0.03]),
            heal_probability=rng.choice([0.02, 0.05]),
            clock_jump_probability=rng.choice([0.0, 0.002, 0.01]),
            transfer_probability=rng.choice([0.0, 0.005, 0.02]),
            produce_probability=rng.choice([0.1, 0.3, 0.6]),
            compact_threshold=threshold,
            compact_keep=rng.choice([0, 1, 2, threshold // 2]),
            sync_ms=rng.choice([0, 5, 20, 80]),
        )


@dataclass(frozen=True, slots=True)
class Options:
    """How a simulation runs (the seed draws everything else)."""

    steps: int = 400
    compaction: bool = True  # compact logs after applying, so lagging nodes need snapshots
    settle: bool = True  # heal and run quiet at the end, then check liveness and convergence
    crash_points: tuple[str, ...] = CRASH_POINTS
    pauses: bool = True  # stall nodes now and then (their messages pile up unread)
    trace_messages: bool = False  # put every delivered message in the failure's trace

    @classmethod
    def from_environment(cls, environ: dict[str, str], *, steps: int) -> Options:
        """Options from ``ZBROKER_RAFT_*`` variables (what ``replay_command`` sets)."""
        points = environ.get("ZBROKER_RAFT_CRASH_POINTS")
        return cls(
            steps=int(environ.get("ZBROKER_RAFT_STEPS", str(steps))),
            compaction=environ.get("ZBROKER_RAFT_COMPACTION", "1") != "0",
            settle=environ.get("ZBROKER_RAFT_SETTLE", "1") != "0",
            crash_points=tuple(points.split(",")) if points else CRASH_POINTS,
            pauses=environ.get("ZBROKER_RAFT_PAUSES", "1") != "0",
            trace_messages=environ.get("ZBROKER_RAFT_TRACE", "0") != "0",
        )


def replay_command(seed: int, nodes: int, options: Options) -> str:
    """The shell command that replays one simulation (add ZBROKER_RAFT_TRACE=1 to see every message)."""
    variables = [
        f"ZBROKER_RAFT_SEED={seed}",
        f"ZBROKER_RAFT_NODES={nodes}",
        f"ZBROKER_RAFT_STEPS={options.steps}",
    ]
    if not options.compaction:
        variables.append("ZBROKER_RAFT_COMPACTION=0")
    if not options.settle:
        variables.append("ZBROKER_RAFT_SETTLE=0")
    if not options.pauses:
        variables.append("ZBROKER_RAFT_PAUSES=0")
    if options.crash_points != CRASH_POINTS:
        variables.append(f"ZBROKER_RAFT_CRASH_POINTS={','.join(options.crash_points)}")
    return " ".join(variables) + " .venv/bin/pytest tests/test_raft_simulation.py -k replay"


class World:
    """One seeded simulation of a replica group, its network, its disks and its clients."""

    def __init__(self, seed: int, nodes: int, options: Options | None = None) -> None:
        self.seed = seed
        self.size = nodes
        self.options = options = options or Options()
        rng = self.rng = random.Random(seed * 1_000_003 + nodes)
        self.knobs = Knobs.draw(rng)
        self.stall_rng = random.Random(f"pauses-{seed}-{nodes}")
        self.pause_probability = self.stall_rng.choice([0.0, 0.0, 0.003, 0.01]) if options.pauses else 0.0
        self.config = RaftConfig(
            election_timeout_ms=300,
            heartbeat_interval_ms=50,
            max_entries_per_append=rng.choice([1, 3, 64]),
            max_inflight_appends=rng.choice([1, 2, 32]),
            retransmit_after_ms=rng.choice([120, 200]),
            snapshot_timeout_ms=1_500,
        )
        self.members = tuple(f"n{i}" for i in range(1, nodes + 1))
        self.nodes = {m: Node(m, self.members, self.config, seed) for m in self.members}
        self.clients = [Client(f"c{i}", rng.choice([300, 700, 1_500])) for i in range(rng.randint(1, 3))]
        self.now_ms = 0
        self.flights: list[tuple[int, int, str, str, Wire]] = []
        self.sequence = 0
        self.cut: set[tuple[str, str]] = set()
        self.calm = False
        # What the run has seen, for the invariants.
        self.leaders: dict[int, str] = {}
        self.applied: dict[int, tuple[int, bytes]] = {}  # index -> (term, payload) as first applied
        self.first_applied: dict[str, int] = {}  # produce id -> index of its first application
        self.entries: dict[tuple[int, int], bytes] = {}  # (index, term) -> payload, on any disk or wire
        self.acknowledged: dict[str, int] = {}  # produce id -> index its answer came from
        self.stats: collections.Counter[str] = collections.Counter()
        self.trace: collections.deque[str] = collections.deque(
            maxlen=TRACE_LINES * 8 if options.trace_messages else TRACE_LINES
        )
        self.trace_messages = options.trace_messages
        self.step_number = 0
        self._checked: dict[object, tuple[object, ...]] = {}

    # ------------------------------------------------------------------ running

    def run(self, *, settle_steps: int = 3_000) -> collections.Counter[str]:
        """The steps of faults and traffic, then heal and settle; raises on any violation."""
        try:
            for step in range(self.options.steps):
                self.step_number = step
                self.step()
                self.check()
            if self.options.settle:
                self.settle(settle_steps)
        except AssertionError as exc:
            trace = "\n    ".join(self.trace)
            raise InvariantViolation(
                f"raft simulation seed {self.seed} ({self.size} nodes) failed at step {self.step_number} "
                f"(t={self.now_ms}ms): {exc}\n  knobs: {self.knobs}\n  last events:\n    {trace}\n"
                f"  replay: {replay_command(self.seed, self.size, self.options)}"
            ) from exc
        self.stats["seeds"] += 1
        self.stats["terms"] += max(self.leaders, default=0)
        return self.stats

    def note(self, text: str) -> None:
        """Add a line to the trace printed on failure."""
        self.trace.append(f"[{self.step_number} t={self.now_ms}] {text}")

    def step(self) -> None:
        """Time passes, faults strike, messages arrive, clients act, live nodes take a turn."""
        rng = self.rng
        self.now_ms += rng.choice([1, 5, 10, 10, 20, 40])
        if not self.calm:
            self._faults()
        for node in self.nodes.values():
            if not node.up and self.now_ms >= node.restart_at_ms:
                node.restart(node.clock(self.now_ms))
                self.note(f"{node.node_id} restarts (term {node.core.term}, log to {node.core.last_index})")
        self._deliver()
        for client in self.clients:
            self._client_acts(client)
        order = list(self.members)
        rng.shuffle(order)
        for member in order:
            node = self.nodes[member]
            if node.paused_until_ms > self.now_ms:
                continue
            if node.up and (self.calm or rng.random() < self.knobs.turn_probability):
                self._turn(node)

    # ------------------------------------------------------------------ faults

    def _faults(self) -> None:
        rng, knobs = self.rng, self.knobs
        if self.cut and rng.random() < knobs.heal_probability:
            self.cut.clear()
            self.note("network healed")
        if rng.random() < knobs.partition_probability:
            self._partition()
        if rng.random() < knobs.clock_jump_probability:
            node = self.nodes[rng.choice(self.members)]
            jump = rng.choice([500, 2_000, 10_000, 60_000])
            node.clock_offset_ms += jump
            self.stats["clock_jumps"] += 1
            self.note(f"{node.node_id}'s clock jumps {jump}ms")
        # Pauses draw from their own generator: adding them left the other faults of every seed as they were.
        if self.pause_probability and self.stall_rng.random() < self.pause_probability:
            leaders = [n for n in self.nodes.values() if n.up and n.core.role is Role.LEADER]
            node = self.stall_rng.choice(leaders or list(self.nodes.values()))
            until = self.now_ms + self.stall_rng.choice([300, 1_000, 3_000])
            node.paused_until_ms = max(node.paused_until_ms, until)
            self.stats["pauses"] += 1
            self.note(f"{node.node_id} stalls until t={node.paused_until_ms}")
        if rng.random() < knobs.transfer_probability:
            leaders = [n for n in self.nodes.values() if n.up and n.core.role is Role.LEADER]
            if leaders:
                leader = rng.choice(leaders)
                leader.transfer_to = rng.choice(leader.core.peers)
                self.stats["transfers_asked"] += 1
                self.note(f"{leader.node_id} is asked to hand leadership to {leader.transfer_to}")

    def _partition(self) -> None:
        rng, members = self.rng, self.members
        kind = rng.choice(["isolate", "split", "one_way", "one_way"])
        if kind == "isolate":
            lone = rng.choice(members)
            self.cut |= {(lone, m) for m in members if m != lone} | {(m, lone) for m in members if m != lone}
            self.note(f"partition: {lone} isolated")
        elif kind == "split":
            minority = rng.sample(members, rng.randint(1, (len(members) - 1) // 2))
            rest = [m for m in members if m not in minority]
            self.cut |= {(a, b) for a in minority for b in rest} | {(b, a) for a in minority for b in rest}
            self.note(f"partition: {sorted(minority)} | {rest}")
        else:
            a, b = rng.sample(members, 2)
            self.cut.add((a, b))
            self.note(f"partition: {a} -> {b} cut (one way)")
        self.stats[f"partition_{kind}"] += 1

    def _dies(self, node: Node, point: str) -> bool:
        """Crash ``node`` here when it is armed for this point of the turn."""
        if node.armed is None or node.armed[0] != point:
            return False
        self._crash(node, point)
        return True

    def _crash(self, node: Node, point: str) -> None:
        rng = self.rng
        power = rng.random() < self.knobs.power_cut_share
        keep = rng.randint(0, len(node.disk.journal)) if power else len(node.disk.journal)
        machine = node.disk.recovered_machine(keep_journal=keep) if power else node.machine
        node.disk.lose_unsynced(rng.randint(0, len(node.disk.pending)) if power else None)
        node.crash(machine)
        node.restart_at_ms = self.now_ms + rng.choice([20, 100, 400, 1_500])
        self.stats[f"crash_{point}"] += 1
        self.stats["power_cuts" if power else "kills"] += 1
        self.note(f"{node.node_id} {'loses power' if power else 'is killed'} at {point}")

    # ------------------------------------------------------------------ network

    def _send(self, sender: str, receiver: str, message: Wire, *, extra_delay_ms: int = 0) -> None:
        rng, knobs = self.rng, self.knobs
        if (sender, receiver) in self.cut:
            self.stats["cut"] += 1
            return
        if not self.calm and rng.random() < knobs.loss:
            self.stats["lost"] += 1
            return
        copies = 2 if not self.calm and rng.random() < knobs.duplication else 1
        for _ in range(copies):
            jitter = 0 if self.calm else int(rng.random() * knobs.jitter_ms)
            due = self.now_ms + knobs.delay_ms + jitter + extra_delay_ms
            self.sequence += 1
            heapq.heappush(self.flights, (due, self.sequence, sender, receiver, message))
        self.stats["duplicated"] += copies - 1

    def _deliver(self) -> None:
        while self.flights and self.flights[0][0] <= self.now_ms:
            _, _, sender, receiver, message = heapq.heappop(self.flights)
            node = self.nodes[receiver]
            if node.up and (sender, receiver) not in self.cut:
                node.inbox.append((sender, message))
                if self.trace_messages:
                    self.note(f"{sender} -> {receiver}: {message}")

    # ------------------------------------------------------------------ clients

    def _client_acts(self, client: Client) -> None:
        rng = self.rng
        request = client.current
        if request is None:
            if self.calm or rng.random() >= self.knobs.produce_probability:
                return
            client.counter += 1
            request = client.current = Request(f"{client.name}-{client.counter}", "", 0)
            self._send_request(client, rng.choice(self.members))
            return
        if client.retry_at_ms is not None and self.now_ms >= client.retry_at_ms:
            hint, client.retry_at_ms, client.retry_hint = client.retry_hint, None, None
            request.attempts += 1
            self._send_request(client, hint or rng.choice(self.members))
        elif client.retry_at_ms is None and self.now_ms >= request.deadline_ms:
            request.attempts += 1
            self.stats["client_timeouts"] += 1
            self._send_request(client, rng.choice(self.members))

    def _send_request(self, client: Client, target: str) -> None:
        request = client.current
        assert request is not None
        request.target = target
        request.deadline_ms = self.now_ms + client.timeout_ms
        if request.attempts > 1:
            self.stats["client_retries"] += 1
        node = self.nodes[target]
        if node.up:
            node.requests.append((client, request.produce_id))

    def _not_leader(self, client: Client, produce_id: str, hint: str | None) -> None:
        request = client.current
        if request is None or request.produce_id != produce_id:
            return
        self.stats["not_leader"] += 1
        client.retry_at_ms = self.now_ms + 10
        client.retry_hint = hint

    def _answer(self, client: Client, produce_id: str, index: int) -> None:
        self.acknowledged.setdefault(produce_id, index)
        self.stats["acknowledged"] += 1
        request = client.current
        if request is not None and request.produce_id == produce_id:
            client.current, client.retry_at_ms, client.retry_hint = None, None, None

    # ------------------------------------------------------------------ one node's loop turn

    def _turn(self, node: Node) -> None:
        """``Node.run_once``: receive, tick, propose, flush, apply, compact (crashing somewhere, maybe)."""
        rng = self.rng
        if node.armed is None and not self.calm and rng.random() < self.knobs.crash_probability:
            # Armed for a point of the turn; it dies when it next gets there (or soon, somewhere).
            node.armed = (rng.choice(self.options.crash_points), self.now_ms + 1_000)
        elif node.armed is not None and self.now_ms >= node.armed[1]:
            node.armed = ("received", self.now_ms)
        now = node.clock(self.now_ms)
        inbox, node.inbox = node.inbox, []
        for sender, message in inbox:
            if isinstance(message, Transfer):
                node.staged = message  # the staging folder holds one snapshot: a newer one replaces it
                node.step(Receive(sender, message.request), now)
            else:
                node.step(Receive(sender, message), now)
        if self._dies(node, "received"):
            return
        node.step(Tick(), now)
        if node.transfer_to is not None:
            node.step(TransferLeadership(node.transfer_to), now)
            node.transfer_to = None
        requests, node.requests = node.requests, []
        for client, produce_id in requests:
            if node.core.role is not Role.LEADER:
                self._not_leader(client, produce_id, node.core.leader_id)
                continue
            payload = produce_payload(produce_id)
            index = node.step(Propose(payload), now).proposed_index
            if index is None:  # a transfer is under way
                self._not_leader(client, produce_id, None)
            else:
                node.waiting[index] = (client, produce_id, payload)
        self._record_leader(node)
        if not self._flush(node, now):
            return
        if node.role_changed and node.core.role is not Role.LEADER:
            node.role_changed = (
                False  # ``Node.run_once``: refuse waiters before applying the next leader's entries
            )
            self._role_changed(node)
        self._apply(node)
        if self._dies(node, "applied"):
            return
        if node.role_changed:
            node.role_changed = False
            self._role_changed(node)
        self._maybe_compact(node, now)

    def _flush(self, node: Node, now: int) -> bool:
        """``Replica.flush``; False when the node crashed inside it."""
        effects, node.pending = node.pending, Effects()
        if effects.persist_needed():
            self._write(node, effects)
        if self._dies(node, "written"):
            return False
        if node.core.role is not Role.LEADER and not self._sync_inline(node, now):
            return False
        if effects.install_snapshot is not None and not self._install(
            node, effects.install_snapshot, now, effects
        ):
            return False
        self._send_all(node, effects)
        self._request_sync(node, now)
        if not self._collect_synced(node, now):
            return False
        for peer in effects.send_snapshot:
            self._start_snapshot(node, peer)
        if self._dies(node, "sent"):
            return False
        node.role_changed = node.role_changed or effects.role_changed
        return True

    def _write(self, node: Node, effects: Effects) -> None:
        """``LogStore.write``: a ticket for the truncation and appends, the index it will make durable."""
        disk = node.disk
        if effects.truncate_from is None and not effects.append:
            disk.write(effects, node.written_ticket)
            return
        node.written_ticket += 1
        if effects.truncate_from is not None and effects.truncate_from <= disk.last_index:
            for pending in node.unsynced:
                pending[1] = min(pending[1], effects.truncate_from - 1)
        disk.write(effects, node.written_ticket)
        node.unsynced.append([node.written_ticket, disk.last_index])
        for index, term, payload in effects.append:
            self._record_entry(node.node_id, index, term, payload, "written")

    def _request_sync(self, node: Node, now: int) -> None:
        """``LogSyncer``: one sync at a time; what was asked for meanwhile rides on the next one."""
        node.requested_ticket = max(node.requested_ticket, node.written_ticket)
        if node.sync_running is None and node.requested_ticket > node.synced_ticket:
            node.sync_running = (node.requested_ticket, now + self.rng.randint(0, self.knobs.sync_ms))

    def _sync_inline(self, node: Node, now: int) -> bool:
        """A follower's ``LogStore.sync_now`` in ``Replica.flush``: everything written is synced within
        the turn (a sync the thread is still running finishes later and changes nothing)."""
        if node.written_ticket <= node.synced_ticket:
            return True
        node.requested_ticket = max(node.requested_ticket, node.written_ticket)
        return self._synced(node, node.written_ticket, now)

    def _collect_synced(self, node: Node, now: int) -> bool:
        """``Replica.collect_synced``: report a finished sync as ``Persisted``, release held answers."""
        running = node.sync_running
        if running is None or running[1] > now:
            return True
        node.sync_running = None
        if running[0] <= node.synced_ticket:  # overtaken by an inline sync
            self._request_sync(node, now)
            return True
        return self._synced(node, running[0], now)

    def _synced(self, node: Node, ticket: int, now: int) -> bool:
        """The log is durable through ``ticket``: tell the core, send the answers that waited."""
        node.disk.sync(ticket)
        node.synced_ticket = ticket
        if self._dies(node, "synced"):
            return False
        durable = None
        while node.unsynced and node.unsynced[0][0] <= ticket:
            durable = node.unsynced.popleft()[1]
        if durable is not None:
            effects = node.core.step(Persisted(durable), now)
            node.role_changed = node.role_changed or effects.role_changed
            self._send_all(node, effects)
        while node.held and node.held[0][0] <= ticket:
            _, peer, message = node.held.pop(0)
            if message.term == node.core.term:
                self._send(node.node_id, peer, message)
            else:
                self.stats["stale_answers_dropped"] += 1
        self._request_sync(node, now)
        return True

    def _record_entry(self, where: str, index: int, term: int, payload: bytes, how: str) -> None:
        known = self.entries.setdefault((index, term), payload)
        if known != payload:
            raise InvariantViolation(
                f"entry {index} of term {term} {how} by {where} is {payload!r}, elsewhere {known!r}"
            )

    def _send_all(self, node: Node, effects: Effects) -> None:
        fresh = {index: (term, payload) for index, term, payload in effects.append}
        for peer, message in effects.messages:
            if isinstance(message, AppendRequest) and message.entry_terms:
                if node.core.role is not Role.LEADER or message.term != node.core.term:
                    self.stats["stale_appends_dropped"] += 1
                    continue  # ``Replica._send_all``: made before this node stepped down this turn
                filled = self._payloads(node, message, fresh)
                if filled is None:
                    self.stats["append_skipped_compacted"] += 1
                    continue  # compacted meanwhile: the core falls back to a snapshot
                message = AppendRequest(
                    message.term,
                    message.leader,
                    message.prev_index,
                    message.prev_term,
                    message.entry_terms,
                    message.commit_index,
                    filled,
                )
            if isinstance(message, AppendResponse | SnapshotResponse) and (
                node.held or node.synced_ticket < node.written_ticket
            ):
                node.held.append((node.written_ticket, peer, message))  # ``Replica._send_all``
                continue
            self._send(node.node_id, peer, message)

    def _payloads(
        self, node: Node, message: AppendRequest, fresh: dict[int, tuple[int, bytes]]
    ) -> tuple[bytes, ...] | None:
        """``Replica._payloads``: this turn's appends, else the log; the terms must be the core's."""
        payloads = []
        for offset, term in enumerate(message.entry_terms):
            index = message.first_index + offset
            found = fresh.get(index) or node.disk.log.get(index)
            if found is None:
                return None
            if found[0] != term:
                raise InvariantViolation(
                    f"{node.node_id} would send entry {index} as term {term} but its payload is of term "
                    f"{found[0]}"
                )
            payloads.append(found[1])
            self._record_entry(node.node_id, index, term, found[1], "sent")
        return tuple(payloads)

    # ------------------------------------------------------------------ snapshots

    def _start_snapshot(self, node: Node, peer: str) -> None:
        """``Replica._start_snapshot``: checkpoint the state machine at its applied index, stream it."""
        index = node.machine.applied_index
        term = node.core.term_at(index)
        if term is None:
            self.stats["snapshot_term_unknown"] += 1
            self.note(f"{node.node_id} cannot snapshot at {index}: its term is unknown")
            return
        if (node.node_id, peer) in self.cut or not self.nodes[peer].up:
            # The transport cannot reach the peer: the shell gives up and the core retries later.
            node.step(SnapshotFailed(peer), node.clock(self.now_ms))
            self.stats["snapshots_failed"] += 1
            return
        request = SnapshotRequest(node.core.term, node.node_id, index, term)
        self.stats["snapshots_sent"] += 1
        self.note(f"{node.node_id} streams a snapshot through {index} (term {term}) to {peer}")
        self._send(node.node_id, peer, Transfer(request, node.machine.copy()), extra_delay_ms=30)

    def _install(self, node: Node, request: SnapshotRequest, now: int, effects: Effects) -> bool:
        """``Replica._install_snapshot``; False when the node crashed inside it."""
        staged = node.staged
        if staged is None or (staged.request.index, staged.request.snapshot_term) != (
            request.index,
            request.snapshot_term,
        ):
            self.stats["install_not_staged"] += 1
            self.note(f"{node.node_id} has no staged snapshot for {request}")
            return True
        node.staged = None
        self._check_snapshot(node.node_id, staged.machine)
        if request.index < node.disk.snapshot_index:
            raise InvariantViolation(
                f"{node.node_id} installs a snapshot through {request.index} though its log starts after "
                f"{node.disk.snapshot_index} (its state machine applied {node.machine.applied_index})"
            )
        if staged.machine.applied_index < node.machine.applied_index:
            raise InvariantViolation(
                f"{node.node_id} installs a snapshot through {request.index} over a state machine that "
                f"applied up to {node.machine.applied_index} (log starts after {node.disk.snapshot_index})"
            )
        node.disk.installing = (request.index, request.snapshot_term)
        node.machine = staged.machine.copy()
        node.disk.sync_machine(node.machine)
        if self._dies(node, "installing"):
            return False
        node.disk.reset(request.index, request.snapshot_term)
        node.disk.installing = None
        node.unsynced.clear()
        node.held.clear()  # ``Replica._install_snapshot``: they answered for a log that is gone
        effects.merge(node.core.step(SnapshotInstalled(request.index, request.snapshot_term), now))
        self.stats["snapshots_installed"] += 1
        self.note(f"{node.node_id} installed the snapshot through {request.index} from {request.leader}")
        return True

    # ------------------------------------------------------------------ applying

    def _apply(self, node: Node) -> None:
        """``Node._apply``: entries up to min(commit, persisted) from the log; answer who waits on them."""
        core, disk, machine = node.core, node.disk, node.machine
        ready = min(core.commit_index, core.persisted_index)
        while machine.applied_index < ready:
            index = machine.applied_index + 1
            entry = disk.log.get(index)
            if entry is None:
                self.stats["apply_missing_entry"] += 1
                return  # "entries are missing from the log; waiting for the leader"
            term, payload = entry
            self._check_apply(node.node_id, index, term, payload, machine)
            machine.apply(index, payload)
            disk.journal.append((index, payload))
            self.stats["applied"] += 1
            waiting = node.waiting.pop(index, None)
            if waiting is None:
                continue
            client, produce_id, proposed = waiting
            if payload != proposed:
                raise InvariantViolation(
                    f"{node.node_id} answers {client.name}'s produce {produce_id} (proposed at {index}) "
                    f"with the result of {payload!r}"
                )
            self._answer(client, produce_id, index)

    def _role_changed(self, node: Node) -> None:
        """``Node._role_changed``: a node that no longer leads refuses what waits (clients go elsewhere)."""
        if node.core.role is Role.LEADER:
            self.note(f"{node.node_id} leads term {node.core.term} (log to {node.core.last_index})")
            return
        for client, produce_id, _ in node.waiting.values():
            self._not_leader(client, produce_id, node.core.leader_id)
        node.waiting.clear()

    def _maybe_compact(self, node: Node, now: int) -> None:
        """``Replica.maybe_compact``: drop applied entries once there are many, keeping a tail."""
        knobs, disk, machine = self.knobs, node.disk, node.machine
        if (
            not self.options.compaction
            or machine.applied_index - disk.snapshot_index < knobs.compact_threshold
        ):
            return
        through = machine.applied_index - knobs.compact_keep
        term = node.core.term_at(through)
        if through <= disk.snapshot_index or term is None:
            return
        disk.sync_machine(machine)  # the state machine must hold everything the log forgets
        if self._dies(node, "compacting"):
            return
        disk.compact(through, term)
        node.step(Compacted(through, term), now)
        self.stats["compactions"] += 1

    # ------------------------------------------------------------------ invariants

    def _record_leader(self, node: Node) -> None:
        core = node.core
        if core.role is not Role.LEADER:
            return
        leader = self.leaders.setdefault(core.term, node.node_id)
        if leader != node.node_id:
            raise InvariantViolation(f"two leaders in term {core.term}: {leader} and {node.node_id}")

    def _check_apply(self, where: str, index: int, term: int, payload: bytes, machine: Machine) -> None:
        known = self.applied.setdefault(index, (term, payload))
        if known != (term, payload):
            raise InvariantViolation(
                f"{where} applies entry {index} as (term {term}, {payload!r}); it was applied as "
                f"(term {known[0]}, {known[1]!r})"
            )
        produce_id = produce_id_of(payload)
        if produce_id is None:
            return
        if machine.applications[produce_id] > 1:
            raise InvariantViolation(f"{where} applied {produce_id} {machine.applications[produce_id]} times")
        first = self.first_applied.setdefault(produce_id, index)
        held = machine.values.get(produce_id)
        if held is None and first != index:
            raise InvariantViolation(f"{where} applies {produce_id} at {index}, first applied at {first}")
        if held is not None and held != first:
            raise InvariantViolation(f"{where} holds {produce_id} from {held}, first applied at {first}")

    def _check_snapshot(self, where: str, machine: Machine) -> None:
        expected = {pid: index for pid, index in self.first_applied.items() if index <= machine.applied_index}
        if machine.values != expected:
            raise InvariantViolation(
                f"the snapshot {where} installs (through {machine.applied_index}) differs from what was "
                f"applied: {sorted(set(machine.values.items()) ^ set(expected.items()))[:5]}"
            )

    def check(self) -> None:
        """Every invariant that must hold between any two steps (skipping what did not change)."""
        nodes = list(self.nodes.values())
        for node in nodes:
            core = node.core
            state: tuple[object, ...] = (node.disk.version, node.up, node.incarnation)
            state += (core.snapshot_index, core.persisted_index)
            if self._checked.get(node.node_id) != state:
                self._check_node(node)
                self._checked[node.node_id] = state
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                disks: tuple[object, ...] = (a.disk.version, b.disk.version)
                if self._checked.get((a.node_id, b.node_id)) != disks:
                    self._check_log_matching(a, b)
                    self._checked[(a.node_id, b.node_id)] = disks
        everything: tuple[object, ...] = (len(self.acknowledged), *(node.disk.version for node in nodes))
        if self._checked.get("acknowledged") != everything:
            self._check_acknowledged_durable()
            self._checked["acknowledged"] = everything

    def _check_node(self, node: Node) -> None:
        disk = node.disk
        if disk.image.applied_index < disk.snapshot_index:
            raise InvariantViolation(
                f"{node.node_id}'s log starts after {disk.snapshot_index} but its synced state machine "
                f"only covers {disk.image.applied_index}"
            )
        if not node.up:
            return
        core = node.core
        # The core's log up to what it counts as persisted is what the disk holds.
        if core.snapshot_index != disk.snapshot_index:
            raise InvariantViolation(
                f"{node.node_id}'s core starts its log after {core.snapshot_index}, its disk after "
                f"{disk.snapshot_index}"
            )
        for index in range(max(core.snapshot_index, disk.snapshot_index) + 1, core.persisted_index + 1):
            entry = disk.durable.get(index)
            if entry is None or entry[0] != core.term_at(index):
                raise InvariantViolation(
                    f"{node.node_id}'s core counts entry {index} (term {core.term_at(index)}) as persisted, "
                    f"the disk has {entry}"
                )

    def _check_log_matching(self, a: Node, b: Node) -> None:
        """If two durable logs hold an entry of the same index and term, they agree up to it."""
        la, lb = a.disk.durable, b.disk.durable
        low = max(a.disk.snapshot_index, b.disk.snapshot_index)
        high = min(a.disk.durable_last_index, b.disk.durable_last_index)
        for index in range(high, low, -1):
            ea, eb = la.get(index), lb.get(index)
            if ea is None or eb is None or ea[0] != eb[0]:
                continue
            for below in range(index, low, -1):
                if la.get(below) != lb.get(below):
                    raise InvariantViolation(
                        f"{a.node_id} and {b.node_id} both hold entry {index} of term {ea[0]} but differ "
                        f"at {below}: {la.get(below)} vs {lb.get(below)}"
                    )
            return

    def _check_acknowledged_durable(self) -> None:
        quorum = self.size // 2 + 1
        for produce_id, answered_at in self.acknowledged.items():
            first = self.first_applied[produce_id]
            entry = self.applied[first]
            holders = [
                node.node_id
                for node in self.nodes.values()
                if node.disk.durable.get(first) == entry or produce_id in node.disk.image.values
            ]
            if len(holders) < quorum:
                raise InvariantViolation(
                    f"acknowledged produce {produce_id} (entry {first}, answered at {answered_at}) is "
                    f"durable only on {holders}"
                )

    # ------------------------------------------------------------------ the end

    def settle(self, max_steps: int) -> None:
        """Heal everything, run quiet; then a leader must exist, commit a proposal, and all must agree."""
        self.step_number += 1
        self.calm = True
        self.cut.clear()
        self.note("heal everything; no more faults")
        final = Client("final", 1_000)
        self.clients.append(final)
        final.counter = 1
        final.current = Request("final-1", self.members[0], 0)

        def done() -> bool:
            return final.current is None and all(c.current is None for c in self.clients) and self._agreed()

        self._run_until(done, max_steps, "no leader committed a new proposal and brought every node along")
        if "final-1" not in self.acknowledged:
            raise InvariantViolation("the final proposal was not acknowledged")
        self._check_final()

    def _run_until(self, condition: Callable[[], bool], max_steps: int, failure: str) -> None:
        for _ in range(max_steps):
            self.step_number += 1
            self.step()
            self.check()
            if condition():
                return
        raise InvariantViolation(f"liveness: {failure} within {max_steps} quiet steps; {self._status()}")

    def _agreed(self) -> bool:
        nodes = list(self.nodes.values())
        if not all(node.up for node in nodes):
            return False
        leaders = [node for node in nodes if node.core.role is Role.LEADER]
        if len(leaders) != 1:
            return False
        leader = leaders[0].core
        return all(
            node.core.term == leader.term
            and node.core.leader_id == leader.node_id
            and node.machine.applied_index == leader.last_index
            for node in nodes
        )

    def _status(self) -> str:
        parts = []
        for node in self.nodes.values():
            core = node.core
            parts.append(
                f"{node.node_id}: {'up' if node.up else 'down'} {core.role.value} term {core.term} "
                f"leader {core.leader_id} log {core.snapshot_index}..{core.last_index} "
                f"commit {core.commit_index} persisted {core.persisted_index} "
                f"applied {node.machine.applied_index} progress {core.follower_progress()}"
            )
        return "; ".join(parts)

    def _check_final(self) -> None:
        nodes = list(self.nodes.values())
        reference = nodes[0].machine
        for node in nodes[1:]:
            if node.machine.values != reference.values:
                difference = set(node.machine.values.items()) ^ set(reference.values.items())
                raise InvariantViolation(
                    f"state machines differ after quiescence ({nodes[0].node_id} vs {node.node_id}): "
                    f"{sorted(difference)[:5]}"
                )
        for node in nodes:
            twice = sorted(pid for pid, count in node.machine.applications.items() if count > 1)
            if twice:
                raise InvariantViolation(f"{node.node_id} applied {twice[:5]} more than once")
        for produce_id in self.acknowledged:
            missing = [node.node_id for node in nodes if produce_id not in node.machine.values]
            if missing:
                raise InvariantViolation(f"acknowledged produce {produce_id} is not applied on {missing}")


def run_seed(seed: int, nodes: int, options: Options | None = None) -> collections.Counter[str]:
    """Run one simulation; raises ``InvariantViolation`` (with the replay command) on any violation."""
    return World(seed, nodes, options).run()
