"""Running a node in the foreground: logging, signals, clean shutdown."""

from __future__ import annotations

import json
import logging
import signal
import sys
from types import FrameType

from broker.node import Node
from config import Settings


class _JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "node": self.node_id,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    """Log to stderr in the configured format and level, every line naming the node."""
    handler = logging.StreamHandler(sys.stderr)
    node_id = settings.node.id
    if settings.node.log_format == "json":
        handler.setFormatter(_JsonFormatter(node_id))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [{node_id}] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.node.log_level.upper())


def serve(settings: Settings) -> None:
    """Run one node until SIGTERM or SIGINT, then shut down cleanly."""
    configure_logging(settings)
    node: Node | None = None
    stop_requested = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        logging.getLogger("zbroker.node").info("received %s: shutting down", signal.Signals(signum).name)
        stop_requested = True
        if node is not None:
            node.stop()

    # Before the node binds its ports: a SIGTERM that arrives while it starts is still a clean stop.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    node = Node(settings)
    if stop_requested:
        node.stop()
    node.run()
    # Closed cleanly. A later stop signal (Ctrl-C reaches a whole process group, then a launcher may
    # send SIGTERM as well) must not turn this exit into a death by signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
