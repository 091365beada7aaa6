"""The leader's choices: which messages to lease to whom, and which timers have fired.

Consumer sessions and their subscriptions are the leader's soft state (clients re-attach after a
failover); the leases they hold are hard state in ``QueueState``. Each loop turn the node asks
``plan(now_ms)`` for commands; everything proposed but not yet applied is remembered as pending, so
the same message is never proposed twice and credit freed by an ack in this turn is usable at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from broker import keys as k
from broker.commands import (
    AckCmd,
    ExpireCmd,
    ExpireDedupCmd,
    LeaseCmd,
    LogCommand,
    NackCmd,
    PromoteCmd,
)
from broker.keys import Cf
from broker.protocol import LeaseRef, NackItem
from broker.queue_state import ChannelState, QueueState, session_key

PROMOTE_BATCH = 1000
MAX_GONE_REMEMBERED = 10_000
DEDUP_SWEEP_INTERVAL_MS = 1000


@dataclass(slots=True)
class Subscription:
    """A consumer: a channel and its credit and retry policy, within one session."""

    session: bytes
    subscription_id: int
    channel: str
    max_parallel: int
    max_attempts: int
    retry_backoff_ms: int
    retry_backoff_max_ms: int
    processing_timeout_ms: int


@dataclass(slots=True)
class Session:
    """A client connection that may hold leases; dead after ``timeout_ms`` of silence."""

    session: bytes
    routing_id: bytes | None
    timeout_ms: int
    last_seen_ms: int
    subscriptions: dict[int, Subscription] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending:
    ready_keys: list[bytes] = field(default_factory=list)
    delayed_keys: list[bytes] = field(default_factory=list)
    settled: list[int] = field(default_factory=list)
    granted: list[tuple[tuple[bytes, int], int]] = field(default_factory=list)


class Scheduler:
    """Decides lease grants, promotions and expiries from the applied state and the live sessions."""

    def __init__(self, state: QueueState, *, default_session_timeout_ms: int) -> None:
        self.state = state
        self.default_session_timeout_ms = default_session_timeout_ms
        self.sessions: dict[bytes, Session] = {}
        self.by_routing_id: dict[bytes, Session] = {}
        self._subscribers: dict[str, list[Subscription]] = {}
        self._pending: dict[int, _Pending] = {}
        self._turn = _Pending()
        self._pending_ready: set[bytes] = set()
        self._pending_delayed: set[bytes] = set()
        self._pending_settled: dict[int, tuple[bytes, int]] = {}
        self._settling: dict[tuple[bytes, int], int] = {}
        self._granting: dict[tuple[bytes, int], int] = {}
        # Sessions that closed or expired here: a lease granted to one of them just before is released.
        self._gone: set[bytes] = set()
        self._next_dedup_sweep_ms = 0

    # ------------------------------------------------------------------ sessions

    def adopt_leased_sessions(self, now_ms: int) -> None:
        """Give every session that holds leases but is not attached a grace period to re-attach."""
        for session in self.state.session_leases:
            if session not in self.sessions:
                self.sessions[session] = Session(session, None, self.default_session_timeout_ms, now_ms)

    def attach(self, routing_id: bytes, timeout_ms: int, now_ms: int) -> Session:
        """Open or re-attach the session of ``routing_id``."""
        key = session_key(routing_id)
        self._gone.discard(key)
        session = self.sessions.get(key)
        if session is None:
            session = Session(key, routing_id, timeout_ms, now_ms)
            self.sessions[key] = session
        session.routing_id = routing_id
        session.timeout_ms = timeout_ms
        session.last_seen_ms = now_ms
        self.by_routing_id[routing_id] = session
        return session

    def touch(self, routing_id: bytes, now_ms: int) -> Session | None:
        """Note traffic from a session; None when the routing id has no session here."""
        session = self.by_routing_id.get(routing_id)
        if session is not None:
            session.last_seen_ms = now_ms
        return session

    def subscribe(self, session: Session, subscription: Subscription) -> None:
        """Add or replace a subscription of a session."""
        self.unsubscribe(session, subscription.subscription_id)
        session.subscriptions[subscription.subscription_id] = subscription
        self._subscribers.setdefault(subscription.channel, []).append(subscription)

    def unsubscribe(self, session: Session, subscription_id: int) -> bool:
        """Remove a subscription; its leases stay until settled. False when it did not exist."""
        old = session.subscriptions.pop(subscription_id, None)
        if old is None:
            return False
        subscribers = self._subscribers[old.channel]
        subscribers.remove(old)
        if not subscribers:
            del self._subscribers[old.channel]
        return True

    def close(self, session: Session) -> NackCmd | None:
        """End a session at its request: its leases are released for immediate redelivery."""
        self._drop(session)
        self._remember_gone(session.session)
        refs = [ref for ref in self.state.leases_of(session.session) if ref.seq not in self._pending_settled]
        if not refs:
            return None
        command = NackCmd(tuple(NackItem(ref.seq, ref.lease_token, True, "session closed") for ref in refs))
        self.note_settle(command)
        return command

    def _remember_gone(self, key: bytes) -> None:
        if len(self._gone) >= MAX_GONE_REMEMBERED:
            self._gone.clear()
        self._gone.add(key)

    def _drop(self, session: Session) -> None:
        for subscription_id in list(session.subscriptions):
            self.unsubscribe(session, subscription_id)
        self.sessions.pop(session.session, None)
        if session.routing_id is not None and self.by_routing_id.get(session.routing_id) is session:
            del self.by_routing_id[session.routing_id]

    def reset_sessions(self) -> None:
        """Forget every session and subscription: this node no longer leads, clients move on."""
        self.sessions.clear()
        self.by_routing_id.clear()
        self._subscribers.clear()
        self.forget_pending()

    def consumers_of(self, channel: str) -> int:
        """How many subscriptions consume a channel."""
        return len(self._subscribers.get(channel, ()))

    # ------------------------------------------------------------------ pending bookkeeping

    def note_settle(self, command: AckCmd | NackCmd | ExpireCmd) -> None:
        """Record acks/nacks/expiries proposed this turn so their credit is usable at once."""
        refs: Iterable[LeaseRef | NackItem] = command.items if isinstance(command, NackCmd) else command.refs
        for ref in refs:
            lease = self.state.leases.get(ref.seq)
            if (
                lease is not None
                and lease.lease_token == ref.lease_token
                and ref.seq not in self._pending_settled
            ):
                owner = (lease.session, lease.subscription_id)
                self._pending_settled[ref.seq] = owner
                self._settling[owner] = self._settling.get(owner, 0) + 1
                self._turn.settled.append(ref.seq)

    def proposed(self, index: int) -> None:
        """The commands of this turn went into log entry ``index``."""
        self._pending[index] = self._turn
        self._turn = _Pending()

    def applied(self, index: int) -> None:
        """Log entry ``index`` was applied: what it proposed is no longer pending."""
        pending = self._pending.pop(index, None)
        if pending is None:
            return
        self._pending_ready.difference_update(pending.ready_keys)
        self._pending_delayed.difference_update(pending.delayed_keys)
        for owner, count in pending.granted:
            left = self._granting[owner] - count
            if left:
                self._granting[owner] = left
            else:
                del self._granting[owner]
        for seq in pending.settled:
            owner = self._pending_settled.pop(seq, None)  # type: ignore[arg-type]
            if owner is not None:
                left = self._settling[owner] - 1
                if left:
                    self._settling[owner] = left
                else:
                    del self._settling[owner]

    def forget_pending(self) -> None:
        """Leadership was lost: nothing proposed by this node will be applied as planned."""
        self._pending.clear()
        self._turn = _Pending()
        self._pending_ready.clear()
        self._pending_delayed.clear()
        self._pending_settled.clear()
        self._settling.clear()
        self._granting.clear()

    # ------------------------------------------------------------------ planning

    def plan(self, now_ms: int) -> list[LogCommand]:
        """Commands for timers that fired and for consumers with free credit."""
        commands: list[LogCommand] = []
        commands.extend(self._expire_sessions(now_ms))
        overdue = [ref for ref in self.state.overdue_leases(now_ms) if ref.seq not in self._pending_settled]
        if overdue:
            command = ExpireCmd(tuple(overdue), "processing timeout")
            self.note_settle(command)
            commands.append(command)
        for channel in self.state.channels.values():
            if channel.delayed:
                promote = self._promote(channel, now_ms)
                if promote is not None:
                    commands.append(promote)
        if now_ms >= self._next_dedup_sweep_ms:
            self._next_dedup_sweep_ms = now_ms + DEDUP_SWEEP_INTERVAL_MS
            first = self.state.store.first_key(Cf.DEDUP_EXPIRY, b"", k.END)
            if first is not None and k.split_dedup_expiry_key(first)[0] <= now_ms:
                commands.append(ExpireDedupCmd(now_ms))
        for name, subscribers in self._subscribers.items():
            subscribed = self.state.channels.get(name)
            if subscribed is not None and subscribed.ready:
                commands.extend(self._grant(subscribed, subscribers))
        return commands

    def next_timer_ms(self, now_ms: int) -> int:
        """When ``plan`` should run next at the latest, even with no traffic."""
        wake = now_ms + 100
        for channel in self.state.channels.values():
            if channel.delayed and channel.next_due_ms is not None:
                wake = min(wake, channel.next_due_ms)
        return wake

    def has_work(self) -> bool:
        """True when a consumer has credit and its channel has unleased ready messages."""
        for name, subscribers in self._subscribers.items():
            channel = self.state.channels.get(name)
            if channel is None or channel.ready <= len(self._pending_ready):
                continue
            if any(self._credit(sub) > 0 for sub in subscribers):
                return True
        return False

    def _expire_sessions(self, now_ms: int) -> list[LogCommand]:
        expired: list[bytes] = []
        for session in list(self.sessions.values()):
            if now_ms - session.last_seen_ms > session.timeout_ms:
                self._drop(session)
                self._remember_gone(session.session)
                expired.append(session.session)
        commands: list[LogCommand] = []
        for key in expired:
            refs = [ref for ref in self.state.leases_of(key) if ref.seq not in self._pending_settled]
            if refs:
                command = ExpireCmd(tuple(refs), "session expired")
                self.note_settle(command)
                commands.append(command)
        # Leases applied for a session this leader does not know. If the session closed or expired here
        # before the grant was applied, nobody received it: release it without counting an attempt.
        # Otherwise a previous leader may have delivered it (it applied the grant before this node did):
        # the session gets the usual grace to re-attach, as at a failover; its leases expire after that.
        orphans: list[LeaseRef] = []
        for key in list(self.state.session_leases):
            if key in self.sessions or key in expired:
                continue
            if key in self._gone:
                orphans.extend(
                    ref for ref in self.state.leases_of(key) if ref.seq not in self._pending_settled
                )
            else:
                self.sessions[key] = Session(key, None, self.default_session_timeout_ms, now_ms)
        if orphans:
            release = NackCmd(
                tuple(NackItem(ref.seq, ref.lease_token, True, "session gone") for ref in orphans)
            )
            self.note_settle(release)
            commands.append(release)
        return commands

    def _promote(self, channel: ChannelState, now_ms: int) -> PromoteCmd | None:
        start, end = k.chan_range(channel.chan_id)
        if channel.next_due_ms is None:
            first = self.state.store.first_key(Cf.DELAYED, start, end)
            channel.next_due_ms = k.unpack_delayed_key(first)[1] if first is not None else None
        if channel.next_due_ms is None or channel.next_due_ms > now_ms:
            return None
        due = [
            key
            for key, _ in self.state.store.scan(
                Cf.DELAYED, start, k.delayed_key(channel.chan_id, now_ms + 1, 0), PROMOTE_BATCH
            )
            if key not in self._pending_delayed
        ]
        if not due:
            return None
        self._pending_delayed.update(due)
        self._turn.delayed_keys.extend(due)
        return PromoteCmd(tuple(due))

    def _credit(self, sub: Subscription) -> int:
        owner = (sub.session, sub.subscription_id)
        inflight = self.state.inflight_of(sub.session, sub.subscription_id) + self._granting.get(owner, 0)
        return sub.max_parallel - inflight + self._settling.get(owner, 0)

    def _grant(self, channel: ChannelState, subscribers: list[Subscription]) -> list[LeaseCmd]:
        credits = [(sub, self._credit(sub)) for sub in subscribers]
        credits = [(sub, credit) for sub, credit in credits if credit > 0]
        if not credits:
            return []
        head = channel.head
        wanted = sum(credit for _, credit in credits)
        available = [key for key in head.keys if key not in self._pending_ready]
        if len(available) < wanted and not head.complete:
            head.refill(self.state.store)
            available = [key for key in head.keys if key not in self._pending_ready]
        if not available:
            return []
        # Rotate so competing consumers take turns being first.
        subscribers.append(subscribers.pop(0))
        grants: dict[int, list[bytes]] = {}
        position = 0
        while position < len(available) and credits:
            still: list[tuple[Subscription, int]] = []
            for sub, credit in credits:
                if position >= len(available):
                    break
                grants.setdefault(id(sub), []).append(available[position])
                position += 1
                if credit > 1:
                    still.append((sub, credit - 1))
            credits = still
        commands: list[LeaseCmd] = []
        by_id = {id(sub): sub for sub in subscribers}
        for sub_key, keys in grants.items():
            sub = by_id[sub_key]
            self._pending_ready.update(keys)
            self._turn.ready_keys.extend(keys)
            owner = (sub.session, sub.subscription_id)
            self._granting[owner] = self._granting.get(owner, 0) + len(keys)
            self._turn.granted.append((owner, len(keys)))
            commands.append(
                LeaseCmd(
                    sub.session,
                    sub.subscription_id,
                    sub.max_attempts,
                    sub.retry_backoff_ms,
                    sub.retry_backoff_max_ms,
                    sub.processing_timeout_ms,
                    tuple(keys),
                )
            )
        return commands
