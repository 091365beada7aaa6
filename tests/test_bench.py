"""scripts/bench stays runnable: a tiny run against one real node prints a row per scenario."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from broker.bench import peer_targets


def test_bench_prints_one_row_per_scenario_with_measured_rates() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "bench", "--messages", "300", "--rounds", "1", "--peers", "none"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| (produce|consume)", line)]
    scenarios = [tuple(cell.strip() for cell in row.strip("|").split("|")[:2]) for row in rows]
    assert scenarios == [
        (scenario, size)
        for size in ("200B", "4KB")
        for scenario in ("produce-1", "produce-100", "consume-ack")
    ]
    for row in rows:
        rate = row.split("|")[3].strip()
        assert re.fullmatch(r"[\d,]+/s", rate) and int(rate[:-2].replace(",", "")) > 0, row


def test_unknown_peer_is_named() -> None:
    with pytest.raises(SystemExit, match="unknown peer 'kafka'"):
        peer_targets("redis,kafka")
    assert peer_targets("none") == []
