"""Streaming a state-machine snapshot (a RocksDB checkpoint) to a follower behind the compacted log.

The leader checkpoints its state database, then sends its files in chunks of ``CHUNK_BYTES`` with a
few in flight, each acknowledged. A last frame carries the manifest (file names and sizes); the
follower checks it against what it stored, and only then hands the Raft core a ``SnapshotRequest``,
which the core accepts or refuses by term like any leader message. Installing swaps the state
database directory (see ``install_state_dir``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.messages import SnapshotRequest

log = logging.getLogger("zbroker.snapshot")

CHUNK_BYTES = 1 << 20
WINDOW_CHUNKS = 4
STALL_TIMEOUT_S = 15.0


@dataclass(slots=True)
class OutgoingSnapshot:
    """One snapshot being streamed to one follower."""

    snapshot_id: str
    peer: str
    term: int
    index: int
    snapshot_term: int
    directory: Path
    files: list[tuple[str, int]]
    file_position: int = 0
    offset: int = 0
    in_flight: int = 0
    manifest_sent: bool = False
    last_progress: float = field(default_factory=time.monotonic)

    def next_frames(self) -> list[dict[str, Any]]:
        """Chunk payloads that may be sent now (window permitting), then the manifest once all are acked."""
        frames: list[dict[str, Any]] = []
        while self.in_flight < WINDOW_CHUNKS and self.file_position < len(self.files):
            name, size = self.files[self.file_position]
            with open(self.directory / name, "rb") as source:
                source.seek(self.offset)
                data = source.read(CHUNK_BYTES)
            frames.append(self._frame(name=name, offset=self.offset, data=data))
            self.in_flight += 1
            self.offset += len(data)
            if self.offset >= size:
                self.file_position += 1
                self.offset = 0
        if self.file_position >= len(self.files) and self.in_flight == 0 and not self.manifest_sent:
            self.manifest_sent = True
            frames.append(self._frame(manifest=[[name, size] for name, size in self.files]))
        return frames

    def _frame(self, **fields: Any) -> dict[str, Any]:
        return {"id": self.snapshot_id, "t": self.term, "x": self.index, "st": self.snapshot_term, **fields}

    def acked(self) -> None:
        """One chunk arrived."""
        self.in_flight = max(0, self.in_flight - 1)
        self.last_progress = time.monotonic()

    def stalled(self) -> bool:
        """No acknowledgement for a long time: give up (the core retries later)."""
        return time.monotonic() - self.last_progress > STALL_TIMEOUT_S


def checkpoint_files(directory: Path) -> list[tuple[str, int]]:
    """(relative name, size) of every file of a checkpoint, in a stable order."""
    return sorted(
        (str(path.relative_to(directory)), path.stat().st_size)
        for path in directory.rglob("*")
        if path.is_file()
    )


class IncomingSnapshot:
    """The follower side: stores chunks in a staging folder and checks the manifest."""

    def __init__(self, staging_root: Path) -> None:
        self.staging_root = staging_root
        self.snapshot_id: str | None = None
        self.directory: Path | None = None
        self.request: SnapshotRequest | None = None

    def receive(self, leader: str, frame: dict[str, Any]) -> SnapshotRequest | None:
        """Store one chunk; returns the request to hand the core once the manifest checks out."""
        snapshot_id = str(frame["id"])
        if snapshot_id != self.snapshot_id:
            self._reset(snapshot_id)
        assert self.directory is not None
        if "manifest" in frame:
            for name, size in frame["manifest"]:
                path = self._path(str(name))
                if not path.exists() or path.stat().st_size != int(size):
                    log.warning(
                        "snapshot %s is incomplete at %s; waiting for the leader to retry", snapshot_id, name
                    )
                    return None
            self.request = SnapshotRequest(int(frame["t"]), leader, int(frame["x"]), int(frame["st"]))
            return self.request
        path = self._path(str(frame["name"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if path.exists() else "wb"
        with open(path, mode) as target:
            target.seek(int(frame["offset"]))
            target.write(bytes(frame["data"]))
        return None

    def _path(self, name: str) -> Path:
        assert self.directory is not None
        path = (self.directory / name).resolve()
        if self.directory.resolve() not in path.parents:
            raise ValueError(f"snapshot file name {name!r} escapes the staging folder")
        return path

    def _reset(self, snapshot_id: str) -> None:
        shutil.rmtree(self.staging_root, ignore_errors=True)
        self.snapshot_id = snapshot_id
        self.directory = self.staging_root / snapshot_id
        self.directory.mkdir(parents=True)
        self.request = None

    def take(self, request: SnapshotRequest) -> Path | None:
        """The staged folder for ``request`` (and forget it), or None when another one is staged."""
        if self.request is None or self.directory is None:
            return None
        if (self.request.index, self.request.snapshot_term) != (request.index, request.snapshot_term):
            return None
        directory = self.directory
        self.snapshot_id, self.directory, self.request = None, None, None
        return directory


def install_state_dir(state_dir: Path, staged: Path) -> None:
    """Replace ``state_dir`` with ``staged``: move the old one aside, the new one in, delete the old."""
    old = state_dir.with_name(state_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(staged, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def recover_state_dir(state_dir: Path) -> None:
    """At start-up: finish an install a crash interrupted (the old folder moved aside, the new not in)."""
    old = state_dir.with_name(state_dir.name + ".old")
    if not state_dir.exists() and old.exists():
        os.replace(old, state_dir)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
