"""The worker runner and the example app, as processes against a real 3-node cluster."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.launcher import ClusterProcesses
from client import BrokerAdmin, BrokerQueue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcesses]:
    processes = ClusterProcesses(
        tmp_path_factory.mktemp("cluster"), 3, node_options={"session_timeout": "3s"}
    )
    processes.start()
    yield processes
    processes.stop_all()


def _env(cluster: ClusterProcesses, **extra: str) -> dict[str, str]:
    return {**os.environ, "ZBROKER_ENDPOINTS": ",".join(cluster.endpoints), "PYTHONUNBUFFERED": "1", **extra}


def _wait_for(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _produce(cluster: ClusterProcesses, channel: str, count: int) -> None:
    async def fill() -> None:
        async with BrokerQueue(cluster.endpoints) as queue:
            await asyncio.gather(*(queue.channel(channel, int).produce(i) for i in range(count)))

    asyncio.run(fill())


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _start_worker(module: str, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    worker = subprocess.Popen(
        [sys.executable, "-m", "broker", "worker", module, *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert worker.stdout is not None
    deadline = time.monotonic() + 30
    for line in worker.stdout:
        if "ready" in line:
            return worker
        assert time.monotonic() < deadline, "worker never became ready"
    raise AssertionError(f"worker exited with {worker.wait()} before it was ready")


def test_the_registration_example_processes_a_user_once(cluster: ClusterProcesses, tmp_path: Path) -> None:
    # Given the example worker running as its own process
    welcome_log = tmp_path / "welcome.log"
    env = _env(cluster, WELCOME_LOG=str(welcome_log))
    worker = _start_worker("examples.registration.worker", env)
    try:
        # When the web app registers a user, and the form is submitted twice
        app = [sys.executable, "-m", "examples.registration.app", "42", "alice", "alice@example.com"]
        first = subprocess.run(app, env=env, capture_output=True, text=True, timeout=60)
        second = subprocess.run(app, env=env, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0 and "registered alice" in first.stdout, first.stderr
        assert "already registered" in second.stdout, second.stderr
        # Then the worker sent exactly one welcome mail
        _wait_for(lambda: _lines(welcome_log), 20, "the welcome mail")
        time.sleep(0.5)  # a second mail would arrive within this
        (line,) = _lines(welcome_log)
        assert line.startswith("welcome 42 alice <alice@example.com>") and line.endswith("attempt=1")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0


def test_sigterm_finishes_in_flight_work_and_loses_nothing(cluster: ClusterProcesses, tmp_path: Path) -> None:
    # Given 12 queued messages and a worker taking 4 at a time, 1 s each
    channel = f"worker/slow-{time.monotonic_ns()}"
    slow_log = tmp_path / "slow.log"

    _produce(cluster, channel, 12)
    env = _env(cluster, SLOW_LOG=str(slow_log), SLOW_CHANNEL=channel, SLOW_SECONDS="1")
    worker = _start_worker("tests.helpers.slow_worker", env, "--grace", "10")
    _wait_for(
        lambda: sum(line.startswith("start") for line in _lines(slow_log)) >= 4, 20, "4 messages in flight"
    )
    # When it gets SIGTERM while handling them
    worker.send_signal(signal.SIGTERM)
    # Then it finishes the ones in flight, acks them and exits cleanly
    assert worker.wait(30) == 0
    started = [line.split()[1] for line in _lines(slow_log) if line.startswith("start")]
    finished = [line.split()[1] for line in _lines(slow_log) if line.startswith("done")]
    assert sorted(started) == sorted(finished), "every message it started was finished"

    # And everything else is still queued, ready at once for the next worker
    async def stats() -> tuple[int, int, int]:
        async with BrokerAdmin(cluster.endpoints) as admin:
            counters = await admin.stats(channel)
            return counters.ready, counters.in_flight, counters.acked_total

    ready, in_flight, acked = asyncio.run(stats())
    assert (in_flight, acked, ready + acked) == (0, len(finished), 12)


def test_a_short_grace_releases_unfinished_messages_for_immediate_redelivery(
    cluster: ClusterProcesses, tmp_path: Path
) -> None:
    # Given a worker whose handlers take 30 s, and only 0.5 s of grace
    channel = f"worker/stuck-{time.monotonic_ns()}"
    slow_log = tmp_path / "slow.log"

    _produce(cluster, channel, 4)
    env = _env(cluster, SLOW_LOG=str(slow_log), SLOW_CHANNEL=channel, SLOW_SECONDS="30")
    worker = _start_worker("tests.helpers.slow_worker", env, "--grace", "0.5")
    _wait_for(
        lambda: sum(line.startswith("start") for line in _lines(slow_log)) >= 4, 20, "4 messages in flight"
    )
    # When it is told to stop
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert time.monotonic() - started < 10

    # Then its messages are back in the queue at once (released, not waiting for a session timeout)
    async def ready() -> int:
        async with BrokerAdmin(cluster.endpoints) as admin:
            return (await admin.stats(channel)).ready

    assert asyncio.run(ready()) == 4


def test_a_second_signal_exits_at_once(cluster: ClusterProcesses, tmp_path: Path) -> None:
    channel = f"worker/second-{time.monotonic_ns()}"
    slow_log = tmp_path / "slow.log"

    _produce(cluster, channel, 1)
    env = _env(cluster, SLOW_LOG=str(slow_log), SLOW_CHANNEL=channel, SLOW_SECONDS="30")
    worker = _start_worker("tests.helpers.slow_worker", env, "--grace", "60")
    _wait_for(lambda: _lines(slow_log), 20, "a message in flight")
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(10) == 130
