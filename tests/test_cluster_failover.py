"""Failover of a real 3-node cluster under load: SIGKILLed leaders and followers, an isolated leader.

One ``FaultyCluster`` (every peer link through its own proxy) serves the whole module; each test
first restores it (links healed, every member running and caught up) and uses its own channel. The
workload (``tests/helpers/workload.py``) produces at full speed while two consumers drain; at the
end every acknowledged value must have been consumed and none enqueued twice. Run with ``-s`` to
see the figures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from client import BrokerAdmin, BrokerQueue, QueueMessage
from tests.helpers.faults import FaultyCluster
from tests.helpers.workload import Report, Workload, own_row, probe, restore, wait_caught_up, wait_for_leader

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

FAILOVER_BUDGET_S = 3.0  # the target: leader SIGKILL to the first acknowledged produce on the new leader
FAILOVER_MARGIN_S = 1.0  # for a shared 2-core machine running three nodes and the clients
ACKS_BETWEEN_FAULTS = 1000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyCluster]:
    """Three members, default Raft timing (election timeout 1 s), every peer link proxied."""
    with FaultyCluster(
        tmp_path_factory.mktemp("failover"), 3, node_options={"session_timeout": "5s"}
    ) as nodes:
        nodes.start()
        yield nodes


def show(title: str, report: Report, extra: str = "") -> None:
    print(f"\n== {title}\n{report.summary()}{extra}")


def logs_of(cluster: FaultyCluster) -> str:
    return "\n".join(f"--- {node_id}\n{cluster.log_text(node_id)[-3000:]}" for node_id in cluster.ids)


def check(report: Report, cluster: FaultyCluster, *, at_least: int) -> None:
    assert not report.problems(), f"{report.problems()}\n{report.summary()}\n{logs_of(cluster)}"
    assert report.acknowledged >= at_least, report.summary()
    assert report.uncertain == 0, f"produces gave up within their 30 s timeout:\n{report.summary()}"


async def test_every_acknowledged_message_survives_two_leader_sigkills_and_none_is_enqueued_twice(
    cluster: FaultyCluster, channel_name: str
) -> None:
    # Given a healthy cluster, a producer at full speed and two consumers
    await restore(cluster)
    workload = Workload(cluster.endpoints, channel_name)
    await workload.start()
    failovers: list[float] = []
    try:
        await workload.wait_acknowledged(ACKS_BETWEEN_FAULTS)
        for _ in range(2):
            # When the leader is SIGKILLed mid-run
            leader = await wait_for_leader(cluster)
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.kill, leader)
            # Then the producer's next acknowledgement comes from a new leader
            failovers.append(await workload.first_ack_after(killed_at, 15, not_from=leader))
            await workload.wait_acknowledged(ACKS_BETWEEN_FAULTS)
            # And the killed node restarts and catches up while the load goes on
            await asyncio.to_thread(cluster.start)
            await wait_caught_up(cluster)
            await workload.wait_acknowledged(ACKS_BETWEEN_FAULTS)
        report = await workload.finish()
    finally:
        await workload.close()
    # Then every acknowledged value was consumed, and none was enqueued twice
    times = ", ".join(f"{seconds:.2f}s" for seconds in failovers)
    show("two leader SIGKILLs", report, f"\nfailover times         {times}")
    check(report, cluster, at_least=5 * ACKS_BETWEEN_FAULTS)


async def test_every_acknowledged_message_survives_two_follower_sigkills_and_none_is_enqueued_twice(
    cluster: FaultyCluster, channel_name: str
) -> None:
    # Given a healthy cluster, a producer at full speed and two consumers
    leader = await restore(cluster)
    workload = Workload(cluster.endpoints, channel_name)
    await workload.start()
    try:
        await workload.wait_acknowledged(ACKS_BETWEEN_FAULTS)
        for round_number in range(2):
            # When a follower is SIGKILLed mid-run
            follower = [node_id for node_id in cluster.ids if node_id != leader][round_number]
            await asyncio.to_thread(cluster.kill, follower)
            # Then the leader and the other follower keep acknowledging
            await workload.wait_acknowledged(ACKS_BETWEEN_FAULTS, timeout_s=15)
            # And the killed follower restarts and catches up while the load goes on
            await asyncio.to_thread(cluster.start)
            await wait_caught_up(cluster)
            await workload.wait_acknowledged(ACKS_BETWEEN_FAULTS)
        still_leading = await wait_for_leader(cluster)
        report = await workload.finish()
    finally:
        await workload.close()
    # Then every acknowledged value was consumed, none was enqueued twice, the leader stayed
    show("two follower SIGKILLs", report)
    check(report, cluster, at_least=5 * ACKS_BETWEEN_FAULTS)
    assert still_leading == leader


async def test_an_isolated_leader_steps_down_and_clients_move_to_the_new_leader_without_loss(
    cluster: FaultyCluster, channel_name: str
) -> None:
    # Given a healthy cluster, a producer at full speed and two consumers
    await restore(cluster)
    workload = Workload(cluster.endpoints, channel_name)
    await workload.start()
    figures: list[str] = []
    try:
        await workload.wait_acknowledged(ACKS_BETWEEN_FAULTS)
        for _ in range(2):
            # When every peer link of the leader is cut (its client endpoint stays reachable)
            old = await wait_for_leader(cluster)
            cut_at = time.monotonic()
            await asyncio.to_thread(cluster.isolate, old)
            # Then the other two elect a new leader
            new = await wait_for_leader(cluster, 15, not_in=[old])
            elected_s = time.monotonic() - cut_at
            # And the isolated one steps down (check-quorum) rather than keep taking produces
            await wait_stepped_down(cluster, old, timeout_s=10)
            stepped_down_s = time.monotonic() - cut_at
            # And the producer is acknowledged by the new leader
            moved_s = await workload.first_ack_after(cut_at, 15, not_from=old)
            await workload.wait_acknowledged(ACKS_BETWEEN_FAULTS)
            figures.append(
                f"{old}->{new}: elected {elected_s:.2f}s, old stepped down {stepped_down_s:.2f}s, "
                f"producer moved {moved_s:.2f}s"
            )
            # And after healing, the old leader catches up as a follower
            await asyncio.to_thread(cluster.heal_all)
            await wait_caught_up(cluster)
            await workload.wait_acknowledged(ACKS_BETWEEN_FAULTS)
        report = await workload.finish()
    finally:
        await workload.close()
    # Then every acknowledged value was consumed, and none was enqueued twice
    show("isolated leader, twice", report, "".join(f"\n{line}" for line in figures))
    check(report, cluster, at_least=5 * ACKS_BETWEEN_FAULTS)


async def wait_stepped_down(cluster: FaultyCluster, node_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        view = await probe(cluster[node_id].endpoint)
        if view is not None and own_row(view, node_id)["role"] != "leader":
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{node_id} still says it leads {timeout_s:g}s after losing its peers")
        await asyncio.sleep(0.05)


async def test_a_produce_is_acknowledged_by_the_new_leader_within_3_seconds_of_a_leader_sigkill(
    cluster: FaultyCluster, channel_name: str
) -> None:
    # Given a producer at full speed on a healthy cluster
    await restore(cluster)
    workload = Workload(cluster.endpoints, channel_name, consumers=0)
    await workload.start()
    try:
        await workload.wait_acknowledged(ACKS_BETWEEN_FAULTS)
        # When the leader is SIGKILLed
        leader = await wait_for_leader(cluster)
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, leader)
        # Then a produce is acknowledged by another node within the budget
        failover_s = await workload.first_ack_after(killed_at, 15, not_from=leader)
        await workload.stop_producing()
    finally:
        await workload.close()
    print(f"\n== failover: leader SIGKILL -> first acknowledged produce on the new leader: {failover_s:.2f}s")
    assert failover_s <= FAILOVER_BUDGET_S + FAILOVER_MARGIN_S


async def test_cluster_status_reports_three_members_one_leader_and_their_pids(cluster: FaultyCluster) -> None:
    # Given a healthy cluster
    leader = await restore(cluster)
    pids = {node_id: cluster[node_id].pid for node_id in cluster.ids}
    # When an admin client asks the leader for the cluster status
    async with BrokerAdmin(cluster[leader].endpoint) as admin:
        status = await admin.cluster_status()
    # Then it lists the three members, exactly one of them leading, with the processes' pids
    assert sorted(node.id for node in status.nodes) == cluster.ids
    assert [node.id for node in status.nodes if node.role == "leader"] == [leader]
    assert status.leader == leader
    assert {node.id: node.pid for node in status.nodes} == pids
    assert {node.id: node.client_endpoint for node in status.nodes} == {
        node_id: cluster[node_id].endpoint for node_id in cluster.ids
    }
    assert len({node.term for node in status.nodes}) == 1
    # And every member, asked on its own endpoint, names the same single leader and its own pid
    for node_id in cluster.ids:
        async with BrokerAdmin(cluster[node_id].endpoint) as admin:
            view = await admin.cluster_status()
        assert view.leader == leader, node_id
        assert [node.id for node in view.nodes if node.role == "leader"] == [leader], (node_id, view)
        assert next(node.pid for node in view.nodes if node.id == node_id) == pids[node_id]
    # And a client given every endpoint gets a status naming the same leader and pids
    async with BrokerAdmin(cluster.endpoints) as admin:
        anywhere = await admin.cluster_status()
    assert anywhere.leader == leader
    assert next(node.pid for node in anywhere.nodes if node.id == leader) == pids[leader]


async def test_a_follower_restarted_on_an_idle_cluster_catches_up_without_new_produces(
    cluster: FaultyCluster, channel_name: str
) -> None:
    leader = await restore(cluster)
    async with BrokerQueue(cluster.endpoints) as queue:
        channel = queue.channel(channel_name, int)
        # (Repeated: whether a heartbeat or a retransmission reaches the restarted node first is a race.)
        for _ in range(6):
            # Given a follower SIGKILLed, and entries it misses appended while it is down
            follower = next(node_id for node_id in cluster.ids if node_id != leader)
            await asyncio.to_thread(cluster.kill, follower)
            await asyncio.gather(*(channel.produce(value) for value in range(100)))
            # When it restarts and nothing more is produced
            await asyncio.to_thread(cluster.start)
            # Then heartbeats alone bring it up to date within a few seconds
            await wait_caught_up(cluster, timeout_s=5)


async def test_a_live_consumer_keeps_its_leases_through_a_leader_sigkill(
    cluster: FaultyCluster, channel_name: str
) -> None:
    # (Repeated: whether the followers learned the commit of the last leases before the kill is a race.)
    for round_number in range(3):
        # Given a worker holding 20 leases inside its handler (its session stays alive throughout)
        # When the leader that granted them is SIGKILLed at once, and a second worker subscribes
        again = await hold_leases_through_a_leader_kill(cluster, f"{channel_name}-{round_number}")
        # Then once the first worker is back on the new leader, nobody gets those messages again
        assert not again, f"round {round_number}: delivered again while the holder lives: {again}"


async def hold_leases_through_a_leader_kill(
    cluster: FaultyCluster, name: str
) -> list[tuple[str, int, int, int]]:
    """Deliveries (worker, value, attempt, lease token) beyond the 20 first ones, seen within 2 s of the
    holder re-attaching to the new leader."""
    leader = await restore(cluster)
    finish = asyncio.Event()
    deliveries: list[tuple[str, int, int, int]] = []

    def worker(tag: str) -> Callable[[int, QueueMessage[int]], Awaitable[None]]:
        async def handle(value: int, message: QueueMessage[int]) -> None:
            deliveries.append((tag, value, message.attempt, message.lease_token))
            await finish.wait()

        return handle

    async with (
        BrokerQueue(cluster.endpoints, session_timeout="10s") as holder,
        BrokerQueue(cluster.endpoints, session_timeout="10s") as other,
    ):
        await asyncio.gather(*(holder.channel(name, int).produce(value) for value in range(20)))
        await holder.channel(name, int).consume(worker("A"), max_parallel=20)
        await until(lambda: len(deliveries) >= 20, 10)
        os.kill(cluster[leader].pid, signal.SIGKILL)
        await other.channel(name, int).consume(worker("B"), max_parallel=20)
        await wait_for_leader(cluster, 15, not_in=[leader])
        await until(lambda: holder.connection.node_id not in ("", leader), 15)
        await asyncio.sleep(2.0)  # the window in which a wrong redelivery shows up (observed: ~0.5 s)
        seen = list(deliveries)
        finish.set()
    await asyncio.to_thread(cluster.kill, leader)  # reap it
    return seen[20:]


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout_s:g}s")
        await asyncio.sleep(0.02)
