"""What a handler receives beside its data, and what a produce returns."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueMessageProcessing(Enum):
    """How a channel treats repeated payloads."""

    AT_LEAST_ONCE = "at_least_once"
    """Every produce is enqueued (produce ids still make retries safe)."""
    EXACTLY_ONCE = "exactly_once"
    """A payload (or ``hash``) already accepted within the deduplication interval is not enqueued again."""


@dataclass(frozen=True, slots=True)
class ProduceResult:
    """The answer to a produce: the message id and whether it was a duplicate (EXACTLY_ONCE)."""

    id: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class QueueMessage(Generic[T]):
    """One delivery of a message to a handler."""

    id: str
    channel: str
    data: T
    attempt: int
    produced_at: datetime.datetime
    seq: int
    lease_token: int
