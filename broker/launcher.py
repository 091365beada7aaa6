"""Starting ``brokerctl serve`` child processes on free loopback ports (dev clusters, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BROKERCTL = [sys.executable, "-m", "broker"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the node exited with code {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout_s}s")


class NodeProcess:
    """One ``brokerctl serve`` child process with its own config and data folder."""

    def __init__(self, workdir: Path, node_id: str = "n1", **node_options: Any) -> None:
        self.workdir = workdir
        self.node_id = node_id
        self.port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.data_dir = workdir / node_id
        self.config_path = workdir / f"{node_id}.toml"
        self.log_path = workdir / f"{node_id}.log"
        self.process: subprocess.Popen[bytes] | None = None
        lines = [
            "[node]",
            f'id = "{node_id}"',
            f'client_endpoint = "{self.endpoint}"',
            f'peer_endpoint = "tcp://127.0.0.1:{self.peer_port}"',
            f'data_dir = "{self.data_dir}"',
        ]
        for key, value in node_options.items():
            lines.append(
                f"{key} = {value!r}" if not isinstance(value, bool) else f"{key} = {str(value).lower()}"
            )
        self.config_path.write_text("\n".join(lines).replace("'", '"') + "\n")

    def start(self, timeout_s: float = 20.0) -> NodeProcess:
        """Start the node and wait until it accepts connections."""
        assert self.process is None or self.process.poll() is not None, "already running"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*BROKERCTL, "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        wait_for_port(self.port, timeout_s, self.process)
        return self

    @property
    def pid(self) -> int:
        """The running node's process id."""
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the node (no chance to flush anything) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM the node and wait for its clean exit; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return int(self.process.returncode)

    def restart(self) -> NodeProcess:
        """Start again on the same ports and data."""
        return self.start()

    def log_text(self) -> str:
        """Everything the node logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_bytes(self) -> int:
        """Resident memory of the node process."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")
