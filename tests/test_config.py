"""Tests for the ``config`` package: parsing units, loading TOML, env overrides, errors, round trips."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pydantic
import pytest

from client.errors import BrokerError
from config import (
    ClusterMember,
    ClusterSettings,
    ConfigError,
    NodeSettings,
    Settings,
    dump_settings_toml,
    load_settings,
    parse_duration,
    parse_size,
)

pytestmark = pytest.mark.timeout(10)

DESIGN_EXAMPLE = """
[node]
id = "n1"
client_endpoint = "tcp://127.0.0.1:7101"   # ROUTER for clients and admin
peer_endpoint   = "tcp://127.0.0.1:7201"   # ROUTER for replication traffic
data_dir = "var/n1"
[cluster]                                  # absent = a cluster of one
nodes = [ { id = "n1", client_endpoint = "tcp://127.0.0.1:7101", peer_endpoint = "tcp://127.0.0.1:7201" },
          { id = "n2", client_endpoint = "tcp://127.0.0.1:7102", peer_endpoint = "tcp://127.0.0.1:7202" },
          { id = "n3", client_endpoint = "tcp://127.0.0.1:7103", peer_endpoint = "tcp://127.0.0.1:7203" } ]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), env=env or {})
    return str(caught.value)


# --- durations and sizes ---------------------------------------------------------------------------


DURATION_FORMS: list[tuple[object, float]] = [("250ms", 0.25), ("1s", 1.0), ("1.5s", 1.5), ("5m", 300.0)]
DURATION_FORMS += [("2h", 7200.0), ("1d", 86400.0), ("90", 90.0), ("100 ms", 0.1), (" 10m ", 600.0)]
DURATION_FORMS += [(3, 3.0), (0.5, 0.5), (0, 0.0), (datetime.timedelta(minutes=2), 120.0)]
SIZE_FORMS: list[tuple[object, int]] = [(512, 512), ("512", 512), ("100B", 100), ("64KiB", 65536)]
SIZE_FORMS += [("16MiB", 16 * 1024**2), ("1GiB", 1024**3), ("10KB", 10_000), ("10MB", 10_000_000)]
SIZE_FORMS += [("1.5 KiB", 1536)]


@pytest.mark.parametrize(("given", "seconds"), DURATION_FORMS)
def test_a_duration_in_any_accepted_form_becomes_seconds(
    given: str | float | datetime.timedelta, seconds: float
) -> None:
    # Given a duration as a number, timedelta or string; When it is parsed; Then it is in seconds.
    assert parse_duration(given) == seconds


@pytest.mark.parametrize("given", ["-1s", -1, "", "   ", "5 weeks", "1x", "abc", True, float("nan"), [1]])
def test_an_invalid_duration_is_refused_naming_the_setting_value_and_units(given: object) -> None:
    # Given a bad duration; When it is parsed; Then the error names the setting, the value and the units.
    with pytest.raises(ValueError) as caught:
        parse_duration(given, name="lease_timeout")  # type: ignore[arg-type]
    message = str(caught.value)
    assert "lease_timeout" in message
    assert repr(given) in message
    assert "ms, s, m, h, d" in message


@pytest.mark.parametrize(("given", "size"), SIZE_FORMS)
def test_a_size_in_any_accepted_form_becomes_bytes(given: str | int, size: int) -> None:
    # Given a size as an int or string; When it is parsed; Then it is in bytes.
    assert parse_size(given) == size


@pytest.mark.parametrize("given", [-1, "-1KiB", "", "12 parsecs", "0.5B", True, 1.5])
def test_an_invalid_size_is_refused_naming_the_setting_value_and_units(given: object) -> None:
    # Given a bad size; When it is parsed; Then the error names the setting, the value and the units.
    with pytest.raises(ValueError) as caught:
        parse_size(given, name="max_batch")  # type: ignore[arg-type]
    assert "max_batch" in str(caught.value)
    assert repr(given) in str(caught.value)
    assert "KiB, MiB, GiB" in str(caught.value)


# --- loading files -----------------------------------------------------------------------------------


def test_no_file_gives_the_documented_defaults() -> None:
    # Given no file and no variables; When settings load; Then every key has its documented default.
    node = load_settings(env={}).node
    assert (node.id, node.client_endpoint, node.peer_endpoint) == (
        "n1",
        "tcp://127.0.0.1:7101",
        "tcp://127.0.0.1:7201",
    )
    assert node.data_dir == Path("var/n1")
    assert (node.session_timeout_s, node.heartbeat_interval_s, node.produce_id_window_s) == (10.0, 1.0, 600.0)
    assert node.max_message_bytes == 16 * 1024 * 1024
    assert (node.fsync, node.log_level, node.log_format, node.metrics_endpoint) == (True, "info", "text", "")


def test_an_empty_file_gives_the_same_settings_as_no_file(tmp_path: Path) -> None:
    # Given an empty file; When it loads; Then the settings equal the defaults and there is no cluster.
    settings = load_settings(write(tmp_path, ""), env={})
    assert settings == load_settings(env={}) == Settings()
    assert settings.cluster is None


def test_the_design_example_loads_as_a_cluster_of_three(tmp_path: Path) -> None:
    # Given the example from DESIGN.md; When it loads; Then the cluster lists n1..n3 with Raft defaults.
    settings = load_settings(write(tmp_path, DESIGN_EXAMPLE), env={})
    assert [member.id for member in settings.members()] == ["n1", "n2", "n3"]
    assert settings.members()[2].peer_endpoint == "tcp://127.0.0.1:7203"
    assert settings.cluster is not None
    assert (settings.cluster.election_timeout_s, settings.cluster.heartbeat_interval_s) == (1.0, 0.1)
    assert settings.cluster.snapshot_threshold_entries == 100_000


def test_without_a_cluster_the_members_are_the_node_alone() -> None:
    # Given settings without [cluster]; When members are asked for; Then the node is the only member.
    settings = Settings(node=NodeSettings(id="solo", client_endpoint="ipc:///tmp/solo-c"))
    assert settings.members() == (
        ClusterMember(id="solo", client_endpoint="ipc:///tmp/solo-c", peer_endpoint="tcp://127.0.0.1:7201"),
    )


def test_durations_and_sizes_in_a_file_accept_strings_and_numbers(tmp_path: Path) -> None:
    # Given units written as strings and plain numbers; When the file loads; Then they are seconds and bytes.
    text = '[node]\nsession_timeout = "1.5s"\nheartbeat_interval = "250ms"\nproduce_id_window = 90\n'
    node = load_settings(write(tmp_path, text + 'max_message_bytes = "64KiB"\n'), env={}).node
    assert (node.session_timeout_s, node.heartbeat_interval_s, node.produce_id_window_s) == (1.5, 0.25, 90.0)
    assert node.max_message_bytes == 65536


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('session_timeout = "5x"', "[node] session_timeout: invalid duration '5x'"),
        ('session_timeout = "2h"', "[node] session_timeout: must be between 100ms and 1h, got 2h"),
        ('heartbeat_interval = "20s"', "heartbeat_interval (20s) must be shorter than session_timeout (10s)"),
        ('max_message_bytes = "1GiB"', "[node] max_message_bytes: must be between 1KiB and 256MiB"),
        ('produce_id_window = "2d"', "[node] produce_id_window: must be between 1s and 1d"),
        ('id = "n 1"', "[node] id: must be 1-64 characters"),
        ('client_endpoint = "tcp://127.0.0.1:0"', "[node] client_endpoint: must look like 'tcp://HOST:PORT'"),
        ('peer_endpoint = "127.0.0.1:7201"', "[node] peer_endpoint: must look like"),
        ('metrics_endpoint = "localhost"', "[node] metrics_endpoint: must be empty (disabled) or look like"),
        ('log_level = "verbose"', "[node] log_level: Input should be 'debug', 'info', 'warning' or 'error'"),
        ("fsync = 3", "[node] fsync:"),
    ],
)
def test_an_invalid_value_is_refused_naming_the_key(tmp_path: Path, line: str, expected: str) -> None:
    # Given one bad [node] value; When the file loads; Then the error names the file and the TOML key.
    message = load_error(tmp_path, f"[node]\n{line}\n")
    assert expected in message
    assert message.startswith(str(tmp_path / "node.toml"))


def test_every_problem_is_reported_on_its_own_line(tmp_path: Path) -> None:
    # Given two bad values; When the file loads; Then the error has one line per problem.
    message = load_error(tmp_path, '[node]\nsession_timeout = "soon"\nlog_format = "xml"\n')
    lines = message.splitlines()
    assert len(lines) == 2
    assert "session_timeout" in lines[0]
    assert "log_format" in lines[1]


def test_an_unknown_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    # Given a misspelt key; When the file loads; Then the error calls it unknown and suggests the real one.
    message = load_error(tmp_path, '[node]\nsesion_timeout = "5s"\n')
    assert "[node] sesion_timeout: unknown key; did you mean 'session_timeout'?" in message


def test_an_unknown_table_is_refused(tmp_path: Path) -> None:
    # Given a table zbroker does not know; When the file loads; Then the error names it.
    assert "nodes: unknown top-level key" in load_error(tmp_path, "[nodes]\n")


def test_a_bad_cluster_member_is_named_by_its_index(tmp_path: Path) -> None:
    # Given the example with n2's peer port out of range; When it loads; Then the error points at nodes[1].
    message = load_error(tmp_path, DESIGN_EXAMPLE.replace("127.0.0.1:7202", "127.0.0.1:99999"))
    assert "[cluster] nodes[1].peer_endpoint: must look like 'tcp://HOST:PORT'" in message


def test_cluster_members_must_have_unique_ids_and_endpoints(tmp_path: Path) -> None:
    # Given two members called n2, then two members sharing an endpoint; When they load; Then both fail.
    assert "member id 'n2' appears more than once" in load_error(
        tmp_path, DESIGN_EXAMPLE.replace('"n3"', '"n2"')
    )
    shared = DESIGN_EXAMPLE.replace("127.0.0.1:7203", "127.0.0.1:7202")
    assert "endpoint 'tcp://127.0.0.1:7202' of member 'n3' is already used by member 'n2'" in load_error(
        tmp_path, shared
    )


def test_a_node_missing_from_its_cluster_is_refused(tmp_path: Path) -> None:
    # Given [node] id n4 with a cluster of n1..n3; When it loads; Then the error says n4 is not a member.
    message = load_error(tmp_path, DESIGN_EXAMPLE.replace('id = "n1"\nclient', 'id = "n4"\nclient'))
    assert "[node] id 'n4' is not one of [cluster] nodes (n1, n2, n3)" in message


def test_a_node_whose_endpoints_differ_from_its_member_entry_is_refused(tmp_path: Path) -> None:
    # Given [node] n1 listening on another peer port than its entry says; When it loads; Then it says which.
    message = load_error(
        tmp_path,
        DESIGN_EXAMPLE.replace(
            'peer_endpoint   = "tcp://127.0.0.1:7201"', 'peer_endpoint = "tcp://127.0.0.1:7299"'
        ),
    )
    assert (
        "[node] peer_endpoint 'tcp://127.0.0.1:7299' differs from [cluster] nodes[0].peer_endpoint" in message
    )


def test_a_missing_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    # Given a path to nothing; When it loads; Then the error names the path.
    with pytest.raises(ConfigError, match=r"nope\.toml: no such configuration file"):
        load_settings(tmp_path / "nope.toml", env={})


def test_a_toml_syntax_error_is_reported_with_its_line(tmp_path: Path) -> None:
    # Given a file with a value missing on line 3; When it loads; Then the error gives the line.
    message = load_error(tmp_path, '[node]\nid = "n1"\ndata_dir =\n')
    assert "invalid TOML" in message
    assert "line 3" in message


# --- environment overrides ---------------------------------------------------------------------------


def test_variables_override_the_file_including_bools_and_durations(tmp_path: Path) -> None:
    # Given a file and ZBROKER_NODE_* variables; When settings load; Then the variables win, typed.
    env = {
        "ZBROKER_NODE_ID": "n7",
        "ZBROKER_NODE_CLIENT_ENDPOINT": "tcp://10.0.0.7:7101",
        "ZBROKER_NODE_DATA_DIR": "/srv/zbroker/n7",
        "ZBROKER_NODE_SESSION_TIMEOUT": "30s",
        "ZBROKER_NODE_FSYNC": "false",
        "ZBROKER_NODE_MAX_MESSAGE_BYTES": "1MiB",
        "ZBROKER_ENDPOINTS": "tcp://elsewhere:1",  # the CLI's variable: not ours, ignored
    }
    node = load_settings(write(tmp_path, '[node]\nid = "n1"\nsession_timeout = "5s"\n'), env=env).node
    assert (node.id, node.client_endpoint, node.data_dir) == (
        "n7",
        "tcp://10.0.0.7:7101",
        Path("/srv/zbroker/n7"),
    )
    assert (node.session_timeout_s, node.fsync, node.max_message_bytes) == (30.0, False, 1024 * 1024)


def test_variables_are_read_from_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given ZBROKER_NODE_LOG_LEVEL in os.environ; When settings load without env; Then it applies.
    monkeypatch.setenv("ZBROKER_NODE_LOG_LEVEL", "debug")
    assert load_settings().node.log_level == "debug"


def test_cluster_variables_set_raft_timing_and_members_from_json() -> None:
    # Given ZBROKER_CLUSTER_* variables with a JSON member list; When settings load; Then they apply.
    members = [
        {"id": "n1", "client_endpoint": "tcp://127.0.0.1:7101", "peer_endpoint": "tcp://127.0.0.1:7201"},
        {"id": "n2", "client_endpoint": "tcp://127.0.0.1:7102", "peer_endpoint": "tcp://127.0.0.1:7202"},
    ]
    env = {"ZBROKER_CLUSTER_NODES": json.dumps(members), "ZBROKER_CLUSTER_ELECTION_TIMEOUT": "2s"}
    settings = load_settings(env=env | {"ZBROKER_CLUSTER_SNAPSHOT_THRESHOLD": "5000"})
    assert [member.id for member in settings.members()] == ["n1", "n2"]
    assert settings.cluster == ClusterSettings(
        nodes=tuple(ClusterMember(**member) for member in members),
        election_timeout_s=2.0,
        snapshot_threshold_entries=5000,
    )


def test_a_bad_override_is_reported_naming_the_variable() -> None:
    # Given a bad duration, then a non-JSON member list; When settings load; Then the variable is named.
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"ZBROKER_NODE_SESSION_TIMEOUT": "soon"})
    message = str(caught.value)
    assert "[node] session_timeout: invalid duration 'soon'" in message
    assert message.endswith("(from ZBROKER_NODE_SESSION_TIMEOUT)")
    with pytest.raises(ConfigError, match="ZBROKER_CLUSTER_NODES: not valid JSON"):
        load_settings(env={"ZBROKER_CLUSTER_NODES": "[n1, n2]"})


def test_an_unknown_variable_is_refused_naming_it() -> None:
    # Given a misspelt ZBROKER_NODE_ variable; When settings load; Then the error names it and the real ones.
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"ZBROKER_NODE_SESION_TIMEOUT": "5s"})
    assert str(caught.value).startswith("ZBROKER_NODE_SESION_TIMEOUT: unknown variable")
    assert "ZBROKER_NODE_SESSION_TIMEOUT" in str(caught.value)


# --- the models and the writer ------------------------------------------------------------------------


def test_models_accept_attribute_names_and_toml_keys_and_are_immutable() -> None:
    # Given the same node built by attribute name and by TOML key; Then they are equal and frozen.
    by_name = NodeSettings(session_timeout_s=5, max_message_bytes="2MiB")  # type: ignore[arg-type]
    assert by_name == NodeSettings.model_validate({"session_timeout": "5s", "max_message_bytes": 2 * 1024**2})
    with pytest.raises(pydantic.ValidationError):
        by_name.__setattr__("id", "n2")
    assert issubclass(ConfigError, BrokerError)


UNUSUAL_NODE = NodeSettings(
    id="n2",
    client_endpoint="tcp://127.0.0.1:7102",
    peer_endpoint="tcp://127.0.0.1:7202",
    data_dir=Path('var/odd "dir"\\n2'),
    session_timeout_s=2.5,
    heartbeat_interval_s=0.25,
    max_message_bytes=10_000,
    produce_id_window_s=3600,
    fsync=False,
    log_level="debug",
    log_format="json",
    metrics_endpoint="127.0.0.1:9102",
)
UNUSUAL_CLUSTER = ClusterSettings(
    nodes=(
        ClusterMember(id="n2", client_endpoint="tcp://127.0.0.1:7102", peer_endpoint="tcp://127.0.0.1:7202"),
    ),
    election_timeout_s=0.0125,  # not a whole number of milliseconds: written as plain seconds
    heartbeat_interval_s=0.001,
    snapshot_threshold_entries=7,
)


@pytest.mark.parametrize("settings", [Settings(), Settings(node=UNUSUAL_NODE, cluster=UNUSUAL_CLUSTER)])
def test_dumped_settings_load_back_equal(tmp_path: Path, settings: Settings) -> None:
    # Given settings; When they are dumped to TOML and loaded again; Then nothing changed.
    text = dump_settings_toml(settings)
    assert load_settings(write(tmp_path, text), env={}) == settings


def test_dumped_durations_and_sizes_are_written_with_units() -> None:
    # Given the defaults with a cluster; When dumped; Then durations and sizes read as people write them.
    text = dump_settings_toml(Settings(cluster=ClusterSettings()))
    for line in ['session_timeout = "10s"', 'produce_id_window = "10m"', 'max_message_bytes = "16MiB"']:
        assert line in text
    assert 'heartbeat_interval = "100ms"' in text.split("[cluster]")[1]
