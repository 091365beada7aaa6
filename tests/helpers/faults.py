"""Network faults for cluster tests: a TCP proxy per directed link that a test can cut, heal or slow.

Each node sends every peer message over its own connection to the address its config lists for the
other node, so traffic src -> dst flows only through the proxy ``FaultyCluster`` puts on (src, dst).
Cutting that proxy cuts exactly one direction; the proxies outlive node restarts.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from broker.launcher import ClusterProcesses

__all__ = ["FaultyCluster", "LinkProxy"]

_CHUNK_BYTES = 64 * 1024
# Chunks read but not yet written, per direction: bounded so a stalled receiver pushes back on the
# sender through TCP, as a direct connection would, instead of the proxy buffering without limit.
_QUEUED_CHUNKS = 64
_CALL_TIMEOUT_S = 5.0

_T = TypeVar("_T")
_Queued = tuple[float, bytes] | None  # (when to write it, loop time; the bytes), or None for end of stream


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST (SO_LINGER 0), the way a dead link looks to the far side."""
    if writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One forwarded connection: the accepted socket and the one opened to the target."""

    def __init__(self, inbound: asyncio.StreamWriter) -> None:
        self.inbound = inbound
        self.outbound: asyncio.StreamWriter | None = None
        self.task = asyncio.current_task()

    def reset(self) -> None:
        _reset(self.inbound)
        if self.outbound is not None:
            _reset(self.outbound)

    def close(self) -> None:
        self.inbound.close()
        if self.outbound is not None:
            self.outbound.close()


class LinkProxy:
    """A TCP forwarder from ``127.0.0.1:<port>`` to a target, run by a background thread.

    Every accepted connection opens its own connection to the target; bytes are forwarded both
    ways, ``delay_ms`` late (settable at any time; it adds latency without limiting throughput).
    A connection is refused with an RST when the target does not answer, so a restarted target is
    reached on the next attempt. ``cut()`` resets every forwarded connection and every new one until
    ``heal()``.

    Args:
        target_host: Where to forward to.
        target_port: Where to forward to.
        delay_ms: Added one-way latency in milliseconds.
    """

    def __init__(self, target_host: str, target_port: int, *, delay_ms: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.delay_ms = delay_ms
        self.bytes_to_target = 0
        self.bytes_from_target = 0
        self.connections_forwarded = 0
        self.connections_refused = 0
        self._is_cut = False
        self._closed = False
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"LinkProxy->{target_host}:{target_port}", daemon=True
        )
        self._thread.start()
        try:
            self._server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        except BaseException:
            self._stop_loop()
            raise
        self.port = int(self._server.sockets[0].getsockname()[1])

    @classmethod
    def to_endpoint(cls, endpoint: str, *, delay_ms: float = 0.0) -> LinkProxy:
        """A proxy to a ZeroMQ ``tcp://host:port`` endpoint."""
        if not endpoint.startswith("tcp://"):
            raise ValueError(f"only tcp:// endpoints can be proxied, got {endpoint!r}")
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        return cls(host.strip("[]"), int(port), delay_ms=delay_ms)

    @property
    def endpoint(self) -> str:
        """The proxy's address as a ZeroMQ endpoint."""
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def bytes_forwarded(self) -> int:
        """Bytes forwarded in both directions so far."""
        return self.bytes_to_target + self.bytes_from_target

    @property
    def is_cut(self) -> bool:
        """Whether the link is cut."""
        return self._is_cut

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed (including ones still connecting to the target)."""
        return len(self._links)

    def cut(self) -> None:
        """Reset every forwarded connection and every new one until ``heal()``; returns once they are gone."""
        self._call(self._cut())

    def heal(self) -> None:
        """Forward new connections again (the peers reconnect on their own)."""
        self._call(self._set_cut(False))

    def close(self) -> None:
        """Stop listening, reset every connection and stop the thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._shutdown())
        finally:
            self._stop_loop()

    def __enter__(self) -> LinkProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- inside the loop thread ---------------------------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_CALL_TIMEOUT_S)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CALL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    async def _set_cut(self, is_cut: bool) -> None:
        self._is_cut = is_cut

    async def _cut(self) -> None:
        self._is_cut = True
        await self._reset_all()

    async def _reset_all(self) -> None:
        links = list(self._links)
        for link in links:
            link.reset()
        tasks = {link.task for link in links if link.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=_CALL_TIMEOUT_S)

    async def _shutdown(self) -> None:
        self._is_cut = True
        self._server.close()
        await self._reset_all()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._is_cut:
            self.connections_refused += 1
            _reset(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            try:
                target_reader, target_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), _CALL_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                self.connections_refused += 1
                link.reset()
                return
            link.outbound = target_writer
            if self._is_cut:  # cut while connecting to the target
                self.connections_refused += 1
                link.reset()
                return
            self.connections_forwarded += 1
            await asyncio.gather(
                self._forward(reader, target_writer, link, to_target=True),
                self._forward(target_reader, writer, link, to_target=False),
            )
            link.close()
        finally:
            self._links.discard(link)

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, *, to_target: bool
    ) -> None:
        """Copy one direction until end of stream (then half-close) or an error (then reset both)."""
        queue: asyncio.Queue[_Queued] = asyncio.Queue(_QUEUED_CHUNKS)
        feeder = asyncio.create_task(self._read_into(reader, queue, link))
        try:
            while (item := await queue.get()) is not None:
                due, chunk = item
                wait_s = due - self._loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                if self._is_cut or writer.transport.is_closing():
                    return
                # Counted before writing so that whoever receives the bytes sees them counted.
                if to_target:
                    self.bytes_to_target += len(chunk)
                else:
                    self.bytes_from_target += len(chunk)
                writer.write(chunk)
                await writer.drain()
            if not writer.transport.is_closing() and writer.can_write_eof():
                writer.write_eof()
        except OSError:
            link.reset()
        finally:
            feeder.cancel()
            await asyncio.wait([feeder])

    async def _read_into(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[_Queued], link: _Link
    ) -> None:
        try:
            while chunk := await reader.read(_CHUNK_BYTES):
                await queue.put((self._loop.time() + self.delay_ms / 1000, chunk))
        except OSError:
            link.reset()
        await queue.put(None)


class FaultyCluster(ClusterProcesses):
    """A ``ClusterProcesses`` whose every directed peer link (src, dst) goes through its own ``LinkProxy``.

    ``links[(src, dst)]`` is the proxy src's config lists as dst's peer endpoint; it forwards to
    dst's real one. Client endpoints are not proxied. ``close()`` stops the nodes and the proxies.
    """

    def __init__(
        self,
        workdir: Path,
        size: int = 3,
        *,
        node_options: Mapping[str, Any] | None = None,
        cluster_options: Mapping[str, Any] | None = None,
        delay_ms: float = 0.0,
    ) -> None:
        self.links: dict[tuple[str, str], LinkProxy] = {}
        self._delay_ms = delay_ms
        try:
            super().__init__(
                workdir,
                size,
                node_options=node_options,
                cluster_options=cluster_options,
                peer_address=self._through_proxy,
            )
        except BaseException:
            self._close_links()
            raise

    def _through_proxy(self, src_id: str, dst_id: str, dst_peer_endpoint: str) -> str:
        proxy = LinkProxy.to_endpoint(dst_peer_endpoint, delay_ms=self._delay_ms)
        self.links[(src_id, dst_id)] = proxy
        return proxy.endpoint

    def link(self, src_id: str, dst_id: str) -> LinkProxy:
        """The proxy carrying src's traffic to dst."""
        return self.links[(src_id, dst_id)]

    def cut(self, src_id: str, dst_id: str) -> None:
        """Cut one direction: src's messages no longer reach dst (dst's still reach src)."""
        self.link(src_id, dst_id).cut()

    def heal(self, src_id: str, dst_id: str) -> None:
        """Heal one direction."""
        self.link(src_id, dst_id).heal()

    def isolate(self, node_id: str) -> None:
        """Cut every link to and from ``node_id``."""
        self._check_ids([node_id])
        for (src_id, dst_id), proxy in self.links.items():
            if node_id in (src_id, dst_id):
                proxy.cut()

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Cut both directions between every member of ``group_a`` and every member of ``group_b``."""
        side_a, side_b = set(group_a), set(group_b)
        self._check_ids(side_a | side_b)
        if side_a & side_b:
            raise ValueError(f"the groups overlap: {sorted(side_a & side_b)}")
        for (src_id, dst_id), proxy in self.links.items():
            if {src_id, dst_id} & side_a and {src_id, dst_id} & side_b:
                proxy.cut()

    def heal_all(self) -> None:
        """Heal every link."""
        for proxy in self.links.values():
            proxy.heal()

    def close(self) -> None:
        """Stop every node, then close every proxy."""
        try:
            super().close()
        finally:
            self._close_links()

    def _close_links(self) -> None:
        for proxy in self.links.values():
            proxy.close()

    def _check_ids(self, node_ids: Iterable[str]) -> None:
        unknown = sorted(set(node_ids) - {member.id for member in self.members})
        if unknown:
            raise KeyError(f"no such member: {', '.join(unknown)}")
