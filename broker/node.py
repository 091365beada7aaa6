"""The node process: one loop around the client ROUTER, the replica group and the queue state machine.

One loop turn: wait for frames or the next timer; feed peer frames to Raft; decode client frames; if
this node leads, turn them and the scheduler's plan into ONE log entry (group commit) and propose it;
persist the turn's Raft effects with one fsynced write and send one frame per follower; apply every
entry a majority has persisted; answer producers and deliver leases from what was applied. Nothing is
answered before the entry holding it is committed, i.e. fsynced on a majority (a group of one: here).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import zmq

from broker import protocol as p
from broker.admin import AdminHandler
from broker.commands import (
    AckCmd,
    LeaseCmd,
    LogCommand,
    LogEntry,
    MembershipCmd,
    NackCmd,
    ProduceCmd,
    decode_entry,
    encode_entry,
)
from broker.frontend import Frontend, ResultCallback, Turn
from broker.keys import STATE_MACHINE_CFS
from broker.metrics import NodeMetrics
from broker.queue_state import QueueState
from broker.scheduler import Scheduler
from broker.store import RocksStore
from cluster.log import LogStore
from cluster.log_migration import migrate_rocksdb_log
from cluster.membership import Members, decode_membership
from cluster.raft import RaftConfig
from cluster.replica import Replica, monotonic_ms
from cluster.snapshot import install_state_dir, recover_state_dir
from config import Settings

log = logging.getLogger("zbroker.node")

APPLY_BATCH_ENTRIES = 256
STATE_MEMTABLE_BYTES = 96 << 20
CLUSTER_POLL_MS = 20
IDLE_POLL_MS = 100


def _decode(payload: bytes) -> LogEntry:
    """A log payload as a queue entry: empty = a new leader's no-op; membership entries are recorded."""
    if not payload:
        return LogEntry(0, ())
    members = decode_membership(payload)
    if members is not None:
        rows = tuple((member_id, client, peer) for member_id, (client, peer) in sorted(members.items()))
        return LogEntry(0, (MembershipCmd(rows),))
    return decode_entry(payload)


def wall_ms() -> int:
    """Wall-clock milliseconds: the time the leader stamps into log entries."""
    return time.time_ns() // 1_000_000


class Node:
    """One zbroker node: serves clients when it leads, replicates either way."""

    wall_ms = staticmethod(wall_ms)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        node = settings.node
        self.node_id = node.id
        self.max_message_bytes = node.max_message_bytes
        self.session_timeout_ms = int(node.session_timeout_s * 1000)
        self.heartbeat_interval_ms = int(node.heartbeat_interval_s * 1000)
        self.data_dir = Path(node.data_dir)
        self.state_dir = self.data_dir / "state"
        recover_state_dir(self.state_dir)
        migrate_rocksdb_log(self.data_dir / "log", self.data_dir / "raft")
        self.log_store = LogStore(self.data_dir / "raft", fsync=node.fsync)
        self.store = RocksStore(self.state_dir, STATE_MACHINE_CFS, memtable_bytes=STATE_MEMTABLE_BYTES)
        self.state = QueueState(self.store, produce_id_window_ms=int(node.produce_id_window_s * 1000))
        self.scheduler = Scheduler(self.state, default_session_timeout_ms=self.session_timeout_ms)
        self.admin = AdminHandler(self)
        self.metrics = NodeMetrics()
        self.counters: dict[str, int] = {
            "frames_received": 0,
            "frames_rejected": 0,
            "items_rejected": 0,
            "entries_proposed": 0,
            "entries_applied": 0,
        }
        self._stopping = False
        self._stop_deadline_ms = 0
        self._waiting: dict[int, Turn] = {}
        self._membership_waiters: dict[int, tuple[bytes, int]] = {}
        # Entries this leader proposed, kept decoded until applied (a Raft truncation drops them).
        self._proposed: dict[int, LogEntry] = {}
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        cluster = settings.cluster
        # The membership: the configuration file's, unless membership changes were applied since.
        members = self.state.members or {
            member.id: (member.client_endpoint, member.peer_endpoint) for member in settings.members()
        }
        self.replica = Replica(
            node_id=self.node_id,
            members=members,
            peer_bind=node.peer_endpoint,
            log_store=self.log_store,
            context=self.context,
            config=RaftConfig(
                election_timeout_ms=int((cluster.election_timeout_s if cluster else 1.0) * 1000),
                heartbeat_interval_ms=int((cluster.heartbeat_interval_s if cluster else 0.1) * 1000),
            ),
            snapshot_threshold_entries=cluster.snapshot_threshold_entries if cluster else 10_000,
            work_dir=self.data_dir,
            status=self.status,
            applied_index=self.state.applied_index,
            checkpoint=self._checkpoint,
            install=self._install_snapshot,
            observe_fsync=self.metrics.fsync_time.observe,
            listen_for_peers=cluster is not None,
        )
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Refuse (rather than silently drop) frames to unknown or full peers, so undeliverable
        # deliveries can be released at once instead of holding their leases.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, 100_000)
        self.router.setsockopt(zmq.RCVHWM, 100_000)
        self.router.setsockopt(zmq.MAXMSGSIZE, 4 * self.max_message_bytes + (1 << 20))
        self.router.setsockopt(zmq.HEARTBEAT_IVL, self.heartbeat_interval_ms)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * self.heartbeat_interval_ms)
        self.frontend = Frontend(self, self.router)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        if self.replica.socket is not None:
            self.poller.register(self.replica.socket, zmq.POLLIN)
        self.poller.register(self.log_store.fileno(), zmq.POLLIN)  # the log's fsync finished
        self.router.bind(node.client_endpoint)
        if node.metrics_endpoint:
            self.metrics.serve(self, node.metrics_endpoint)
        # A group of one elects itself at its first tick: do it now, so it serves from the start.
        start = monotonic_ms()
        self.replica.tick(start)
        self._apply(self.replica.flush(start)[1])
        if self.replica.role_changed:
            self.replica.role_changed = False
            self._role_changed()
        log.info(
            "node %s serving clients on %s, peers on %s (%d members; data in %s, %d channels, %d leases)",
            self.node_id,
            node.client_endpoint,
            node.peer_endpoint,
            len(members),
            node.data_dir,
            len(self.state.channels),
            len(self.state.leases),
        )

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask the loop to shut down (safe from a signal handler); a leader hands over first."""
        self._stopping = True

    def run(self) -> None:
        """Serve until ``stop`` is called."""
        try:
            while not self._shutdown_complete():
                self.run_once()
        finally:
            self.close()

    def _shutdown_complete(self) -> bool:
        if not self._stopping:
            return False
        replica = self.replica
        if not replica.is_leader or not replica.core.peers:
            return True
        now = monotonic_ms()
        if not self._stop_deadline_ms:
            progress = replica.core.follower_progress()
            target = max(progress, key=lambda peer: progress[peer])
            log.info("handing leadership to %s before shutting down", target)
            replica.transfer_leadership(target, now)
            self._stop_deadline_ms = now + 2 * replica.core.config.election_timeout_ms
        return now >= self._stop_deadline_ms

    def close(self) -> None:
        """Release sockets and databases; everything acknowledged is already durable."""
        if self.router.closed:
            return
        self.router.close(0)
        self.replica.close()
        self.store.sync_wal()
        self.store.close()
        self.log_store.close()
        log.info("node %s stopped", self.node_id)

    # ------------------------------------------------------------------ the loop turn

    def run_once(self) -> None:
        """One loop turn."""
        replica = self.replica
        busy = replica.is_leader and (self.scheduler.has_work() or bool(self.frontend.undelivered))
        timeout = 0 if busy else self._idle_timeout()
        self.poller.poll(timeout)
        now = monotonic_ms()
        replica.receive(now)
        self.frontend.drain()
        replica.tick(now)
        turn, self.frontend.turn = self.frontend.turn, Turn()
        if replica.is_leader:
            self._propose(turn, now)
        elif turn.requesters:
            self._refuse(turn)
        _, ready = replica.flush(now)
        if replica.role_changed and not replica.is_leader:
            # Refuse this node's waiters and drop its own proposals before applying what the next leader
            # committed in their place.
            replica.role_changed = False
            self._role_changed()
        self._apply(ready)
        if replica.role_changed:
            replica.role_changed = False
            self._role_changed()
        replica.maybe_compact(self.state.applied_index, self.store.sync_wal, now)
        self.admin.rates.sample(now / 1000, self.state.channels)
        self.frontend.flush()

    def _idle_timeout(self) -> int:
        cap = CLUSTER_POLL_MS if self.replica.core.peers else IDLE_POLL_MS
        if not self.replica.is_leader:
            return cap
        now = wall_ms()
        return max(0, min(self.scheduler.next_timer_ms(now) - now, cap))

    def _propose(self, turn: Turn, now: int) -> None:
        frontend = self.frontend
        if turn.produce:
            turn.add(ProduceCmd(tuple(turn.produce)), frontend.answer_produce(turn.produce_waiters))
        if turn.acks:
            ack = AckCmd(tuple(turn.acks))
            self.scheduler.note_settle(ack)
            turn.add(ack, frontend.answer_settles(turn.ack_waiters))
        if turn.nacks:
            nack = NackCmd(tuple(turn.nacks))
            self.scheduler.note_settle(nack)
            turn.add(nack, frontend.answer_settles(turn.nack_waiters))
        if frontend.undelivered:
            undelivered = NackCmd(tuple(frontend.undelivered))
            frontend.undelivered = []
            self.scheduler.note_settle(undelivered)
            turn.add(undelivered)
        for session in turn.closing:  # after this turn's acks, so a session's last acks still count
            release = self.scheduler.close(session)
            if release is not None:
                turn.add(release)
        for command in self.scheduler.plan(wall_ms()):
            turn.add(command, frontend.deliver if isinstance(command, LeaseCmd) else None)
        if not turn.commands:
            return
        entry = LogEntry(wall_ms(), tuple(turn.commands))
        index = self.replica.propose(encode_entry(entry), now)
        if index is None:  # leadership is being handed over: clients retry at the next leader
            self.scheduler.forget_pending()
            self._refuse(turn)
            return
        self.counters["entries_proposed"] += 1
        self.scheduler.proposed(index)
        turn.proposed_at = time.perf_counter()
        self._waiting[index] = turn
        self._proposed[index] = entry

    def _refuse(self, turn: Turn) -> None:
        for routing_id, rid in turn.requesters:
            self.frontend.not_leader(routing_id, rid)

    def propose_admin(
        self, command: LogCommand, callback: ResultCallback, routing_id: bytes, rid: int
    ) -> None:
        """Add an admin change to this turn's entry."""
        self.frontend.turn.add(command, callback)
        self.frontend.turn.requesters.append((routing_id, rid))

    def _apply(self, ready: int) -> None:
        """Apply committed entries up to ``ready`` and run the answers waiting on them."""
        while self.state.applied_index < ready:
            start = self.state.applied_index + 1
            end = min(ready, start + APPLY_BATCH_ENTRIES - 1) + 1
            entries = self._entries(start, end)
            if entries is None:
                log.error("entries %d..%d are missing from the log; waiting for the leader", start, end - 1)
                return
            results = self.state.apply(entries)
            self.counters["entries_applied"] += len(entries)
            for (index, _), entry_results in zip(entries, results, strict=True):
                self.scheduler.applied(index)
                waiter = self._membership_waiters.pop(index, None)
                if waiter is not None:
                    self.send_reply(*waiter, {"members": sorted(self.replica.core.members)})
                turn = self._waiting.pop(index, None)
                if turn is None:
                    continue
                self.metrics.commit_latency.observe(time.perf_counter() - turn.proposed_at)
                for result, callback in zip(entry_results, turn.callbacks, strict=True):
                    if callback is not None:
                        callback(result)

    def _entries(self, start: int, end: int) -> list[tuple[int, LogEntry]] | None:
        """Decoded entries start..end-1: this leader's own proposals as built, the rest from the log."""
        recent = self.replica.recent_payloads
        if all(index in self._proposed or index in recent for index in range(start, end)):
            rows = [(index, recent.get(index, b"")) for index in range(start, end)]
        else:
            rows = [(index, payload) for index, _, payload in self.replica.log.entries(start, end)]
            if len(rows) != end - start or rows[0][0] != start:
                return None
        entries = []
        for index, payload in rows:
            entry = self._proposed.pop(index, None)
            if entry is None:
                entry = _decode(payload)
            entries.append((index, entry))
        self.replica.forget_recent(end - 1)
        return entries

    def _role_changed(self) -> None:
        replica = self.replica
        self.scheduler.forget_pending()
        if replica.is_leader:
            log.info("node %s leads (term %d)", self.node_id, replica.core.term)
            self.scheduler.adopt_leased_sessions(wall_ms())
            return
        log.info(
            "node %s follows %s (term %d)",
            self.node_id,
            replica.leader_id or "no leader yet",
            replica.core.term,
        )
        # Entries this node proposed may still commit under the next leader; their clients re-send
        # with the same ids and get the same answers there.
        for turn in self._waiting.values():
            self._refuse(turn)
        self._waiting.clear()
        for routing_id, rid in self._membership_waiters.values():
            self.frontend.not_leader(routing_id, rid)
        self._membership_waiters.clear()
        self._proposed.clear()
        self.scheduler.reset_sessions()

    # ------------------------------------------------------------------ snapshots

    def _checkpoint(self, directory: Path) -> int:
        """Copy the state machine for a follower; returns the index it covers."""
        self.store.checkpoint(directory)
        return self.state.applied_index

    def _install_snapshot(self, staged: Path, index: int) -> Members | None:
        """Replace the state machine with a snapshot received from the leader."""
        self.store.close()
        install_state_dir(self.state_dir, staged)
        self.store = RocksStore(self.state_dir, STATE_MACHINE_CFS, memtable_bytes=STATE_MEMTABLE_BYTES)
        self.state = QueueState(self.store, produce_id_window_ms=self.state.produce_id_window_ms)
        self.scheduler = Scheduler(self.state, default_session_timeout_ms=self.session_timeout_ms)
        if self.state.applied_index != index:
            log.warning("installed snapshot covers %d, expected %d", self.state.applied_index, index)
        return self.state.members

    def change_membership(self, members: Members, routing_id: bytes, rid: int) -> None:
        """Propose a membership with one node added or removed; the answer comes once it is applied."""
        index = self.replica.propose_membership(members, monotonic_ms())
        if index is None:
            self.frontend.not_leader(routing_id, rid)
            return
        self._membership_waiters[index] = (routing_id, rid)

    def compact_now(self) -> None:
        """Drop every applied log entry (the admin ``compact``)."""
        self.replica.compact(self.state.applied_index, self.store.sync_wal, monotonic_ms(), keep=0)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """This node's progress, sent to peers with every frame and reported by ``cluster_status``."""
        core = self.replica.core
        return {
            "pid": os.getpid(),
            "role": core.role.value,
            "term": core.term,
            "commit": core.commit_index,
            "applied": self.state.applied_index,
            "last": core.last_index,
            "leader": core.leader_id or "",
        }

    @property
    def pid(self) -> int:
        """This process's id."""
        return os.getpid()

    def send_reply(self, routing_id: bytes, rid: int, result: dict[str, Any]) -> None:
        """Queue a reply to an admin request."""
        self.frontend.send_reply(routing_id, rid, result)

    def send_error(self, routing_id: bytes, rid: int, code: p.ErrorCode, message: str) -> None:
        """Queue an error answer to an admin request."""
        self.frontend.send_error(routing_id, rid, code, message)
