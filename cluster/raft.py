"""The Raft consensus core: pure, deterministic, sans-I/O. ``step(event, now_ms) -> Effects``.

It keeps only the log's terms (payloads stay in the shell's storage), the hard state, and the
leader's view of its followers. The shell persists ``Effects.hard_state``/``truncate_from``/``append``
in one synced write BEFORE sending ``Effects.messages``, so no vote or append acknowledgement ever
precedes the state it promises. Then it reports ``Persisted`` and applies entries up to
``commit_index``.

Beyond the paper's basics: pre-vote and leader stickiness (a partitioned node that comes back cannot
depose a healthy leader), check-quorum (a leader that cannot hear a majority steps down), pipelined
AppendEntries with a bounded number in flight per follower and retransmission, leadership transfer
(TimeoutNow), and snapshots for followers behind the compacted log (the shell streams the data).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cluster.membership import member_ids
from cluster.messages import (
    AppendRequest,
    AppendResponse,
    Compacted,
    Effects,
    HardState,
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
    TimeoutNow,
    TransferLeadership,
    VoteRequest,
    VoteResponse,
)

SNAPSHOT_RETRY_MS = 1000


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Timing and flow-control settings of the core."""

    election_timeout_ms: int = 1000
    heartbeat_interval_ms: int = 100
    max_entries_per_append: int = 64
    max_inflight_appends: int = 32
    retransmit_after_ms: int = 400
    snapshot_timeout_ms: int = 60_000


@dataclass(slots=True)
class _Follower:
    """The leader's view of one follower."""

    next_index: int
    match_index: int = 0
    inflight: int = 0
    last_sent_ms: int = -(10**12)
    # When match_index last advanced (or an outstanding send began): no progress for a while while
    # entries are outstanding means appends or answers were lost, so the leader resends.
    last_progress_ms: int = 0
    next_snapshot_ms: int = 0
    last_heard_ms: int = 0
    probing: bool = False
    snapshot_in_progress: bool = False
    snapshot_started_ms: int = 0


class RaftCore:
    """One member of a replica group."""

    def __init__(
        self,
        node_id: str,
        members: tuple[str, ...],
        *,
        hard_state: HardState,
        snapshot_index: int,
        snapshot_term: int,
        log_terms: list[int],
        now_ms: int,
        applied_index: int = 0,
        log_configs: tuple[tuple[int, tuple[str, ...]], ...] = (),
        config: RaftConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        # Membership: the latest configuration entry in the log wins, committed or not; below the log
        # (compacted, or from a snapshot) the base membership holds.
        self.base_members = tuple(sorted(members))
        self.configs: list[tuple[int, tuple[str, ...]]] = list(log_configs)
        self.members: tuple[str, ...] = ()
        self.peers: tuple[str, ...] = ()
        self.config = config or RaftConfig()
        self.rng = rng or random.Random()
        self.term = hard_state.term
        self.voted_for = hard_state.voted_for
        self.role = Role.FOLLOWER
        self.leader_id: str | None = None
        # The log: entries snapshot_index+1 .. snapshot_index+len(terms).
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self.terms = list(log_terms)
        self.persisted_index = self.last_index
        # Whatever the state machine applied was committed, even if the log no longer says so.
        self.commit_index = max(snapshot_index, min(applied_index, snapshot_index + len(log_terms)))
        self.followers: dict[str, _Follower] = {}
        self.votes: set[str] = set()
        self.last_leader_contact_ms = -(10**12)
        self.transfer_target: str | None = None
        self.transfer_deadline_ms = 0
        self._leader_since_ms = 0
        # Set while the shell installs a snapshot: appends wait, they would land in a log being replaced.
        self._installing: int | None = None
        self._election_deadline_ms = 0
        self._effects = Effects()
        self._use_latest_membership()
        self._reset_election_timer(now_ms)
        if not self.peers:
            self._election_deadline_ms = now_ms  # a group of one elects itself at the first tick

    # ------------------------------------------------------------------ membership

    def _use_latest_membership(self, now_ms: int = 0) -> None:
        members = self.configs[-1][1] if self.configs else self.base_members
        if members == self.members:
            return
        self.members = members
        self.peers = tuple(member for member in members if member != self.node_id)
        self._effects.members_changed = True
        if self.role is Role.LEADER:
            for gone in [peer for peer in self.followers if peer not in self.peers]:
                del self.followers[gone]
            for peer in self.peers:
                if peer not in self.followers:
                    self.followers[peer] = _Follower(
                        next_index=self.last_index + 1, last_progress_ms=now_ms, last_heard_ms=now_ms
                    )

    def _note_configs(self, entries: list[tuple[int, int, bytes]], now_ms: int) -> None:
        found = False
        for index, _, payload in entries:
            ids = member_ids(payload)
            if ids is not None:
                self.configs.append((index, ids))
                found = True
        if found:
            self._use_latest_membership(now_ms)

    def _forget_configs_from(self, index: int, now_ms: int) -> None:
        if self.configs and self.configs[-1][0] >= index:
            self.configs = [config for config in self.configs if config[0] < index]
            self._use_latest_membership(now_ms)

    def membership_pending(self) -> bool:
        """True while the latest membership change is not committed (no new change may start)."""
        return bool(self.configs) and self.configs[-1][0] > self.commit_index

    @property
    def is_member(self) -> bool:
        """False for a node being added (not yet in any membership it knows) or one removed."""
        return self.node_id in self.members

    # ------------------------------------------------------------------ log view

    @property
    def last_index(self) -> int:
        """Index of the last entry in the log."""
        return self.snapshot_index + len(self.terms)

    @property
    def last_term(self) -> int:
        """Term of the last entry (or of the snapshot)."""
        return self.terms[-1] if self.terms else self.snapshot_term

    def term_at(self, index: int) -> int | None:
        """The term of entry ``index``; None when it is compacted away or beyond the log."""
        if index == self.snapshot_index:
            return self.snapshot_term
        if self.snapshot_index < index <= self.last_index:
            return self.terms[index - self.snapshot_index - 1]
        return None

    @property
    def quorum(self) -> int:
        """Votes or acknowledgements that make a majority."""
        return len(self.members) // 2 + 1

    # ------------------------------------------------------------------ driving

    def step(self, event: RaftEvent, now_ms: int) -> Effects:
        """Feed one event; returns everything the shell must now do (and clears it)."""
        match event:
            case Tick():
                self._tick(now_ms)
            case Receive(sender, message):
                if sender in self.members and sender != self.node_id:
                    self._receive(sender, message, now_ms)
            case Propose(payload):
                self._effects.proposed_index = self._propose(payload, now_ms)
            case Persisted(index):
                self.persisted_index = max(self.persisted_index, min(index, self.last_index))
                if self.role is Role.LEADER:
                    self._advance_commit()
            case TransferLeadership(target):
                self._transfer(target, now_ms)
            case SnapshotInstalled(index, term, members):
                self._snapshot_installed(index, term)
                if members:
                    self.base_members = tuple(sorted(members))
                self.configs = []
                self._use_latest_membership(now_ms)
            case Compacted(index, term):
                self._compacted(index, term)
            case SnapshotFailed(peer):
                follower = self.followers.get(peer)
                if follower is not None and follower.snapshot_in_progress:
                    follower.snapshot_in_progress = False
                    follower.next_snapshot_ms = now_ms + SNAPSHOT_RETRY_MS
        effects = self._effects
        effects.commit_index = self.commit_index
        self._effects = Effects()
        return effects

    def _send(self, peer: str, message: RaftMessage) -> None:
        self._effects.messages.append((peer, message))

    def _persist_hard_state(self) -> None:
        self._effects.hard_state = HardState(self.term, self.voted_for)

    def _reset_election_timer(self, now_ms: int) -> None:
        timeout = self.config.election_timeout_ms
        self._election_deadline_ms = now_ms + timeout + self.rng.randrange(timeout)

    def _become_follower(self, term: int, leader: str | None, now_ms: int) -> None:
        if term > self.term:
            self.term = term
            self.voted_for = None
            self._persist_hard_state()
        if self.role is not Role.FOLLOWER:
            self._effects.role_changed = True
        if leader != self.leader_id:
            self._effects.role_changed = True
        self.role = Role.FOLLOWER
        if leader != self.leader_id:
            self._installing = None
        self.leader_id = leader
        self.followers.clear()
        self.votes.clear()
        self.transfer_target = None
        self._reset_election_timer(now_ms)

    # ------------------------------------------------------------------ timers

    def _tick(self, now_ms: int) -> None:
        if self.role is Role.LEADER:
            self._leader_tick(now_ms)
        elif now_ms >= self._election_deadline_ms and self.is_member:
            self._start_pre_vote(now_ms)

    def _leader_tick(self, now_ms: int) -> None:
        config = self.config
        heard = 1 + sum(
            1 for f in self.followers.values() if now_ms - f.last_heard_ms < config.election_timeout_ms
        )
        if heard < self.quorum and now_ms - self._leader_since_ms >= config.election_timeout_ms:
            # Check quorum: a leader cut off from the majority stops pretending, so clients move on.
            self._become_follower(self.term, None, now_ms)
            return
        if self.transfer_target is not None and now_ms >= self.transfer_deadline_ms:
            self.transfer_target = None
        for peer, follower in self.followers.items():
            if (
                follower.snapshot_in_progress
                and now_ms - follower.snapshot_started_ms >= config.snapshot_timeout_ms
            ):
                follower.snapshot_in_progress = False  # the transfer failed somewhere: start over
            outstanding = follower.next_index > follower.match_index + 1
            if outstanding and now_ms - follower.last_progress_ms >= config.retransmit_after_ms:
                # Appends (or their answers) were lost: go back to what the follower confirmed.
                follower.inflight = 0
                follower.next_index = follower.match_index + 1
                follower.last_progress_ms = now_ms
            self._replicate(peer, follower, now_ms)
            if now_ms - follower.last_sent_ms >= config.heartbeat_interval_ms:
                self._send_heartbeat(peer, follower, now_ms)

    # ------------------------------------------------------------------ elections

    def _up_to_date(self, last_index: int, last_term: int) -> bool:
        return last_term > self.last_term or (last_term == self.last_term and last_index >= self.last_index)

    def _start_pre_vote(self, now_ms: int) -> None:
        if not self.peers:
            self._start_election(now_ms, transfer=False)
            return
        self.role = Role.PRE_CANDIDATE
        self.leader_id = None
        self._effects.role_changed = True
        self.votes = {self.node_id}
        self._reset_election_timer(now_ms)
        for peer in self.peers:
            self._send(peer, VoteRequest(self.term + 1, self.node_id, self.last_index, self.last_term, True))

    def _start_election(self, now_ms: int, *, transfer: bool) -> None:
        self.role = Role.CANDIDATE
        self.term += 1
        self.voted_for = self.node_id
        self.leader_id = None
        self._effects.role_changed = True
        self._persist_hard_state()
        self.votes = {self.node_id}
        self._reset_election_timer(now_ms)
        if len(self.votes) >= self.quorum:
            self._become_leader(now_ms)
            return
        for peer in self.peers:
            self._send(
                peer, VoteRequest(self.term, self.node_id, self.last_index, self.last_term, False, transfer)
            )

    def _become_leader(self, now_ms: int) -> None:
        self.role = Role.LEADER
        self.leader_id = self.node_id
        self._effects.role_changed = True
        self._leader_since_ms = now_ms
        self.followers = {
            peer: _Follower(next_index=self.last_index + 1, last_progress_ms=now_ms, last_heard_ms=now_ms)
            for peer in self.peers
        }
        # A new leader commits an entry of its own term; that commits everything before it too.
        self._propose(b"", now_ms)
        for peer, follower in self.followers.items():
            self._send_heartbeat(peer, follower, now_ms)

    def _on_vote_request(self, sender: str, request: VoteRequest, now_ms: int) -> None:
        leader_recently = now_ms - self.last_leader_contact_ms < self.config.election_timeout_ms
        if request.pre_vote:
            granted = (
                request.term > self.term
                and self._up_to_date(request.last_index, request.last_term)
                and not (leader_recently and self.leader_id is not None)
                and self.role is not Role.LEADER
            ) or (request.term >= self.term and request.transfer)
            self._send(
                sender, VoteResponse(max(request.term, self.term) if granted else self.term, granted, True)
            )
            return
        if request.term > self.term:
            sticky = (leader_recently and self.leader_id is not None) or self.role is Role.LEADER
            if sticky and not request.transfer:
                # Leader stickiness: ignore a disruptive candidate while our leader is alive.
                self._send(sender, VoteResponse(self.term, False, False))
                return
            self._become_follower(request.term, None, now_ms)
        if request.term < self.term:
            self._send(sender, VoteResponse(self.term, False, False))
            return
        granted = self.voted_for in (None, request.candidate) and self._up_to_date(
            request.last_index, request.last_term
        )
        if granted:
            self.voted_for = request.candidate
            self._persist_hard_state()
            self._reset_election_timer(now_ms)
        self._send(sender, VoteResponse(self.term, granted, False))

    def _on_vote_response(self, sender: str, response: VoteResponse, now_ms: int) -> None:
        if response.pre_vote:
            if self.role is not Role.PRE_CANDIDATE:
                return
            if not response.granted:
                if response.term > self.term:
                    self._become_follower(response.term, None, now_ms)
                return
            self.votes.add(sender)
            if len(self.votes) >= self.quorum:
                self._start_election(now_ms, transfer=False)
            return
        if response.term > self.term:
            self._become_follower(response.term, None, now_ms)
            return
        if self.role is not Role.CANDIDATE or response.term != self.term or not response.granted:
            return
        self.votes.add(sender)
        if len(self.votes) >= self.quorum:
            self._become_leader(now_ms)

    # ------------------------------------------------------------------ messages

    def _receive(self, sender: str, message: RaftMessage, now_ms: int) -> None:
        match message:
            case VoteRequest():
                self._on_vote_request(sender, message, now_ms)
            case VoteResponse():
                self._on_vote_response(sender, message, now_ms)
            case AppendRequest() | SnapshotRequest() | TimeoutNow():
                if message.term < self.term:
                    self._reject_stale(sender, message)
                    return
                if message.term > self.term or self.role is not Role.FOLLOWER or self.leader_id != sender:
                    self._become_follower(message.term, sender, now_ms)
                self.last_leader_contact_ms = now_ms
                self._reset_election_timer(now_ms)
                if isinstance(message, AppendRequest):
                    self._on_append(sender, message)
                elif isinstance(message, SnapshotRequest):
                    self._on_snapshot(message)
                else:
                    self._start_election(now_ms, transfer=True)
            case AppendResponse() | SnapshotResponse():
                if message.term > self.term:
                    self._become_follower(message.term, None, now_ms)
                    return
                if self.role is not Role.LEADER or message.term != self.term:
                    return
                follower = self.followers[sender]
                follower.last_heard_ms = now_ms
                if isinstance(message, AppendResponse):
                    self._on_append_response(sender, follower, message, now_ms)
                else:
                    follower.snapshot_in_progress = False
                    follower.match_index = max(follower.match_index, message.match_index)
                    follower.next_index = follower.match_index + 1
                    follower.inflight = 0
                    follower.last_progress_ms = now_ms
                    self._advance_commit()
                    self._replicate(sender, follower, now_ms)

    def _reject_stale(self, sender: str, message: AppendRequest | SnapshotRequest | TimeoutNow) -> None:
        if isinstance(message, SnapshotRequest):
            self._send(sender, SnapshotResponse(self.term, 0))
        elif isinstance(message, AppendRequest):
            self._send(sender, AppendResponse(self.term, False, 0, self.last_index + 1))

    def _on_append(self, sender: str, request: AppendRequest) -> None:
        if self._installing is not None:
            return  # no answer: the leader retransmits once the snapshot is in
        prev_index, terms = request.prev_index, request.entry_terms
        payloads = request.payloads
        if prev_index < self.snapshot_index:
            # The start of this batch is inside our snapshot (committed): skip what we already cover.
            skip = self.snapshot_index - prev_index
            if skip > len(terms):
                self._send(sender, AppendResponse(self.term, True, self.snapshot_index, 0))
                return
            prev_index, terms, payloads = self.snapshot_index, terms[skip:], payloads[skip:]
            prev_term = self.snapshot_term
        else:
            prev_term = request.prev_term
        if prev_index > self.last_index:
            self._send(sender, AppendResponse(self.term, False, 0, self.last_index + 1))
            return
        if self.term_at(prev_index) != prev_term:
            # Conflict: ask the leader to retry from the first entry of our conflicting term.
            conflict_term = self.term_at(prev_index)
            hint = prev_index
            while hint - 1 > self.snapshot_index and self.term_at(hint - 1) == conflict_term:
                hint -= 1
            self._send(sender, AppendResponse(self.term, False, 0, max(hint, self.snapshot_index + 1)))
            return
        for offset, term in enumerate(terms):
            index = prev_index + 1 + offset
            existing = self.term_at(index)
            if existing == term:
                continue
            if existing is not None:
                if index <= self.commit_index:
                    raise AssertionError(f"leader {sender} conflicts with committed entry {index}")
                del self.terms[index - self.snapshot_index - 1 :]
                self._forget_configs_from(index, self.last_leader_contact_ms)
                self._effects.truncate_from = (
                    index if self._effects.truncate_from is None else min(index, self._effects.truncate_from)
                )
                self._effects.append = [entry for entry in self._effects.append if entry[0] < index]
                self.persisted_index = min(self.persisted_index, index - 1)
            self.terms.extend(terms[offset:])
            appended = [(prev_index + 1 + i, terms[i], payloads[i]) for i in range(offset, len(terms))]
            self._effects.append.extend(appended)
            self._note_configs(appended, self.last_leader_contact_ms)
            break
        match_index = prev_index + len(terms)
        if request.commit_index > self.commit_index:
            self.commit_index = max(self.commit_index, min(request.commit_index, match_index))
        self._send(sender, AppendResponse(self.term, True, match_index, 0))

    def _on_append_response(
        self, sender: str, follower: _Follower, response: AppendResponse, now_ms: int
    ) -> None:
        if response.success:
            follower.probing = False
            if response.match_index > follower.match_index:
                # Only an answer that moves the match frees a slot: heartbeats and duplicates do not.
                follower.match_index = response.match_index
                follower.inflight = max(0, follower.inflight - 1)
                follower.last_progress_ms = now_ms
                self._advance_commit()
            follower.next_index = max(follower.next_index, follower.match_index + 1)
            if follower.next_index == follower.match_index + 1:
                follower.inflight = 0  # everything sent is confirmed
            if self.transfer_target == sender and follower.match_index == self.last_index:
                self._send(sender, TimeoutNow(self.term, self.node_id))
        else:
            # Probe: one append at a time until the follower accepts one, instead of a burst per rejection.
            follower.next_index = max(follower.match_index + 1, min(response.hint_index, self.last_index + 1))
            follower.inflight = 0
            follower.probing = True
            follower.last_progress_ms = now_ms
        self._replicate(sender, follower, now_ms)

    def _on_snapshot(self, request: SnapshotRequest) -> None:
        if self.term_at(request.index) == request.snapshot_term:
            # Our log already holds the snapshot's last entry, hence everything before it: installing
            # would throw away entries after it that we may have acknowledged. Keep the log.
            self._send(request.leader, SnapshotResponse(self.term, request.index))
            return
        if request.index <= self.commit_index:
            self._send(request.leader, SnapshotResponse(self.term, self.commit_index))
            return
        self._effects.install_snapshot = request
        self._installing = request.index

    def _snapshot_installed(self, index: int, term: int) -> None:
        self._installing = None
        self.snapshot_index, self.snapshot_term = index, term
        self.terms = []
        self.persisted_index = index
        self.commit_index = max(self.commit_index, index)
        if self.leader_id is not None and self.role is Role.FOLLOWER:
            self._send(self.leader_id, SnapshotResponse(self.term, index))

    def _compacted(self, index: int, term: int) -> None:
        if index <= self.snapshot_index:
            return
        if self.term_at(index) != term:
            raise AssertionError(
                f"compacted through {index} of term {term}, but the log has {self.term_at(index)}"
            )
        del self.terms[: index - self.snapshot_index]
        self.snapshot_index, self.snapshot_term = index, term
        self.commit_index = max(self.commit_index, index)
        folded = [config for config in self.configs if config[0] <= index]
        if folded:
            self.base_members = folded[-1][1]
            self.configs = [config for config in self.configs if config[0] > index]

    # ------------------------------------------------------------------ replication (leader)

    def _propose(self, payload: bytes, now_ms: int) -> int | None:
        if self.role is not Role.LEADER or self.transfer_target is not None:
            return None
        self.terms.append(self.term)
        index = self.last_index
        self._effects.append.append((index, self.term, payload))
        self._note_configs([(index, self.term, payload)], now_ms)
        for peer, follower in self.followers.items():
            self._replicate(peer, follower, now_ms)
        if not self.peers:
            self._advance_commit()
        return index

    def _replicate(self, peer: str, follower: _Follower, now_ms: int) -> None:
        config = self.config
        limit = 1 if follower.probing else config.max_inflight_appends
        while follower.next_index <= self.last_index and follower.inflight < limit:
            if follower.snapshot_in_progress:
                return
            prev_index = follower.next_index - 1
            prev_term = self.term_at(prev_index)
            if prev_term is None:
                if now_ms >= follower.next_snapshot_ms:
                    follower.snapshot_in_progress = True
                    follower.snapshot_started_ms = now_ms
                    self._effects.send_snapshot.append(peer)
                return
            if follower.next_index == follower.match_index + 1:
                follower.last_progress_ms = now_ms  # the first send after a quiet spell starts the clock
            last = min(self.last_index, prev_index + config.max_entries_per_append)
            start = prev_index - self.snapshot_index
            terms = tuple(self.terms[start : start + (last - prev_index)])
            self._send(
                peer, AppendRequest(self.term, self.node_id, prev_index, prev_term, terms, self.commit_index)
            )
            follower.next_index = last + 1
            follower.inflight += 1
            follower.last_sent_ms = now_ms

    def _send_heartbeat(self, peer: str, follower: _Follower, now_ms: int) -> None:
        # Anchored at what the follower confirmed, so a heartbeat never contradicts appends in flight.
        prev_index = max(follower.match_index, self.snapshot_index)
        prev_term = self.term_at(prev_index)
        assert prev_term is not None
        commit = min(self.commit_index, follower.match_index)
        self._send(peer, AppendRequest(self.term, self.node_id, prev_index, prev_term, (), commit))
        follower.last_sent_ms = now_ms

    def _advance_commit(self) -> None:
        own = [self.persisted_index] if self.is_member else []  # a leader being removed does not count
        matches = sorted([*own, *(f.match_index for f in self.followers.values())], reverse=True)
        candidate = matches[self.quorum - 1]
        if candidate > self.commit_index and self.term_at(candidate) == self.term:
            self.commit_index = candidate
            if not self.is_member and not self.membership_pending():
                # Our removal is committed: hand over by going quiet (the others elect a leader).
                self._become_follower(self.term, None, self._leader_since_ms)

    def _transfer(self, target: str, now_ms: int) -> None:
        if self.role is not Role.LEADER or target == self.node_id or target not in self.followers:
            return
        self.transfer_target = target
        self.transfer_deadline_ms = now_ms + self.config.election_timeout_ms
        follower = self.followers[target]
        if follower.match_index == self.last_index:
            self._send(target, TimeoutNow(self.term, self.node_id))
        else:
            self._replicate(target, follower, now_ms)

    # ------------------------------------------------------------------ questions

    def follower_progress(self) -> dict[str, int]:
        """The leader's view of each follower's match index (empty when not leader)."""
        return {peer: follower.match_index for peer, follower in self.followers.items()}

    def hard_state(self) -> HardState:
        """The current term and vote."""
        return HardState(self.term, self.voted_for)
