"""The validated shape of a node's configuration: ``[node]`` and the optional ``[cluster]``.

Attribute names carry the unit (``session_timeout_s``); where they differ from the TOML key
(``session_timeout``) the key is the field's validation and serialization alias. Not ``alias``:
that would make mypy expect the TOML key in ``__init__``, and Python code uses attribute names.
Models accept either spelling and are immutable once built.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from config.durations import format_duration, format_size, parse_duration, parse_size

__all__ = ["ClusterMember", "ClusterSettings", "NodeSettings", "Settings", "Unit"]


class Unit(enum.Enum):
    """The unit a numeric field is written in, so ``dump_settings_toml`` can write it back."""

    SECONDS = "seconds"
    BYTES = "bytes"


_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
_TCP_ENDPOINT = re.compile(rf"tcp://{_HOST}:(?P<port>\d{{1,5}})")
_HOST_PORT = re.compile(rf"{_HOST}:(?P<port>\d{{1,5}})")


def _check_node_id(value: str) -> str:
    if _NODE_ID.fullmatch(value) is None:
        raise ValueError(f"must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-', got {value!r}")
    return value


def _port_ok(match: re.Match[str] | None) -> bool:
    return match is not None and 1 <= int(match["port"]) <= 65535


def _check_endpoint(value: str) -> str:
    if value.startswith("ipc://") and len(value) > len("ipc://"):
        return value
    if not _port_ok(_TCP_ENDPOINT.fullmatch(value)):
        raise ValueError(f"must look like 'tcp://HOST:PORT' (port 1-65535) or 'ipc://PATH', got {value!r}")
    return value


def _check_metrics_endpoint(value: str) -> str:
    if value and not _port_ok(_HOST_PORT.fullmatch(value)):
        raise ValueError(f"must be empty (disabled) or look like 'HOST:PORT' (port 1-65535), got {value!r}")
    return value


def _check_data_dir(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must name a directory, got an empty string")
    return value


def _seconds(value: Any) -> float:
    return parse_duration(value)


def _bytes(value: Any) -> int:
    return parse_size(value)


def _between_s(low_s: float, high_s: float) -> Callable[[float], float]:
    def check(seconds: float) -> float:
        if not low_s <= seconds <= high_s:
            raise ValueError(
                f"must be between {format_duration(low_s)} and {format_duration(high_s)}, "
                f"got {format_duration(seconds)}"
            )
        return seconds

    return check


def _between_bytes(low: int, high: int) -> Callable[[int], int]:
    def check(size: int) -> int:
        if not low <= size <= high:
            raise ValueError(
                f"must be between {format_size(low)} and {format_size(high)}, got {format_size(size)}"
            )
        return size

    return check


_NodeId = Annotated[str, AfterValidator(_check_node_id)]
_Endpoint = Annotated[str, AfterValidator(_check_endpoint)]
_SessionTimeout = Annotated[
    float, Unit.SECONDS, BeforeValidator(_seconds), AfterValidator(_between_s(0.1, 3600))
]
_NodeHeartbeat = Annotated[
    float, Unit.SECONDS, BeforeValidator(_seconds), AfterValidator(_between_s(0.05, 60))
]
_ProduceIdWindow = Annotated[
    float, Unit.SECONDS, BeforeValidator(_seconds), AfterValidator(_between_s(1, 86400))
]
_ElectionTimeout = Annotated[
    float, Unit.SECONDS, BeforeValidator(_seconds), AfterValidator(_between_s(0.01, 3600))
]
_RaftHeartbeat = Annotated[
    float, Unit.SECONDS, BeforeValidator(_seconds), AfterValidator(_between_s(0.001, 60))
]
_MessageBytes = Annotated[
    int, Unit.BYTES, BeforeValidator(_bytes), AfterValidator(_between_bytes(1024, 256 * 1024**2))
]

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)


class NodeSettings(BaseModel):
    """The ``[node]`` table: who this node is, where it listens and how it behaves."""

    model_config = _MODEL_CONFIG

    id: _NodeId = "n1"
    client_endpoint: _Endpoint = "tcp://127.0.0.1:7101"
    peer_endpoint: _Endpoint = "tcp://127.0.0.1:7201"
    data_dir: Annotated[Path, BeforeValidator(_check_data_dir)] = Path("var/n1")
    session_timeout_s: _SessionTimeout = Field(
        default=10.0, validation_alias="session_timeout", serialization_alias="session_timeout"
    )
    heartbeat_interval_s: _NodeHeartbeat = Field(
        default=1.0, validation_alias="heartbeat_interval", serialization_alias="heartbeat_interval"
    )
    max_message_bytes: _MessageBytes = 16 * 1024**2
    # How long produce ids are remembered, so a producer's retry within it is not stored twice.
    produce_id_window_s: _ProduceIdWindow = Field(
        default=600.0, validation_alias="produce_id_window", serialization_alias="produce_id_window"
    )
    fsync: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    metrics_endpoint: Annotated[str, AfterValidator(_check_metrics_endpoint)] = ""

    @model_validator(mode="after")
    def _check_timing_and_endpoints(self) -> Self:
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError(
                f"heartbeat_interval ({format_duration(self.heartbeat_interval_s)}) must be shorter "
                f"than session_timeout ({format_duration(self.session_timeout_s)})"
            )
        if self.client_endpoint == self.peer_endpoint:
            raise ValueError(
                f"client_endpoint and peer_endpoint must differ, both are {self.client_endpoint!r}"
            )
        return self


class ClusterMember(BaseModel):
    """One entry of ``[cluster] nodes``: a node's id and the endpoints the others reach it on."""

    model_config = _MODEL_CONFIG

    id: _NodeId
    client_endpoint: _Endpoint
    peer_endpoint: _Endpoint


class ClusterSettings(BaseModel):
    """The ``[cluster]`` table: the members of the group and the Raft timing."""

    model_config = _MODEL_CONFIG

    # Empty means a cluster of one made from [node], so [cluster] may tune Raft without listing nodes.
    nodes: tuple[ClusterMember, ...] = ()
    election_timeout_s: _ElectionTimeout = Field(
        default=1.0, validation_alias="election_timeout", serialization_alias="election_timeout"
    )
    heartbeat_interval_s: _RaftHeartbeat = Field(
        default=0.1, validation_alias="heartbeat_interval", serialization_alias="heartbeat_interval"
    )
    snapshot_threshold_entries: int = Field(
        default=100_000, ge=1, validation_alias="snapshot_threshold", serialization_alias="snapshot_threshold"
    )

    @field_validator("nodes")
    @classmethod
    def _check_unique(cls, nodes: tuple[ClusterMember, ...]) -> tuple[ClusterMember, ...]:
        ids: set[str] = set()
        endpoints: dict[str, str] = {}
        for member in nodes:
            if member.id in ids:
                raise ValueError(f"member id {member.id!r} appears more than once")
            ids.add(member.id)
            for endpoint in (member.client_endpoint, member.peer_endpoint):
                if endpoint in endpoints:
                    raise ValueError(
                        f"endpoint {endpoint!r} of member {member.id!r} "
                        f"is already used by member {endpoints[endpoint]!r}"
                    )
                endpoints[endpoint] = member.id
        return nodes

    @model_validator(mode="after")
    def _check_timing(self) -> Self:
        if self.heartbeat_interval_s >= self.election_timeout_s:
            raise ValueError(
                f"heartbeat_interval ({format_duration(self.heartbeat_interval_s)}) must be shorter "
                f"than election_timeout ({format_duration(self.election_timeout_s)})"
            )
        return self


class Settings(BaseModel):
    """A node's whole configuration: its ``[node]`` table and the optional ``[cluster]``."""

    model_config = _MODEL_CONFIG

    node: NodeSettings = Field(default_factory=NodeSettings)
    cluster: ClusterSettings | None = None

    @model_validator(mode="after")
    def _check_node_in_cluster(self) -> Self:
        if self.cluster is None or not self.cluster.nodes:
            return self
        listed = {member.id: (index, member) for index, member in enumerate(self.cluster.nodes)}
        if self.node.id not in listed:
            raise ValueError(
                f"[node] id {self.node.id!r} is not one of [cluster] nodes ({', '.join(listed)}); "
                "add it to nodes or change [node] id"
            )
        index, member = listed[self.node.id]
        for key in ("client_endpoint", "peer_endpoint"):
            mine, theirs = getattr(self.node, key), getattr(member, key)
            if mine != theirs:
                raise ValueError(
                    f"[node] {key} {mine!r} differs from [cluster] nodes[{index}].{key} {theirs!r} "
                    f"for member {member.id!r}; they must be equal"
                )
        return self

    def members(self) -> tuple[ClusterMember, ...]:
        """Return the cluster's members, or this node alone when there is no ``[cluster] nodes``."""
        if self.cluster is not None and self.cluster.nodes:
            return self.cluster.nodes
        node = self.node
        return (
            ClusterMember(id=node.id, client_endpoint=node.client_endpoint, peer_endpoint=node.peer_endpoint),
        )
