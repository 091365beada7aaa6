"""Unit tests of the pure Raft core (``cluster.raft.RaftCore``), message by message.

``Group`` plays the shell and the network for a few cores: ``step`` feeds one event and, like
``Replica.flush``, reports ``Persisted`` at once when the effects ask for a write (unless told not
to), then queues the messages; ``deliver`` hands queued messages over round by round, dropping what
a test says is lost. Time moves only when a test moves it.

Tests that say "Regression" pin bugs the simulator (``tests/test_raft_simulation.py``) found.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest

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
    SnapshotInstalled,
    SnapshotRequest,
    SnapshotResponse,
    Tick,
    TimeoutNow,
    TransferLeadership,
    VoteRequest,
    VoteResponse,
)
from cluster.raft import RaftConfig, RaftCore

pytestmark = pytest.mark.timeout(30)

ELECTION_MS = 1_000
CONFIG = RaftConfig(
    election_timeout_ms=ELECTION_MS,
    heartbeat_interval_ms=100,
    max_entries_per_append=64,
    max_inflight_appends=32,
    retransmit_after_ms=400,
    snapshot_timeout_ms=5_000,
)

Sent = tuple[str, str, RaftMessage]  # sender, receiver, message
Drop = Callable[[str, str, RaftMessage], bool]


def _never(sender: str, receiver: str, message: RaftMessage) -> bool:
    return False


class Group:
    """Cores of one replica group, the messages between them, and a clock the test moves."""

    def __init__(
        self,
        *members: str,
        config: RaftConfig = CONFIG,
        terms: dict[str, int] | None = None,
        logs: dict[str, list[int]] | None = None,
        snapshots: dict[str, tuple[int, int]] | None = None,
        applied: dict[str, int] | None = None,
    ) -> None:
        self.now = 0
        self.members = members
        self.cores: dict[str, RaftCore] = {}
        for member in members:
            snapshot_index, snapshot_term = (snapshots or {}).get(member, (0, 0))
            self.cores[member] = RaftCore(
                member,
                members,
                hard_state=HardState((terms or {}).get(member, 0), None),
                snapshot_index=snapshot_index,
                snapshot_term=snapshot_term,
                log_terms=list((logs or {}).get(member, [])),
                now_ms=0,
                applied_index=(applied or {}).get(member, 0),
                config=config,
                rng=random.Random(member),
            )
        self.queue: list[Sent] = []
        # The shell's store of payloads (entries the tests start with carry empty ones).
        self.payloads: dict[str, dict[int, bytes]] = {
            member: dict.fromkeys(range(1, self.cores[member].last_index + 1), b"") for member in members
        }
        self.effects: dict[str, list[Effects]] = {member: [] for member in members}

    def __getitem__(self, member: str) -> RaftCore:
        return self.cores[member]

    def step(self, member: str, event: RaftEvent, *, persist: bool = True) -> Effects:
        """Feed one event; persist at once (as the shell does) unless told not to; queue the messages."""
        core = self.cores[member]
        effects = core.step(event, self.now)
        payloads = self.payloads[member]
        if effects.truncate_from is not None:
            for index in [index for index in payloads if index >= effects.truncate_from]:
                del payloads[index]
        payloads.update((index, payload) for index, _, payload in effects.append)
        if persist and effects.persist_needed():
            effects.merge(core.step(Persisted(core.last_index), self.now))
        for peer, message in effects.messages:
            if isinstance(message, AppendRequest) and message.entry_terms:
                count = len(message.entry_terms)
                filled = tuple(payloads[message.first_index + n] for n in range(count))
                message = dataclasses.replace(message, payloads=filled)
            self.queue.append((member, peer, message))
        self.effects[member].append(effects)
        return effects

    def deliver(self, *, drop: Drop = _never, rounds: int = 1) -> list[Sent]:
        """Hand over what is queued (and, for ``rounds`` > 1, what that provokes); returns what arrived."""
        arrived = []
        for _ in range(rounds):
            batch, self.queue = self.queue, []
            for sender, receiver, message in batch:
                if not drop(sender, receiver, message):
                    arrived.append((sender, receiver, message))
                    self.step(receiver, Receive(sender, message))
        return arrived

    def settle(self, *, drop: Drop = _never) -> None:
        """Deliver until nothing is in flight."""
        for _ in range(100):
            if not self.queue:
                return
            self.deliver(drop=drop)
        raise AssertionError("messages kept flowing")

    def tick(self, member: str, *, after_ms: int = 0) -> Effects:
        """Move the clock, then let ``member``'s timers fire."""
        self.now += after_ms
        return self.step(member, Tick())

    def elect(self, member: str) -> None:
        """Let ``member``'s election timer fire and deliver everything until the election is over."""
        self.tick(member, after_ms=2 * ELECTION_MS)
        self.settle()
        assert role(self.cores[member]) is Role.LEADER

    def queued(self, sender: str, receiver: str, kind: type) -> list[RaftMessage]:
        """Queued messages of one kind on one link."""
        return [m for s, r, m in self.queue if (s, r) == (sender, receiver) and isinstance(m, kind)]

    def replicate(self, leader: str, *payloads: bytes) -> list[int]:
        """Propose payloads at the leader and deliver until every follower has them."""
        indexes = [self.step(leader, Propose(payload)).proposed_index for payload in payloads]
        self.settle()
        assert None not in indexes
        return [index for index in indexes if index is not None]


def role(core: RaftCore) -> Role:
    """A core's role (a call, so type checkers do not narrow it across steps)."""
    return core.role


def to(receiver: str) -> Drop:
    """Drop every message to ``receiver``."""
    return lambda sender, r, message: r == receiver


# ---------------------------------------------------------------------- elections


def test_a_node_whose_timer_fires_asks_for_pre_votes_before_it_changes_its_term() -> None:
    # Given three fresh nodes
    group = Group("a", "b", "c")
    # When a's election timer fires
    effects = group.tick("a", after_ms=2 * ELECTION_MS)
    # Then a asks for pre-votes for term 1 while it stays in term 0 and persists nothing
    assert role(group["a"]) is Role.PRE_CANDIDATE and group["a"].term == 0
    assert effects.hard_state is None
    requests = [m for _, _, m in group.queue]
    assert len(requests) == 2
    assert all(isinstance(m, VoteRequest) and m.pre_vote and m.term == 1 for m in requests)
    # And the voters grant the pre-vote without leaving term 0 or persisting anything
    group.deliver()
    for voter in ("b", "c"):
        assert group[voter].term == 0 and group[voter].voted_for is None
        assert all(e.hard_state is None for e in group.effects[voter])
    assert all(isinstance(m, VoteResponse) and m.granted and m.pre_vote for _, _, m in group.queue)


def test_a_won_pre_vote_leads_to_an_election_and_the_winner_appends_an_entry_of_its_term() -> None:
    # Given a node that asked for pre-votes
    group = Group("a", "b", "c")
    group.tick("a", after_ms=2 * ELECTION_MS)
    # When the pre-votes come back granted
    group.deliver(rounds=2)
    # Then a is a candidate of term 1 that voted for itself, persisted with its vote requests
    assert role(group["a"]) is Role.CANDIDATE and group["a"].term == 1
    (campaign,) = [e for e in group.effects["a"] if e.hard_state is not None]
    assert campaign.hard_state == HardState(1, "a")
    assert all(isinstance(m, VoteRequest) and not m.pre_vote for _, m in campaign.messages)
    # When the votes are cast and counted
    group.deliver(rounds=2)
    # Then a leads term 1 with a no-op of term 1 at index 1, and nobody else leads
    assert role(group["a"]) is Role.LEADER and group["a"].terms == [1]
    assert [m.role for m in (group["b"], group["c"])] == [Role.FOLLOWER, Role.FOLLOWER]
    group.settle()
    assert group["a"].commit_index == 1
    # And the followers learn the commit with the next heartbeat
    group.tick("a", after_ms=100)
    group.settle()
    assert all(group[m].commit_index == 1 for m in ("b", "c"))


def test_a_node_with_a_shorter_log_is_refused_its_pre_vote_and_never_campaigns() -> None:
    # Given b and c hold an entry of term 1 that a lacks
    group = Group("a", "b", "c", terms={"b": 1, "c": 1}, logs={"b": [1], "c": [1]})
    # When a's timer fires
    group.tick("a", after_ms=2 * ELECTION_MS)
    group.settle()
    # Then its pre-vote is refused: it learns term 1 and follows, and nobody voted or changed term
    assert role(group["a"]) is Role.FOLLOWER and group["a"].term == 1
    assert group["a"].voted_for is None
    assert group["b"].hard_state() == group["c"].hard_state() == HardState(1, None)


def test_an_isolated_node_does_not_inflate_its_term_and_rejoins_without_disturbing_the_leader() -> None:
    # Given a leader a of term 1 with followers b and c
    group = Group("a", "b", "c")
    group.elect("a")
    # When c is cut off for ten election timeouts while a and b keep talking
    for _ in range(100):
        group.now += 100
        group.tick("a")
        group.tick("c")
        group.settle(drop=lambda s, r, m: "c" in (s, r))
    # Then c keeps asking for pre-votes that nobody answers: its term stays 1
    assert group["c"].term == 1 and role(group["c"]) is Role.PRE_CANDIDATE
    # When the partition heals
    group.tick("a", after_ms=100)
    group.tick("c")
    group.settle()
    # Then a still leads term 1 and c follows it
    assert role(group["a"]) is Role.LEADER and group["a"].term == 1
    assert role(group["c"]) is Role.FOLLOWER and group["c"].leader_id == "a"


def test_nodes_that_hear_a_healthy_leader_refuse_a_candidate_of_a_higher_term() -> None:
    # Given a leader a of term 1 that b heard a moment ago, and c back from a partition in term 5
    group = Group("a", "b", "c")
    group.elect("a")
    group.tick("a", after_ms=100)
    group.settle()
    last_index, last_term = group["c"].last_index, group["c"].last_term
    # When c asks them for votes (pre-vote or not)
    for pre_vote in (True, False):
        for voter in ("a", "b"):
            group.step(voter, Receive("c", VoteRequest(5, "c", last_index, last_term, pre_vote)))
    # Then both refuse without adopting term 5 (stickiness), and a keeps leading term 1
    answers = [m for s, r, m in group.queue if r == "c"]
    assert len(answers) == 4 and all(isinstance(m, VoteResponse) and not m.granted for m in answers)
    assert group["a"].term == group["b"].term == 1
    assert role(group["a"]) is Role.LEADER and group["b"].leader_id == "a"


def test_a_leader_that_hears_no_majority_for_an_election_timeout_steps_down() -> None:
    # Given a leader a of term 1
    group = Group("a", "b", "c")
    group.elect("a")
    # When a hears nothing from b and c for a whole election timeout
    group.tick("a", after_ms=ELECTION_MS // 2)
    group.queue.clear()
    effects = group.tick("a", after_ms=ELECTION_MS)
    # Then it steps down (check quorum) in the same term, and says its role changed
    assert role(group["a"]) is Role.FOLLOWER and group["a"].term == 1
    assert effects.role_changed
    assert group.step("a", Propose(b"x")).proposed_index is None


def test_a_leader_that_hears_one_follower_keeps_leading() -> None:
    # Given a leader a of term 1 whose messages to c are lost
    group = Group("a", "b", "c")
    group.elect("a")
    # When two election timeouts pass with b answering heartbeats
    for _ in range(20):
        group.tick("a", after_ms=100)
        group.settle(drop=lambda s, r, m: "c" in (s, r))
    # Then a still leads: a and b are a majority
    assert role(group["a"]) is Role.LEADER


# ---------------------------------------------------------------------- the log


def test_a_follower_truncates_a_conflicting_suffix_and_appends_the_leaders_entries() -> None:
    # Given b holds entries 1..4 of terms 1, 1, 2, 2 (the last two never committed)
    group = Group("a", "b", "c", terms={"b": 2}, logs={"b": [1, 1, 2, 2]})
    # When the leader of term 3 sends entries 3..4 of term 3 after entry 2 of term 1
    request = AppendRequest(3, "a", 2, 1, (3, 3), 2, (b"x", b"y"))
    effects = group.step("b", Receive("a", request))
    # Then b drops its entries from 3 on and appends the leader's, in one write, and says it matches to 4
    assert effects.truncate_from == 3
    assert effects.append == [(3, 3, b"x"), (4, 3, b"y")]
    assert group["b"].terms == [1, 1, 3, 3]
    assert effects.messages == [("a", AppendResponse(3, True, 4, 0))]
    assert group["b"].commit_index == 2


def test_a_follower_whose_log_disagrees_hints_the_first_index_of_the_conflicting_term() -> None:
    # Given b holds entries 1..4 of terms 1, 1, 2, 2
    group = Group("a", "b", "c", terms={"b": 2}, logs={"b": [1, 1, 2, 2]})
    # When the leader of term 3 sends an entry after entry 4 of term 3
    effects = group.step("b", Receive("a", AppendRequest(3, "a", 4, 3, (3,), 0, (b"z",))))
    # Then b refuses, pointing at index 3 where its term 2 began, and changes nothing in its log
    assert effects.messages == [("a", AppendResponse(3, False, 0, 3))]
    assert not effects.append and effects.truncate_from is None


def test_a_follower_missing_entries_hints_the_end_of_its_log() -> None:
    # Given b holds one entry
    group = Group("a", "b", "c", terms={"b": 1}, logs={"b": [1]})
    # When the leader sends entries after index 5
    effects = group.step("b", Receive("a", AppendRequest(1, "a", 5, 1, (1,), 0, (b"z",))))
    # Then b asks for what follows its last entry
    assert effects.messages == [("a", AppendResponse(1, False, 0, 2))]


def test_a_leader_repairs_a_diverged_follower_and_overwrites_its_uncommitted_entries() -> None:
    # Given a holds entries of terms 1, 2 and c holds an uncommitted entry of term 1 at index 2
    group = Group("a", "b", "c", terms={"a": 2, "b": 2, "c": 2}, logs={"a": [1, 2], "b": [1, 2], "c": [1, 1]})
    # When a is elected (term 3) and replicates
    group.elect("a")
    group.replicate("a", b"p")
    # Then c's log is a's log
    assert group["c"].terms == group["a"].terms == [1, 2, 3, 3]
    assert any(e.truncate_from == 2 for e in group.effects["c"])


def test_a_leader_commits_an_earlier_terms_entry_only_with_an_entry_of_its_own_term() -> None:
    # Given (Figure 8 of the Raft paper) a holds an entry of term 2 that only it has, b and c stop at 1
    config = RaftConfig(election_timeout_ms=ELECTION_MS, max_entries_per_append=1, retransmit_after_ms=400)
    logs = {"a": [1, 2], "b": [1], "c": [1]}
    group = Group("a", "b", "c", config=config, terms=dict.fromkeys("abc", 2), logs=logs)
    # When a wins term 3 and its entry of term 2 reaches b, but not yet its no-op of term 3
    group.tick("a", after_ms=2 * ELECTION_MS)
    group.deliver(rounds=4)  # pre-vote, vote: a leads and probes b and c one entry at a time
    assert role(group["a"]) is Role.LEADER and group["a"].terms == [1, 2, 3]

    def lost(sender: str, receiver: str, message: RaftMessage) -> bool:
        # c hears nothing; b gets the probe for entry 2 but neither heartbeats nor (yet) entry 3
        if receiver == "c":
            return True
        if receiver != "b" or not isinstance(message, AppendRequest):
            return False
        return not message.entry_terms or group["b"].last_index == 2

    group.settle(drop=lost)
    # Then entry 2 is on a majority (a, b) but not committed: counting replicas commits only the leader's term
    assert group["b"].terms == [1, 2]
    assert group["a"].follower_progress()["b"] == 2
    assert group["a"].commit_index == 0
    # When the no-op of term 3 reaches b too
    group.tick("a", after_ms=500)
    group.settle(drop=to("c"))
    # Then entries 1..3 commit together
    assert group["a"].commit_index == 3


def test_a_follower_learns_the_commit_index_only_up_to_what_it_matches() -> None:
    # Given b holds an uncommitted entry of an old term at index 2
    group = Group("a", "b", "c", terms={"b": 1}, logs={"b": [1, 1]})
    # When the leader of term 2, which committed up to 5, sends a heartbeat anchored at index 1
    group.step("b", Receive("a", AppendRequest(2, "a", 1, 1, (), 5)))
    # Then b commits only entry 1, the one it knows matches the leader
    assert group["b"].commit_index == 1


# ---------------------------------------------------------------------- replication


def test_a_leader_pipelines_appends_up_to_its_in_flight_limit() -> None:
    # Given a leader that sends one entry per append and keeps at most 3 in flight per follower
    config = RaftConfig(election_timeout_ms=ELECTION_MS, max_entries_per_append=1, max_inflight_appends=3)
    group = Group("a", "b", "c", config=config)
    group.elect("a")
    # When it takes 5 proposals before any answer comes back
    for n in range(5):
        group.step("a", Propose(b"p%d" % n))
    # Then 3 appends per follower are in flight at once, for consecutive entries
    for follower in ("b", "c"):
        appends = group.queued("a", follower, AppendRequest)
        assert [(m.prev_index, m.entry_terms) for m in appends if isinstance(m, AppendRequest)] == [
            (1, (1,)),
            (2, (1,)),
            (3, (1,)),
        ]
    # When the answers come back
    group.deliver(rounds=2)
    # Then the rest goes out, and once all arrive everything commits
    group.settle()
    assert group["a"].commit_index == 6
    assert group["b"].terms == group["c"].terms == [1] * 6


def test_a_leader_batches_entries_up_to_its_append_size() -> None:
    # Given a leader that sends up to 64 entries per append
    group = Group("a", "b", "c")
    group.elect("a")
    group.queue.clear()
    # When it takes 3 proposals in one turn (the shell persists once, at the end)
    for n in range(3):
        group.step("a", Propose(b"p%d" % n), persist=False)
    # Then each proposal goes out at once (pipelined), not waiting for the previous answer
    appends = group.queued("a", "b", AppendRequest)
    assert [m.first_index for m in appends if isinstance(m, AppendRequest)] == [2, 3, 4]


def test_lost_appends_are_sent_again_from_the_followers_confirmed_index() -> None:
    # Given a leader of term 1 whose append of a new entry to b is lost
    group = Group("a", "b", "c")
    group.elect("a")
    group.step("a", Propose(b"x"))
    group.settle(drop=to("b"))
    assert group["b"].last_index == 1
    # When the retransmission timeout passes
    group.tick("a", after_ms=CONFIG.retransmit_after_ms)
    # Then a sends the entry again, after what b confirmed
    appends = [m for m in group.queued("a", "b", AppendRequest) if isinstance(m, AppendRequest)]
    appends = [m for m in appends if m.entry_terms]
    assert appends and appends[0].prev_index == 1 and appends[0].entry_terms == (1,)
    group.settle()
    assert group["b"].last_index == 2


def test_a_follower_that_missed_an_append_catches_up_while_the_leader_is_idle() -> None:
    # (Regression: heartbeat answers used to free append slots, so a lost append was never resent.)
    # Given a leader of term 1 whose append of a new entry to b is lost
    group = Group("a", "b", "c")
    group.elect("a")
    group.step("a", Propose(b"x"))
    group.settle(drop=lambda s, r, m: r == "b" and isinstance(m, AppendRequest) and bool(m.entry_terms))
    # When the group runs for three election timeouts with every heartbeat and answer delivered
    for _ in range(30):
        group.tick("a", after_ms=100)
        group.settle()
    # Then b has the entry
    assert group["b"].last_index == group["a"].last_index == 2


def test_a_rejected_append_makes_the_leader_probe_one_append_at_a_time() -> None:
    # Given a leader a of term 2 with 4 entries and a follower c that has only the first
    group = Group("a", "b", "c", terms={"a": 1, "b": 1, "c": 1}, logs={"a": [1] * 4, "b": [1] * 4, "c": [1]})
    group.elect("a")
    # Then c ends up with a's log
    assert group["c"].terms == group["a"].terms == [1, 1, 1, 1, 2]
    # And c refused once, and each refusal was followed by a single append (no burst)
    refusals = [m for e in group.effects["c"] for _, m in e.messages if isinstance(m, AppendResponse)]
    assert any(not m.success for m in refusals)


# ---------------------------------------------------------------------- leadership transfer


def test_a_leader_hands_over_with_timeout_now_and_the_target_wins_at_once() -> None:
    # Given a leader a of term 1 whose followers are caught up
    group = Group("a", "b", "c")
    group.elect("a")
    group.replicate("a", b"x")
    # When a is asked to hand leadership to b
    effects = group.step("a", TransferLeadership("b"))
    # Then it tells b to campaign now, and takes no more proposals meanwhile
    assert effects.messages == [("b", TimeoutNow(1, "a"))]
    assert group.step("a", Propose(b"y")).proposed_index is None
    # When b gets it
    group.deliver()
    # Then b campaigns for term 2 at once, without pre-vote, flagged as a transfer
    requests = group.queued("b", "c", VoteRequest)
    assert len(requests) == 1 and isinstance(requests[0], VoteRequest)
    assert requests[0].term == 2 and requests[0].transfer and not requests[0].pre_vote
    # And c and a grant it though they heard from a leader a moment ago: b leads term 2
    group.settle()
    assert role(group["b"]) is Role.LEADER and group["b"].term == 2
    assert role(group["a"]) is Role.FOLLOWER and group["a"].leader_id == "b"


def test_a_leader_catches_a_lagging_transfer_target_up_before_handing_over() -> None:
    # Given a leader a of term 1 and b that missed the last entry
    group = Group("a", "b", "c")
    group.elect("a")
    group.step("a", Propose(b"x"))
    group.settle(drop=to("b"))
    # When a is asked to hand leadership to b
    effects = group.step("a", TransferLeadership("b"))
    # Then it does not tell b to campaign yet
    assert not [m for _, m in effects.messages if isinstance(m, TimeoutNow)]
    # When the retransmission timer brings b the entry and b confirms it
    group.tick("a", after_ms=CONFIG.retransmit_after_ms)
    group.settle()
    # Then a said TimeoutNow and b took over with the entry
    assert role(group["b"]) is Role.LEADER and group["b"].term == 2
    assert group["b"].terms[:2] == [1, 1]


def test_a_transfer_that_does_not_complete_expires_and_the_leader_takes_proposals_again() -> None:
    # Given a leader a of term 1 asked to hand over to b, whose messages are all lost
    group = Group("a", "b", "c")
    group.elect("a")
    group.step("a", TransferLeadership("b"))
    # When an election timeout passes (c keeps answering)
    for _ in range(10):
        group.tick("a", after_ms=100)
        group.settle(drop=lambda s, r, m: "b" in (s, r))
    # Then a still leads and takes proposals again
    assert group.step("a", Propose(b"y")).proposed_index is not None


# ---------------------------------------------------------------------- snapshots


def _group_with_compacted_leader() -> Group:
    """a's log was compacted through 10 (term 1) and holds 11..12; c holds 1..12; b's log is empty."""
    logs = {"a": [1, 1], "c": [1] * 12}
    return Group("a", "b", "c", terms={"a": 1, "c": 1}, logs=logs, snapshots={"a": (10, 1)})


def test_a_leader_asks_for_a_snapshot_when_a_follower_needs_compacted_entries() -> None:
    # Given a leader whose log starts after index 10, and b whose log is empty
    group = _group_with_compacted_leader()
    group.tick("a", after_ms=2 * ELECTION_MS)
    group.deliver(rounds=4)
    assert role(group["a"]) is Role.LEADER
    # When b refuses the first append (it has nothing) and the leader must go back to index 1
    group.deliver(rounds=2)
    # Then the leader asks the shell to stream a snapshot to b (once), and sends b no entries meanwhile
    asked = [peer for e in group.effects["a"] for peer in e.send_snapshot]
    assert asked == ["b"]
    group.queue = [(s, r, m) for s, r, m in group.queue if r != "b"]
    group.tick("a", after_ms=100)
    group.deliver()
    appends = [m for e in group.effects["a"][-2:] for p, m in e.messages if p == "b"]
    assert all(isinstance(m, AppendRequest) and not m.entry_terms for m in appends)


def test_a_follower_installs_a_snapshot_and_the_leader_resumes_after_it() -> None:
    # Given a leader whose log starts after index 10, streaming a snapshot to b
    group = _group_with_compacted_leader()
    group.elect("a")
    assert [peer for e in group.effects["a"] for peer in e.send_snapshot] == ["b"]
    request = SnapshotRequest(group["a"].term, "a", 10, 1)
    # When the streamed snapshot reaches b
    effects = group.step("b", Receive("a", request))
    # Then b asks its shell to install it, and ignores appends meanwhile (no answer: the leader retries)
    assert effects.install_snapshot == request
    ignored = group.step("b", Receive("a", AppendRequest(group["a"].term, "a", 12, 1, (), 12)))
    assert not ignored.messages
    # When the shell installed it
    installed = group.step("b", SnapshotInstalled(10, 1))
    # Then b's log starts after 10, and it tells the leader
    assert (group["b"].snapshot_index, group["b"].last_index, group["b"].commit_index) == (10, 10, 10)
    assert installed.messages == [("a", SnapshotResponse(group["a"].term, 10))]
    # And the leader sends the entries after the snapshot; b catches up
    group.settle()
    assert group["b"].terms == group["a"].terms
    assert group["b"].last_index == group["a"].last_index


def test_a_stale_snapshot_is_answered_without_installing_it() -> None:
    # Given b committed up to 3
    group = Group("a", "b", "c", terms={"b": 1}, logs={"b": [1, 1, 1]})
    group.step("b", Receive("a", AppendRequest(1, "a", 3, 1, (), 3)))
    # When a snapshot through 2 arrives
    effects = group.step("b", Receive("a", SnapshotRequest(1, "a", 2, 1)))
    # Then b does not install it and tells the leader it matches at least through the snapshot
    assert effects.install_snapshot is None
    ((peer, answer),) = effects.messages
    assert peer == "a" and isinstance(answer, SnapshotResponse) and 2 <= answer.match_index <= 3
    assert group["b"].last_index == 3


def test_compaction_moves_the_start_of_the_log_and_keeps_the_entries_after_it() -> None:
    # Given a node with entries 1..5 of term 1
    group = Group("a", "b", "c", terms={"a": 1}, logs={"a": [1] * 5})
    # When the shell compacted through 3
    group.step("a", Compacted(3, 1))
    # Then the log starts after 3 and still ends at 5
    assert (group["a"].snapshot_index, group["a"].snapshot_term, group["a"].terms) == (3, 1, [1, 1])
    assert group["a"].term_at(3) == 1 and group["a"].term_at(2) is None


def test_a_snapshot_a_follower_already_holds_keeps_the_entries_it_acknowledged() -> None:
    # (Regression: the install emptied the log, and acknowledged entries were left on a minority.)
    # Given b acknowledged entries 1..5 of term 1 to the leader but knows only 2 as committed
    group = Group("a", "b", "c", terms={"b": 1}, logs={"b": [1, 1]})
    acked = group.step("b", Receive("a", AppendRequest(1, "a", 2, 1, (1, 1, 1), 2, (b"x", b"y", b"z"))))
    assert acked.messages == [("a", AppendResponse(1, True, 5, 0))]
    # When a snapshot through 3 (of term 1), streamed before that answer arrived, reaches b
    effects = group.step("b", Receive("a", SnapshotRequest(1, "a", 3, 1)))
    if effects.install_snapshot is not None:
        group.step("b", SnapshotInstalled(3, 1))  # the shell installs it and resets its log
    # Then b still holds entries 4 and 5: the leader counts them toward a majority
    assert group["b"].last_index == 5


def test_a_restarted_node_counts_what_its_state_machine_applied_as_committed() -> None:
    # Given a node restarting with entries 1..10 of term 1, whose state machine had applied 8
    group = Group("a", "b", "c", terms={"b": 1}, logs={"b": [1] * 10}, applied={"b": 8})
    # Then entries up to 8 count as committed
    assert group["b"].commit_index == 8
    # When the shell compacts through 8 and a snapshot through 5 (streamed earlier) arrives
    group.step("b", Compacted(8, 1))
    effects = group.step("b", Receive("a", SnapshotRequest(1, "a", 5, 1)))
    # Then b does not install it (its log start and state machine never go back) and says it has 8
    assert effects.install_snapshot is None
    assert effects.messages == [("a", SnapshotResponse(1, 8))]
    assert (group["b"].snapshot_index, group["b"].last_index) == (8, 10)


# ---------------------------------------------------------------------- durable before said


def test_a_vote_is_granted_in_the_same_effects_that_persist_it() -> None:
    # Given three fresh nodes and a candidate of term 1
    group = Group("a", "b", "c")
    group.tick("a", after_ms=2 * ELECTION_MS)
    group.deliver(rounds=2)
    # When b answers a's vote request
    request = group.queued("a", "b", VoteRequest)[0]
    effects = group["b"].step(Receive("a", request), group.now)
    # Then the grant travels with the hard state that records it (the shell writes before it sends)
    assert ("a", VoteResponse(1, True, False)) in effects.messages
    assert effects.hard_state == HardState(1, "a") and effects.persist_needed()


def test_an_append_is_acknowledged_in_the_same_effects_that_persist_it() -> None:
    # Given a follower b with an empty log
    group = Group("a", "b", "c")
    # When an append of two entries arrives
    effects = group["b"].step(Receive("a", AppendRequest(1, "a", 0, 0, (1, 1), 0, (b"x", b"y"))), 0)
    # Then the acknowledgement travels with the entries and the new term to write first
    assert effects.messages == [("a", AppendResponse(1, True, 2, 0))]
    assert effects.append == [(1, 1, b"x"), (2, 1, b"y")]
    assert effects.hard_state == HardState(1, None)


def test_a_leader_counts_its_own_entry_toward_commit_only_once_persisted() -> None:
    # Given a leader a of term 1
    group = Group("a", "b", "c")
    group.elect("a")
    # When it proposes an entry (not yet written) and b acknowledges it
    index = group.step("a", Propose(b"x"), persist=False).proposed_index
    assert index == 2
    group.settle(drop=to("c"))
    # Then the entry is not committed: only b holds it durably
    assert group["a"].follower_progress()["b"] == 2
    assert group["a"].commit_index == 1
    # When the shell reports the leader's write
    effects = group.step("a", Persisted(2))
    # Then it commits
    assert effects.commit_index == 2


def test_a_leaders_appends_need_no_write_before_they_are_sent() -> None:
    # Given a leader a of term 1
    group = Group("a", "b", "c")
    group.elect("a")
    # When it proposes an entry
    effects = group["a"].step(Propose(b"x"), group.now)
    # Then its effects hold the append and the messages but no hard state: the shell may send first
    assert effects.append == [(2, 1, b"x")] and effects.hard_state is None
    assert {peer for peer, m in effects.messages if isinstance(m, AppendRequest)} == {"b", "c"}


def test_a_campaign_persists_the_new_term_and_self_vote_with_its_vote_requests() -> None:
    # Given a node that won its pre-vote
    group = Group("a", "b", "c")
    group.tick("a", after_ms=2 * ELECTION_MS)
    group.deliver()
    grant = group.queued("b", "a", VoteResponse)[0]
    # When the grant is counted
    effects = group["a"].step(Receive("b", grant), group.now)
    # Then the vote requests of term 1 come with the hard state (1, a)
    assert effects.hard_state == HardState(1, "a")
    assert all(isinstance(m, VoteRequest) and m.term == 1 for _, m in effects.messages)


# ---------------------------------------------------------------------- effects of a turn


def test_merging_a_later_truncation_drops_the_earlier_appends_it_overrides() -> None:
    # Given the effects of one step that appended entries 5..7
    turn = Effects(append=[(5, 1, b"a"), (6, 1, b"b"), (7, 1, b"c")], commit_index=4)
    # When a later step of the same turn truncates from 6 and appends a new 6
    turn.merge(Effects(truncate_from=6, append=[(6, 2, b"B")], commit_index=3))
    # Then the turn writes 5 and the new 6, truncating from 6, and keeps the highest commit index
    assert turn.truncate_from == 6
    assert turn.append == [(5, 1, b"a"), (6, 2, b"B")]
    assert turn.commit_index == 4


def test_merging_keeps_the_latest_hard_state_and_every_message() -> None:
    # Given the effects of two steps of one turn
    turn = Effects(hard_state=HardState(1, None), messages=[("b", TimeoutNow(1, "a"))])
    turn.merge(Effects(hard_state=HardState(1, "a"), messages=[("c", TimeoutNow(1, "a"))], role_changed=True))
    # Then the turn persists the latest hard state and sends both messages
    assert turn.hard_state == HardState(1, "a")
    assert [peer for peer, _ in turn.messages] == ["b", "c"]
    assert turn.role_changed and turn.persist_needed()


# ---------------------------------------------------------------------- what a shell must not assume


def test_a_deposed_leader_can_learn_in_one_turn_that_its_entry_was_replaced_and_committed() -> None:
    # Given a leader a of term 1 that proposed an entry at index 3 nobody received,
    # and b, elected in term 2 meanwhile, whose two pipelined appends to a are delayed together
    group = Group("a", "b", "c")
    group.elect("a")
    group.replicate("a", b"x")
    mine = group.step("a", Propose(b"mine")).proposed_index
    group.queue.clear()
    delayed: list[Sent] = []

    def network(sender: str, receiver: str, message: RaftMessage) -> bool:
        if (sender, receiver) == ("b", "a"):
            delayed.append((sender, receiver, message))
        return "a" in (sender, receiver)

    group.tick("b", after_ms=2 * ELECTION_MS)
    group.settle(drop=network)
    group.step("b", Propose(b"theirs"))
    group.settle(drop=network)
    # When a's next loop turn drains both appends and persists them
    turn = Effects()
    for sender, _, message in delayed:
        if isinstance(message, AppendRequest) and message.entry_terms:
            turn.merge(group["a"].step(Receive(sender, message), group.now))
    turn.merge(group["a"].step(Persisted(group["a"].last_index), group.now))
    # Then in that one turn a stops leading, its entry 3 is replaced by b's, and 3 is committed:
    # a shell must not answer what a proposed at 3 by index alone (it would answer with b's entry)
    assert mine == 3
    assert turn.role_changed and role(group["a"]) is Role.FOLLOWER
    assert turn.truncate_from == 3 and (3, 2, b"") in turn.append
    assert min(group["a"].commit_index, group["a"].persisted_index) >= 3


def test_a_leader_deposed_mid_turn_leaves_appends_of_its_old_term_for_entries_the_turn_replaced() -> None:
    # Given a leader a of term 1 with an entry at index 3 that only it holds
    group = Group("a", "b", "c")
    group.elect("a")
    group.replicate("a", b"x")
    group.step("a", Propose(b"mine"))
    group.queue.clear()
    # When one turn of a takes c's refusal of entry 3 (so a sends it again), then b's append of term 2
    # that replaces entry 3 (b was elected meanwhile)
    turn = group["a"].step(Receive("c", AppendResponse(1, False, 0, 3)), group.now)
    turn.merge(group["a"].step(Receive("b", AppendRequest(2, "b", 2, 1, (2,), 2, (b"",))), group.now))
    # Then the turn's effects hold an append of term 1 carrying entry 3, and b's entry 3 of term 2:
    # a shell filling payloads from the turn's appends (or the log, once written) must check each
    # payload's term, or it sends b's entry as entry 3 of term 1
    stale = [m for _, m in turn.messages if isinstance(m, AppendRequest) and m.term == 1 and m.entry_terms]
    assert [(m.first_index, m.entry_terms) for m in stale] == [(3, (1,))]
    assert turn.truncate_from == 3 and turn.append[-1] == (3, 2, b"")
    assert role(group["a"]) is Role.FOLLOWER
