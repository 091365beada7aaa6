"""Membership changes with real processes: a node is replaced without downtime or loss."""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker.launcher import ClusterProcesses, NodeProcess, free_ports
from client import BrokerAdmin, BrokerQueue
from config import ClusterMember
from tests.helpers.workload import Workload
from tests.test_queue_basics import Collector


async def _leader_view(endpoints: list[str]) -> dict[str, tuple[str, int]]:
    async with BrokerAdmin(endpoints) as admin:
        status = await admin.cluster_status()
    return {node.id: (node.role, node.applied_index) for node in status.nodes}


async def _wait(check: object, timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_node_is_replaced_and_every_acknowledged_message_survives(tmp_path: Path) -> None:
    # Given a 3-node cluster holding 2,000 acknowledged messages
    cluster = ClusterProcesses(tmp_path, 3, node_options={"session_timeout": "3s"})
    cluster.start()
    client_port, peer_port = free_ports(2)
    n4_member = ClusterMember(
        id="n4",
        client_endpoint=f"tcp://127.0.0.1:{client_port}",
        peer_endpoint=f"tcp://127.0.0.1:{peer_port}",
    )
    n4 = NodeProcess(
        tmp_path, "n4", port=client_port, peer_port=peer_port, cluster_members=[*cluster.members, n4_member]
    )
    endpoints = [*cluster.endpoints, n4.endpoint]
    try:
        async with BrokerQueue(endpoints) as queue:
            channel = queue.channel("membership/jobs", int)
            for start in range(0, 2000, 500):
                await asyncio.gather(*(channel.produce(i) for i in range(start, start + 500)))
        # When a fourth node starts and is added, catches up, and n1 is removed and killed, while a
        # producer keeps going
        producer = Workload(endpoints, "membership/jobs", in_flight=20, consumers=0, first_value=2000)
        await producer.start()
        try:
            n4.start()
            async with BrokerAdmin(endpoints) as admin:
                assert await admin.add_node("n4", n4_member.client_endpoint, n4_member.peer_endpoint) == [
                    "n1",
                    "n2",
                    "n3",
                    "n4",
                ]

                view = await _leader_view(cluster.endpoints)
            # The leader keeps applying new produces: n4 has caught up once it reaches where the leader
            # was when it was added.
            leader_applied = max(applied for role, applied in view.values() if role == "leader")

            async def n4_caught_up() -> bool:
                return (await _leader_view(cluster.endpoints)).get("n4", ("", 0))[1] >= leader_applied

            await _wait(n4_caught_up, 30, "n4 to catch up")
            async with BrokerAdmin(endpoints) as admin:
                assert await admin.remove_node("n1") == ["n2", "n3", "n4"]
            cluster.kill("n1")

            # Then the producer is acknowledged all along, including after n1 is gone
            await producer.wait_acknowledged(60, timeout_s=30)
            await producer.stop_producing()
        finally:
            await producer.close()
        assert not producer.uncertain, f"produces that failed: {dict(producer.errors)}"
        total = 2000 + len(producer.acknowledged)
        assert producer.acknowledged == set(range(2000, total))
        assert producer.max_unavailable_s < 5, (
            f"no produce acknowledged for {producer.max_unavailable_s:.2f} s"
        )
        print(
            f"{total - 2000} produces acknowledged during the change,"
            f" longest wait {producer.max_unavailable_s:.2f} s"
        )
        # And the leader of the remaining three is killed too, so n4 must vote for a new one
        remaining = [cluster["n2"].endpoint, cluster["n3"].endpoint, n4.endpoint]

        async def leader_among_remaining() -> bool:
            try:
                view = await _leader_view(remaining)
            except Exception:  # during the election nobody may answer for a moment
                return False
            return any(role == "leader" for node_id, (role, _) in view.items() if node_id != "n1")

        await _wait(leader_among_remaining, 30, "a leader among n2, n3, n4")
        view = await _leader_view(remaining)
        (leader,) = [node_id for node_id, (role, _) in view.items() if role == "leader"]
        assert set(view) == {"n2", "n3", "n4"}
        if leader == "n4":
            n4.kill()
        else:
            cluster.kill(leader)
        survivors = [
            endpoint
            for endpoint in remaining
            if endpoint != (n4.endpoint if leader == "n4" else cluster[leader].endpoint)
        ]
        # Then the two survivors elect a leader and every acknowledged message is there, once
        async with BrokerQueue(survivors, connect_timeout=30) as queue:
            seen = Collector()
            await queue.channel("membership/jobs", int).consume(seen, max_parallel=50)
            items = await seen.wait_for(total, timeout_s=60)
            await asyncio.sleep(0.3)
            assert sorted(items) == list(range(total))
            assert (await queue.channel("membership/jobs", int).produce(total)).duplicate is False
    finally:
        cluster.kill_all()
        n4.kill()
