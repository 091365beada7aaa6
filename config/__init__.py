"""zbroker's settings: the ``[node]`` and ``[cluster]`` TOML schema, its loader and its writer.

Example::

    settings = load_settings("node.toml")   # file, then ZBROKER_NODE_* / ZBROKER_CLUSTER_* overrides
    settings.node.session_timeout_s         # 10.0 — attribute names carry the unit
    dump_settings_toml(settings)            # TOML text that load_settings reads back
"""

from client.errors import ConfigError
from config.durations import parse_duration, parse_size
from config.loading import dump_settings_toml, load_settings
from config.schema import ClusterMember, ClusterSettings, NodeSettings, Settings

__all__ = [
    "ClusterMember",
    "ClusterSettings",
    "ConfigError",
    "NodeSettings",
    "Settings",
    "dump_settings_toml",
    "load_settings",
    "parse_duration",
    "parse_size",
]
