"""A worker process for crash tests: consumes a channel and reports each delivery on stdout.

    python -m tests.helpers.worker ENDPOINT CHANNEL SESSION_TIMEOUT MODE

MODE "hang": never finish a handler (the test SIGKILLs us mid-handling).
MODE "ack": handle and ack every message.
"""

from __future__ import annotations

import asyncio
import sys

from client import BrokerQueue, QueueMessage


async def main(endpoint: str, channel_name: str, session_timeout: str, mode: str) -> None:
    async with BrokerQueue(endpoint, session_timeout=session_timeout) as queue:
        channel = queue.channel(channel_name, int)

        async def handler(value: int, message: QueueMessage[int]) -> None:
            print(f"handling {message.id} {message.attempt} {value}", flush=True)
            if mode == "hang":
                await asyncio.Event().wait()

        await channel.consume(handler, max_parallel=4)
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
