"""Tests for the fault-injection helpers (``LinkProxy``, ``FaultyCluster``) and ``ClusterProcesses`` configs.

No cluster node is started here: these tests check the tools the replication tests will use.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.utils.monitor

from broker.launcher import ClusterProcesses, NodeProcess
from config import ConfigError, Settings, load_settings
from tests.helpers.faults import FaultyCluster, LinkProxy

pytestmark = pytest.mark.timeout(10)

WAIT_S = 3.0  # upper bound for anything that should happen promptly
QUIET_S = 0.3  # how long "nothing arrives" is watched for


@pytest.fixture
def target() -> Iterator[socket.socket]:
    """A listening socket on a free loopback port, standing for a node's peer endpoint."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(WAIT_S)
        yield server


@pytest.fixture
def proxy(target: socket.socket) -> Iterator[LinkProxy]:
    """A proxy to ``target``."""
    with LinkProxy("127.0.0.1", target.getsockname()[1]) as link:
        yield link


@contextlib.contextmanager
def connected_pair(proxy: LinkProxy, target: socket.socket) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A client connected through the proxy and the target's side of that connection."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT_S) as client:
        far, _ = target.accept()
        with far:
            far.settimeout(WAIT_S)
            yield client, far


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the connection ended after {data!r}"
        data += chunk
    return data


def link_is_down(sock: socket.socket) -> bool:
    """Whether the connection ends (EOF or reset) within ``WAIT_S``."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_bytes_pass_both_ways_and_are_counted(proxy: LinkProxy, target: socket.socket) -> None:
    # Given a connection through the proxy
    with connected_pair(proxy, target) as (client, far):
        # When each side sends
        client.sendall(b"ping")
        far.sendall(b"pong!")
        # Then the other side receives it, and the proxy counted it
        assert receive_exactly(far, 4) == b"ping"
        assert receive_exactly(client, 5) == b"pong!"
    assert (proxy.bytes_to_target, proxy.bytes_from_target, proxy.bytes_forwarded) == (4, 5, 9)
    assert proxy.connections_forwarded == 1


def test_a_half_close_is_forwarded_and_the_reply_still_comes_back(
    proxy: LinkProxy, target: socket.socket
) -> None:
    with connected_pair(proxy, target) as (client, far):
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)
        assert receive_exactly(far, 10) == b"last words"
        assert far.recv(1) == b""  # the end of stream arrived
        far.sendall(b"ok")
        far.shutdown(socket.SHUT_WR)
        assert receive_exactly(client, 2) == b"ok"
        assert client.recv(1) == b""


def test_cut_ends_open_connections_on_both_sides(proxy: LinkProxy, target: socket.socket) -> None:
    with connected_pair(proxy, target) as (client, far):
        client.sendall(b"x")
        assert receive_exactly(far, 1) == b"x"
        proxy.cut()
        assert proxy.is_cut and proxy.open_connections == 0
        assert link_is_down(client)
        assert link_is_down(far)


def connection_is_dropped(port: int) -> bool:
    """Whether a new connection to 127.0.0.1:port ends at once (reset while or right after connecting)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as client:
            return link_is_down(client)
    except ConnectionResetError:
        return True


def test_while_cut_new_connections_are_reset_without_reaching_the_target(
    proxy: LinkProxy, target: socket.socket
) -> None:
    proxy.cut()
    assert connection_is_dropped(proxy.port)
    # The proxy resets before it would connect onward, so by now the target has nothing to accept.
    assert select.select([target], [], [], 0)[0] == []
    assert proxy.connections_refused == 1 and proxy.bytes_forwarded == 0


def test_heal_forwards_new_connections_again(proxy: LinkProxy, target: socket.socket) -> None:
    proxy.cut()
    proxy.heal()
    assert not proxy.is_cut
    with connected_pair(proxy, target) as (client, far):
        client.sendall(b"again")
        assert receive_exactly(far, 5) == b"again"


def test_a_target_that_is_down_is_reached_again_once_it_is_back(target: socket.socket) -> None:
    # Given a proxy to a port where nothing listens (a node being restarted)
    port = target.getsockname()[1]
    target.close()
    with LinkProxy("127.0.0.1", port) as proxy:
        # Then connections are reset at once
        assert connection_is_dropped(proxy.port)
        assert proxy.connections_refused == 1
        # And once the target listens again on the same port, the same proxy forwards to it
        with socket.create_server(("127.0.0.1", port)) as restarted:
            restarted.settimeout(WAIT_S)
            with connected_pair(proxy, restarted) as (client, far):
                client.sendall(b"back")
                assert receive_exactly(far, 4) == b"back"


def test_delay_ms_adds_latency_without_limiting_throughput(proxy: LinkProxy, target: socket.socket) -> None:
    proxy.delay_ms = 150
    with connected_pair(proxy, target) as (client, far):
        started = time.monotonic()
        client.sendall(b"a" * 1000)
        assert receive_exactly(far, 1000) == b"a" * 1000
        first_s = time.monotonic() - started
        # Five writes 40 ms apart: each is 150 ms late, not 150 ms after the one before it.
        started = time.monotonic()
        for index in range(5):
            client.sendall(bytes([index]) * 1000)
            time.sleep(0.04)  # pacing the sender, not waiting for an outcome
        received = receive_exactly(far, 5000)
        all_s = time.monotonic() - started
    assert first_s >= 0.15
    assert received == b"".join(bytes([index]) * 1000 for index in range(5))
    assert all_s < 0.6  # 5 x 150 ms if the delays added up


def test_to_endpoint_parses_a_zeromq_endpoint() -> None:
    with LinkProxy.to_endpoint("tcp://127.0.0.1:7201") as proxy:
        assert proxy.target == ("127.0.0.1", 7201)
        assert proxy.endpoint == f"tcp://127.0.0.1:{proxy.port}"
    with pytest.raises(ValueError, match="only tcp://"):
        LinkProxy.to_endpoint("ipc:///tmp/n1.peer")


# --- ZeroMQ through a proxy ----------------------------------------------------------------------


class Sockets:
    """ZeroMQ sockets of one test, on a private context; all closed (linger 0) at teardown."""

    def __init__(self) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.opened: list[zmq.Socket[bytes]] = []

    def open(self, kind: int) -> zmq.Socket[bytes]:
        sock = self.context.socket(kind)
        sock.linger = 0
        self.opened.append(sock)
        return sock

    def monitor(self, sock: zmq.Socket[bytes], events: int) -> zmq.Socket[bytes]:
        """A socket receiving ``sock``'s monitor events."""
        monitor = sock.get_monitor_socket(events)
        self.opened.append(monitor)
        return monitor

    def close(self) -> None:
        for sock in reversed(self.opened):
            sock.close(linger=0)
        self.context.term()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    opened = Sockets()
    yield opened
    opened.close()


def wait_event(monitor: zmq.Socket[bytes], wanted: int) -> None:
    """Wait for the socket monitor event ``wanted``, skipping others."""
    deadline = time.monotonic() + WAIT_S
    while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        if monitor.poll(left_ms) and zmq.utils.monitor.recv_monitor_message(monitor)["event"] == wanted:
            return
    raise TimeoutError(f"no monitor event {zmq.Event(wanted).name} within {WAIT_S}s")


def receive(router: zmq.Socket[bytes], timeout_s: float) -> bytes | None:
    """The next message's body (after the routing id), or None if none arrives in time."""
    if not router.poll(int(timeout_s * 1000)):
        return None
    _routing_id, body = router.recv_multipart()
    return body


def test_a_zeromq_link_goes_down_on_cut_and_reconnects_on_heal(sockets: Sockets) -> None:
    # Given a DEALER connected to a ROUTER through a proxy
    router = sockets.open(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    router_events = sockets.monitor(router, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    with LinkProxy("127.0.0.1", port) as proxy:
        dealer = sockets.open(zmq.DEALER)
        dealer.setsockopt(zmq.RECONNECT_IVL, 50)
        dealer.routing_id = b"n1"
        dealer_events = sockets.monitor(dealer, zmq.EVENT_DISCONNECTED)
        dealer.connect(proxy.endpoint)
        dealer.send(b"before")
        assert receive(router, WAIT_S) == b"before"
        wait_event(router_events, zmq.EVENT_HANDSHAKE_SUCCEEDED)

        # When the link is cut
        proxy.cut()
        # Then both ends see the connection go, and nothing sent meanwhile arrives
        wait_event(router_events, zmq.EVENT_DISCONNECTED)
        wait_event(dealer_events, zmq.EVENT_DISCONNECTED)
        dealer.send(b"during")
        assert receive(router, QUIET_S) is None

        # When it is healed, the DEALER reconnects on its own and new messages arrive
        proxy.heal()
        dealer.send(b"after")
        deadline = time.monotonic() + WAIT_S
        seen: list[bytes] = []
        while b"after" not in seen:
            body = receive(router, max(deadline - time.monotonic(), 0.0))
            assert body is not None, f"only {seen} arrived after heal()"
            seen.append(body)
        assert seen in ([b"after"], [b"during", b"after"])  # queued in the DEALER, maybe sent on reconnect
        assert proxy.connections_forwarded >= 2


# --- configs written by ClusterProcesses ---------------------------------------------------------


def loaded(cluster: ClusterProcesses, node_id: str) -> Settings:
    return load_settings(cluster[node_id].config_path, env={})


def test_cluster_configs_list_every_member_and_load(tmp_path: Path) -> None:
    cluster = ClusterProcesses(
        tmp_path,
        3,
        node_options={"session_timeout": "2s", "log_level": "debug"},
        cluster_options={"election_timeout": "300ms", "heartbeat_interval": "50ms"},
    )
    assert cluster.ids == ["n1", "n2", "n3"]
    assert cluster.endpoints == [member.client_endpoint for member in cluster.members]
    ports = {node.port for node in cluster.nodes.values()} | {
        node.peer_port for node in cluster.nodes.values()
    }
    assert len(ports) == 6
    for node_id, node in cluster.nodes.items():
        settings = loaded(cluster, node_id)
        assert settings == node.settings
        assert settings.node.id == node_id
        assert settings.node.client_endpoint == node.endpoint
        assert settings.node.peer_endpoint == node.peer_endpoint
        assert settings.node.data_dir == tmp_path / node_id
        assert settings.node.session_timeout_s == 2.0 and settings.node.log_level == "debug"
        assert settings.cluster is not None
        assert settings.cluster.election_timeout_s == 0.3 and settings.cluster.heartbeat_interval_s == 0.05
        assert settings.members() == cluster.members


def test_peer_address_substitutes_what_each_node_lists_for_the_others(tmp_path: Path) -> None:
    calls: list[tuple[str, str, str]] = []

    def substitute(src_id: str, dst_id: str) -> str:
        return f"tcp://{src_id}-to-{dst_id}.test:9{src_id[1]}{dst_id[1]}"

    def via(src_id: str, dst_id: str, dst_peer_endpoint: str) -> str:
        calls.append((src_id, dst_id, dst_peer_endpoint))
        return substitute(src_id, dst_id)

    cluster = ClusterProcesses(tmp_path, 3, peer_address=via)
    real = {member.id: member for member in cluster.members}
    assert sorted(calls) == [
        (src, dst, real[dst].peer_endpoint) for src in real for dst in real if src != dst
    ]
    for src_id in real:
        for member in loaded(cluster, src_id).members():
            # Only peer endpoints of the others change; a node's own entry stays its real endpoints.
            expected = real[src_id].peer_endpoint if member.id == src_id else substitute(src_id, member.id)
            assert member.peer_endpoint == expected
            assert member.client_endpoint == real[member.id].client_endpoint


def test_a_bad_option_fails_when_the_config_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="election_timeout"):
        ClusterProcesses(tmp_path, 2, cluster_options={"election_timeout": "1ms"})
    with pytest.raises(ValueError, match="data_dir"):
        NodeProcess(tmp_path, data_dir="elsewhere")


def test_a_faulty_cluster_routes_each_directed_link_through_its_own_proxy(tmp_path: Path) -> None:
    with FaultyCluster(tmp_path, 3) as cluster:
        assert sorted(cluster.links) == [(s, d) for s in cluster.ids for d in cluster.ids if s != d]
        for (src_id, dst_id), proxy in cluster.links.items():
            listed = {member.id: member.peer_endpoint for member in loaded(cluster, src_id).members()}
            assert listed[dst_id] == proxy.endpoint
            assert proxy.target == ("127.0.0.1", cluster[dst_id].peer_port)


def cut_links(cluster: FaultyCluster) -> set[tuple[str, str]]:
    return {pair for pair, proxy in cluster.links.items() if proxy.is_cut}


def test_faulty_cluster_cuts_directions_isolates_and_partitions(tmp_path: Path) -> None:
    with FaultyCluster(tmp_path, 3) as cluster:
        cluster.cut("n1", "n2")
        assert cut_links(cluster) == {("n1", "n2")}
        cluster.heal_all()
        cluster.isolate("n3")
        assert cut_links(cluster) == {("n1", "n3"), ("n3", "n1"), ("n2", "n3"), ("n3", "n2")}
        cluster.heal_all()
        cluster.partition(["n1"], ["n2", "n3"])
        assert cut_links(cluster) == {("n1", "n2"), ("n2", "n1"), ("n1", "n3"), ("n3", "n1")}
        cluster.heal_all()
        assert cut_links(cluster) == set()
        with pytest.raises(ValueError, match="overlap"):
            cluster.partition(["n1", "n2"], ["n2"])
        with pytest.raises(KeyError, match="n9"):
            cluster.isolate("n9")


# --- processes ------------------------------------------------------------------------------------


def test_a_single_node_process_still_starts_and_stops_cleanly(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, session_timeout="2s").start()
    try:
        assert node.running
        with socket.create_connection(("127.0.0.1", node.port), timeout=WAIT_S):
            pass
        assert node.settings.cluster is None
    finally:
        code = node.stop()
    assert code == 0 and not node.running
