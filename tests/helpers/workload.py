"""A workload for replicated-cluster tests and ``scripts/chaos``: a producer at full speed, two
competing consumers, and a verdict on what was acknowledged, consumed, lost or enqueued twice.

    workload = Workload(cluster.endpoints, "chaos/jobs")
    await workload.start()
    ...                                   # kill nodes, cut links, restart, heal
    report = await workload.finish()      # stop producing, drain, verify
    print(report.summary())
    assert not report.problems(), report.problems()

The producer sends batches of ``in_flight`` produces with ``asyncio.gather``, each with a unique int
payload. A produce that returned is *acknowledged*: the guarantee is that it is consumed. One that
raised (after the client's own retries with the same produce id, until ``produce_timeout_s``) is
*uncertain*: it may or may not be enqueued, so it is counted apart and never produced again (a second
produce would carry a new id and be a second message by design).

Every delivery is recorded with its message id (the produce id) and attempt. A value delivered under
two message ids was enqueued twice; deliveries of the same id beyond the first are redeliveries.
The admin counters must agree: once drained, ``produced_total`` equals the distinct ids consumed.

Also here: per-node probes (each node answers ``cluster_status`` from its own view, counters
included), waits for a leader and for catch-up, and ``Chaos``, a random fault schedule.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import itertools
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from broker import protocol as p
from broker.launcher import ClusterProcesses
from client import BrokerAdmin, BrokerError, BrokerQueue, NotFoundError, QueueMessage, QueueStats
from tests.helpers.faults import FaultyCluster
from tests.helpers.raw import RawClient

__all__ = [
    "Chaos",
    "Delivery",
    "Report",
    "Workload",
    "probe",
    "restore",
    "run_chaos",
    "transfer_leadership",
    "wait_caught_up",
    "wait_for_leader",
]

POLL_S = 0.05


async def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g}s")
        await asyncio.sleep(POLL_S)


# ---------------------------------------------------------------------------------------- node probes


def _admin_blocking(endpoint: str, op: str, args: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
    client = RawClient(endpoint)
    try:
        answer = client.request(p.Command.ADMIN, {"op": op, "args": args}, timeout_s)
    except TimeoutError:
        return None
    finally:
        client.close()
    return answer.result if isinstance(answer, p.Reply) else None


async def probe(endpoint: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """One node's own ``cluster_status`` (followers answer it locally), or None if it does not answer.

    Unlike ``BrokerAdmin``, which says HELLO and so follows NOT_LEADER to the leader, a bare request
    reaches exactly this node: ``result["counters"]`` are its own, ``result["nodes"]`` its view.
    """
    return await asyncio.to_thread(_admin_blocking, endpoint, "cluster_status", {"local": True}, timeout_s)


def own_row(view: dict[str, Any], node_id: str) -> dict[str, Any]:
    """The row a node's ``cluster_status`` gives for itself."""
    return next(row for row in view["nodes"] if row["id"] == node_id)


async def views(cluster: ClusterProcesses) -> dict[str, dict[str, Any] | None]:
    """Every running member's own view (None for a member that did not answer)."""
    running = [node_id for node_id in cluster.ids if cluster[node_id].running]
    answers = await asyncio.gather(*(probe(cluster[node_id].endpoint) for node_id in running))
    return dict(zip(running, answers, strict=True))


def _agreed_leader(seen: dict[str, dict[str, Any] | None], size: int) -> str | None:
    """The member a majority of the cluster names as leader, if that member says it leads."""
    named = Counter(view["leader"] for view in seen.values() if view is not None and view.get("leader"))
    for leader, votes in named.items():
        view = seen.get(leader)
        if votes > size // 2 and view is not None and own_row(view, leader)["role"] == "leader":
            return str(leader)
    return None


async def wait_for_leader(
    cluster: ClusterProcesses, timeout_s: float = 15.0, *, not_in: Iterable[str] = ()
) -> str:
    """The leader a majority agrees on (and that says it leads), waiting for one outside ``not_in``."""
    excluded = set(not_in)
    deadline = time.monotonic() + timeout_s
    while True:
        leader = _agreed_leader(await views(cluster), len(cluster.ids))
        if leader is not None and leader not in excluded:
            return leader
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no agreed leader outside {sorted(excluded)} within {timeout_s:g}s")
        await asyncio.sleep(POLL_S)


async def transfer_leadership(cluster: ClusterProcesses, to: str, timeout_s: float = 15.0) -> None:
    """Ask the leader (admin ``leader_transfer``) to hand over to ``to`` until ``to`` leads."""
    deadline = time.monotonic() + timeout_s
    while (leader := await wait_for_leader(cluster, max(deadline - time.monotonic(), 0.1))) != to:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{to} did not take over from {leader} within {timeout_s:g}s")
        await asyncio.to_thread(
            _admin_blocking, cluster[leader].endpoint, "leader_transfer", {"node": to}, 1.0
        )
        await asyncio.sleep(0.2)


async def wait_caught_up(cluster: ClusterProcesses, timeout_s: float = 30.0) -> dict[str, int]:
    """Wait until every running member has applied what the leader had committed when this began.

    Returns each member's applied index at that point.
    """
    leader = await wait_for_leader(cluster, timeout_s)
    leader_view = await probe(cluster[leader].endpoint)
    assert leader_view is not None, f"the leader {leader} stopped answering"
    target = int(own_row(leader_view, leader)["commit_index"])
    deadline = time.monotonic() + timeout_s
    while True:
        applied = {
            node_id: int(own_row(view, node_id)["applied_index"]) if view is not None else -1
            for node_id, view in (await views(cluster)).items()
        }
        if len(applied) == len(cluster.ids) and min(applied.values()) >= target:
            return applied
        if time.monotonic() >= deadline:
            raise TimeoutError(f"members not caught up to {target} within {timeout_s:g}s: {applied}")
        await asyncio.sleep(POLL_S)


NUDGE_CHANNEL = "workload/nudge"
NUDGE_EVERY_S = 0.5


async def restore(cluster: ClusterProcesses, timeout_s: float = 40.0, *, nudge: bool = True) -> str:
    """Heal every link, start every stopped member, and wait for a leader and full catch-up.

    With ``nudge`` a produce to ``NUDGE_CHANNEL`` goes out every half second meanwhile: a member that
    missed entries while down is only brought up to date when the leader appends something new (see
    ``test_a_follower_restarted_on_an_idle_cluster_catches_up_without_new_produces``), and the next
    test needs every member caught up.
    """
    if isinstance(cluster, FaultyCluster):
        await asyncio.to_thread(cluster.heal_all)
    await asyncio.to_thread(cluster.start)
    if not nudge:
        await wait_caught_up(cluster, timeout_s)
        return await wait_for_leader(cluster, timeout_s)
    async with BrokerQueue(cluster.endpoints, connect_timeout=timeout_s) as queue:
        channel = queue.channel(NUDGE_CHANNEL, int)

        async def keep_nudging() -> None:
            for count in itertools.count():
                await channel.produce(count, timeout=timeout_s)
                await asyncio.sleep(NUDGE_EVERY_S)

        nudging = asyncio.create_task(keep_nudging())
        try:
            await wait_caught_up(cluster, timeout_s)
        finally:
            nudging.cancel()
            await asyncio.gather(nudging, return_exceptions=True)
    return await wait_for_leader(cluster, timeout_s)


# ---------------------------------------------------------------------------------------- the workload


class _StaleAckCounter(logging.Handler):
    """Counts the consumer's "ack of message ... refused" warnings (and keeps them off stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "refused" in record.getMessage():
            self.count += 1


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One handling of a message by a consumer."""

    value: int
    message_id: str
    attempt: int
    lease_token: int
    consumer: str
    at: float


@dataclasses.dataclass(slots=True)
class Report:
    """What a workload did and what it proves; ``problems()`` is empty when every guarantee held."""

    acknowledged: int
    uncertain: int
    uncertain_enqueued: int
    consumed: int
    handled: int
    lost: list[int]
    enqueued_twice: list[int]
    phantoms: list[int]
    redelivered: int
    later_attempts: int
    first_attempt_repeats: int
    max_unavailable_s: float
    max_unavailable_at_s: float
    duration_s: float
    stats: QueueStats | None
    stats_problem: str | None
    errors: Counter[str]
    stale_acks: int = 0

    def summary(self) -> str:
        """The figures, one per line."""
        stats = self.stats
        rate = self.acknowledged / self.duration_s if self.duration_s else 0.0
        lines = [
            f"acknowledged           {self.acknowledged} ({rate:.0f}/s over {self.duration_s:.1f}s)",
            f"uncertain              {self.uncertain} (of which enqueued: {self.uncertain_enqueued})",
            f"consumed (distinct)    {self.consumed}",
            f"handled (deliveries)   {self.handled}",
            f"lost                   {len(self.lost)}",
            f"enqueued twice         {len(self.enqueued_twice)}",
            f"redelivered            {self.redelivered} (deliveries with attempt > 1: {self.later_attempts}; "
            f"messages handled twice as attempt 1: {self.first_attempt_repeats})",
            f"max unavailability     {self.max_unavailable_s:.2f}s "
            f"(ending {self.max_unavailable_at_s:.1f}s in)",
        ]
        if stats is not None:
            lines.append(
                f"admin stats            produced_total={stats.produced_total} "
                f"acked_total={stats.acked_total} dead={stats.dead} ready={stats.ready} "
                f"in_flight={stats.in_flight}"
            )
        if self.stale_acks:
            lines.append(f"acks refused as stale  {self.stale_acks}")
        if self.errors:
            lines.append(f"produce errors         {dict(self.errors)}")
        return "\n".join(lines)

    def problems(self) -> list[str]:
        """Every broken guarantee, described; empty when all held."""
        found = []
        if self.lost:
            found.append(f"{len(self.lost)} acknowledged values never consumed, e.g. {self.lost[:10]}")
        if self.enqueued_twice:
            found.append(
                f"{len(self.enqueued_twice)} values enqueued twice (two message ids), "
                f"e.g. {self.enqueued_twice[:10]}"
            )
        if self.phantoms:
            found.append(f"{len(self.phantoms)} consumed values never produced, e.g. {self.phantoms[:10]}")
        if self.stats_problem:
            found.append(self.stats_problem)
        return found


class Workload:
    """A full-speed producer and two competing consumers on one channel of a cluster.

    Args:
        endpoints: The cluster's client endpoints (every client gets the whole list).
        channel: The channel name.
        in_flight: Produces per ``gather`` batch.
        produce_timeout_s: Each produce's ``timeout`` (the client retries inside it with the same id).
        consumers: How many consumer clients (separate connections and sessions).
        consumer_parallel: Each consumer's ``max_parallel``.
        session_timeout: The consumers' session timeout (leases come back after it).
        first_value: The first payload value (values count up from it).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        channel: str,
        *,
        in_flight: int = 100,
        produce_timeout_s: float = 30.0,
        consumers: int = 2,
        consumer_parallel: int = 50,
        session_timeout: str = "5s",
        first_value: int = 0,
    ) -> None:
        self.endpoints = list(endpoints)
        self.channel = channel
        self.in_flight = in_flight
        self.produce_timeout_s = produce_timeout_s
        self.consumer_count = consumers
        self.consumer_parallel = consumer_parallel
        self.session_timeout = session_timeout
        self.started_at = 0.0
        # The longest wait for an acknowledgement: since the previous one, or since producing (re)started.
        self.max_unavailable_s = 0.0
        self.max_unavailable_end = 0.0
        self._gap_anchor = 0.0
        self.attempted: set[int] = set()
        self.acknowledged: set[int] = set()
        self.uncertain: set[int] = set()
        self.errors: Counter[str] = Counter()
        self.duplicate_answers = 0
        # (monotonic time, node the producer was connected to) of every acknowledged produce, in order
        self.ack_times: list[float] = []
        self.ack_nodes: list[str] = []
        self.deliveries: list[Delivery] = []
        self.consumed_values: set[int] = set()
        self._next_value = first_value
        self._stopping = False
        self._stop_at: int | None = None
        self._producer_queue: BrokerQueue | None = None
        self._consumer_queues: list[BrokerQueue] = []
        self._consumers: list[Any] = []
        self._producer: asyncio.Task[None] | None = None
        self._stale_acks = _StaleAckCounter()

    # ------------------------------------------------------------------ running

    async def start(self, *, produce: bool = True) -> None:
        """Connect the producer and the consumers; start producing unless ``produce`` is False."""
        self.started_at = time.monotonic()
        logging.getLogger("zbroker.consumer").addHandler(self._stale_acks)
        self._producer_queue = BrokerQueue(self.endpoints, connect_timeout=20)
        await self._producer_queue.connect()
        await self.add_consumers(self.consumer_count)
        if produce:
            self.start_producing()

    async def add_consumers(self, count: int) -> None:
        """Start ``count`` more consumer clients, each on its own connection and session."""
        for _ in range(count):
            name = f"c{len(self._consumer_queues) + 1}"
            queue = BrokerQueue(
                self.endpoints,
                session_timeout=self.session_timeout,
                connect_timeout=20,
                client_name=f"workload-consumer-{name}",
            )
            await queue.connect()
            self._consumer_queues.append(queue)
            # Many attempts allowed: a lease that comes back after a failover must not dead-letter.
            channel = queue.channel(self.channel, int, max_attempts=1000, retry_backoff="50ms")
            self._consumers.append(
                await channel.consume(self._handler(name), max_parallel=self.consumer_parallel)
            )

    def start_producing(self) -> None:
        """Start (or restart) the producer task."""
        assert self._producer_queue is not None, "start() first"
        if self._producer is None or self._producer.done():
            self._stopping = False
            self._gap_anchor = time.monotonic()  # a pause in producing is no unavailability
            self._producer = asyncio.create_task(self._produce_loop(), name="workload-producer")

    def _handler(self, name: str) -> Callable[[int, QueueMessage[int]], Any]:
        async def handle(value: int, message: QueueMessage[int]) -> None:
            self.deliveries.append(
                Delivery(value, message.id, message.attempt, message.lease_token, name, time.monotonic())
            )
            self.consumed_values.add(value)

        return handle

    async def _produce_loop(self) -> None:
        assert self._producer_queue is not None
        channel = self._producer_queue.channel(self.channel, int)
        while not self._stopping and (self._stop_at is None or self._next_value < self._stop_at):
            end = self._next_value + self.in_flight
            batch = range(self._next_value, end if self._stop_at is None else min(end, self._stop_at))
            self._next_value = batch.stop
            await asyncio.gather(*(self._produce_one(channel, value) for value in batch))

    async def _produce_one(self, channel: Any, value: int) -> None:
        self.attempted.add(value)
        try:
            result = await channel.produce(value, timeout=self.produce_timeout_s)
        except BrokerError as exc:  # BrokerTimeoutError after the client's retries, or the close
            self.uncertain.add(value)
            self.errors[type(exc).__name__] += 1
            return
        now = time.monotonic()
        if now - self._gap_anchor > self.max_unavailable_s:
            self.max_unavailable_s, self.max_unavailable_end = now - self._gap_anchor, now
        self._gap_anchor = now
        self.acknowledged.add(value)
        if result.duplicate:
            self.duplicate_answers += 1
        assert self._producer_queue is not None
        self.ack_times.append(now)
        self.ack_nodes.append(self._producer_queue.connection.node_id)

    async def stop_producing(self, timeout_s: float = 60.0) -> None:
        """Let the current batch finish (every produce ends by its own timeout) and stop."""
        self._stopping = True
        if self._producer is not None:
            await asyncio.wait_for(self._producer, timeout_s)

    async def produce_count(self, count: int, timeout_s: float = 120.0) -> None:
        """Produce exactly ``count`` more values (in batches of ``in_flight``) and return."""
        assert self._producer is None or self._producer.done(), "the producer is already running"
        self._stop_at = self._next_value + count
        try:
            self.start_producing()
            assert self._producer is not None
            await asyncio.wait_for(asyncio.shield(self._producer), timeout_s)
        finally:
            self._stop_at = None

    # ------------------------------------------------------------------ waiting on progress

    async def wait_acknowledged(self, more: int, timeout_s: float = 30.0) -> None:
        """Wait until ``more`` further produces were acknowledged."""
        target = len(self.acknowledged) + more
        await _until(lambda: len(self.acknowledged) >= target, timeout_s, f"{more} more acknowledgements")

    async def wait_consumed(self, more: int, timeout_s: float = 30.0) -> None:
        """Wait until ``more`` further deliveries were handled."""
        target = len(self.deliveries) + more
        await _until(lambda: len(self.deliveries) >= target, timeout_s, f"{more} more deliveries")

    async def first_ack_after(self, since: float, timeout_s: float = 30.0, *, not_from: str = "") -> float:
        """Seconds from ``since`` (monotonic) to the first acknowledgement after it from a node other
        than ``not_from``."""

        def found() -> float | None:
            for index in range(bisect.bisect_right(self.ack_times, since), len(self.ack_times)):
                if self.ack_nodes[index] != not_from:
                    return self.ack_times[index] - since
            return None

        await _until(lambda: found() is not None, timeout_s, f"an acknowledgement not from {not_from!r}")
        waited = found()
        assert waited is not None
        return waited

    # ------------------------------------------------------------------ the verdict

    async def finish(self, drain_timeout_s: float = 60.0, quiet_s: float = 1.0) -> Report:
        """Stop producing, wait until everything enqueued is consumed, close the clients, verify."""
        await self.stop_producing()
        duration_s = time.monotonic() - self.started_at
        with contextlib.suppress(TimeoutError):  # what is missing then is reported as lost
            await _until(
                lambda: self.acknowledged <= self.consumed_values,
                drain_timeout_s,
                "every acknowledged value consumed",
            )
        stats, stats_problem = await self._settled_stats(drain_timeout_s, quiet_s)
        await self.close()
        return self._report(duration_s, stats, stats_problem)

    async def _settled_stats(self, timeout_s: float, quiet_s: float) -> tuple[QueueStats | None, str | None]:
        """The channel's counters once nothing is ready or in flight and no delivery came for ``quiet_s``."""
        deadline = time.monotonic() + timeout_s
        stats: QueueStats | None = None
        async with BrokerAdmin(self.endpoints, timeout=10) as admin:
            while time.monotonic() < deadline:
                try:
                    stats = await admin.stats(self.channel)
                except NotFoundError:
                    return None, None if not self.acknowledged else "the channel does not exist"
                except BrokerError:
                    await asyncio.sleep(POLL_S)
                    continue
                last = self.deliveries[-1].at if self.deliveries else 0.0
                idle = time.monotonic() - last >= quiet_s
                if idle and stats.ready == stats.in_flight == stats.delayed == 0:
                    break
                await asyncio.sleep(POLL_S)
            else:
                return stats, f"the queue did not drain within {timeout_s:g}s: {stats}"
        assert stats is not None
        distinct_ids = len({delivery.message_id for delivery in self.deliveries})
        if stats.produced_total != distinct_ids + stats.dead:
            return stats, (
                f"produced_total {stats.produced_total} != {distinct_ids} distinct message ids consumed "
                f"+ {stats.dead} dead: something was enqueued and never consumed, or counted twice"
            )
        if stats.acked_total < distinct_ids:
            return stats, f"acked_total {stats.acked_total} < {distinct_ids} distinct messages handled"
        return stats, None

    def _report(self, duration_s: float, stats: QueueStats | None, stats_problem: str | None) -> Report:
        ids_of_value: dict[int, set[str]] = defaultdict(set)
        for delivery in self.deliveries:
            ids_of_value[delivery.value].add(delivery.message_id)
        consumed = set(ids_of_value)
        first_attempts = Counter(delivery.message_id for delivery in self.deliveries if delivery.attempt == 1)
        distinct_ids = sum(len(ids) for ids in ids_of_value.values())
        return Report(
            acknowledged=len(self.acknowledged),
            uncertain=len(self.uncertain),
            uncertain_enqueued=len(self.uncertain & consumed),
            consumed=len(consumed),
            handled=len(self.deliveries),
            lost=sorted(self.acknowledged - consumed),
            enqueued_twice=sorted(value for value, ids in ids_of_value.items() if len(ids) > 1),
            phantoms=sorted(consumed - self.attempted),
            redelivered=len(self.deliveries) - distinct_ids,
            later_attempts=sum(1 for delivery in self.deliveries if delivery.attempt > 1),
            first_attempt_repeats=sum(1 for count in first_attempts.values() if count > 1),
            max_unavailable_s=self.max_unavailable_s,
            max_unavailable_at_s=max(self.max_unavailable_end - self.started_at, 0.0),
            duration_s=duration_s,
            stats=stats,
            stats_problem=stats_problem,
            errors=self.errors,
            stale_acks=self._stale_acks.count,
        )

    async def close(self) -> None:
        """Stop the producer and close every client (consumers finish their in-flight messages)."""
        self._stopping = True
        if self._producer is not None and not self._producer.done():
            self._producer.cancel()
            await asyncio.gather(self._producer, return_exceptions=True)
        for queue in [*self._consumer_queues, self._producer_queue]:
            if queue is not None:
                with contextlib.suppress(BrokerError, TimeoutError):
                    await asyncio.wait_for(queue.close(), 40)
        self._consumer_queues.clear()
        self._producer_queue = None
        logging.getLogger("zbroker.consumer").removeHandler(self._stale_acks)


# ---------------------------------------------------------------------------------------- chaos


@dataclasses.dataclass(slots=True)
class Chaos:
    """Random faults, one at a time, each healed before the next: SIGKILL the leader or a follower
    (restarted after a while, or at once), isolate a node, partition one node from the other two,
    cut one direction of one link. The cluster keeps a majority, so the workload can make progress.

    Args:
        cluster: The cluster to hurt; link faults need a ``FaultyCluster``.
        rng: The source of every choice (seed it to replay a schedule).
        say: Where to report each fault (``print`` in scripts).
        hold_s: How long a fault lasts, (low, high) seconds.
        pause_s: Healthy time between faults, (low, high) seconds.
    """

    cluster: ClusterProcesses
    rng: random.Random
    say: Callable[[str], None] = lambda line: None
    hold_s: tuple[float, float] = (0.5, 4.0)
    pause_s: tuple[float, float] = (0.5, 2.0)
    faults: Counter[str] = dataclasses.field(default_factory=Counter)

    async def run(self, duration_s: float) -> None:
        """Inject faults until ``duration_s`` has passed, then leave the cluster healed and caught up."""
        started = time.monotonic()
        kinds = ["kill-leader", "kill-follower", "kill-restart-at-once"]
        if isinstance(self.cluster, FaultyCluster):
            kinds += ["isolate-leader", "isolate-follower", "partition", "cut-one-way"]
        while time.monotonic() - started < duration_s:
            kind = self.rng.choice(kinds)
            leader = await wait_for_leader(self.cluster, 30)
            others = [node_id for node_id in self.cluster.ids if node_id != leader]
            if kind.endswith("leader"):
                victim = leader
            elif kind == "partition":
                victim = self.rng.choice(self.cluster.ids)
            else:
                victim = self.rng.choice(others)
            hold = self.rng.uniform(*self.hold_s)
            self.say(f"{time.monotonic() - started:6.1f}s  {kind} {victim} (leader {leader}) for {hold:.1f}s")
            self.faults[kind] += 1
            await self._inject(kind, victim, leader, others)
            if kind != "kill-restart-at-once":
                await asyncio.sleep(hold)  # the fault lasts this long: the point of the exercise
            await restore(self.cluster)
            await asyncio.sleep(self.rng.uniform(*self.pause_s))

    async def _inject(self, kind: str, victim: str, leader: str, others: list[str]) -> None:
        cluster = self.cluster
        if kind.startswith("kill"):
            await asyncio.to_thread(cluster.kill, victim)
            if kind == "kill-restart-at-once":
                await asyncio.to_thread(cluster.start)
            return
        assert isinstance(cluster, FaultyCluster)
        if kind.startswith("isolate"):
            await asyncio.to_thread(cluster.isolate, victim)
        elif kind == "partition":
            rest = [node_id for node_id in cluster.ids if node_id != victim]
            await asyncio.to_thread(cluster.partition, [victim], rest)
        elif kind == "cut-one-way":
            src, dst = (leader, victim) if self.rng.random() < 0.5 else (victim, leader)
            await asyncio.to_thread(cluster.cut, src, dst)


async def run_chaos(
    workdir: Path,
    duration_s: float,
    *,
    seed: int,
    say: Callable[[str], None] = lambda line: None,
    snapshot_threshold: int | None = None,
) -> tuple[Report, Chaos]:
    """Start a 3-node ``FaultyCluster`` in ``workdir``, run the workload under ``Chaos`` for
    ``duration_s``, heal, drain and verify. Returns the report and the chaos (its ``faults`` counts).

    ``snapshot_threshold`` (``[cluster]`` entries before compaction) small makes restarted members
    catch up by snapshot."""
    cluster_options = {} if snapshot_threshold is None else {"snapshot_threshold": snapshot_threshold}
    with FaultyCluster(
        workdir, 3, node_options={"session_timeout": "5s"}, cluster_options=cluster_options
    ) as cluster:
        cluster.start()
        await restore(cluster)
        workload = Workload(cluster.endpoints, "chaos/jobs")
        chaos = Chaos(cluster, random.Random(seed), say=say)
        await workload.start()
        try:
            await chaos.run(duration_s)
            say("healed; draining and verifying")
            report = await workload.finish(drain_timeout_s=120)
        except BaseException:
            for node_id in cluster.ids:
                say(f"--- last lines of {node_id}'s log\n{cluster.log_text(node_id)[-2000:]}")
            raise
        finally:
            await workload.close()
    return report, chaos
