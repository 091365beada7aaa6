"""The worker runner behind ``brokerctl worker MODULE``: run every registered consumer until told to stop.

Shutdown, on SIGTERM or SIGINT: stop taking messages, let handlers in flight finish for up to
``grace_s`` seconds (their messages are acked), then cancel what is left and release those messages
for immediate redelivery elsewhere, and say goodbye (the node releases anything still leased). A
second signal exits at once; the node then redelivers after the session timeout, as for a crash.

With ``processes > 1`` the runner starts that many child workers (each its own session) and forwards
signals to them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from client.consumer import Consumer
from client.errors import InvalidArgumentError
from client.queue import BrokerQueue
from client.registry import REGISTRY, ConsumerRegistration

log = logging.getLogger("zbroker.worker")

EXIT_NOW = 130


def load_registrations(module: str) -> list[ConsumerRegistration]:
    """Import ``module`` (from the current directory too) and return the consumers it registered."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    before = len(REGISTRY)
    importlib.import_module(module)
    registrations = REGISTRY[before:] or list(REGISTRY)
    if not registrations:
        raise InvalidArgumentError(
            f"module {module!r} registers no consumer: "
            "decorate a handler with @channel.consumer(max_parallel=...)"
        )
    return registrations


async def run_consumers(
    endpoints: Sequence[str],
    registrations: Sequence[ConsumerRegistration],
    stop: asyncio.Event,
    *,
    grace_s: float,
    session_timeout: float = 10.0,
) -> None:
    """Consume with every registration until ``stop`` is set, then shut down gracefully."""
    queue = BrokerQueue(list(endpoints), session_timeout=session_timeout, client_name=f"worker:{os.getpid()}")
    await queue.connect()
    consumers: list[Consumer[Any]] = []
    try:
        for registration in registrations:
            channel = registration.definition.bind(queue)
            consumers.append(
                await channel.consume(
                    registration.handler,
                    registration.max_parallel,
                    processing_timeout=registration.processing_timeout,
                )
            )
            log.info(
                "consuming %s with %s (max_parallel=%d)",
                channel.name,
                getattr(registration.handler, "__qualname__", registration.handler),
                registration.max_parallel,
            )
        print(f"worker {os.getpid()} ready: {len(consumers)} consumer(s)", flush=True)
        await stop.wait()
        log.info("stopping: finishing in-flight messages for up to %gs", grace_s)
        await asyncio.gather(*(consumer.close(grace_s) for consumer in consumers))
    finally:
        await queue.close()
    print(f"worker {os.getpid()} stopped", flush=True)


def run_worker(module: str, endpoints: Sequence[str], *, processes: int = 1, grace_s: float = 30.0) -> int:
    """Run the consumers ``module`` registers, in this process or in ``processes`` children."""
    if processes > 1:
        return _run_children(module, endpoints, processes, grace_s)
    registrations = load_registrations(module)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                print("second signal: exiting now", file=sys.stderr, flush=True)
                os._exit(EXIT_NOW)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        await run_consumers(endpoints, registrations, stop, grace_s=grace_s)

    asyncio.run(main())
    return 0


def _run_children(module: str, endpoints: Sequence[str], processes: int, grace_s: float) -> int:
    command = [
        sys.executable,
        "-m",
        "broker",
        "worker",
        module,
        "--endpoint",
        ",".join(endpoints),
        "--grace",
        str(grace_s),
    ]
    # Own sessions: a Ctrl-C in the terminal reaches only this parent, which forwards it once.
    children = [subprocess.Popen(command, start_new_session=True) for _ in range(processes)]
    signals_seen = 0

    def forward(signum: int, frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGKILL if signals_seen > 1 else signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, key=abs) if any(codes) else 0
