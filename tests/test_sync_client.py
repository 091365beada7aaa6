"""The blocking client: same surface as the asyncio one, for scripts and WSGI apps."""

from __future__ import annotations

import dataclasses
import threading

from broker.launcher import NodeProcess
from client import QueueMessage, QueueMessageProcessing
from client.sync import BrokerAdmin, BrokerQueue


@dataclasses.dataclass
class Job:
    id: int
    name: str


def test_the_blocking_client_produces_and_consumes_typed_messages(
    node: NodeProcess, channel_name: str
) -> None:
    received: list[tuple[Job, int]] = []
    all_in = threading.Event()

    def handle(job: Job, message: QueueMessage[Job]) -> None:
        received.append((job, message.attempt))
        if len(received) == 3:
            all_in.set()

    # Given a blocking client and a plain-function handler
    with BrokerQueue(node.endpoint) as queue:
        jobs = queue.channel(channel_name, Job, process=QueueMessageProcessing.EXACTLY_ONCE)
        consumer = jobs.consume(handle, max_parallel=2)
        # When three jobs are produced (and one repeated)
        results = [jobs.produce(Job(i, f"job-{i}")) for i in range(3)]
        repeat = jobs.produce(Job(0, "job-0"))
        # Then all three arrive once, typed, and the repeat was a duplicate
        assert all_in.wait(10)
        consumer.close()
        assert sorted(job.id for job, _ in received) == [0, 1, 2]
        assert all(isinstance(job, Job) and attempt == 1 for job, attempt in received)
        assert repeat.duplicate and repeat.id == results[0].id
        assert consumer.handled == 3
    with BrokerAdmin(node.endpoint) as admin:
        stats = admin.stats(channel_name)
        assert (stats.ready, stats.acked_total, stats.duplicates_total) == (0, 3, 1)
        assert admin.cluster_status().leader == "n1"
