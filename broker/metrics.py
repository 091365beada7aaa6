"""Prometheus metrics of a node, served over HTTP on ``[node] metrics_endpoint`` ("HOST:PORT").

Queue counters and depths, Raft progress and the frame counters are read from the node at scrape
time (a collector), so the loop pays nothing for them; latencies are histograms the loop observes
once per request or per write, not per message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from broker.node import Node

log = logging.getLogger("zbroker.metrics")

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_CHANNEL_COUNTERS = (
    ("produced", "produced_total", "Messages enqueued (duplicates excluded)."),
    ("delivered", "delivered_total", "Deliveries (leases granted), redeliveries included."),
    ("acked", "acked_total", "Messages acknowledged by a consumer (and deleted)."),
    ("nacked", "nacked_total", "Failed handlings reported by consumers."),
    ("dead_lettered", "dead_total", "Messages moved to the dead letters."),
    ("lease_expired", "expired_total", "Leases that ended because a session died or a deadline passed."),
    ("duplicates", "duplicates_total", "EXACTLY_ONCE produces dropped as duplicates."),
)


class NodeMetrics:
    """The histograms the loop observes, and the collector that reads everything else."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.produce_latency = Histogram(
            "zbroker_produce_latency_seconds",
            "From a PRODUCE frame's arrival to its answer (committed on a majority and applied).",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.commit_latency = Histogram(
            "zbroker_commit_latency_seconds",
            "From proposing a log entry to applying it (replication and majority fsync included).",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.fsync_time = Histogram(
            "zbroker_log_fsync_seconds",
            "Duration of one synced write of the Raft log.",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    def serve(self, node: Node, endpoint: str) -> None:
        """Register the node collector and start the HTTP server (a daemon thread)."""
        self.registry.register(_NodeCollector(node))
        host, _, port = endpoint.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        log.info("metrics on http://%s/metrics", endpoint)


class _NodeCollector(Collector):
    """Reads the node's state at scrape time (from the HTTP thread: copies before iterating)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        node = self.node
        for _ in range(3):  # the loop may resize a dict while we copy it: try again
            try:
                channels = list(node.state.channels.values())
                break
            except RuntimeError:
                continue
        else:
            channels = []
        for name, attribute, documentation in _CHANNEL_COUNTERS:
            family = CounterMetricFamily(f"zbroker_messages_{name}", documentation, labels=["channel"])
            for channel in channels:
                family.add_metric([channel.name], getattr(channel, attribute))
            yield family
        depth = GaugeMetricFamily(
            "zbroker_queue_depth", "Messages per queue and state.", labels=["channel", "state"]
        )
        consumers = GaugeMetricFamily(
            "zbroker_consumers", "Consumers attached to this node.", labels=["channel"]
        )
        for channel in channels:
            for state, value in (
                ("ready", channel.ready),
                ("delayed", channel.delayed),
                ("in_flight", channel.inflight),
                ("dead", channel.dead),
            ):
                depth.add_metric([channel.name, state], value)
            consumers.add_metric([channel.name], node.scheduler.consumers_of(channel.name))
        yield depth
        yield consumers
        core = node.replica.core
        yield GaugeMetricFamily("zbroker_raft_term", "Current Raft term.", value=core.term)
        role = GaugeMetricFamily("zbroker_raft_role", "1 for this node's current role.", labels=["role"])
        for candidate in type(core.role):
            role.add_metric([candidate.value], 1 if candidate is core.role else 0)
        yield role
        yield GaugeMetricFamily(
            "zbroker_raft_commit_index", "Highest committed log index known.", value=core.commit_index
        )
        yield GaugeMetricFamily(
            "zbroker_raft_applied_index", "Highest applied log index.", value=node.state.applied_index
        )
        yield GaugeMetricFamily(
            "zbroker_raft_last_index", "Last index in the local log.", value=core.last_index
        )
        lag = GaugeMetricFamily(
            "zbroker_raft_follower_lag_entries",
            "Entries a follower lacks (leader only).",
            labels=["follower"],
        )
        for follower, match in core.follower_progress().items():
            lag.add_metric([follower], core.last_index - match)
        yield lag
        for key, value in list(node.counters.items()) + list(node.replica.counters.items()):
            yield CounterMetricFamily(f"zbroker_{key}", f"Node counter {key}.", value=value)
