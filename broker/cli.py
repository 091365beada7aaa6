"""``brokerctl``: run nodes and inspect queues.

It parses arguments, calls the library and maps exceptions to named exit codes; nothing more.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, is_dataclass
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from client.admin import BrokerAdmin
from client.errors import BrokerConnectionError, BrokerError, BrokerTimeoutError, ConfigError, NotFoundError

T = TypeVar("T")


class ExitCode(IntEnum):
    """What ``brokerctl`` exits with."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    UNREACHABLE = 4
    NOT_FOUND = 5


app = typer.Typer(no_args_is_help=True, add_completion=False, help="Run and operate zbroker nodes.")
queue_app = typer.Typer(no_args_is_help=True, help="Inspect and manage one queue.")
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters of a queue.")
leader_app = typer.Typer(no_args_is_help=True, help="Leadership of the cluster.")
config_app = typer.Typer(no_args_is_help=True, help="Node configuration files.")
node_app = typer.Typer(no_args_is_help=True, help="Cluster membership: add or remove one node at a time.")
app.add_typer(queue_app, name="queue")
app.add_typer(dlq_app, name="dlq")
app.add_typer(leader_app, name="leader")
app.add_typer(config_app, name="config")
app.add_typer(node_app, name="node")

EndpointOption = Annotated[
    str,
    typer.Option("--endpoint", "-e", envvar="ZBROKER_ENDPOINTS", help="Node endpoint(s), comma-separated."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DEFAULT_ENDPOINT = "tcp://127.0.0.1:7101"


def _fail(message: str, code: ExitCode) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(int(code))


def _run_admin(endpoint: str, call: Callable[[BrokerAdmin], Awaitable[T]]) -> T:
    async def main() -> T:
        async with BrokerAdmin(_endpoints(endpoint), timeout=5.0) as admin:
            return await call(admin)

    return _run(main())


def _confirm_or_exit(question: str, yes: bool) -> None:
    """Destructive commands ask first, unless ``--yes``; declining exits with FAILURE."""
    if not yes and not typer.confirm(question):
        raise typer.Exit(int(ExitCode.FAILURE))


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    lines = ["  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True))]
    for line in cells:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    return "\n".join(lines)


def _print(value: Any, as_json: bool, columns: list[str] | None = None) -> None:
    plain = _plain(value)
    if as_json or columns is None:
        typer.echo(json.dumps(plain, indent=2, default=str))
    else:
        typer.echo(_table(plain if isinstance(plain, list) else [plain], columns))


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Node configuration (TOML).")] = None,
) -> None:
    """Run one node in the foreground (SIGTERM or Ctrl-C: clean shutdown)."""
    from broker.server import serve as run
    from config import load_settings

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise _fail(str(exc), ExitCode.CONFIG) from None
    run(settings)


@app.command()
def dev(
    data_dir: Annotated[Path, typer.Option(help="Where the nodes keep their data, configs and logs.")] = Path(
        "var"
    ),
    port: Annotated[int, typer.Option(help="Client port of n1 (n2, n3 follow; peers use port+100).")] = 7101,
    nodes: Annotated[int, typer.Option(help="How many nodes.")] = 3,
) -> None:
    """Run a local cluster (3 nodes by default) with defaults, for a first try (data under ./var)."""
    import signal
    import time

    from broker.launcher import ClusterProcesses

    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        cluster = ClusterProcesses(data_dir, nodes, base_port=port).start()
    except (ConfigError, RuntimeError, TimeoutError) as exc:
        raise _fail(
            f"could not start the cluster: {exc} (see the logs in {data_dir})", ExitCode.FAILURE
        ) from None
    endpoints = ",".join(cluster.endpoints)
    typer.echo(f"zbroker dev cluster of {nodes} on {endpoints}; data, configs and logs in {data_dir}/")
    typer.echo(f'connect with:  BrokerQueue("{endpoints}")   or   brokerctl status -e {endpoints}')
    typer.echo("stop with Ctrl-C")
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping:
            for node_id, node in cluster.nodes.items():
                if not node.running:
                    typer.echo(f"{node_id} exited; see {node.log_path}", err=True)
                    stopping = True
            time.sleep(0.2)
    finally:
        codes = cluster.stop_all()
        typer.echo(f"stopped: {codes}")


@app.command()
def status(
    endpoint: EndpointOption = "",
    as_json: JsonOption = False,
    local: Annotated[
        bool, typer.Option("--local", help="The answering node's own view, not the leader's.")
    ] = False,
) -> None:
    """Nodes of the cluster with their roles, terms and progress (as the leader sees them)."""
    result = _run_admin(endpoint, lambda admin: admin.cluster_status(local=local))
    if as_json:
        _print(result, True)
        return
    typer.echo(f"leader: {result.leader}")
    _print(
        list(result.nodes),
        False,
        ["id", "role", "term", "commit_index", "applied_index", "lag", "pid", "client_endpoint"],
    )


@app.command()
def queues(endpoint: EndpointOption = "", as_json: JsonOption = False) -> None:
    """Every queue with its depths."""
    result = _run_admin(endpoint, lambda admin: admin.queues())
    _print(
        result,
        as_json,
        ["channel", "ready", "delayed", "in_flight", "dead", "consumers", "produce_rate", "ack_rate"],
    )


@queue_app.command("stats")
def queue_stats(name: str, endpoint: EndpointOption = "", as_json: JsonOption = False) -> None:
    """Counters of one queue."""
    _print(_run_admin(endpoint, lambda admin: admin.stats(name)), as_json)


@queue_app.command("peek")
def queue_peek(
    name: str,
    n: Annotated[int, typer.Option("-n", help="How many.")] = 10,
    endpoint: EndpointOption = "",
    as_json: JsonOption = False,
) -> None:
    """The next ready messages of a queue, without taking them."""
    result = _run_admin(endpoint, lambda admin: admin.peek(name, n))
    _print(result, as_json, ["id", "priority", "attempts", "produced_at", "data"])


@queue_app.command("purge")
def queue_purge(name: str, endpoint: EndpointOption = "", yes: YesOption = False) -> None:
    """Delete every ready and delayed message of a queue."""
    _confirm_or_exit(f"Delete every ready and delayed message of {name!r}?", yes)
    typer.echo(f"purged {_run_admin(endpoint, lambda admin: admin.purge(name))} messages")


@dlq_app.command("list")
def dlq_list(
    name: str,
    n: Annotated[int, typer.Option("-n", help="How many.")] = 100,
    endpoint: EndpointOption = "",
    as_json: JsonOption = False,
) -> None:
    """Dead letters of a queue with the reason they died."""
    result = _run_admin(endpoint, lambda admin: admin.dead_letters(name, n))
    _print(result, as_json, ["id", "attempts", "dead_at", "reason"])


@dlq_app.command("requeue")
def dlq_requeue(name: str, endpoint: EndpointOption = "", yes: YesOption = False) -> None:
    """Move every dead letter of a queue back to ready."""
    _confirm_or_exit(f"Requeue every dead letter of {name!r}?", yes)
    typer.echo(f"requeued {_run_admin(endpoint, lambda admin: admin.requeue_dead(name))} messages")


@dlq_app.command("purge")
def dlq_purge(name: str, endpoint: EndpointOption = "", yes: YesOption = False) -> None:
    """Delete every dead letter of a queue."""
    _confirm_or_exit(f"Delete every dead letter of {name!r}?", yes)
    typer.echo(f"purged {_run_admin(endpoint, lambda admin: admin.purge_dead(name))} dead letters")


@leader_app.command("transfer")
def leader_transfer(node: str, endpoint: EndpointOption = "") -> None:
    """Hand leadership to NODE (it takes over within an election timeout)."""
    result = _run_admin(endpoint, lambda admin: admin.transfer_leadership(node))
    typer.echo(f"leadership is moving to {result}")


@node_app.command("add")
def node_add(
    node_id: Annotated[str, typer.Argument(metavar="ID")],
    client_endpoint: Annotated[str, typer.Option("--client", help="The new node's client endpoint.")],
    peer_endpoint: Annotated[str, typer.Option("--peer", help="The new node's peer endpoint.")],
    endpoint: EndpointOption = "",
) -> None:
    """Add a node to the cluster (start it first, with a [cluster] section listing it)."""
    members = _run_admin(endpoint, lambda admin: admin.add_node(node_id, client_endpoint, peer_endpoint))
    typer.echo(f"members: {', '.join(members)}")


@node_app.command("remove")
def node_remove(
    node_id: Annotated[str, typer.Argument(metavar="ID")],
    endpoint: EndpointOption = "",
    yes: YesOption = False,
) -> None:
    """Remove a node from the cluster (it can be stopped once the change is applied)."""
    _confirm_or_exit(f"Remove {node_id!r} from the cluster?", yes)
    members = _run_admin(endpoint, lambda admin: admin.remove_node(node_id))
    typer.echo(f"members: {', '.join(members)}")


@config_app.command("check")
def config_check(file: Path, as_json: JsonOption = False) -> None:
    """Load and validate a node configuration file (with ZBROKER_* overrides); print the result."""
    from config import load_settings

    try:
        settings = load_settings(file)
    except ConfigError as exc:
        raise _fail(str(exc), ExitCode.CONFIG) from None
    if as_json:
        typer.echo(settings.model_dump_json(indent=2, by_alias=True))
        return
    members = settings.members()
    typer.echo(f"{file}: valid; node {settings.node.id}, a cluster of {len(members)}")
    _print([member.model_dump() for member in members], False, ["id", "client_endpoint", "peer_endpoint"])


@app.command()
def produce(
    name: str,
    data: Annotated[str, typer.Argument(help="The payload as JSON.")],
    priority: Annotated[int, typer.Option(help="Higher is delivered first.")] = 0,
    delay: Annotated[str | None, typer.Option(help='Hold back, e.g. "10s".')] = None,
    exactly_once: Annotated[bool, typer.Option("--exactly-once", help="Deduplicate (5 min window).")] = False,
    endpoint: EndpointOption = "",
    as_json: JsonOption = False,
) -> None:
    """Put one message (a JSON value) on a channel, for debugging."""
    from client import BrokerQueue, QueueMessageProcessing

    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise _fail(f"DATA is not valid JSON: {exc}", ExitCode.USAGE) from None
    mode = QueueMessageProcessing.EXACTLY_ONCE if exactly_once else QueueMessageProcessing.AT_LEAST_ONCE

    async def main() -> Any:
        async with BrokerQueue(_endpoints(endpoint), connect_timeout=5.0) as queue:
            channel = queue.channel(name, process=mode)
            return await channel.produce(payload, priority=priority, delay=delay, timeout=10.0)

    result = _run(main())
    _print(result, as_json, ["id", "duplicate"])


@app.command()
def consume(
    name: str,
    count: Annotated[int, typer.Option("-n", help="Stop after this many messages.")] = 1,
    wait: Annotated[float, typer.Option(help="Give up after this many seconds without a message.")] = 10.0,
    endpoint: EndpointOption = "",
) -> None:
    """Take messages off a channel (acking them) and print each as a JSON line, for debugging."""
    from client import BrokerQueue, QueueMessage

    async def main() -> int:
        received = 0
        done = asyncio.Event()
        arrived = asyncio.Event()

        async def show(data: Any, message: QueueMessage[Any]) -> None:
            nonlocal received
            if received >= count:
                raise RuntimeError("brokerctl consume has all it asked for")  # nacked, goes back
            received += 1
            line = {
                "id": message.id,
                "attempt": message.attempt,
                "produced_at": message.produced_at,
                "data": data,
            }
            typer.echo(json.dumps(_plain(line), default=str))
            arrived.set()
            if received >= count:
                done.set()

        async with BrokerQueue(_endpoints(endpoint), connect_timeout=5.0) as queue:
            consumer = await queue.channel(name).consume(show)
            while not done.is_set():
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), wait)
                except TimeoutError:
                    break
            await consumer.close()
        return received

    received = _run(main())
    if received < count:
        raise _fail(f"got {received} of {count} messages within {wait:g}s", ExitCode.NOT_FOUND)


@app.command()
def worker(
    module: Annotated[str, typer.Argument(help="Python module whose import registers consumers.")],
    processes: Annotated[int, typer.Option(help="Worker processes, each its own session.")] = 1,
    grace: Annotated[float, typer.Option(help="Seconds in-flight messages get to finish on SIGTERM.")] = 30.0,
    endpoint: EndpointOption = "",
) -> None:
    """Run every consumer MODULE registers (``@channel.consumer(...)``) until SIGTERM or Ctrl-C."""
    from client.worker import run_worker

    try:
        code = run_worker(module, _endpoints(endpoint), processes=processes, grace_s=grace)
    except (ImportError, BrokerError) as exc:
        raise _fail(str(exc), ExitCode.USAGE if isinstance(exc, ImportError) else ExitCode.FAILURE) from None
    raise typer.Exit(code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Run the benchmark (the options of scripts/bench, e.g. --messages 30000 --nodes 3)."""
    from broker.bench import main as bench_main

    bench_main(list(ctx.args))


def _endpoints(endpoint: str) -> list[str]:
    return [part.strip() for part in (endpoint or DEFAULT_ENDPOINT).split(",") if part.strip()]


def _run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    try:
        return asyncio.run(main())
    except (BrokerConnectionError, BrokerTimeoutError) as exc:
        raise _fail(str(exc), ExitCode.UNREACHABLE) from None
    except NotFoundError as exc:
        raise _fail(str(exc), ExitCode.NOT_FOUND) from None
    except BrokerError as exc:
        raise _fail(str(exc), ExitCode.FAILURE) from None


def main() -> None:
    """Entry point of the ``brokerctl`` console script."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
