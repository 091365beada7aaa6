"""A seeded, deterministic simulation of the queue core: many clients, a fake clock, crashes.

Each seed builds a world: producers (priorities, delays, EXACTLY_ONCE payloads that collide, produce
ids retried), consumer sessions whose subscriptions have random credit and retry policies, workers
that ack, fail, release, go silent (session expiry) or outlive their processing timeout, an admin
that purges and requeues dead letters, and crashes of the node at every point of a loop turn:
before the entry is durable, after it is durable but before it is applied, after it is applied but
before anyone heard back, and a power cut that loses the state machine's last unsynced writes.

Every turn is built exactly as ``broker.node`` builds it (``tests.helpers.simulation.Core``). After
every step the store is compared row by row with a naive reference model of the design
(``tests.helpers.simulation.Model``), and the scheduler's choices are checked: the keys leased are
the first ready keys in queue order, no subscription exceeds its credit, due messages are promoted,
overdue leases and dead sessions are expired.

A failure names its seed; replay one with
``ZBROKER_SIM_SEED=<seed> .venv/bin/pytest tests/test_queue_simulation.py -k replay``
(``ZBROKER_SIM_STEPS`` sets the steps; ``ZBROKER_SIM_SEEDS`` how many seeds the sweep runs).
"""

from __future__ import annotations

import collections
import os
import random
from dataclasses import dataclass, field

import bson
import pytest

from broker import keys as k
from broker.commands import (
    AckCmd,
    ExpireCmd,
    LeaseCmd,
    LogCommand,
    LogEntry,
    NackCmd,
    PurgeCmd,
    PurgeDeadCmd,
    RequeueDeadCmd,
)
from broker.keys import Cf
from broker.protocol import ErrorCode, LeaseRef, NackItem, ProduceItem
from broker.queue_state import ChannelState, CommandResult, Leased, ProduceOutcome, session_key
from broker.ready_head import HEAD_CAPACITY
from broker.store import MemoryStore
from tests.helpers.simulation import Core, Model, View, restored_copy, view

SEEDS = int(os.environ.get("ZBROKER_SIM_SEEDS", "200"))
STEPS = int(os.environ.get("ZBROKER_SIM_STEPS", "250"))
REPLAY_SEED = os.environ.get("ZBROKER_SIM_SEED")
CHANNELS = ("sim/a", "sim/b", "sim/ordered")
TRACE_STEPS = 12
# Known core bug (see test_queue_state.py, xfail): a duplicate-only change to a channel is not saved.
KNOWN_UNPERSISTED_COUNTERS = ("duplicates_total",)
# Known core bug (see test_queue_state.py, xfail): a purge followed in the same entry by a lease or a
# promotion of a purged key corrupts the counters and makes apply raise. Until fixed, the simulated
# admin's purge gets an entry of its own.
KNOWN_PURGE_NEEDS_OWN_ENTRY = True


@dataclass(slots=True)
class SubConfig:
    """A client's subscription; its options never change, so credit can be checked against them."""

    sub_id: int
    channel: str
    max_parallel: int
    max_attempts: int
    retry_backoff_ms: int
    retry_backoff_max_ms: int
    processing_timeout_ms: int
    subscribed: bool = True


@dataclass(slots=True)
class Held:
    """A delivery a worker is handling: what it will do and when."""

    lease: Leased
    done_ms: int
    outcome: str  # "ack", "fail" or "release"


@dataclass(slots=True)
class Client:
    """A consumer process with one session."""

    name: bytes
    timeout_ms: int
    subs: dict[int, SubConfig]
    slow: bool
    mode: str = "live"  # "live", "silent" (no heartbeats, no acks) or "gone" (said BYE)
    until_ms: int = 0
    attached: bool = False
    held: dict[tuple[int, int], Held] = field(default_factory=dict)  # (seq, lease token) -> delivery
    unanswered_acks: list[LeaseRef] = field(default_factory=list)
    unanswered_nacks: list[NackItem] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        """The session key the node files this client's leases under."""
        return session_key(self.name)


class World:
    """One seeded simulation."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        rng = self.rng = random.Random(seed)
        self.now_ms = rng.randrange(1_000_000, 2_000_000_000_000)
        window_ms = rng.choice([1_000, 3_000, 20_000])
        self.head_capacity = rng.choice([1, 2, 3, 8, None])
        self.core = Core(
            produce_id_window_ms=window_ms,
            session_timeout_ms=rng.choice([300, 1_000]),
            head_capacity=self.head_capacity,
        )
        self.model = Model(window_ms, unpersisted=KNOWN_UNPERSISTED_COUNTERS)
        self.clients = [self._client(b"ordered", ordered=True)]
        self.clients += [self._client(b"c%d" % n) for n in range(rng.randint(1, 4))]
        self.produce_counter = 0
        self.sent: dict[str, tuple[int, ProduceItem]] = {}  # produce id -> first sent, item
        self.recent_ids: collections.deque[str] = collections.deque(maxlen=40)
        self.unanswered_produce: list[ProduceItem] = []
        self.images: collections.deque[MemoryStore] = collections.deque(maxlen=3)
        self.trace: collections.deque[str] = collections.deque(maxlen=TRACE_STEPS)
        self._view: tuple[int, View] | None = None
        self.stats = collections.Counter[str]()
        self.senders: set[bytes] = set()
        self.restarts = 0
        self._checked = (-1, -1)

    def _client(self, name: bytes, *, ordered: bool = False) -> Client:
        rng = self.rng
        subs = {}
        channels = ["sim/ordered"] if ordered else rng.sample(CHANNELS[:2], rng.randint(1, 2))
        for sub_id, channel in enumerate(channels, start=1):
            subs[sub_id] = SubConfig(
                sub_id,
                channel,
                max_parallel=1 if ordered else rng.randint(1, 4),
                max_attempts=rng.randint(1, 4),
                retry_backoff_ms=rng.choice([0, 0, 30, 200]),
                retry_backoff_max_ms=rng.choice([0, 100, 1_000]),
                processing_timeout_ms=rng.choice([0, 0, 150, 800]),
            )
        return Client(name, rng.choice([300, 600, 2_000]), subs, slow=rng.random() < 0.3)

    # ------------------------------------------------------------------ running

    def run(self, steps: int) -> collections.Counter[str]:
        """Run ``steps`` steps, checking every invariant after each; what happened, counted."""
        for step in range(steps):
            try:
                self.step(step)
            except AssertionError as exc:
                trace = "\n    ".join(self.trace)
                raise AssertionError(
                    f"simulation seed {self.seed} failed at step {step} (t={self.now_ms}): {exc}\n"
                    f"  last steps:\n    {trace}\n"
                    f"  replay: ZBROKER_SIM_SEED={self.seed} ZBROKER_SIM_STEPS={step + 1} "
                    ".venv/bin/pytest tests/test_queue_simulation.py -k replay"
                ) from exc
        for channel in self.model.channels.values():
            for counter in ("dead_total", "expired_total", "nacked_total"):
                self.stats[counter] += channel.counters[counter]
        return self.stats

    def step(self, step: int) -> None:
        """One loop turn of the node and what every client did before it."""
        rng = self.rng
        self.now_ms += rng.choices([0, 1, 20, 100, 250, 3_000], weights=[5, 10, 30, 30, 20, 1])[0]
        now = self.now_ms
        first: list[LogCommand] = []
        acks: list[LeaseRef] = []
        nacks: list[NackItem] = []
        admin = self._admin()
        if isinstance(admin, PurgeCmd) and KNOWN_PURGE_NEEDS_OWN_ENTRY:
            self._alone(admin)
            admin = None
        for client in self.clients:
            self._client_acts(client, first, acks, nacks)
        if admin is not None:
            first.insert(rng.randint(0, len(first)), admin)
        produce = self._produce()
        self.senders = {client.name for client in self.clients if client.mode == "live"}
        pre = self._current_view()
        commands = self.core.build(now, first=first, produce=produce, acks=acks, nacks=nacks)
        self._check_plan(pre, commands)
        crash = rng.choices(["none", "lost", "unapplied", "unanswered", "power"], weights=[96, 1, 1, 1, 1])[0]
        if crash == "power" and not self.images:
            crash = "none"
        self.trace.append(f"step {step} t={now} crash={crash}: {_describe(commands)}")
        if crash != "none":
            self.unanswered_produce = list(produce)  # nobody heard back: the same items come again
        if not commands or crash == "lost":
            if crash != "none":
                self._crash("lost")
            else:
                self._check_after(pre, planned=True)
            return
        index, entry = self.core.append(now, commands)
        if crash == "unapplied":
            self._crash(crash)
            return
        results = self.core.apply(index, entry)
        self._applied(index, entry, results)
        if crash == "unanswered":
            self._crash(crash)
            return
        if crash == "power":
            self._power_cut()
            return
        self._deliver(entry.commands, results)
        if step % 25 == 0:
            self.images.append(restored_copy(self.core.store))
        self._check_after(self._current_view(), planned=True)

    def _applied(self, index: int, entry: LogEntry, results: list[CommandResult]) -> None:
        """The model checks what applying an entry answered; the stats count what was exercised."""
        self.model.apply(index, entry, results)
        for command, result in zip(entry.commands, results, strict=True):
            self.stats[type(command).__name__] += 1
            if isinstance(result, list):
                self.stats["stale"] += sum(1 for r in result if r is ErrorCode.STALE_LEASE)
                self.stats["duplicate"] += sum(
                    1 for r in result if isinstance(r, ProduceOutcome) and r.duplicate
                )

    def _alone(self, command: LogCommand) -> None:
        index, entry = self.core.append(self.now_ms, [command])
        self._applied(index, entry, self.core.apply(index, entry))
        self._check_after(self._current_view(), planned=False)

    # ------------------------------------------------------------------ clients

    def _client_acts(
        self, client: Client, first: list[LogCommand], acks: list[LeaseRef], nacks: list[NackItem]
    ) -> None:
        rng, now, core = self.rng, self.now_ms, self.core
        if client.mode != "live":
            if now < client.until_ms:
                return
            client.mode = (
                "live"  # back: a silent worker resumes (a zombie if it expired), a gone one reconnects
            )
        if rng.random() < 0.004:
            client.mode, client.until_ms = "silent", now + int(client.timeout_ms * rng.uniform(0.3, 3))
            return
        session = core.scheduler.touch(client.name, now)
        if session is None or not client.attached:
            session = core.attach(client.name, now, timeout_ms=client.timeout_ms)
            for sub in client.subs.values():
                if sub.subscribed:
                    self._subscribe(session, sub)
            client.attached = True
        if not client.unanswered_acks and not client.unanswered_nacks and rng.random() < 0.003:
            release = core.scheduler.close(session)  # BYE: the node releases every lease of the session
            if release is not None:
                first.append(release)
            client.held.clear()
            client.attached = False
            client.mode, client.until_ms = "gone", now + rng.randint(0, 2_000)
            return
        for sub in client.subs.values():
            if rng.random() < 0.003:
                if sub.subscribed:
                    core.scheduler.unsubscribe(session, sub.sub_id)
                else:
                    self._subscribe(session, sub)
                sub.subscribed = not sub.subscribed
        acks.extend(client.unanswered_acks)
        nacks.extend(client.unanswered_nacks)
        for delivery, held in list(client.held.items()):
            if held.done_ms > now:
                continue
            del client.held[delivery]
            lease = held.lease
            if held.outcome == "ack":
                client.unanswered_acks.append(LeaseRef(lease.seq, lease.lease_token))
                acks.append(client.unanswered_acks[-1])
            else:
                release = held.outcome == "release"
                client.unanswered_nacks.append(
                    NackItem(lease.seq, lease.lease_token, release, "worker failed")
                )
                nacks.append(client.unanswered_nacks[-1])

    def _subscribe(self, session: object, sub: SubConfig) -> None:
        self.core.subscribe(
            session,  # type: ignore[arg-type]
            sub.sub_id,
            sub.channel,
            max_parallel=sub.max_parallel,
            max_attempts=sub.max_attempts,
            retry_backoff_ms=sub.retry_backoff_ms,
            retry_backoff_max_ms=sub.retry_backoff_max_ms,
            processing_timeout_ms=sub.processing_timeout_ms,
        )

    def _deliver(self, commands: tuple[LogCommand, ...], results: list[CommandResult]) -> None:
        """Answers reach the clients: leases to their workers, settles acknowledged."""
        rng, now = self.rng, self.now_ms
        by_key = {client.key: client for client in self.clients}
        for command, result in zip(commands, results, strict=True):
            if not isinstance(command, LeaseCmd):
                continue
            assert isinstance(result, list)
            for lease in result:
                assert isinstance(lease, Leased)
                client = by_key[lease.session]
                assert client.mode != "gone", f"{client.name!r} said BYE but was leased message {lease.seq}"
                # A silent worker is frozen, not gone: it reads its deliveries when it wakes up.
                timeout = max(sub.processing_timeout_ms for sub in client.subs.values()) or 500
                duration = rng.randint(0, 2 * timeout) if client.slow else rng.randint(0, 120)
                outcome = rng.choices(["ack", "fail", "release"], weights=[75, 17, 8])[0]
                client.held[(lease.seq, lease.lease_token)] = Held(lease, now + duration, outcome)
                self.stats["delivered"] += 1
        for client in self.clients:
            if client.name in self.senders:
                client.unanswered_acks.clear()
                client.unanswered_nacks.clear()
        self.unanswered_produce.clear()

    # ------------------------------------------------------------------ producers and admin

    def _produce(self) -> list[ProduceItem]:
        rng, now = self.rng, self.now_ms
        items = list(self.unanswered_produce)
        for _ in range(rng.choices([0, 1, 2, 3], weights=[3, 4, 2, 1])[0]):
            retry = [pid for pid in self.recent_ids if now - self.sent[pid][0] < self.model.window_ms // 2]
            if retry and rng.random() < 0.1:
                self.stats["retried_produce"] += 1
                items.append(self.sent[rng.choice(retry)][1])  # a retry after a timeout: same id, same item
                continue
            self.produce_counter += 1
            pid = f"p{self.produce_counter}"
            channel = rng.choice(CHANNELS)
            priority = rng.choice([0, 0, 0, 1, 2, -1])
            delay_ms = 0 if rng.random() < 0.8 else rng.choice([1, 50, 300, 1_500])
            if rng.random() < 0.35:
                body = bson.encode({"k": rng.randrange(3)})
                dedup_ms = rng.choice([50, 300, 2_000])
                dedup_hash = rng.choice([b"h0", b"h1"]) if rng.random() < 0.3 else None
            else:
                body, dedup_ms, dedup_hash = bson.encode({"n": self.produce_counter}), 0, None
            item = ProduceItem(pid, channel, body, priority, delay_ms, dedup_ms, dedup_hash)
            self.sent[pid] = (now, item)
            self.recent_ids.append(pid)
            items.append(item)
            if rng.random() < 0.05:
                items.append(item)  # the same id twice in one entry
        return items

    def _admin(self) -> LogCommand | None:
        r = self.rng.random()
        channel = self.rng.choice(CHANNELS)
        if r < 0.01:
            return PurgeCmd(channel)
        if r < 0.02:
            return RequeueDeadCmd(channel)
        if r < 0.025:
            return PurgeDeadCmd(channel)
        return None

    # ------------------------------------------------------------------ crashes

    def _crash(self, kind: str) -> None:
        """The node dies and restarts: scheduler soft state and undelivered answers are lost."""
        self.stats[f"crash_{kind}"] += 1
        applied_before = self.core.state.applied_index
        replayed = self.core.restart(self.now_ms, one_by_one=self.rng.random() < 0.5)
        for index, entry, results in replayed:
            assert index > applied_before
            self._applied(index, entry, results)
        self._after_restart()
        self._check_after(self._current_view(), planned=False)

    def _power_cut(self) -> None:
        """The state machine's unsynced writes are lost; the log (fsynced) is replayed over an old image."""
        self.stats["crash_power"] += 1
        before = self.core.store.snapshot_items()
        image = self.rng.choice(list(self.images))
        self.core.store = restored_copy(image)
        replayed = self.core.restart(self.now_ms, one_by_one=self.rng.random() < 0.5)
        assert replayed, "an old image must be behind the log"
        after = self.core.store.snapshot_items()
        for cf, rows in before.items():
            assert _masked(cf, after[cf]) == _masked(cf, rows), (
                f"replaying the log over an old image gave another {cf.value} column family"
            )
        self.images = collections.deque([restored_copy(image)], maxlen=3)
        self._after_restart()
        self._check_after(self._current_view(), planned=False)

    def _after_restart(self) -> None:
        self.restarts += 1
        for client in self.clients:
            client.attached = False  # the client library says HELLO again and re-subscribes
        self._view = None

    # ------------------------------------------------------------------ checks

    def _current_view(self) -> View:
        writes = self.core.store.writes
        if self._view is None or self._view[0] != writes or self._view[1] is None:
            self._view = (writes, view(self.core.store))
        return self._view[1]

    def _check_plan(self, pre: View, commands: list[LogCommand]) -> None:
        """Lease grants take the first ready keys in queue order, within every subscription's credit."""
        state, scheduler = self.core.state, self.core.scheduler
        settling: dict[tuple[bytes, int], set[int]] = {}
        for command in commands:
            refs: tuple[LeaseRef | NackItem, ...] = ()
            if isinstance(command, AckCmd | ExpireCmd):
                refs = command.refs
            elif isinstance(command, NackCmd):
                refs = command.items
            for ref in refs:
                lease = pre.leases.get(ref.seq)
                if lease is not None and lease[3] == ref.lease_token:
                    settling.setdefault((lease[1], lease[2]), set()).add(ref.seq)
        configs = {(client.key, sub.sub_id): sub for client in self.clients for sub in client.subs.values()}
        credit: dict[tuple[bytes, int], int] = {}
        wanted: collections.Counter[str] = collections.Counter()
        for session in scheduler.sessions.values():
            for sub in session.subscriptions.values():
                owner = (sub.session, sub.subscription_id)
                inflight = sum(1 for row in pre.leases.values() if (row[1], row[2]) == owner)
                credit[owner] = sub.max_parallel - inflight + len(settling.get(owner, ()))
                wanted[sub.channel] += max(0, credit[owner])
        granted: dict[str, list[bytes]] = {}
        for command in commands:
            if not isinstance(command, LeaseCmd):
                continue
            owner = (session_key(command.session), command.subscription_id)
            assert owner in credit, f"a lease command for {owner}, which is not subscribed"
            assert len(command.ready_keys) <= credit[owner], (
                f"{owner} granted {len(command.ready_keys)} with credit {credit[owner]}"
            )
            config = configs[owner]
            assert (command.max_attempts, command.processing_timeout_ms) == (
                config.max_attempts,
                config.processing_timeout_ms,
            )
            granted.setdefault(config.channel, []).extend(command.ready_keys)
        capacity = self.head_capacity or HEAD_CAPACITY
        for name in CHANNELS:
            channel = state.channels.get(name)
            if channel is None:
                continue
            ready = pre.ready_keys(channel.chan_id)
            keys = granted.get(name, [])
            assert sorted(keys) == ready[: len(keys)], (
                f"{name}: leased {_keys(keys)} but the first ready keys were {_keys(ready[: len(keys) + 2])}"
            )
            expected = min(wanted[name], len(ready), capacity)
            assert len(keys) == expected, (
                f"{name}: leased {len(keys)} keys with {len(ready)} ready and {wanted[name]} credit"
            )

    def _check_after(self, current: View, *, planned: bool) -> None:
        """The store matches the model; timers that fired were handled; credit and ownership hold."""
        state, now = self.core.state, self.now_ms
        checked = (self.restarts, self.core.store.writes)
        if checked != self._checked:  # nothing applied since the last check: the model agreed already
            self.model.check(current, state)
            self._checked = checked
        if planned:
            for seq, (key, _, _) in current.delayed.items():
                due = k.unpack_delayed_key(key)[1]
                assert due > now, f"message {seq} was due at {due} but is still delayed at {now}"
            for seq, row in current.leases.items():
                assert row[5] == 0 or row[5] > now, f"lease of {seq} is past its deadline {row[5]} at {now}"
        for seq, row in current.leases.items():
            assert row[1] in self.core.scheduler.sessions, f"lease of {seq} belongs to no session: {row[1]!r}"
        for owner, count in state.subscription_inflight.items():
            (sub,) = [
                sub
                for client in self.clients
                if client.key == owner[0]
                for sub in client.subs.values()
                if sub.sub_id == owner[1]
            ]
            assert count <= sub.max_parallel, f"{owner} holds {count} leases, max_parallel {sub.max_parallel}"
        for client in self.clients:
            for (seq, _), held in client.held.items():
                lease = state.leases.get(seq)
                if lease is not None and lease.lease_token == held.lease.lease_token:
                    assert lease.session == client.key, f"{client.name!r} holds a lease of {lease.session!r}"


def _masked(cf: Cf, rows: dict[bytes, bytes]) -> dict[bytes, object]:
    """Rows to compare, the channel counters of known bugs left out."""
    if cf is not Cf.CHANNELS or not KNOWN_UNPERSISTED_COUNTERS:
        return dict(rows)
    masked: dict[bytes, object] = {}
    for name, value in rows.items():
        channel = ChannelState.unpack(name.decode(), value)
        for counter in KNOWN_UNPERSISTED_COUNTERS:
            setattr(channel, counter, 0)
        masked[name] = channel.pack()
    return masked


def _keys(keys: list[bytes]) -> list[tuple[int, int, int]]:
    return [k.unpack_ready_key(key)[1:] for key in keys]


def _describe(commands: list[LogCommand]) -> str:
    kinds = collections.Counter(type(c).__name__ for c in commands)
    return " ".join(f"{name}x{count}" for name, count in sorted(kinds.items()))


# ---------------------------------------------------------------------- tests


def test_random_worlds_keep_every_invariant() -> None:
    # Given SEEDS seeded worlds of producers, consumers, an admin and a crashing node
    totals: collections.Counter[str] = collections.Counter()
    for seed in range(SEEDS):
        # When each runs STEPS turns
        totals += World(seed).run(STEPS)
    # Then every invariant held after every step (World.run raises with the seed otherwise),
    # and the worlds did exercise deliveries, failures, fencing, deduplication and every crash
    assert totals["delivered"] > SEEDS * STEPS // 10, totals
    exercised = ["stale", "duplicate", "retried_produce", "dead_total", "expired_total", "nacked_total"]
    exercised += [f"crash_{kind}" for kind in ("lost", "unapplied", "unanswered", "power")]
    exercised += ["PromoteCmd", "ExpireCmd", "ExpireDedupCmd", "PurgeCmd", "RequeueDeadCmd", "PurgeDeadCmd"]
    assert all(totals[name] > 0 for name in exercised), totals


@pytest.mark.skipif(REPLAY_SEED is None, reason="set ZBROKER_SIM_SEED=<seed> to replay one simulation")
def test_replay_one_seed() -> None:
    # Given the seed a failure named
    world = World(int(REPLAY_SEED or 0))
    # When it runs again
    # Then it fails the same way (or passes once fixed)
    world.run(STEPS)
