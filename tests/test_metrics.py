"""Prometheus metrics and structured logs of a real node."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from broker.launcher import NodeProcess, free_port
from client import BrokerQueue


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_a_node_serves_queue_raft_and_latency_metrics(tmp_path: Path) -> None:
    # Given a node with a metrics endpoint and JSON logs
    port = free_port()
    node = NodeProcess(tmp_path, metrics_endpoint=f"127.0.0.1:{port}", log_format="json").start()
    try:
        # When 30 messages are produced and 10 consumed
        async with BrokerQueue(node.endpoint) as queue:
            channel = queue.channel("metrics/jobs", int)
            await asyncio.gather(*(channel.produce(i) for i in range(30)))
            taken: list[int] = []
            enough = asyncio.Event()

            async def take(value: int) -> None:
                if len(taken) >= 10:
                    await asyncio.sleep(3600)
                taken.append(value)
                if len(taken) == 10:
                    enough.set()

            consumer = await channel.consume(take, max_parallel=1)
            await asyncio.wait_for(enough.wait(), 10)
            # Then a scrape shows the counts, the depths, Raft's progress and the latency histograms
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                samples = _scrape(port)
                if samples.get(("zbroker_messages_acked_total", (("channel", "metrics/jobs"),))) == 10:
                    break
                assert asyncio.get_running_loop().time() < deadline, "acks never showed in the metrics"
                await asyncio.sleep(0.05)
            label = (("channel", "metrics/jobs"),)
            assert samples[("zbroker_messages_produced_total", label)] == 30
            assert (
                samples[("zbroker_queue_depth", (("channel", "metrics/jobs"), ("state", "ready")))]
                + samples[("zbroker_queue_depth", (("channel", "metrics/jobs"), ("state", "in_flight")))]
                == 20
            )
            assert samples[("zbroker_consumers", label)] == 1
            assert samples[("zbroker_raft_role", (("role", "leader"),))] == 1
            assert samples[("zbroker_raft_applied_index", ())] >= 3
            assert samples[("zbroker_produce_latency_seconds_count", ())] >= 1
            assert samples[("zbroker_log_fsync_seconds_count", ())] >= 1
            assert samples[("zbroker_frames_received_total", ())] > 0
            await consumer.close(grace_s=0.1)
    finally:
        node.stop()
    # And the log lines are JSON objects naming the node
    lines = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
    assert lines and all(line["node"] == "n1" for line in lines)
    assert any("metrics on" in line["message"] for line in lines)
