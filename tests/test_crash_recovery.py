"""Guarantees proven with real processes killed by SIGKILL: leases follow liveness, acks are durable."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from broker.launcher import NodeProcess
from client import BrokerAdmin, BrokerQueue, QueueMessageProcessing
from tests.test_queue_basics import Collector


def _read_line(process: subprocess.Popen[str], prefix: str, timeout_s: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    os.set_blocking(process.stdout.fileno(), False)
    buffered = ""
    while time.monotonic() < deadline:
        chunk = process.stdout.readline()
        if chunk:
            buffered = chunk
            if chunk.startswith(prefix):
                return chunk.strip()
        else:
            time.sleep(0.02)
        assert process.poll() is None, f"worker exited early with {process.returncode}"
    raise TimeoutError(f"worker never printed {prefix!r} (last line {buffered!r})")


async def test_a_worker_killed_inside_its_handler_has_its_message_redelivered_with_attempt_2(
    node: NodeProcess, channel_name: str
) -> None:
    # Given a worker process (session timeout 1s) holding a message inside its handler
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.worker", node.endpoint, channel_name, "1s", "hang"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        await asyncio.to_thread(_read_line, worker, "ready", 20)
        async with BrokerQueue(node.endpoint) as queue:
            produced = await queue.channel(channel_name, int).produce(42)
            line = await asyncio.to_thread(_read_line, worker, "handling", 10)
            assert line == f"handling {produced.id} 1 42"
            # And another worker on the same channel
            seen = Collector()
            await queue.channel(channel_name, int).consume(seen)
            # When the first worker is SIGKILLed
            os.kill(worker.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            worker.wait(5)
            # Then after its session times out the message goes to the other worker, as attempt 2
            await seen.wait_for(1, timeout_s=15)
            assert time.monotonic() - killed_at >= 0.8
            message = seen.messages[0]
            assert (message.id, message.attempt, message.data) == (produced.id, 2, 42)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(5)


async def test_a_node_killed_after_10000_acknowledged_produces_loses_nothing(fresh_node: NodeProcess) -> None:
    jobs, once = "crash/jobs", "crash/once"
    async with BrokerQueue(fresh_node.endpoint) as queue:
        # Given 10,000 acknowledged produces, and 100 more on an EXACTLY_ONCE channel
        channel = queue.channel(jobs, int)
        for start in range(0, 10_000, 1000):
            results = await asyncio.gather(*(channel.produce(i) for i in range(start, start + 1000)))
            assert not any(result.duplicate for result in results)
        exactly = queue.channel(
            once, int, process=QueueMessageProcessing.EXACTLY_ONCE, deduplication_interval="1h"
        )
        assert not any(r.duplicate for r in await asyncio.gather(*(exactly.produce(i) for i in range(100))))
        # And about 3,000 consumed and acked (close() returns once every ack is confirmed)
        handled: list[int] = []
        enough = asyncio.Event()

        async def take(value: int) -> None:
            handled.append(value)
            if len(handled) >= 3000:
                enough.set()

        consumer = await channel.consume(take, max_parallel=50)
        await asyncio.wait_for(enough.wait(), 30)
        await consumer.close()
    async with BrokerAdmin(fresh_node.endpoint) as admin:
        assert (await admin.stats(jobs)).acked_total == len(handled)
    # And a worker process holding some leases inside its handler
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.worker", fresh_node.endpoint, jobs, "10s", "hang"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = {int((await asyncio.to_thread(_read_line, worker, "handling", 20)).split()[3])}
        # When the node is SIGKILLed (and the worker with it)
        fresh_node.kill()
        worker.kill()
        worker.wait(5)
    finally:
        if worker.poll() is None:
            worker.kill()
    fresh_node.restart()
    # Then the acks survived, every unacked message is delivered (held ones after their lease
    # expires), and no acked message comes back
    async with BrokerQueue(fresh_node.endpoint) as queue:
        seen = Collector()
        await queue.channel(jobs, int).consume(seen, max_parallel=100)
        expected = set(range(10_000)) - set(handled)
        items = await seen.wait_for(len(expected), timeout_s=60)
        await asyncio.sleep(0.5)
        assert len(items) == len(set(items)) == len(expected)
        assert set(items) == expected
        assert held <= set(items)
        attempts = {message.data: message.attempt for message in seen.messages}
        assert all(attempts[value] == 2 for value in held)
        # And the deduplication window survived the crash
        exactly = queue.channel(
            once, int, process=QueueMessageProcessing.EXACTLY_ONCE, deduplication_interval="1h"
        )
        again = await asyncio.gather(*(exactly.produce(i) for i in range(100)))
        assert all(result.duplicate for result in again)
    async with BrokerAdmin(fresh_node.endpoint) as admin:
        final = await admin.stats(jobs)
        assert (final.ready, final.delayed, final.in_flight, final.acked_total) == (0, 0, 0, 10_000)


async def test_clients_ride_through_a_node_restart_without_loss_or_duplicates(
    fresh_node: NodeProcess,
) -> None:
    # Given a producer and a slow consumer both working when the node is SIGKILLed and restarted
    handled: list[int] = []

    async def slow(value: int) -> None:
        await asyncio.sleep(0.05)
        handled.append(value)

    async with BrokerQueue(fresh_node.endpoint, session_timeout="5s") as queue:
        channel = queue.channel("restart/jobs", int)
        await channel.consume(slow, max_parallel=10)
        acknowledged: list[int] = []

        async def produce_all() -> None:
            for start in range(0, 600, 20):
                await asyncio.gather(*(channel.produce(i, timeout=30) for i in range(start, start + 20)))
                acknowledged.extend(range(start, start + 20))

        producing = asyncio.create_task(produce_all())
        while len(handled) < 50:
            await asyncio.sleep(0.01)
        # When the node dies and comes back within the session timeout
        fresh_node.kill()
        await asyncio.sleep(0.3)
        await asyncio.to_thread(fresh_node.restart)
        await asyncio.wait_for(producing, 60)

        # Then every acknowledged produce is handled exactly once: produce retries reuse their ids,
        # the session re-attaches with its leases, and in-flight acks are re-sent with their tokens
        async def all_handled() -> None:
            while len(handled) < len(acknowledged):
                await asyncio.sleep(0.05)

        try:
            await asyncio.wait_for(all_handled(), 30)
        except TimeoutError:
            async with BrokerAdmin(fresh_node.endpoint) as admin:
                stats = await admin.stats("restart/jobs")
            missing = sorted(set(acknowledged) - set(handled))
            raise AssertionError(f"not handled: {missing[:20]} ({len(missing)}); {stats}") from None
        await asyncio.sleep(0.5)
        assert sorted(handled) == sorted(acknowledged) == list(range(600))
    async with BrokerAdmin(fresh_node.endpoint) as admin:
        stats = await admin.stats("restart/jobs")
        assert (stats.ready, stats.in_flight, stats.produced_total, stats.acked_total) == (0, 0, 600, 600)
