"""A short chaos run (``scripts/chaos`` for longer ones): random SIGKILLs, restarts, isolations,
partitions and one-way cuts under a full-speed producer and two consumers; nothing acknowledged may
be lost and nothing enqueued twice. ``ZBROKER_CHAOS_SEED`` replays a schedule; run with ``-s`` to
see the faults and the figures.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.workload import run_chaos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CHAOS_S = 40.0


async def test_forty_seconds_of_random_faults_lose_no_acknowledged_message_and_enqueue_none_twice(
    tmp_path: Path,
) -> None:
    # Given a 3-node cluster under a full-speed producer and two consumers
    seed = int(os.environ.get("ZBROKER_CHAOS_SEED", "20261203"))
    print(f"\n== chaos for {CHAOS_S:g}s, seed {seed}")
    # When random faults hit it for 40 s, then everything is healed and the queue drained
    report, chaos = await run_chaos(tmp_path, CHAOS_S, seed=seed, say=print)
    print(f"faults injected        {sum(chaos.faults.values())} {dict(sorted(chaos.faults.items()))}")
    print(report.summary())
    # Then every acknowledged value was consumed and none was enqueued twice
    assert not report.problems(), f"{report.problems()}\n{report.summary()}"
    assert sum(chaos.faults.values()) >= 5
    assert report.acknowledged > 10_000
