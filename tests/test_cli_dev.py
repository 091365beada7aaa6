"""`brokerctl dev` (what ./scripts/dev runs): a local 3-node cluster that serves, and Ctrl-C stops
every node cleanly."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

from broker.launcher import BROKERCTL
from client import BrokerQueue


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base_port() -> int:
    """A client port for n1 such that n1..n3 and their peer ports (+100) are all free."""
    for _ in range(100):
        base = random.randrange(20_000, 40_000)
        if all(_port_is_free(base + offset) for offset in (0, 1, 2, 100, 101, 102)):
            return base
    raise RuntimeError("no free block of ports")


async def _produce(endpoints: list[str]) -> bool:
    async with BrokerQueue(endpoints, connect_timeout=30) as queue:
        return (await queue.channel("dev/check", int).produce(7)).duplicate


def test_dev_serves_a_three_node_cluster_and_ctrl_c_stops_every_node_cleanly(tmp_path: Path) -> None:
    base = _free_base_port()
    process = subprocess.Popen(
        [*BROKERCTL, "dev", "--data-dir", str(tmp_path / "var"), "--port", str(base)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    try:
        # Given the dev cluster says it is up and how to connect
        assert process.stdout is not None
        banner = []
        for line in process.stdout:
            banner.append(line)
            if "stop with Ctrl-C" in line:
                break
        endpoints = [f"tcp://127.0.0.1:{base + index}" for index in range(3)]
        assert any(",".join(endpoints) in line for line in banner), banner
        # When a client produces through the endpoints it printed
        assert asyncio.run(_produce(endpoints)) is False
        # And Ctrl-C reaches the whole process group (the launcher and every node at once)
        os.killpg(process.pid, signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Then every node exits cleanly and the launcher says so
    assert process.returncode == 0, rest
    assert "stopped: {'n1': 0, 'n2': 0, 'n3': 0}" in rest, rest
    assert all((tmp_path / "var" / f"n{index}.toml").exists() for index in (1, 2, 3))
