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
app.add_typer(queue_app, name="queue")
app.add_typer(dlq_app, name="dlq")

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
        async with BrokerAdmin(endpoint or DEFAULT_ENDPOINT, timeout=5.0) as admin:
            return await call(admin)

    try:
        return asyncio.run(main())
    except (BrokerConnectionError, BrokerTimeoutError) as exc:
        raise _fail(str(exc), ExitCode.UNREACHABLE) from None
    except NotFoundError as exc:
        raise _fail(str(exc), ExitCode.NOT_FOUND) from None
    except BrokerError as exc:
        raise _fail(str(exc), ExitCode.FAILURE) from None


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
def status(endpoint: EndpointOption = "", as_json: JsonOption = False) -> None:
    """Nodes of the cluster with their roles, terms and progress."""
    result = _run_admin(endpoint, lambda admin: admin.cluster_status())
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
        ["channel", "ready", "delayed", "in_flight", "dead", "consumers", "produced_total", "acked_total"],
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


def main() -> None:
    """Entry point of the ``brokerctl`` console script."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
