"""The replication shell around the Raft core: peer I/O, the durable log, snapshots, compaction.

The node drives it once per loop turn:

    replica.receive(now)          # peer frames -> core
    replica.tick(now)
    index = replica.propose(payload, now)      # leader only
    committed = replica.flush(now)             # write, send, sync off the loop; entries to apply

Effects of every step in a turn are merged, so a turn costs one write and one frame per follower
however many proposals and acknowledgements it saw. The write only reaches the page cache; the log's
sync thread makes it durable while the loop goes on serving, and every write that piles up meanwhile
rides on the next fsync (group commit without a timer). Pipelined both ways: the leader never waits
for an answer before sending the next batch, nor for its own fsync before sending its entries. What
the sync thread finished is reported to the core as ``Persisted``: only then does the leader count
itself, and only then do append answers leave (they promise the entries are on disk). A follower,
whose answers are what the leader waits for and who has nothing better to do meanwhile, fsyncs
within the turn instead (``LogStore.sync_now``): no thread hand-offs on the replication round trip.
The leader keeps the thread, so a slow disk on the leader does not stop it from counting its
followers' answers: two followers make a majority of three without it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from cluster.log import LogStore
from cluster.membership import Members, decode_membership, encode_membership
from cluster.messages import (
    AppendRequest,
    AppendResponse,
    Compacted,
    Effects,
    Persisted,
    Propose,
    RaftEvent,
    RaftMessage,
    Receive,
    Role,
    SnapshotFailed,
    SnapshotInstalled,
    SnapshotRequest,
    SnapshotResponse,
    Tick,
    TransferLeadership,
)
from cluster.raft import RaftConfig, RaftCore
from cluster.snapshot import IncomingSnapshot, OutgoingSnapshot, checkpoint_files
from cluster.transport import PeerKind, PeerTransport, decode_message, encode_message

log = logging.getLogger("zbroker.replica")

KEEP_ENTRIES_AFTER_COMPACTION = 100
Answer = AppendResponse | SnapshotResponse
COMPACT_AFTER_BYTES = 256 << 20


def monotonic_ms() -> int:
    """Milliseconds of the monotonic clock, for Raft's timers."""
    return time.monotonic_ns() // 1_000_000


class Replica:
    """This node's member of the replica group."""

    def __init__(
        self,
        *,
        node_id: str,
        members: dict[str, tuple[str, str]],
        peer_bind: str,
        log_store: LogStore,
        context: zmq.Context[zmq.Socket[bytes]],
        config: RaftConfig,
        snapshot_threshold_entries: int,
        work_dir: Path,
        status: Callable[[], dict[str, Any]],
        applied_index: int,
        checkpoint: Callable[[Path], int],
        install: Callable[[Path, int], Members | None],
        observe_fsync: Callable[[float], None] | None = None,
        listen_for_peers: bool = False,
    ) -> None:
        self.node_id = node_id
        log_store.finish_interrupted_install(applied_index)
        # Endpoints of every member ever known (the membership itself is the core's).
        self.endpoints: Members = dict(members)
        log_configs = []
        for index, payload in log_store.configs():
            announced = decode_membership(payload)
            if announced is not None:
                self.endpoints.update(announced)
                log_configs.append((index, tuple(sorted(announced))))
        self.log = log_store
        self.snapshot_threshold_entries = snapshot_threshold_entries
        self.work_dir = work_dir
        self._status = status
        self._checkpoint = checkpoint
        self._install = install
        self._observe_fsync = observe_fsync
        now = monotonic_ms()
        self.core = RaftCore(
            node_id,
            tuple(sorted(members)),
            hard_state=log_store.hard_state(),
            snapshot_index=log_store.snapshot_index,
            snapshot_term=log_store.snapshot_term,
            log_terms=log_store.terms(),
            now_ms=now,
            applied_index=applied_index,
            log_configs=tuple(log_configs),
            config=config,
            rng=random.Random(f"{node_id}-{os.getpid()}-{time.time_ns()}"),
        )
        self.transport = (
            PeerTransport(context, node_id, peer_bind, self._peer_endpoints())
            if listen_for_peers or self.core.peers
            else None
        )
        self.peer_status: dict[str, tuple[dict[str, Any], int]] = {}
        self._pending = Effects()
        self._outgoing: dict[str, OutgoingSnapshot] = {}
        self._incoming = IncomingSnapshot(work_dir / "incoming-snapshot")
        self.role_changed = False
        # Payloads appended but not yet applied: the node applies from here instead of reading back.
        self.recent_payloads: dict[int, bytes] = {}
        # Answers waiting for the log to be synced: (ticket they wait for, peer, message).
        self._held: collections.deque[tuple[int, str, Answer]] = collections.deque()
        self.counters = {
            "peer_frames_in": 0,
            "peer_frames_out": 0,
            "snapshots_sent": 0,
            "snapshots_installed": 0,
        }

    # ------------------------------------------------------------------ membership

    @property
    def members(self) -> Members:
        """The current membership with every member's endpoints."""
        return {member: self.endpoints[member] for member in self.core.members if member in self.endpoints}

    def _peer_endpoints(self) -> dict[str, str]:
        return {peer: self.endpoints[peer][1] for peer in self.core.peers if peer in self.endpoints}

    def _learn_members(self, effects: Effects) -> None:
        """Note the endpoints of members announced by this turn's entries; reconnect if membership changed."""
        for _, _, payload in effects.append:
            announced = decode_membership(payload)
            if announced is not None:
                self.endpoints.update(announced)
        if effects.members_changed and self.transport is not None:
            self.transport.set_peers(self._peer_endpoints())
            log.info("members now: %s", ", ".join(self.core.members))

    def propose_membership(self, members: Members, now_ms: int) -> int | None:
        """Propose a new membership (one node added or removed); None when not leader."""
        return self.propose(encode_membership(members), now_ms)

    # ------------------------------------------------------------------ questions

    @property
    def is_leader(self) -> bool:
        """True when this node leads its group."""
        return self.core.role is Role.LEADER

    @property
    def leader_id(self) -> str | None:
        """The node this one believes leads, if any."""
        return self.core.leader_id

    def leader_client_endpoint(self) -> str:
        """Where clients should go: the leader's client endpoint, or "" when unknown."""
        leader = self.core.leader_id
        return self.endpoints[leader][0] if leader is not None and leader in self.endpoints else ""

    @property
    def socket(self) -> zmq.Socket[bytes] | None:
        """The peer ROUTER, for the node's poller."""
        return self.transport.router if self.transport is not None else None

    # ------------------------------------------------------------------ driving

    def _step(self, event: RaftEvent, now_ms: int) -> Effects:
        effects = self.core.step(event, now_ms)
        self._pending.merge(effects)
        return effects

    def receive(self, now_ms: int) -> None:
        """Feed every waiting peer frame to the core (snapshot chunks to the snapshot machinery)."""
        if self.transport is None:
            return
        for sender, kind, payload in self.transport.receive():
            self.counters["peer_frames_in"] += 1
            info = payload.get("i")
            if isinstance(info, dict):
                self.peer_status[sender] = (info, now_ms)
            try:
                if kind is PeerKind.SNAPSHOT_CHUNK:
                    self._on_snapshot_chunk(sender, payload, now_ms)
                elif kind is PeerKind.SNAPSHOT_CHUNK_ACK:
                    outgoing = self._outgoing.get(sender)
                    if outgoing is not None and outgoing.snapshot_id == payload.get("id"):
                        outgoing.acked()
                else:
                    self._step(Receive(sender, decode_message(kind, payload)), now_ms)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                log.warning("ignored a bad %s frame from %s: %s", kind.name, sender, exc)

    def tick(self, now_ms: int) -> None:
        """Let timers fire (elections, heartbeats, retransmissions)."""
        self._step(Tick(), now_ms)

    def propose(self, payload: bytes, now_ms: int) -> int | None:
        """Append an entry (leaders only); its index, or None when this node cannot take it."""
        return self._step(Propose(payload), now_ms).proposed_index

    def transfer_leadership(self, target: str, now_ms: int) -> None:
        """Ask the core to hand leadership to ``target``."""
        self._step(TransferLeadership(target), now_ms)

    def flush(self, now_ms: int) -> tuple[int, int]:
        """Write, send, hand the writes to the sync thread, handle snapshots; returns the range
        (first, last) of entries ready to apply: committed and durable here."""
        effects = self._pending
        self._pending = Effects()
        if effects.truncate_from is not None:
            for index in [index for index in self.recent_payloads if index >= effects.truncate_from]:
                del self.recent_payloads[index]
        for index, _, payload in effects.append:
            self.recent_payloads[index] = payload
        if effects.persist_needed():
            self.log.write(effects)  # the hard state is synced now; entries reach the page cache
            if not self.is_leader:
                self._persisted(self.log.sync_now(), now_ms)
        if effects.install_snapshot is not None:
            self._install_snapshot(effects.install_snapshot, now_ms, effects)
        self._learn_members(effects)
        self._send_all(effects, now_ms)
        self.log.request_sync()
        self.collect_synced(now_ms)
        for peer in effects.send_snapshot:
            self._start_snapshot(peer)
        self._pump_snapshots()
        self.role_changed = self.role_changed or effects.role_changed
        return self.core.snapshot_index, min(self.core.commit_index, self.core.persisted_index)

    def collect_synced(self, now_ms: int) -> None:
        """Take what the sync thread finished: report it to the core, send the answers that waited."""
        durable, durations = self.log.poll_synced()
        if self._observe_fsync is not None:
            for seconds in durations:
                self._observe_fsync(seconds)
        self._persisted(durable, now_ms)
        if self._held and self._held[0][0] <= self.log.synced_ticket:
            info = self._status()
            while self._held and self._held[0][0] <= self.log.synced_ticket:
                _, peer, message = self._held.popleft()
                # An answer of an earlier term may speak of entries a later leader has since replaced
                # (before they reached the disk): it is dropped, as the network might have dropped it.
                if message.term == self.core.term:
                    self._transmit(peer, message, info)

    def _persisted(self, durable: int | None, now_ms: int) -> None:
        """Tell the core the log is durable up to ``durable`` (when it moved)."""
        if durable is not None:
            effects = self.core.step(Persisted(durable), now_ms)
            self.role_changed = self.role_changed or effects.role_changed
            self._send_all(effects, now_ms)

    def _send_all(self, effects: Effects, now_ms: int) -> None:
        """Send this turn's messages. Answers that promise entries are on disk (append and snapshot
        responses) wait until everything written so far is synced; the rest go at once, a leader's
        appends included: the followers' fsyncs overlap its own, which it counts only once Persisted."""
        if self.transport is None:
            return
        info = self._status()
        fresh = {index: payload for index, _, payload in effects.append}
        for peer, message in effects.messages:
            if isinstance(message, AppendRequest) and message.entry_terms:
                if not self.is_leader or message.term != self.core.term:
                    continue  # made before this node stepped down this turn; its entries may be replaced
                try:
                    payloads = self._payloads(message.first_index, len(message.entry_terms), fresh)
                except LookupError:
                    continue  # compacted meanwhile: the core will fall back to a snapshot
                message = dataclasses.replace(message, payloads=payloads)
            if isinstance(message, AppendResponse | SnapshotResponse) and (
                self._held or self.log.synced_ticket < self.log.written_ticket
            ):
                self._held.append((self.log.written_ticket, peer, message))
            else:
                self._transmit(peer, message, info)

    def _transmit(self, peer: str, message: RaftMessage, info: dict[str, Any]) -> None:
        assert self.transport is not None
        kind, payload = encode_message(message)
        if self.transport.send(peer, kind, payload, info):
            self.counters["peer_frames_out"] += 1

    def _payloads(self, first: int, count: int, fresh: dict[int, bytes]) -> tuple[bytes, ...]:
        """Entry payloads from this turn's appends (maybe not on disk yet) or from the log."""
        if first in fresh and first + count - 1 in fresh:
            return tuple(fresh[index] for index in range(first, first + count))
        stored = self.log.payloads(
            first, count - sum(1 for index in range(first, first + count) if index in fresh)
        )
        return stored + tuple(fresh[index] for index in range(first + len(stored), first + count))

    def forget_recent(self, through_index: int) -> None:
        """Drop cached payloads up to ``through_index`` (applied)."""
        for index in [index for index in self.recent_payloads if index <= through_index]:
            del self.recent_payloads[index]

    # ------------------------------------------------------------------ snapshots

    def _start_snapshot(self, peer: str) -> None:
        if peer in self._outgoing or self.transport is None:
            return
        snapshot_id = f"{self.node_id}-{time.time_ns()}"
        directory = self.work_dir / "outgoing-snapshots" / snapshot_id
        directory.parent.mkdir(parents=True, exist_ok=True)
        index = self._checkpoint(directory)
        term = self.core.term_at(index)
        if term is None:
            shutil.rmtree(directory, ignore_errors=True)
            log.error("cannot snapshot at %d: its term is unknown", index)
            return
        log.info("sending snapshot %s (through entry %d) to %s", snapshot_id, index, peer)
        self._outgoing[peer] = OutgoingSnapshot(
            snapshot_id, peer, self.core.term, index, term, directory, checkpoint_files(directory)
        )
        self.counters["snapshots_sent"] += 1

    def _pump_snapshots(self) -> None:
        if self.transport is None:
            return
        info = self._status()
        for peer, outgoing in list(self._outgoing.items()):
            if not self.is_leader or outgoing.term != self.core.term or outgoing.stalled():
                self._fail_outgoing(peer)
                continue
            for frame in outgoing.next_frames():
                if not self.transport.send(peer, PeerKind.SNAPSHOT_CHUNK, frame, info):
                    self._fail_outgoing(peer)  # unreachable: the core retries in a while
                    break
            else:
                if outgoing.manifest_sent:
                    self._drop_outgoing(peer)  # the follower's answer arrives as a SnapshotResponse

    def _fail_outgoing(self, peer: str) -> None:
        self._drop_outgoing(peer)
        self._step(SnapshotFailed(peer), monotonic_ms())

    def _drop_outgoing(self, peer: str) -> None:
        outgoing = self._outgoing.pop(peer)
        shutil.rmtree(outgoing.directory, ignore_errors=True)

    def _on_snapshot_chunk(self, sender: str, payload: dict[str, Any], now_ms: int) -> None:
        request = self._incoming.receive(sender, payload)
        if self.transport is not None and "manifest" not in payload:
            self.transport.send(sender, PeerKind.SNAPSHOT_CHUNK_ACK, {"id": payload["id"]}, self._status())
        if request is not None:
            self._step(Receive(sender, request), now_ms)

    def _install_snapshot(self, request: SnapshotRequest, now_ms: int, effects: Effects) -> None:
        staged = self._incoming.take(request)
        if staged is None:
            return
        log.info("installing the snapshot from %s through entry %d", request.leader, request.index)
        self.log.begin_install(request.index, request.snapshot_term)
        members = self._install(staged, request.index)
        self.log.reset(request.index, request.snapshot_term)
        self.recent_payloads.clear()
        self._held.clear()  # they answered for a log that is gone
        if members:
            self.endpoints.update(members)
        installed = SnapshotInstalled(request.index, request.snapshot_term, tuple(sorted(members or {})))
        effects.merge(self.core.step(installed, now_ms))
        self.counters["snapshots_installed"] += 1

    # ------------------------------------------------------------------ compaction

    def maybe_compact(self, applied_index: int, make_durable: Callable[[], None], now_ms: int) -> None:
        """Drop applied log entries once the log is long or large, keeping a tail for lagging followers."""
        entries = applied_index - self.log.snapshot_index
        if (
            entries < self.snapshot_threshold_entries
            and self.log.bytes_since_compaction < COMPACT_AFTER_BYTES
        ):
            return
        keep = min(self.snapshot_threshold_entries // 2, KEEP_ENTRIES_AFTER_COMPACTION * 10)
        if self.log.bytes_since_compaction >= COMPACT_AFTER_BYTES:
            keep = KEEP_ENTRIES_AFTER_COMPACTION
        self.compact(applied_index, make_durable, now_ms, keep=keep)

    def compact(
        self, applied_index: int, make_durable: Callable[[], None], now_ms: int, *, keep: int
    ) -> None:
        """Drop applied log entries except the last ``keep`` of them."""
        through = applied_index - keep
        term = self.core.term_at(through)
        if through <= self.log.snapshot_index or term is None:
            return
        make_durable()  # the state machine must hold everything the log forgets
        self.log.compact(through, term)
        self._step(Compacted(through, term), now_ms)

    def close(self) -> None:
        """Close the peer sockets."""
        if self.transport is not None:
            self.transport.close()
