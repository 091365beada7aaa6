"""A follower that missed more than the leader keeps in its log catches up by snapshot, then serves.

A 3-node cluster with a tiny ``[cluster] snapshot_threshold`` (200 entries) takes 100,000 produces
while one follower is stopped, so the leader compacts its log far past that follower's position.
Restarted, the follower must install a snapshot (counters ``snapshots_sent`` on the leader,
``snapshots_installed`` on it) and reach the leader's applied index; then, with the old leader
SIGKILLed and the caught-up node leading, every acknowledged message is consumed exactly once.
Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.launcher import ClusterProcesses
from cluster.log import LogStore
from tests.helpers.workload import (
    Workload,
    own_row,
    probe,
    restore,
    transfer_leadership,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SNAPSHOT_THRESHOLD_ENTRIES = 200
MESSAGES = 100_000  # ~8 s at this machine's produce rate (leader + one follower) with 100 in flight


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterProcesses]:
    """Three members that compact their log every 200 applied entries (one cluster per test: a member
    left behind by one test would need a snapshot, and time, before the next could start)."""
    with ClusterProcesses(
        tmp_path,
        3,
        node_options={"session_timeout": "5s"},
        cluster_options={"snapshot_threshold": SNAPSHOT_THRESHOLD_ENTRIES},
    ) as nodes:
        nodes.start()
        yield nodes


async def own_view(cluster: ClusterProcesses, node_id: str) -> dict[str, int]:
    """A member's own applied/commit indexes and counters, asked of that member alone."""
    view = await probe(cluster[node_id].endpoint)
    assert view is not None, f"{node_id} does not answer"
    row = own_row(view, node_id)
    return {"applied": row["applied_index"], "commit": row["commit_index"], **view["counters"]}


def compacted_through(cluster: ClusterProcesses, node_id: str) -> int:
    """The index a stopped member's Raft log is compacted through (read from its files)."""
    assert not cluster[node_id].running
    log = LogStore(cluster[node_id].data_dir / "raft")
    try:
        return log.snapshot_index
    finally:
        log.close()


async def test_a_follower_behind_the_compacted_log_catches_up_by_snapshot_and_then_serves_every_message(
    cluster: ClusterProcesses, channel_name: str
) -> None:
    # Given a healthy cluster and one follower stopped (SIGTERM) at a known applied index
    leader = await restore(cluster)
    follower, third = [node_id for node_id in cluster.ids if node_id != leader]
    await asyncio.to_thread(cluster.stop, follower)
    stopped_at = (await own_view(cluster, third))["applied"]  # the third applies in step with it
    # When 100,000 messages are produced (100 in flight) while it is down
    workload = Workload(cluster.endpoints, channel_name, consumers=0, in_flight=100)
    await workload.start(produce=False)
    try:
        started = time.monotonic()
        await workload.produce_count(MESSAGES)
        produce_s = time.monotonic() - started
        before = await own_view(cluster, leader)
        # Then the leader's log has moved far past the stopped follower's position (compaction every 200)
        assert before["applied"] - stopped_at > 3 * SNAPSHOT_THRESHOLD_ENTRIES, (before, stopped_at)
        # When the follower restarts
        restarted = time.monotonic()
        await asyncio.to_thread(cluster.start)
        # Then it installs a snapshot and reaches the leader's applied index
        target = before["applied"]
        caught_up = await wait_applied(cluster, follower, target, timeout_s=30)
        catch_up_s = time.monotonic() - restarted
        after_leader = await own_view(cluster, leader)
        assert caught_up["snapshots_installed"] >= 1, caught_up
        assert after_leader["snapshots_sent"] > before["snapshots_sent"], (before, after_leader)
        # When the old leader is SIGKILLed and the caught-up follower leads the remaining two
        await asyncio.to_thread(cluster.kill, leader)
        await transfer_leadership(cluster, follower)
        leader_log_start = compacted_through(cluster, leader)
        # Then two consumers get every acknowledged message exactly once from it
        await workload.add_consumers(2)
        report = await workload.finish(drain_timeout_s=90)
    finally:
        await workload.close()
    print(
        f"\n== snapshot catch-up\nproduced {MESSAGES} in {produce_s:.1f}s ({MESSAGES / produce_s:.0f}/s); "
        f"follower stopped at applied {stopped_at}, leader at {target} with its log compacted through "
        f"{leader_log_start}\nfollower caught up in {catch_up_s:.1f}s: {caught_up}\n"
        f"leader counters: {after_leader}\n{report.summary()}"
    )
    assert leader_log_start > stopped_at
    assert not report.problems(), report.problems()
    assert report.acknowledged == MESSAGES and report.uncertain == 0
    assert report.consumed == report.handled == MESSAGES  # each exactly once: nothing redelivered


async def wait_applied(
    cluster: ClusterProcesses, node_id: str, target: int, timeout_s: float
) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        view = await probe(cluster[node_id].endpoint)
        if view is not None and own_row(view, node_id)["applied_index"] >= target:
            row = own_row(view, node_id)
            return {"applied": row["applied_index"], "commit": row["commit_index"], **view["counters"]}
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{node_id} did not apply {target} within {timeout_s:g}s: {view and own_row(view, node_id)}\n"
                + cluster.log_text(node_id)[-3000:]
            )
        await asyncio.sleep(0.1)


async def test_a_follower_that_missed_a_snapshot_while_down_gets_one_within_seconds_of_restarting(
    cluster: ClusterProcesses, channel_name: str
) -> None:
    # Given a follower stopped, and the leader's log compacted past it
    leader = await restore(cluster)
    follower = next(node_id for node_id in cluster.ids if node_id != leader)
    await asyncio.to_thread(cluster.stop, follower)
    before = await own_view(cluster, leader)
    workload = Workload(cluster.endpoints, channel_name, consumers=0, in_flight=10)
    await workload.start(produce=False)
    try:
        await workload.produce_count(5000)
    finally:
        await workload.close()
    # And the leader has already tried to send it a snapshot (which could not arrive)
    deadline = time.monotonic() + 10
    while (now := await own_view(cluster, leader))["snapshots_sent"] == before["snapshots_sent"]:
        assert time.monotonic() < deadline, f"the leader never started a snapshot: {now}"
        await asyncio.sleep(0.1)
    # When the follower restarts
    await asyncio.to_thread(cluster.start)
    # Then it has the leader's state within 10 s
    await wait_applied(cluster, follower, now["applied"], timeout_s=10)
