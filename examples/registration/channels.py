"""The channel both sides share: the web app produces registrations, the worker sends welcome mails."""

from __future__ import annotations

import dataclasses

from client import ChannelDefinition, QueueMessageProcessing


@dataclasses.dataclass
class User:
    """A newly registered user."""

    id: int
    username: str
    email: str


registration: ChannelDefinition[User] = ChannelDefinition(
    "user/registered",
    User,
    process=QueueMessageProcessing.EXACTLY_ONCE,  # a double-submitted form registers once
    deduplication_interval="1h",
    max_attempts=5,
    retry_backoff="1s",
)
