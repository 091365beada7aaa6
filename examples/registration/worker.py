"""The worker app: ``brokerctl worker examples.registration.worker``.

Sends the welcome mail for every registration. Here "sending" appends a line to the file named by
``$WELCOME_LOG`` (or prints it), so a test can see what was sent and how often.
"""

from __future__ import annotations

import os

from client import QueueMessage
from examples.registration.channels import User, registration


@registration.consumer(max_parallel=8)
async def send_welcome(user: User, message: QueueMessage[User]) -> None:
    """Send one welcome mail; raising here would retry the message later."""
    line = f"welcome {user.id} {user.username} <{user.email}> message={message.id} attempt={message.attempt}"
    target = os.environ.get("WELCOME_LOG")
    if target is None:
        print(line, flush=True)
        return
    with open(target, "a", encoding="utf-8") as log:
        log.write(line + "\n")
