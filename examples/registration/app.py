"""The producer side, as a web app would do it (blocking client, e.g. in a WSGI view).

    ZBROKER_ENDPOINTS=tcp://127.0.0.1:7101,tcp://127.0.0.1:7102,tcp://127.0.0.1:7103 \\
        python -m examples.registration.app 1 alice alice@example.com

Registering the same user twice within the deduplication interval enqueues it once.
"""

from __future__ import annotations

import os
import sys

from client.sync import BrokerQueue
from examples.registration.channels import User, registration

DEFAULT_ENDPOINTS = "tcp://127.0.0.1:7101,tcp://127.0.0.1:7102,tcp://127.0.0.1:7103"


def register(queue: BrokerQueue, user: User) -> bool:
    """Publish a registration; False when it was a duplicate of one already accepted."""
    result = queue.channel(registration).produce(user)
    return not result.duplicate


def main(argv: list[str]) -> int:
    """``app.py ID USERNAME EMAIL``: register one user and say whether it was new."""
    if len(argv) != 3:
        print("usage: python -m examples.registration.app ID USERNAME EMAIL", file=sys.stderr)
        return 2
    user = User(id=int(argv[0]), username=argv[1], email=argv[2])
    with BrokerQueue(os.environ.get("ZBROKER_ENDPOINTS", DEFAULT_ENDPOINTS)) as queue:
        new = register(queue, user)
    print(f"registered {user.username}" if new else f"{user.username} was already registered")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
