"""Test-side name for the node launcher (kept so tests read naturally)."""

from broker.launcher import NodeProcess, free_port, wait_for_port

__all__ = ["NodeProcess", "free_port", "wait_for_port"]
