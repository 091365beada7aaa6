"""brokerctl against a real 3-node cluster: status, queues, dead letters, produce, consume, leadership."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import ExitCode, app
from broker.launcher import ClusterProcesses
from client import BrokerAdmin, BrokerQueue, QueueMessage

runner = CliRunner()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcesses]:
    processes = ClusterProcesses(tmp_path_factory.mktemp("cli-cluster"), 3).start()

    async def settled() -> None:  # a leader elected and heard from both followers
        for _ in range(200):
            async with BrokerAdmin(processes.endpoints, timeout=10) as admin:
                roles = sorted(node.role for node in (await admin.cluster_status()).nodes)
            if roles == ["follower", "follower", "leader"]:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the cluster did not settle: {roles}")

    asyncio.run(settled())
    yield processes
    processes.stop_all()


def _cli(cluster: ClusterProcesses, *args: str, input: str | None = None) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "-e", ",".join(cluster.endpoints)], input=input)
    return result.exit_code, result.output


def test_status_shows_three_nodes_and_exactly_one_leader(cluster: ClusterProcesses) -> None:
    code, output = _cli(cluster, "status", "--json")
    assert code == 0, output
    status = json.loads(output)
    roles = sorted(node["role"] for node in status["nodes"])
    assert roles == ["follower", "follower", "leader"]
    assert {node["pid"] for node in status["nodes"]} == {cluster[node_id].pid for node_id in cluster.ids}
    code, table = _cli(cluster, "status")
    assert table.splitlines()[0] == f"leader: {status['leader']}"
    assert sum(" leader " in line for line in table.splitlines()[2:]) == 1


def test_produce_and_consume_round_trip_json(cluster: ClusterProcesses) -> None:
    code, output = _cli(cluster, "produce", "cli/debug", '{"order": 7}', "--json")
    assert code == 0, output
    produced = json.loads(output)
    code, output = _cli(cluster, "consume", "cli/debug", "-n", "1", "--wait", "10")
    assert code == 0, output
    (line,) = [json.loads(line) for line in output.splitlines()]
    assert (line["id"], line["data"], line["attempt"]) == (produced["id"], {"order": 7}, 1)
    code, output = _cli(cluster, "produce", "cli/debug", "{not json")
    assert code == ExitCode.USAGE and "not valid JSON" in output


def test_purge_empties_a_queue_and_dlq_requeue_brings_letters_back(cluster: ClusterProcesses) -> None:
    async def fill() -> None:
        async with BrokerQueue(cluster.endpoints) as queue:
            await asyncio.gather(*(queue.channel("cli/purge", int).produce(i) for i in range(20)))
            failing = queue.channel("cli/dead", int, max_attempts=1)

            async def fail(value: int, message: QueueMessage[int]) -> None:
                raise RuntimeError("always")

            consumer = await failing.consume(fail)
            await failing.produce(1)
            await failing.produce(2)
            async with BrokerAdmin(cluster.endpoints) as admin:
                while (await admin.stats("cli/dead")).dead < 2:
                    await asyncio.sleep(0.05)
            await consumer.close()

    asyncio.run(fill())
    code, output = _cli(cluster, "queue", "purge", "cli/purge", "--yes")
    assert code == 0 and "purged 20 messages" in output
    stats = json.loads(_cli(cluster, "queue", "stats", "cli/purge", "--json")[1])
    assert stats["ready"] == 0
    letters = json.loads(_cli(cluster, "dlq", "list", "cli/dead", "--json")[1])
    assert sorted(letter["data"] for letter in letters) == [1, 2]
    assert all("always" in letter["reason"] for letter in letters)
    code, output = _cli(cluster, "dlq", "requeue", "cli/dead", "--yes")
    assert code == 0 and "requeued 2 messages" in output
    queues = json.loads(_cli(cluster, "queues", "--json")[1])
    (dead_queue,) = [row for row in queues if row["channel"] == "cli/dead"]
    assert (dead_queue["dead"], dead_queue["ready"]) == (0, 2)
    code, output = _cli(cluster, "dlq", "purge", "cli/dead", input="n\n")
    assert code == ExitCode.FAILURE


def test_leader_transfer_moves_leadership(cluster: ClusterProcesses) -> None:
    status = json.loads(_cli(cluster, "status", "--json")[1])
    target = next(node["id"] for node in status["nodes"] if node["role"] == "follower")
    code, output = _cli(cluster, "leader", "transfer", target)
    assert code == 0 and target in output

    async def leader() -> str:
        for _ in range(100):
            async with BrokerAdmin(cluster.endpoints) as admin:
                current = (await admin.cluster_status()).leader
            if current == target:
                return current
            await asyncio.sleep(0.1)
        raise AssertionError(f"{target} never took over")

    assert asyncio.run(leader()) == target


def test_config_check_validates_files(cluster: ClusterProcesses, tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "check", str(cluster["n1"].config_path)])
    assert result.exit_code == 0 and "a cluster of 3" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[cluster]\nnodes = [ { id = "x" } ]\n')
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == ExitCode.CONFIG and "nodes" in result.output


def test_queues_show_produce_and_ack_rates(cluster: ClusterProcesses) -> None:
    # Given a channel receiving messages for a few seconds, and consumed as they come
    async def traffic() -> None:
        async with BrokerQueue(cluster.endpoints) as queue:
            channel = queue.channel("cli/rates", int)

            async def take(value: int) -> None:
                return None

            consumer = await channel.consume(take, max_parallel=10)
            for batch in range(12):
                await asyncio.gather(*(channel.produce(batch * 50 + i) for i in range(50)))
                await asyncio.sleep(0.2)
            await consumer.close()

    asyncio.run(traffic())
    # Then `queues` reports both rates, per second over the last seconds
    queues = json.loads(_cli(cluster, "queues", "--json")[1])
    (row,) = [row for row in queues if row["channel"] == "cli/rates"]
    assert row["produce_rate"] > 10 and row["ack_rate"] > 10
    table = _cli(cluster, "queues")[1]
    assert "PRODUCE_RATE" in table.splitlines()[0]
