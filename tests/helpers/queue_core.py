"""Small helpers shared by the unit tests of the pure queue core (``tests/test_queue_state_*.py``).

They build produce items, consumers and a mixed channel on a ``tests.helpers.simulation.Core``, and
read back what a lease names and what a channel counts. All times are milliseconds from ``T0``.
"""

from __future__ import annotations

from typing import Any

import bson

from broker.protocol import LeaseRef, NackItem, ProduceItem
from broker.queue_state import Leased
from broker.scheduler import Session
from tests.helpers.simulation import Core

T0 = 1_000_000
CH = "jobs"


def item(
    produce_id: str,
    channel: str = CH,
    *,
    body: bytes | None = None,
    priority: int = 0,
    delay_ms: int = 0,
    dedup_ms: int = 0,
    dedup_hash: bytes | None = None,
) -> ProduceItem:
    """A produce item whose body names its produce id unless given."""
    if body is None:
        body = bson.encode({"id": produce_id})
    return ProduceItem(produce_id, channel, body, priority, delay_ms, dedup_ms, dedup_hash)


def message_id(core: Core, lease: Leased) -> str:
    """The id of the message a lease is for."""
    record = core.state.message(lease.chan_id, lease.seq)
    assert record is not None
    return record[2]


def ref(lease: Leased) -> LeaseRef:
    """The reference an ack or nack of ``lease`` names."""
    return LeaseRef(lease.seq, lease.lease_token)


def consumer(core: Core, now_ms: int, name: bytes = b"w1", **options: int) -> Session:
    """A session with one subscription (id 1) on ``CH``."""
    session = core.attach(name, now_ms)
    core.subscribe(session, 1, CH, **options)
    return session


def drain_one_at_a_time(core: Core, now_ms: int, name: bytes = b"w1") -> list[str]:
    """Lease and ack every message through a max_parallel=1 consumer; the ids in delivery order."""
    order: list[str] = []
    acks: list[LeaseRef] = []
    for _ in range(10_000):
        core.scheduler.touch(name, now_ms)
        leased = core.turn(now_ms, acks=acks).leased
        if not leased:
            if not acks:
                return order
            acks = []
            continue
        assert len(leased) == 1
        order.append(message_id(core, leased[0]))
        acks = [ref(leased[0])]
    raise AssertionError("the queue never drained")


def stats(core: Core, channel: str = CH) -> dict[str, Any]:
    """The counters of a channel."""
    return core.state.channels[channel].stats()


def mixed_channel(core: Core) -> dict[str, Leased]:
    """3 ready, 2 delayed, 1 in flight, 1 dead on CH, and 1 ready on 'other'."""
    core.turn(T0, produce=[item("dead"), item("flight")])
    consumer(core, T0, max_parallel=2, max_attempts=1)
    dead, flight = core.turn(T0 + 1).leased
    core.turn(T0 + 2, nacks=[NackItem(dead.seq, dead.lease_token, False, "bad")])
    core.scheduler.unsubscribe(core.scheduler.sessions[b"w1".ljust(16, b"\x00")], 1)
    core.turn(
        T0 + 3,
        produce=[
            item("r1"),
            item("r2", priority=3),
            item("r3"),
            item("d1", delay_ms=1000),
            item("d2", delay_ms=5),
            item("o1", "other"),
        ],
    )
    return {"dead": dead, "flight": flight}
