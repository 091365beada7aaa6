"""Making the log durable off the node's loop: ``fdatasync`` on a thread, completion through a pipe.

The loop writes entries with plain ``os.pwrite`` (the page cache), asks for a sync and goes on serving;
this thread fsyncs every file written since the last request (``os.fdatasync`` releases the GIL, so
the loop keeps running meanwhile) and reports the request's ticket as done. Requests that arrive while
a sync runs are served together by the next one: group commit without a timer. The loop learns of a
completion by polling ``fileno`` (a pipe that gets one byte per finished sync).

An fsync that fails is fatal (after a failed fsync, Linux may have dropped the dirty pages: retrying
would report durable data that is not); the error is raised in the loop at its next ``completed()``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time


class LogSyncError(OSError):
    """Raised when the log could not be made durable: the node must stop and recover from disk."""


class LogSyncer:
    """One thread that fsyncs requested files; tickets count requests, ``done`` the last one synced."""

    def __init__(self, directory_fd: int) -> None:
        self._directory_fd = directory_fd
        self._cond = threading.Condition()
        self._wanted = 0
        self._done = 0
        self._files: set[int] = set()
        self._directory = False
        self._durations: list[float] = []
        self._error: OSError | None = None
        self._closing = False
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._thread = threading.Thread(target=self._run, name="zbroker-log-sync", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        """Readable after a sync finished: for the node's poller."""
        return self._read_fd

    def request(self, ticket: int, files: set[int], directory: bool) -> None:
        """Make ``files`` (and the directory, for new files) durable, then report ``ticket`` done."""
        with self._cond:
            self._wanted = max(self._wanted, ticket)
            self._files |= files
            self._directory = self._directory or directory
            self._cond.notify()

    def completed(self) -> tuple[int, list[float]]:
        """The last ticket synced and how long each sync since the previous call took (seconds)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 4096):
                pass
        with self._cond:
            if self._error is not None:
                raise LogSyncError(self._error.errno, f"fsync of the Raft log failed: {self._error}")
            durations, self._durations = self._durations, []
            return self._done, durations

    def wait(self, ticket: int) -> None:
        """Block until ``ticket`` is synced (the loop is blocked too, so the thread has the GIL at once).

        Leaves the wake-up byte and the durations for ``completed``."""
        with self._cond:
            while self._done < ticket and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise LogSyncError(self._error.errno, f"fsync of the Raft log failed: {self._error}")

    def close(self) -> None:
        """Finish what was requested, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._wanted <= self._done and not self._closing:
                    self._cond.wait()
                if self._wanted <= self._done:
                    return
                ticket, files, directory = self._wanted, self._files, self._directory
                self._files, self._directory = set(), False
            started = time.perf_counter()
            error: OSError | None = None
            try:
                for fd in files:
                    os.fdatasync(fd)
                if directory:
                    os.fsync(self._directory_fd)
            except OSError as exc:
                error = exc
            with self._cond:
                if error is not None:
                    self._error = error
                    self._closing = True
                else:
                    self._done = ticket
                    self._durations.append(time.perf_counter() - started)
                self._cond.notify_all()
            # A full pipe holds wake-ups the loop has not read yet: one more is not needed.
            with contextlib.suppress(BlockingIOError):
                os.write(self._write_fd, b"\0")
            if error is not None:
                return
