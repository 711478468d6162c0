"""Node configuration from flags, environment variables and a TOML file.

Precedence, highest first: command-line flags, RAFTMQ_* environment
variables, the file given with --config, the defaults below. Every setting
has the same name in all three places (flag --max-message-bytes, variable
RAFTMQ_MAX_MESSAGE_BYTES, file key max_message_bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from typing import Any

# Bounds of a consumer group member's session and rebalance timeouts.
MIN_GROUP_TIMEOUT_MS = 500
MAX_GROUP_TIMEOUT_MS = 600_000


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    node_id: int
    # Address the gRPC server binds, and the address clients are given.
    grpc_bind: str
    grpc_advertised: str
    # Address other nodes use to forward calls to this node. It differs from
    # grpc_advertised when clients reach the node through a published port.
    grpc_internal: str
    # Host and first port of this node's Raft endpoints: the metadata group
    # uses raft_port_base, partition groups take ports above it.
    raft_host: str
    raft_port_base: int
    # node id -> "host:port" of each node's metadata Raft endpoint, this one included.
    peers: dict[int, str]
    data_dir: str
    cluster_secret: str = dataclasses.field(repr=False)
    raft_port_span: int = 1000
    default_replication_factor: int = 3
    max_message_bytes: int = 2**20
    max_request_bytes: int = 4 * 2**20
    fetch_max_wait_ms: int = 30_000
    produce_timeout_ms: int = 10_000
    grpc_workers: int = 32
    # Consumer groups: defaults for members that send 0.
    group_session_timeout_ms: int = 10_000
    group_rebalance_timeout_ms: int = 30_000
    # Retention of the dead-letter topics that nodes create on demand.
    dead_letter_retention_ms: int = 7 * 24 * 3600 * 1000
    # Produce rejects records whose timestamp is further ahead of the node's
    # clock than this.
    max_timestamp_future_ms: int = 3600 * 1000
    # Raft log compaction: snapshot after this many journal entries, or
    # after this long since the previous snapshot.
    raft_log_compaction_min_entries: int = 20000
    raft_log_compaction_min_interval_ms: int = 300_000
    raft_log_compaction_max_journal_bytes: int = 256 * 2**20
    # When the Raft journal and the LMDB state reach the disk: "always"
    # (fsync before every acknowledgement), "interval" (every
    # fsync_interval_ms) or "never" (left to the OS page cache).
    fsync_policy: str = "interval"
    fsync_interval_ms: int = 200
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # CA that signs the other nodes' certificates, for forwarded calls.
    tls_ca_file: str | None = None
    log_level: str = "INFO"

    def validate(self) -> None:
        if not self.cluster_secret:
            raise ValueError(
                "missing cluster secret: set --cluster-secret, RAFTMQ_CLUSTER_SECRET "
                "or cluster_secret in the config file; all nodes must use the same one"
            )
        if self.node_id not in self.peers:
            raise ValueError(f"node id {self.node_id} is not in peers {sorted(self.peers)}")
        expected = f"{self.raft_host}:{self.raft_port_base}"
        if self.peers[self.node_id] != expected:
            raise ValueError(
                f"peers gives node {self.node_id} the Raft address {self.peers[self.node_id]}, "
                f"but this node binds {expected}; make --raft-address match"
            )
        if self.max_message_bytes > self.max_request_bytes:
            raise ValueError(
                f"max_message_bytes {self.max_message_bytes} exceeds "
                f"max_request_bytes {self.max_request_bytes}"
            )
        if self.fsync_policy not in ("always", "interval", "never"):
            raise ValueError(
                f"invalid fsync_policy {self.fsync_policy!r}: use always, interval or never")
        if self.fsync_interval_ms < 1:
            raise ValueError(f"invalid fsync_interval_ms {self.fsync_interval_ms}: must be >= 1")
        if self.raft_log_compaction_min_entries < 2:
            raise ValueError(
                f"invalid raft_log_compaction_min_entries {self.raft_log_compaction_min_entries}: "
                "must be >= 2")
        for name in ("group_session_timeout_ms", "group_rebalance_timeout_ms"):
            value = getattr(self, name)
            if not MIN_GROUP_TIMEOUT_MS <= value <= MAX_GROUP_TIMEOUT_MS:
                raise ValueError(
                    f"invalid {name} {value}: use {MIN_GROUP_TIMEOUT_MS} to {MAX_GROUP_TIMEOUT_MS}")
        if self.max_timestamp_future_ms < 0:
            raise ValueError(f"invalid max_timestamp_future_ms {self.max_timestamp_future_ms}: "
                             "must be >= 0")
        if self.dead_letter_retention_ms < 0:
            raise ValueError(f"invalid dead_letter_retention_ms {self.dead_letter_retention_ms}: "
                             "must be >= 0 (0 keeps dead letters forever)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")


_INT_FIELDS = {
    "node_id", "raft_port_span", "default_replication_factor", "max_message_bytes",
    "max_request_bytes", "fetch_max_wait_ms", "produce_timeout_ms", "grpc_workers",
    "raft_log_compaction_min_entries", "raft_log_compaction_min_interval_ms", "fsync_interval_ms",
    "raft_log_compaction_max_journal_bytes", "group_session_timeout_ms",
    "group_rebalance_timeout_ms", "dead_letter_retention_ms", "max_timestamp_future_ms",
}


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file with node settings")
    parser.add_argument("--node-id", type=int, help="this node's id, 1 or more")
    parser.add_argument("--grpc-address", help="host:port the gRPC server binds")
    parser.add_argument("--advertised-address",
                        help="host:port clients use to reach this node (default: --grpc-address)")
    parser.add_argument("--internal-address",
                        help="host:port other nodes use to forward calls to this node "
                             "(default: --advertised-address)")
    parser.add_argument("--raft-address",
                        help="host:port of this node's metadata Raft endpoint; partition "
                             "groups use the next raft_port_span - 1 ports")
    parser.add_argument("--peers",
                        help="every node's Raft address, e.g. 1=10.0.0.1:20000,2=10.0.0.2:20000")
    parser.add_argument("--data-dir", help="folder for this node's logs and snapshots")
    parser.add_argument("--cluster-secret",
                        help="shared secret that authenticates Raft traffic (prefer the "
                             "RAFTMQ_CLUSTER_SECRET variable: flags show up in ps)")
    parser.add_argument("--raft-port-span", type=int)
    parser.add_argument("--default-replication-factor", type=int)
    parser.add_argument("--max-message-bytes", type=int, help="largest record accepted, bytes")
    parser.add_argument("--max-request-bytes", type=int, help="largest produce request, bytes")
    parser.add_argument("--fetch-max-wait-ms", type=int, help="maximum long-poll wait of a fetch, in ms")
    parser.add_argument("--produce-timeout-ms", type=int,
                        help="how long a produce waits for its commit before DEADLINE_EXCEEDED")
    parser.add_argument("--group-session-timeout-ms", type=int,
                        help="default session timeout of consumer group members, in ms")
    parser.add_argument("--group-rebalance-timeout-ms", type=int,
                        help="default time a member may keep a partition it must give "
                             "up, in ms")
    parser.add_argument("--dead-letter-retention-ms", type=int,
                        help="retention of dead-letter topics created on demand, in ms "
                             "(0 keeps dead letters forever)")
    parser.add_argument("--max-timestamp-future-ms", type=int,
                        help="reject records stamped further ahead of the node's clock, in ms")
    parser.add_argument("--raft-log-compaction-min-entries", type=int,
                        help="snapshot a Raft group after this many journal entries")
    parser.add_argument("--raft-log-compaction-min-interval-ms", type=int,
                        help="snapshot a Raft group at least this often, in ms")
    parser.add_argument("--raft-log-compaction-max-journal-bytes", type=int,
                        help="snapshot a Raft group once its journal reaches this many bytes")
    parser.add_argument("--fsync-policy", choices=("always", "interval", "never"),
                        help="when the journal and state are fsynced (default interval)")
    parser.add_argument("--fsync-interval-ms", type=int,
                        help="fsync period for --fsync-policy interval, in ms")
    parser.add_argument("--tls-cert-file")
    parser.add_argument("--tls-key-file")
    parser.add_argument("--tls-ca-file",
                        help="CA certificate that verifies other nodes when forwarding "
                             "(default: --tls-cert-file, for a shared self-signed certificate)")
    parser.add_argument("--log-level")


def parse_peers(text: str) -> dict[int, str]:
    peers = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        node_id, sep, address = item.partition("=")
        node_id = node_id.strip()
        if not sep or not (node_id.isascii() and node_id.isdigit()) or ":" not in address:
            raise ValueError(f"invalid peer {item!r}: expected ID=HOST:PORT, e.g. 1=127.0.0.1:20000")
        peers[int(node_id)] = address.strip()
    if not peers:
        raise ValueError("peers is empty: list every node as ID=HOST:PORT")
    return peers


def load_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> NodeConfig:
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    if args.config:
        with open(args.config, "rb") as config_file:
            values.update(tomllib.load(config_file))
    for key, value in environ.items():
        if key.startswith("RAFTMQ_"):
            values[key[len("RAFTMQ_"):].lower()] = value
    for key, value in vars(args).items():
        if value is not None and key != "config":
            values[key] = value
    return _build(values)


def _build(values: dict[str, Any]) -> NodeConfig:
    def need(key: str) -> Any:
        if values.get(key) in (None, ""):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"missing setting {key}: pass {flag} or set RAFTMQ_{key.upper()}")
        return values[key]

    raft_address = str(need("raft_address"))
    raft_host, _, raft_port = raft_address.rpartition(":")
    if not raft_host or not raft_port.isdigit():
        raise ValueError(
            f"invalid raft_address {raft_address!r}: expected HOST:PORT, e.g. 127.0.0.1:20000")
    peers = values.get("peers") or need("peers")
    if isinstance(peers, str):
        peers = parse_peers(peers)
    else:
        peers = {int(k): str(v) for k, v in peers.items()}
    grpc_bind = str(need("grpc_address"))
    grpc_advertised = str(values.get("advertised_address") or grpc_bind)
    fields: dict[str, Any] = {
        "node_id": need("node_id"),
        "grpc_bind": grpc_bind,
        "grpc_advertised": grpc_advertised,
        "grpc_internal": str(values.get("internal_address") or grpc_advertised),
        "raft_host": raft_host,
        "raft_port_base": int(raft_port),
        "peers": peers,
        "data_dir": str(need("data_dir")),
        "cluster_secret": str(values.get("cluster_secret") or ""),
    }
    names = {f.name for f in dataclasses.fields(NodeConfig)}
    for key, value in values.items():
        if key in names and key not in fields and value is not None:
            fields[key] = value
    for key in _INT_FIELDS:
        if key in fields:
            if isinstance(fields[key], (bool, float)):
                raise ValueError(f"invalid {key} {fields[key]!r}: expected an integer")
            try:
                fields[key] = int(fields[key])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"invalid {key} {fields[key]!r}: expected an integer") from exc
    config = NodeConfig(**fields)
    config.validate()
    return config
