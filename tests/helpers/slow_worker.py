"""A worker module for shutdown tests: each message takes $SLOW_SECONDS; starts and ends go to $SLOW_LOG."""

from __future__ import annotations

import asyncio
import os

from client import ChannelDefinition, QueueMessage

slow = ChannelDefinition(os.environ.get("SLOW_CHANNEL", "worker/slow"), int)


def _log(line: str) -> None:
    with open(os.environ["SLOW_LOG"], "a", encoding="utf-8") as log:
        log.write(line + "\n")


@slow.consumer(max_parallel=4)
async def take_time(value: int, message: QueueMessage[int]) -> None:
    _log(f"start {value} {message.attempt}")
    await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "1")))
    _log(f"done {value} {message.attempt}")
