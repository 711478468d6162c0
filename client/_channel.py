"""Connections and cluster metadata shared by the producer, consumer and admin.

One grpc.Channel per node address, reused by every call to that node; gRPC
reconnects a channel by itself after the node restarts. Cluster metadata
comes from AdminService.DescribeCluster, which any node serves.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

from .errors import RaftMQError, from_rpc_error


def parse_bootstrap_servers(value: str | Sequence[str]) -> list[str]:
    """Split and check a comma-separated "host:port" list, keeping its order."""
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise TypeError(
            "bootstrap_servers must be a comma-separated 'host:port' str or a list of them, "
            f"got {type(value).__name__}"
        )
    addresses: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"bootstrap server address must be a str, got {part!r}")
        address = part.strip()
        if not address:
            continue
        _check_address(address)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ValueError(
            f"bootstrap_servers is empty ({value!r}): give at least one 'host:port', "
            "for example '127.0.0.1:9092'"
        )
    return addresses


def _check_address(address: str) -> None:
    host, separator, port = address.rpartition(":")
    # An IPv6 literal must be bracketed, "[::1]:9092", so that the last colon
    # is the port separator.
    if not separator or not host or (":" in host and not host.startswith("[")):
        raise ValueError(f"invalid bootstrap server address {address!r}: expected 'host:port'")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"invalid port in bootstrap server address {address!r}: expected 1 to 65535"
        )


def load_channel_credentials(ssl_cafile: str | None) -> grpc.ChannelCredentials | None:
    """Read the root certificates for TLS channels, or return None for plaintext."""
    if ssl_cafile is None:
        return None
    try:
        with open(ssl_cafile, "rb") as file:
            root_certificates = file.read()
    except OSError as error:
        raise ValueError(f"cannot read ssl_cafile {ssl_cafile!r}: {error.strerror}") from error
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def check_positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Check a numeric option and return it, naming the option in the error."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    lowest = 0 if allow_zero else 1
    if value < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return value


def backoff_delay_s(attempt: int, base_ms: int, max_ms: int) -> float:
    """Return the wait before retry number `attempt` (1 for the first retry).

    Doubles from base_ms up to max_ms, then spreads it by +-20% so that
    clients that failed together do not retry together.
    """
    exponent = min(max(attempt - 1, 0), 32)
    delay_ms = min(base_ms * (2**exponent), max_ms)
    return delay_ms * random.uniform(0.8, 1.2) / 1000.0


class ChannelPool:
    """Cache of one grpc.Channel per node address, created on first use."""

    def __init__(
        self,
        *,
        ssl_cafile: str | None = None,
        max_send_message_bytes: int,
        max_receive_message_bytes: int,
    ) -> None:
        self._credentials = load_channel_credentials(ssl_cafile)
        self._options = [
            ("grpc.max_send_message_length", max_send_message_bytes),
            ("grpc.max_receive_message_length", max_receive_message_bytes),
        ]
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._closed = False

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise RaftMQError(
                    f"the client is closed, so no channel to {address} can be opened",
                    "INVALID_REQUEST",
                )
            channel = self._channels.get(address)
            if channel is None:
                if self._credentials is None:
                    channel = grpc.insecure_channel(address, options=self._options)
                else:
                    channel = grpc.secure_channel(address, self._credentials, options=self._options)
                self._channels[address] = channel
            return channel

    def close(self) -> None:
        """Close every channel; calls still running on them end with CANCELLED."""
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.close()


@dataclass(frozen=True)
class ClusterMetadata:
    """One DescribeCluster response, indexed for lookups."""

    node_addresses: dict[int, str] = field(default_factory=dict)
    alive_node_ids: frozenset[int] = frozenset()
    controller: int = 0
    topics: dict[str, raftmq_pb2.TopicInfo] = field(default_factory=dict)
    # time.monotonic() when the response arrived; 0.0 for "never fetched".
    fetched_monotonic: float = 0.0

    @classmethod
    def from_response(cls, response: raftmq_pb2.DescribeClusterResponse) -> ClusterMetadata:
        return cls(
            node_addresses={node.node_id: node.address for node in response.nodes},
            alive_node_ids=frozenset(node.node_id for node in response.nodes if node.alive),
            controller=response.controller,
            topics={topic.name: topic for topic in response.topics},
            fetched_monotonic=time.monotonic(),
        )

    def partition_count(self, topic: str) -> int | None:
        info = self.topics.get(topic)
        return None if info is None else len(info.partitions)

    def max_message_bytes(self, topic: str) -> int | None:
        """Return the topic's record size limit in force, or None if unknown."""
        info = self.topics.get(topic)
        if info is None or not info.config.max_message_bytes:
            return None
        return info.config.max_message_bytes

    def backlog_limits(self, topic: str) -> tuple[int, int]:
        """Return the topic's (max_backlog_messages, max_backlog_bytes), 0 for
        no limit or an unknown topic."""
        info = self.topics.get(topic)
        if info is None:
            return 0, 0
        return info.config.max_backlog_messages, info.config.max_backlog_bytes

    def partitions_with_leader(self, topic: str) -> list[int]:
        info = self.topics.get(topic)
        if info is None:
            return []
        return [p.partition for p in info.partitions if p.leader in self.node_addresses]

    def leader_address(self, topic: str, partition: int) -> str | None:
        info = self.topics.get(topic)
        if info is None:
            return None
        for partition_info in info.partitions:
            if partition_info.partition == partition:
                # Leader 0 means "no leader known"; it is not a node id.
                return self.node_addresses.get(partition_info.leader)
        return None

    def node_addresses_alive_first(self) -> list[str]:
        alive = [a for n, a in self.node_addresses.items() if n in self.alive_node_ids]
        others = [a for n, a in self.node_addresses.items() if n not in self.alive_node_ids]
        return alive + others


class MetadataCache:
    """Thread-safe cluster metadata with per-partition leader hints.

    A hint comes from a NOT_LEADER error that named the leader, and is
    newer than the last DescribeCluster response, so it wins until the next
    refresh replaces both.
    """

    def __init__(
        self,
        channels: ChannelPool,
        bootstrap_addresses: list[str],
        *,
        request_timeout_ms: int,
        metadata_max_age_ms: int = 300_000,
    ) -> None:
        self._channels = channels
        self._bootstrap_addresses = list(bootstrap_addresses)
        self._request_timeout_s = request_timeout_ms / 1000.0
        self._max_age_s = metadata_max_age_ms / 1000.0
        self._metadata = ClusterMetadata()
        self._leader_hints: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()
        # Held while a DescribeCluster call runs, so concurrent callers wait
        # for that response instead of sending their own.
        self._refresh_lock = threading.Lock()

    @property
    def current(self) -> ClusterMetadata:
        with self._lock:
            return self._metadata

    def is_stale(self) -> bool:
        metadata = self.current
        return (
            metadata.fetched_monotonic == 0.0
            or time.monotonic() - metadata.fetched_monotonic > self._max_age_s
        )

    def candidate_addresses(self) -> list[str]:
        """Return node addresses to try for a call any node can serve, best first."""
        known = self.current.node_addresses_alive_first()
        return known + [a for a in self._bootstrap_addresses if a not in known]

    def leader_address(self, topic: str, partition: int) -> str | None:
        with self._lock:
            hint = self._leader_hints.get((topic, partition))
            return hint or self._metadata.leader_address(topic, partition)

    def set_leader_hint(self, topic: str, partition: int, address: str) -> None:
        with self._lock:
            self._leader_hints[(topic, partition)] = address

    def refresh(self, min_interval_ms: int = 0) -> ClusterMetadata:
        """Fetch metadata from the first node that responds.

        Returns the cached metadata instead when it is younger than
        min_interval_ms, which stops many failing calls from each sending a
        DescribeCluster. Raises the last node's error when none responds.
        """
        with self._refresh_lock:
            metadata = self.current
            age_s = time.monotonic() - metadata.fetched_monotonic
            if metadata.fetched_monotonic and age_s * 1000.0 < min_interval_ms:
                return metadata
            response = self._describe_cluster(self.candidate_addresses())
            metadata = ClusterMetadata.from_response(response)
            with self._lock:
                self._metadata = metadata
                self._leader_hints.clear()
            return metadata

    def _describe_cluster(self, addresses: Iterable[str]) -> raftmq_pb2.DescribeClusterResponse:
        tried: list[str] = []
        last_error: RaftMQError | None = None
        for address in addresses:
            tried.append(address)
            stub = raftmq_pb2_grpc.AdminServiceStub(self._channels.get(address))
            try:
                return stub.DescribeCluster(
                    raftmq_pb2.DescribeClusterRequest(), timeout=self._request_timeout_s
                )
            except grpc.RpcError as error:
                last_error = from_rpc_error(error)
        assert last_error is not None, "candidate_addresses() always includes the bootstrap list"
        raise type(last_error)(
            f"cannot fetch cluster metadata: DescribeCluster failed on every node "
            f"(tried {', '.join(tried)}; last error: {last_error.message})",
            last_error.reason,
            last_error.code,
            last_error.metadata,
        )
