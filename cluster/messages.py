"""Raft messages between nodes, and the events and effects of the sans-I/O core."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Role(Enum):
    """A node's role in its replica group."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class HardState:
    """What Raft must have on disk before it answers: the term and the vote cast in it."""

    term: int
    voted_for: str | None


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """Asks for a vote; ``pre_vote`` asks whether a vote would be granted, without changing terms."""

    term: int
    candidate: str
    last_index: int
    last_term: int
    pre_vote: bool
    transfer: bool = False


@dataclass(frozen=True, slots=True)
class VoteResponse:
    """Answers a (pre-)vote request."""

    term: int
    granted: bool
    pre_vote: bool


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """Entries ``first_index ..`` with their terms (and payloads, filled in by the shell), or a heartbeat."""

    term: int
    leader: str
    prev_index: int
    prev_term: int
    entry_terms: tuple[int, ...]
    commit_index: int
    payloads: tuple[bytes, ...] = ()

    @property
    def first_index(self) -> int:
        """Index of the first entry carried."""
        return self.prev_index + 1


@dataclass(frozen=True, slots=True)
class AppendResponse:
    """Success: the follower matches the leader up to ``match_index``. Failure: retry from ``hint``."""

    term: int
    success: bool
    match_index: int
    hint_index: int


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """The leader's snapshot up to ``index`` has been streamed: install it."""

    term: int
    leader: str
    index: int
    snapshot_term: int


@dataclass(frozen=True, slots=True)
class SnapshotResponse:
    """The follower's log now starts after ``match_index``."""

    term: int
    match_index: int


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leadership transfer: the target starts an election at once."""

    term: int
    leader: str


RaftMessage = (
    VoteRequest
    | VoteResponse
    | AppendRequest
    | AppendResponse
    | SnapshotRequest
    | SnapshotResponse
    | TimeoutNow
)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; timers may fire."""


@dataclass(frozen=True, slots=True)
class Receive:
    """A message arrived from a peer."""

    sender: str
    message: RaftMessage


@dataclass(frozen=True, slots=True)
class Propose:
    """Append a payload to the log (leaders only)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Persisted:
    """Everything up to ``index`` is durably in the local log."""

    index: int


@dataclass(frozen=True, slots=True)
class TransferLeadership:
    """Hand leadership to ``target``."""

    target: str


@dataclass(frozen=True, slots=True)
class SnapshotInstalled:
    """The shell replaced the state machine with the snapshot up to ``index`` (of ``term``)."""

    index: int
    term: int
    members: tuple[str, ...] = ()  # the membership the snapshot carries (empty: unchanged)


@dataclass(frozen=True, slots=True)
class Compacted:
    """The shell deleted log entries up to ``index`` (of ``term``); they are covered by the state machine."""

    index: int
    term: int


@dataclass(frozen=True, slots=True)
class SnapshotFailed:
    """Streaming a snapshot to ``peer`` failed (unreachable, stalled): try again later."""

    peer: str


RaftEvent = (
    Tick | Receive | Propose | Persisted | TransferLeadership | SnapshotInstalled | Compacted | SnapshotFailed
)


# --------------------------------------------------------------------------- effects


@dataclass(slots=True)
class Effects:
    """What the shell must do, in this order: persist (one synced write), send, install, apply."""

    hard_state: HardState | None = None
    truncate_from: int | None = None
    append: list[tuple[int, int, bytes]] = field(default_factory=list)
    messages: list[tuple[str, RaftMessage]] = field(default_factory=list)
    send_snapshot: list[str] = field(default_factory=list)
    install_snapshot: SnapshotRequest | None = None
    commit_index: int = 0
    proposed_index: int | None = None
    role_changed: bool = False
    members_changed: bool = False

    def merge(self, later: Effects) -> None:
        """Fold the effects of a later step into these (a loop turn gathers many steps)."""
        if later.hard_state is not None:
            self.hard_state = later.hard_state
        if later.truncate_from is not None:
            self.append = [entry for entry in self.append if entry[0] < later.truncate_from]
            self.truncate_from = (
                later.truncate_from
                if self.truncate_from is None
                else min(self.truncate_from, later.truncate_from)
            )
        self.append.extend(later.append)
        self.messages.extend(later.messages)
        self.send_snapshot.extend(later.send_snapshot)
        if later.install_snapshot is not None:
            self.install_snapshot = later.install_snapshot
        self.commit_index = max(self.commit_index, later.commit_index)
        if later.proposed_index is not None:
            self.proposed_index = later.proposed_index
        self.role_changed = self.role_changed or later.role_changed
        self.members_changed = self.members_changed or later.members_changed

    def persist_needed(self) -> bool:
        """True when the local log or hard state must be written (and synced) before sending."""
        return self.hard_state is not None or self.truncate_from is not None or bool(self.append)
