"""zbroker benchmark, side by side with a peer measured in the same run.

    scripts/bench [--messages N] [--rounds R] [--peer redis|none] [--nodes 1|3] [--memory M] [--failover K]
    (the same as ``brokerctl bench ...``)

Scenarios, for 200-byte and 4-KB payloads:
  produce-1     one produce in flight at a time; rate and p50/p99 latency
  produce-100   100 produces in flight (100 concurrent producers on one client)
  consume-ack   a pre-filled queue drained by one consumer with max_parallel=100 (handler returns = ack)
Each scenario runs ``rounds`` times on a fresh node; the median is reported. The peer is Redis 7 Streams
with ``appendfsync always`` (XADD; XREADGROUP + XACK), when ``redis-server`` is installed.
``--memory M`` queues M messages and samples the node's RSS along the way.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from broker.launcher import ClusterProcesses, NodeProcess, free_port, wait_for_port
from client import BrokerQueue

SIZES = {"200B": 200, "4KB": 4096}


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --------------------------------------------------------------------------- zbroker


async def zb_produce(endpoint: list[str], size: int, messages: int, in_flight: int) -> dict[str, float]:
    async with BrokerQueue(endpoint) as queue:
        channel = queue.channel("bench/produce", bytes)
        body = b"x" * size
        latencies: list[float] = []
        per_worker = messages // in_flight

        async def worker() -> None:
            for _ in range(per_worker):
                started = time.perf_counter()
                await channel.produce(body)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(channel.produce(body) for _ in range(min(in_flight, 100))))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
    return {
        "rate": per_worker * in_flight / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


async def zb_consume(endpoint: list[str], size: int, messages: int) -> dict[str, float]:
    async with BrokerQueue(endpoint) as queue:
        channel = queue.channel("bench/consume", bytes)
        body = b"x" * size
        for start in range(0, messages, 1000):
            await asyncio.gather(*(channel.produce(body) for _ in range(min(1000, messages - start))))
        done = asyncio.Event()
        handled = 0

        async def handler(data: bytes) -> None:
            nonlocal handled
            handled += 1
            if handled == messages:
                done.set()

        started = time.perf_counter()
        consumer = await channel.consume(handler, max_parallel=100)
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - started
        await consumer.close()
    return {"rate": messages / elapsed}


# --------------------------------------------------------------------------- Redis Streams peer


class RedisPeer:
    """A throwaway redis-server with appendfsync always."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(workdir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


async def redis_produce(port: int, size: int, messages: int, in_flight: int) -> dict[str, float]:
    import redis.asyncio as redis

    client = redis.Redis(port=port, max_connections=in_flight + 1)
    body = b"x" * size
    latencies: list[float] = []
    per_worker = messages // in_flight

    async def worker() -> None:
        for _ in range(per_worker):
            started = time.perf_counter()
            await client.xadd("bench:produce", {"d": body})
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(client.xadd("bench:produce", {"d": body}) for _ in range(in_flight)))
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    await client.aclose()
    return {
        "rate": per_worker * in_flight / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


async def redis_consume(port: int, size: int, messages: int) -> dict[str, float]:
    import redis.asyncio as redis

    client = redis.Redis(port=port)
    body = b"x" * size
    stream = "bench:consume"
    await client.delete(stream)
    for start in range(0, messages, 1000):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(1000, messages - start)):
            pipe.xadd(stream, {"d": body})
        await pipe.execute()
    await client.xgroup_create(stream, "workers", id="0")
    handled = 0
    started = time.perf_counter()
    while handled < messages:
        batch = await client.xreadgroup("workers", "w1", {stream: ">"}, count=100, block=1000)
        ids = [entry_id for _, entries in batch for entry_id, _ in entries]  # type: ignore[str-unpack, union-attr]
        handled += len(ids)
        if ids:
            await client.xack(stream, "workers", *ids)
    elapsed = time.perf_counter() - started
    await client.aclose()
    return {"rate": messages / elapsed}


# --------------------------------------------------------------------------- driver


def fresh_node(workdir: Path) -> NodeProcess:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return NodeProcess(workdir, log_level="warning").start()


class ZbrokerTarget:
    """A fresh zbroker node (or a cluster of ``NODES`` nodes) per round."""

    name = "zbroker"
    nodes = 1

    def __init__(self, workdir: Path) -> None:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        self.cluster = ClusterProcesses(workdir, self.nodes, node_options={"log_level": "warning"}).start()
        self.endpoints = self.cluster.endpoints
        asyncio.run(wait_for_leader(self.endpoints))

    async def produce(self, size: int, count: int, in_flight: int) -> dict[str, float]:
        return await zb_produce(self.endpoints, size, count, in_flight)

    async def consume(self, size: int, count: int) -> dict[str, float]:
        return await zb_consume(self.endpoints, size, count)

    def stop(self) -> None:
        self.cluster.stop_all()


async def wait_for_leader(endpoints: list[str]) -> None:
    """Until the cluster has elected a leader (a client connects only to a leader)."""
    async with BrokerQueue(endpoints, connect_timeout=30):
        pass


class RedisTarget:
    """A fresh redis-server per round."""

    name = "redis"

    def __init__(self, workdir: Path) -> None:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        self.peer = RedisPeer(workdir)

    async def produce(self, size: int, count: int, in_flight: int) -> dict[str, float]:
        return await redis_produce(self.peer.port, size, count, in_flight)

    async def consume(self, size: int, count: int) -> dict[str, float]:
        return await redis_consume(self.peer.port, size, count)

    def stop(self) -> None:
        self.peer.stop()


def run_rounds(
    rounds: int,
    target: type[ZbrokerTarget | RedisTarget],
    workdir: Path,
    size: int,
    count: int,
    in_flight: int,
) -> dict[str, float]:
    """Median of ``rounds`` measurements, each on a fresh server (in_flight 0 = consume-ack)."""
    results = []
    for _ in range(rounds):
        server = target(workdir / target.name)
        try:
            scenario = server.produce(size, count, in_flight) if in_flight else server.consume(size, count)
            results.append(asyncio.run(scenario))
        finally:
            server.stop()
    return {key: statistics.median(result[key] for result in results) for key in results[0]}


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base = Path(tempfile.mkdtemp(prefix="zbroker-bench-"))
    targets: list[type[ZbrokerTarget | RedisTarget]] = [ZbrokerTarget]
    if args.peer == "redis" and shutil.which("redis-server") is not None:
        targets.append(RedisTarget)
    try:
        for size_name, size in SIZES.items():
            for scenario, in_flight in [("produce-1", 1), ("produce-100", 100), ("consume-ack", 0)]:
                count = args.messages // 10 if in_flight == 1 else args.messages
                row: dict[str, Any] = {"scenario": scenario, "size": size_name, "messages": count}
                for target in targets:
                    row[target.name] = run_rounds(args.rounds, target, base, size, count, in_flight)
                rows.append(row)
                print(format_row(row), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


def format_row(row: dict[str, Any]) -> str:
    zb = row["zbroker"]
    cells = [row["scenario"], row["size"], f"{zb['rate']:,.0f}/s"]
    cells.append(f"{zb['p50_ms']:.2f} / {zb['p99_ms']:.2f} ms" if "p50_ms" in zb else "-")
    peer = row.get("redis")
    if peer:
        cells.append(f"{peer['rate']:,.0f}/s")
        cells.append(f"{peer['p50_ms']:.2f} / {peer['p99_ms']:.2f} ms" if "p50_ms" in peer else "-")
        cells.append(f"{zb['rate'] / peer['rate']:.2f}")
    else:
        cells += ["-", "-", "-"]
    return "| " + " | ".join(cells) + " |"


def memory(count: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="zbroker-mem-"))
    node = fresh_node(base)

    async def fill() -> None:
        async with BrokerQueue(node.endpoint) as queue:
            channel = queue.channel("bench/memory", bytes)
            body = b"x" * 200
            done = 0
            checkpoints = sorted({10_000, count // 4, count // 2, (3 * count) // 4, count})
            started = time.perf_counter()
            for checkpoint in checkpoints:
                while done < checkpoint:
                    batch = min(1000, checkpoint - done)
                    await asyncio.gather(*(channel.produce(body) for _ in range(batch)))
                    done += batch
                print(
                    f"| {done:>9,} queued | node RSS {node.rss_bytes() / 2**20:7.1f} MiB | "
                    f"{time.perf_counter() - started:6.1f} s |",
                    flush=True,
                )

    try:
        asyncio.run(fill())
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


def failover(times: int) -> None:
    """SIGKILL the leader of a 3-node cluster ``times`` times; print how long until a produce is acked."""
    base = Path(tempfile.mkdtemp(prefix="zbroker-failover-"))
    cluster = ClusterProcesses(base, 3, node_options={"log_level": "warning"}).start()
    gaps: list[float] = []

    async def once() -> None:
        async with BrokerQueue(cluster.endpoints, connect_timeout=30) as queue:
            channel = queue.channel("bench/failover", int)
            await channel.produce(0)
            leader = queue.connection.node_id
            cluster.kill(leader)
            killed = time.perf_counter()
            await channel.produce(1, timeout=60)
            gaps.append(time.perf_counter() - killed)
            print(
                f"| {leader} killed | first ack after {gaps[-1]:.2f} s via {queue.connection.node_id} |",
                flush=True,
            )
            cluster.restart(leader)

    try:
        for _ in range(times):
            asyncio.run(once())
        print(f"median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s over {len(gaps)} kills")
    finally:
        cluster.stop_all()
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark with command-line options (``brokerctl bench`` and ``scripts/bench``)."""
    parser = argparse.ArgumentParser(
        prog="brokerctl bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=30_000, help="messages per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario (median reported)")
    parser.add_argument("--peer", choices=["redis", "none"], default="redis")
    parser.add_argument("--memory", type=int, default=0, help="queue this many messages and report RSS")
    parser.add_argument("--nodes", type=int, default=1, help="zbroker cluster size (1 or 3)")
    parser.add_argument(
        "--failover", type=int, default=0, help="measure leader-kill failover this many times"
    )
    args = parser.parse_args(argv)
    if args.memory:
        memory(args.memory)
        return
    ZbrokerTarget.nodes = args.nodes
    if args.failover:
        failover(args.failover)
        return
    columns = ["scenario", "size", "zbroker rate", "zbroker p50 / p99", "redis rate", "redis p50 / p99"]
    print("| " + " | ".join([*columns, "zbroker / redis"]) + " |")
    print("|---|---|---|---|---|---|---|")
    bench(args)


if __name__ == "__main__":
    main()
