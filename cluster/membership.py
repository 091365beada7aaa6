"""Cluster membership as log entries: single-server changes (add or remove one node at a time).

A membership entry's payload is ``MAGIC`` + BSON ``{"members": [[id, client_endpoint, peer_endpoint], ...]}``.
As the Raft thesis prescribes for single-server changes, every node uses the latest membership in its
log as soon as the entry is appended (committed or not), and a leader starts a new change only once
the previous one is committed; any two consecutive memberships then share a majority, so there is
never more than one leader per term. Applied membership is also stored in the state machine, so it
survives compaction and travels with snapshots.
"""

from __future__ import annotations

from typing import Any

import bson

MAGIC = b"\x00ZBCFG"  # no queue entry starts so: a BSON document would have to be ~1.1 GB long

Members = dict[str, tuple[str, str]]
"""Member id -> (client_endpoint, peer_endpoint)."""


def encode_membership(members: Members) -> bytes:
    """The payload of a membership entry."""
    rows = [[member_id, client, peer] for member_id, (client, peer) in sorted(members.items())]
    return MAGIC + bson.encode({"members": rows})


def decode_membership(payload: bytes) -> Members | None:
    """The membership a payload announces, or None when it is a normal entry."""
    if not payload.startswith(MAGIC):
        return None
    doc: dict[str, Any] = bson.decode(payload[len(MAGIC) :])
    return {str(row[0]): (str(row[1]), str(row[2])) for row in doc["members"]}


def member_ids(payload: bytes) -> tuple[str, ...] | None:
    """The member ids a payload announces, or None when it is a normal entry."""
    members = decode_membership(payload)
    return None if members is None else tuple(sorted(members))
