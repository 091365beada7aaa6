"""Starting ``brokerctl serve`` child processes on free loopback ports (dev clusters, tests, benchmarks).

``NodeProcess`` is one node with its own config file, data folder and log; ``ClusterProcesses`` is
a local cluster of them whose config files list every member. Each generated file is validated
with ``config.load_settings`` before any process starts, so a bad option fails here, not in a log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from config import ClusterMember, Settings, load_settings

__all__ = [
    "BROKERCTL",
    "ClusterProcesses",
    "NodeProcess",
    "PeerAddress",
    "free_port",
    "free_ports",
    "wait_for_port",
]

BROKERCTL = [sys.executable, "-m", "broker"]

PeerAddress = Callable[[str, str, str], str]
"""``(src_id, dst_id, dst_peer_endpoint) -> the peer endpoint src's config lists for dst``."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    with _reserved_ports(count) as ports:
        return ports


@contextlib.contextmanager
def _reserved_ports(count: int) -> Iterator[list[int]]:
    """Hold ``count`` distinct free ports bound (so nothing else gets them) until the block ends."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        yield [int(probe.getsockname()[1]) for probe in probes]


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


def _loopback(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(value: object) -> str:
    """Render an option value (string, path, bool or number) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        escaped = (
            _TOML_ESCAPES.get(char, f"\\u{ord(char):04X}" if ord(char) < 0x20 or ord(char) == 0x7F else char)
            for char in str(value)
        )
        return '"' + "".join(escaped) + '"'
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a TOML option value")


def _toml_table(name: str, options: Mapping[str, object]) -> list[str]:
    return [f"[{name}]", *(f"{key} = {_toml_value(value)}" for key, value in options.items())]


def _toml_member(member: ClusterMember) -> str:
    pairs = (
        f"{key} = {_toml_value(getattr(member, key))}" for key in ("id", "client_endpoint", "peer_endpoint")
    )
    return "{ " + ", ".join(pairs) + " }"


# [node] keys NodeProcess writes itself, from its arguments.
_OWN_KEYS = frozenset({"id", "client_endpoint", "peer_endpoint", "data_dir"})


class NodeProcess:
    """One ``brokerctl serve`` child process with its own config and data folder.

    Args:
        workdir: Where ``<node_id>.toml``, ``<node_id>.log`` and the data folder ``<node_id>/`` go.
        node_id: The ``[node] id``.
        port: The client port; a free one when ``None``.
        peer_port: The peer (replication) port; a free one when ``None``.
        cluster_members: ``[cluster] nodes`` as this node's config lists them (its own entry must
            carry ``port`` and ``peer_port``); empty means no member list (a cluster of one).
        cluster_options: Other ``[cluster]`` keys as written in TOML (``election_timeout="300ms"``).
        **node_options: Other ``[node]`` keys as written in TOML (``session_timeout="2s"``).

    Raises:
        ConfigError: If the generated file does not load (a bad option or member list).
    """

    def __init__(
        self,
        workdir: Path,
        node_id: str = "n1",
        *,
        port: int | None = None,
        peer_port: int | None = None,
        cluster_members: Sequence[ClusterMember] = (),
        cluster_options: Mapping[str, Any] | None = None,
        **node_options: Any,
    ) -> None:
        fixed = sorted(_OWN_KEYS.intersection(node_options))
        if fixed:
            raise ValueError(
                f"[node] {', '.join(fixed)}: set by NodeProcess from node_id, workdir, port and peer_port"
            )
        self.workdir = workdir
        self.node_id = node_id
        self.port = free_port() if port is None else port
        self.peer_port = free_port() if peer_port is None else peer_port
        self.endpoint = _loopback(self.port)
        self.peer_endpoint = _loopback(self.peer_port)
        self.data_dir = workdir / node_id
        self.config_path = workdir / f"{node_id}.toml"
        self.log_path = workdir / f"{node_id}.log"
        self.process: subprocess.Popen[bytes] | None = None
        node_table = {
            "id": node_id,
            "client_endpoint": self.endpoint,
            "peer_endpoint": self.peer_endpoint,
            "data_dir": self.data_dir,
            **node_options,
        }
        lines = _toml_table("node", node_table)
        if cluster_members or cluster_options:
            lines += ["", *_toml_table("cluster", cluster_options or {})]
        if cluster_members:
            lines += ["nodes = [", *(f"    {_toml_member(member)}," for member in cluster_members), "]"]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.settings: Settings = load_settings(self.config_path, env=self._environment())

    @staticmethod
    def _environment() -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    @property
    def running(self) -> bool:
        """Whether the child process has been started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def launch(self) -> NodeProcess:
        """Start the child process without waiting for it to listen (see ``wait_ready``)."""
        assert not self.running, f"{self.node_id} is already running"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*BROKERCTL, "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
            )
        return self

    def wait_ready(self, timeout_s: float = 20.0) -> NodeProcess:
        """Wait until the launched node accepts client connections."""
        assert self.process is not None, f"{self.node_id} was never launched"
        wait_for_port(self.port, timeout_s, self.process)
        return self

    def start(self, timeout_s: float = 20.0) -> NodeProcess:
        """Start the node and wait until it accepts connections."""
        return self.launch().wait_ready(timeout_s)

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

    def terminate(self) -> None:
        """Send SIGTERM (clean shutdown) without waiting for the exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM the node and wait for its clean exit; returns the exit code.

        Raises:
            subprocess.TimeoutExpired: If it did not exit within ``timeout_s`` (it is then killed).
        """
        assert self.process is not None
        self.terminate()
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


class ClusterProcesses:
    """A local cluster ``n1``..``nN``: one ``NodeProcess`` each, every config listing all members.

    Args:
        workdir: Where every node's config, log and data folder go.
        size: How many members.
        node_options: ``[node]`` keys (as written in TOML) given to every member.
        cluster_options: ``[cluster]`` keys other than ``nodes`` (``election_timeout``, …).
        base_port: Use fixed ports instead of free ones: clients on ``base_port + i``, peers on
            ``base_port + 100 + i``.
        peer_address: Called once per ordered pair of distinct members as
            ``peer_address(src_id, dst_id, dst_peer_endpoint)``; returns the peer endpoint src's
            config lists for dst (e.g. a proxy's). By default every config lists the real ones.
            Called while the members' ports are still held, so a proxy bound inside it cannot
            take one of them.

    Raises:
        ConfigError: If a generated config does not load.
    """

    def __init__(
        self,
        workdir: Path,
        size: int = 3,
        *,
        node_options: Mapping[str, Any] | None = None,
        cluster_options: Mapping[str, Any] | None = None,
        peer_address: PeerAddress | None = None,
        base_port: int | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one member, got size={size}")
        self.workdir = workdir
        with _reserved_ports(0 if base_port else 2 * size) as free:
            # Fixed ports (``brokerctl dev``): clients on base_port+i, peers on base_port+100+i.
            fixed = (
                [port for i in range(size) for port in (base_port + i, base_port + 100 + i)]
                if base_port
                else []
            )
            ports = free or fixed
            self.members: tuple[ClusterMember, ...] = tuple(
                ClusterMember(
                    id=f"n{index + 1}",
                    client_endpoint=_loopback(ports[2 * index]),
                    peer_endpoint=_loopback(ports[2 * index + 1]),
                )
                for index in range(size)
            )
            views = {src.id: self._view(src.id, peer_address) for src in self.members}
        self.nodes: dict[str, NodeProcess] = {
            member.id: NodeProcess(
                workdir,
                member.id,
                port=ports[2 * index],
                peer_port=ports[2 * index + 1],
                cluster_members=views[member.id],
                cluster_options=cluster_options,
                **(node_options or {}),
            )
            for index, member in enumerate(self.members)
        }

    def _view(self, src_id: str, peer_address: PeerAddress | None) -> list[ClusterMember]:
        """The member list as src's config gives it: its own entry real, the others as src reaches them."""
        if peer_address is None:
            return list(self.members)
        return [
            member
            if member.id == src_id
            else member.model_copy(
                update={"peer_endpoint": peer_address(src_id, member.id, member.peer_endpoint)}
            )
            for member in self.members
        ]

    def __getitem__(self, node_id: str) -> NodeProcess:
        """The member ``node_id``."""
        return self.nodes[node_id]

    @property
    def ids(self) -> list[str]:
        """The members' ids, ``n1`` first."""
        return list(self.nodes)

    @property
    def endpoints(self) -> list[str]:
        """Every member's client endpoint, for ``BrokerQueue`` and ``BrokerAdmin``."""
        return [node.endpoint for node in self.nodes.values()]

    def start(self, timeout_s: float = 20.0) -> ClusterProcesses:
        """Start every member that is not running, then wait until each accepts client connections."""
        starting = [node.launch() for node in self.nodes.values() if not node.running]
        deadline = time.monotonic() + timeout_s
        for node in starting:
            node.wait_ready(max(deadline - time.monotonic(), 0.1))
        return self

    def kill(self, node_id: str) -> None:
        """SIGKILL one member and reap it."""
        self.nodes[node_id].kill()

    def stop(self, node_id: str, timeout_s: float = 15.0) -> int:
        """SIGTERM one member and wait for its exit; returns the exit code."""
        return self.nodes[node_id].stop(timeout_s)

    def restart(self, node_id: str, timeout_s: float = 20.0) -> NodeProcess:
        """Start one member again on its ports and data (stopping it first with SIGTERM if it runs)."""
        node = self.nodes[node_id]
        if node.running:
            node.stop()
        return node.start(timeout_s)

    def stop_all(self, timeout_s: float = 15.0) -> dict[str, int]:
        """SIGTERM every running member at once, then reap them; a member still up after
        ``timeout_s`` is killed. Returns the exit code of every member that was started (-9 for a
        killed one), including those that had exited already."""
        codes = {
            node_id: node.process.returncode
            for node_id, node in self.nodes.items()
            if node.process is not None and not node.running
        }
        running = {node_id: node for node_id, node in self.nodes.items() if node.running}
        for node in running.values():
            node.terminate()
        deadline = time.monotonic() + timeout_s
        for node_id, node in running.items():
            assert node.process is not None
            try:
                codes[node_id] = node.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                node.kill()
                codes[node_id] = node.process.returncode
        return {node_id: codes[node_id] for node_id in self.nodes if node_id in codes}

    def kill_all(self) -> None:
        """SIGKILL every running member."""
        for node in self.nodes.values():
            node.kill()

    def log_text(self, node_id: str) -> str:
        """Everything one member logged so far."""
        return self.nodes[node_id].log_text()

    def close(self) -> None:
        """Stop every member (see ``stop_all``)."""
        self.stop_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
