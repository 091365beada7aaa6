"""brokerctl: argument parsing and output shapes (CliRunner), against a real node where it talks to one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from broker.cli import ExitCode, app
from broker.launcher import NodeProcess, free_port
from client import BrokerQueue

runner = CliRunner()


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "dev", "status", "queues", "queue", "dlq"):
        assert command in result.output


def test_serve_with_a_missing_config_file_exits_with_the_config_code(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == ExitCode.CONFIG
    assert "nope.toml" in result.output


def test_serve_with_an_invalid_key_names_it(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nsession_timeout = "soon"\n')
    result = runner.invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == ExitCode.CONFIG
    assert "session_timeout" in result.output


def test_status_shows_the_node_as_leader(node: NodeProcess) -> None:
    result = runner.invoke(app, ["status", "-e", node.endpoint])
    assert result.exit_code == 0, result.output
    assert "leader: n1" in result.output
    header, row = result.output.splitlines()[1:3]
    assert header.split()[:3] == ["ID", "ROLE", "TERM"]
    assert row.split()[:2] == ["n1", "leader"]
    as_json = json.loads(runner.invoke(app, ["status", "-e", node.endpoint, "--json"]).output)
    assert as_json["leader"] == "n1" and as_json["nodes"][0]["pid"] == node.pid


def test_an_unreachable_endpoint_exits_with_the_unreachable_code() -> None:
    result = runner.invoke(app, ["queues", "-e", f"tcp://127.0.0.1:{free_port()}"])
    assert result.exit_code == ExitCode.UNREACHABLE
    assert "no zbroker node answered" in result.output


def test_queue_commands_show_counts_and_purge_only_when_confirmed(
    node: NodeProcess, channel_name: str
) -> None:
    async def fill() -> None:
        async with BrokerQueue(node.endpoint) as queue:
            channel = queue.channel(channel_name, dict)
            await asyncio.gather(*(channel.produce({"n": i}) for i in range(5)))

    asyncio.run(fill())
    queues = json.loads(runner.invoke(app, ["queues", "-e", node.endpoint, "--json"]).output)
    (mine,) = [row for row in queues if row["channel"] == channel_name]
    assert mine["ready"] == 5
    peek = json.loads(
        runner.invoke(app, ["queue", "peek", channel_name, "-n", "2", "-e", node.endpoint, "--json"]).output
    )
    assert [message["data"] for message in peek] == [{"n": 0}, {"n": 1}]
    # Declining the confirmation purges nothing
    declined = runner.invoke(app, ["queue", "purge", channel_name, "-e", node.endpoint], input="n\n")
    assert declined.exit_code == ExitCode.FAILURE
    stats = json.loads(
        runner.invoke(app, ["queue", "stats", channel_name, "-e", node.endpoint, "--json"]).output
    )
    assert stats["ready"] == 5
    # --yes purges
    purged = runner.invoke(app, ["queue", "purge", channel_name, "-e", node.endpoint, "--yes"])
    assert purged.exit_code == 0 and "purged 5 messages" in purged.output
    missing = runner.invoke(app, ["queue", "stats", "no/such/queue", "-e", node.endpoint])
    assert missing.exit_code == ExitCode.NOT_FOUND


def test_sigterm_shuts_a_node_down_cleanly(tmp_path: Path) -> None:
    process = NodeProcess(tmp_path).start()
    assert process.stop() == 0
    assert "stopped" in process.log_text()
