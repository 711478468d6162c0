"""The raftmq node process: Raft groups, the gRPC server and the timers.

A node runs one metadata group (all nodes) and one group per partition
replica it hosts. A reconciler thread compares the replicated metadata with
what runs locally: it registers this node, starts and stops partition
groups, and reports partition leadership back into the metadata, so every
node can route to any partition's leader. The reconciler is the only place
where time turns into replicated commands; apply never reads the clock.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent import futures
import dataclasses
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..coordinator.metadata import (
    MetadataStore, MetadataView, NodeId, NodeRecord, TopicRecord, encode_command,
)
from ..partition.log import PartitionStore
from ..raft.group import RaftSettings, ReplicatedGroup
from ..v1 import raftmq_pb2, raftmq_pb2_grpc
from .config import NodeConfig

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 0.2
METADATA_COMMAND_TIMEOUT_S = 5.0
REPORT_RETRY_INTERVAL_S = 1.0
# A leader hands its partition back to the preferred replica (the first in
# the placement) at most this often, and only after leading this long, so
# leaders spread over the nodes again after a failover without flapping.
PREFERRED_LEADER_INTERVAL_S = 10.0
PARTITION_START_RETRY_S = 5.0
BIND_WARNING_AFTER_S = 5.0


@dataclass
class HostedPartition:
    topic: str
    partition: int
    topic_id: int
    store: PartitionStore
    group: ReplicatedGroup
    data_dir: str
    # Raft address of each replica's group member -> node id.
    node_by_raft_address: dict[str, NodeId]
    preferred_leader: NodeId
    last_report_s: float = 0.0
    leading_since_s: float | None = None
    last_transfer_s: float = 0.0
    started_s: float = dataclasses.field(default_factory=time.monotonic)
    bind_warned: bool = False

    def leader_node(self) -> NodeId | None:
        address = self.group.leader_address()
        return None if address is None else self.node_by_raft_address.get(address)


class Node:
    def __init__(self, config: NodeConfig):
        config.validate()
        self.config = config
        self.node_id = NodeId(config.node_id)
        self.settings = RaftSettings(
            cluster_secret=config.cluster_secret,
            max_command_bytes=config.max_request_bytes + 2**16,
            log_compaction_min_entries=config.raft_log_compaction_min_entries,
            log_compaction_min_interval_ms=config.raft_log_compaction_min_interval_ms,
            log_compaction_max_journal_bytes=config.raft_log_compaction_max_journal_bytes,
            fsync_policy=config.fsync_policy,
            fsync_interval_ms=config.fsync_interval_ms,
        )
        self._partitions: dict[tuple[str, int], HostedPartition] = {}
        self._partitions_lock = threading.Lock()
        self._stopping = threading.Event()
        self._last_register_s = 0.0
        self._start_retry_after_s: dict[tuple[str, int], float] = {}
        self._health = health.HealthServicer()
        self._grpc_server: grpc.Server | None = None
        self._reconciler: threading.Thread | None = None
        self.metadata_store: MetadataStore | None = None
        self.metadata_group: ReplicatedGroup | None = None
        from .groups import GroupCoordinator

        self.group_coordinator = GroupCoordinator(self)
        from .dead_letters import DeadLetterMover

        self.dead_letter_mover = DeadLetterMover(self)
        from .retention import RetentionEnforcer

        self.retention = RetentionEnforcer(self)

    # --- lifecycle -------------------------------------------------------

    def start(self) -> None:
        config = self.config
        logger.info(
            "node=%d event=node_starting grpc=%s raft=%s:%d data_dir=%s",
            self.node_id, config.grpc_bind, config.raft_host, config.raft_port_base, config.data_dir,
        )
        os.makedirs(config.data_dir, exist_ok=True)
        metadata_dir = os.path.join(config.data_dir, "metadata")
        self.metadata_store = MetadataStore(os.path.join(metadata_dir, "state"),
                                            sync=config.fsync_policy == "always")
        partners = [address for node_id, address in sorted(config.peers.items())
                    if node_id != self.node_id]
        self.metadata_group = ReplicatedGroup(
            f"node={self.node_id} group=metadata",
            config.peers[self.node_id], partners, metadata_dir, self.metadata_store, self.settings,
        )
        self._start_grpc()
        self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self._reconciler = threading.Thread(target=self._reconcile_loop, name="reconciler", daemon=True)
        self._reconciler.start()
        self.group_coordinator.start()
        self.dead_letter_mover.start()
        self.retention.start()
        logger.info("node=%d event=node_started", self.node_id)

    def _start_grpc(self) -> None:
        from .groups import add_to_server as add_group_service
        from .services import AdminServicer, ConsumerServicer, ProducerServicer

        limit = 2 * self.config.max_request_bytes + 2**20
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.config.grpc_workers,
                                       thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        raftmq_pb2_grpc.add_ProducerServiceServicer_to_server(ProducerServicer(self), server)
        raftmq_pb2_grpc.add_ConsumerServiceServicer_to_server(ConsumerServicer(self), server)
        raftmq_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self), server)
        add_group_service(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        service_names = (
            raftmq_pb2.DESCRIPTOR.services_by_name["ProducerService"].full_name,
            raftmq_pb2.DESCRIPTOR.services_by_name["ConsumerService"].full_name,
            raftmq_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            raftmq_pb2.DESCRIPTOR.services_by_name["GroupService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(service_names, server)
        if self.config.tls_cert_file:
            with open(self.config.tls_key_file, "rb") as key_file:
                key = key_file.read()
            with open(self.config.tls_cert_file, "rb") as cert_file:
                cert = cert_file.read()
            port = server.add_secure_port(self.config.grpc_bind,
                                          grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = server.add_insecure_port(self.config.grpc_bind)
        if port == 0:
            raise OSError(f"cannot bind the gRPC address {self.config.grpc_bind}")
        server.start()
        self._grpc_server = server

    def stop(self) -> None:
        logger.info("node=%d event=node_stopping", self.node_id)
        self._stopping.set()
        self._health.enter_graceful_shutdown()
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=2).wait()
        if self._reconciler is not None:
            self._reconciler.join(timeout=5)
        self.group_coordinator.stop()
        self.dead_letter_mover.stop()
        self.retention.stop()
        with self._partitions_lock:
            hosted = list(self._partitions.values())
            self._partitions.clear()
        for partition in hosted:
            partition.group.stop()
            partition.store.close()
        if self.metadata_group is not None:
            self.metadata_group.stop()
        if self.metadata_store is not None:
            self.metadata_store.close()
        logger.info("node=%d event=node_stopped", self.node_id)

    def wait(self) -> None:
        self._stopping.wait()

    # --- metadata --------------------------------------------------------

    @property
    def view(self) -> MetadataView:
        assert self.metadata_store is not None
        return self.metadata_store.view

    def submit_metadata(self, command: bytes, timeout_s: float):
        """Replicate a metadata command from any node; followers forward it to the leader."""
        assert self.metadata_group is not None
        return self.metadata_group.submit(command, timeout_s, forward=True)

    def controller_node(self) -> NodeId | None:
        assert self.metadata_group is not None
        address = self.metadata_group.leader_address()
        for node_id, peer in self.config.peers.items():
            if peer == address:
                return NodeId(node_id)
        return None

    def node_alive(self, node_id: NodeId) -> bool:
        if node_id == self.node_id:
            return True
        assert self.metadata_group is not None
        address = self.config.peers.get(node_id)
        return address is not None and address in self.metadata_group.connected_partners()

    def hosted(self, topic: str, partition: int) -> HostedPartition | None:
        with self._partitions_lock:
            return self._partitions.get((topic, partition))

    def hosted_partitions(self) -> list[HostedPartition]:
        with self._partitions_lock:
            return list(self._partitions.values())

    def partition_leader(self, topic: TopicRecord, partition: int) -> NodeId | None:
        """Best known leader: the local group's view if hosted, else the last report."""
        hosted = self.hosted(topic.name, partition)
        if hosted is not None and hosted.topic_id == topic.topic_id:
            leader = hosted.leader_node()
            if leader is not None:
                return leader
        report = self.view.leaders.get((topic.name, partition))
        return None if report is None else report.leader

    def grpc_address_of(self, node_id: NodeId | None) -> str | None:
        if node_id is None:
            return None
        record = self.view.nodes.get(node_id)
        return None if record is None else record.address

    def internal_address_of(self, node_id: NodeId | None) -> str | None:
        """Return the gRPC address to forward calls to `node_id` on, not the advertised one."""
        if node_id is None:
            return None
        record = self.view.nodes.get(node_id)
        return None if record is None else record.internal_address or record.address

    # --- reconciler ------------------------------------------------------

    def _reconcile_loop(self) -> None:
        while not self._stopping.wait(RECONCILE_INTERVAL_S):
            try:
                self._reconcile_once()
            except Exception:
                logger.exception("node=%d event=reconcile_failed", self.node_id)

    def _reconcile_once(self) -> None:
        view = self.view
        self._maybe_register(view)
        self._sync_partitions(view)
        self._maybe_report_leaders(view)
        self._maybe_restore_preferred_leaders()
        self._warn_unbound_groups()
        serving = (self.node_id in view.nodes and self.controller_node() is not None)
        self._health.set(
            "", health_pb2.HealthCheckResponse.SERVING if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    def _maybe_register(self, view: MetadataView) -> None:
        config = self.config
        wanted = NodeRecord(self.node_id, config.grpc_advertised, config.raft_host,
                            config.raft_port_base, config.raft_port_span, config.grpc_internal)
        if view.nodes.get(self.node_id) == wanted:
            return
        now = time.monotonic()
        if now - self._last_register_s < REPORT_RETRY_INTERVAL_S or self.controller_node() is None:
            return
        self._last_register_s = now
        command = encode_command(
            "register_node", node_id=self.node_id, address=wanted.address,
            raft_host=wanted.raft_host, raft_port_base=wanted.raft_port_base,
            raft_port_span=wanted.raft_port_span, internal_address=wanted.internal_address,
        )
        try:
            self.submit_metadata(command, METADATA_COMMAND_TIMEOUT_S)
            logger.info("node=%d event=node_registered address=%s internal_address=%s",
                        self.node_id, wanted.address, wanted.internal_address)
        except Exception as exc:
            logger.warning("node=%d event=register_retry error=%r", self.node_id, exc)

    def _sync_partitions(self, view: MetadataView) -> None:
        wanted: dict[tuple[str, int], tuple[TopicRecord, int]] = {}
        for topic in view.topics.values():
            for placement in topic.partitions:
                if self.node_id in placement.replicas:
                    wanted[(topic.name, placement.partition)] = (topic, placement.partition)
        with self._partitions_lock:
            running = dict(self._partitions)
        for key, hosted in running.items():
            target = wanted.get(key)
            if target is None or target[0].topic_id != hosted.topic_id:
                self._stop_partition(hosted, remove_data=True)
        for key, (topic, partition) in wanted.items():
            current = running.get(key)
            if current is None or current.topic_id != topic.topic_id:
                if time.monotonic() < self._start_retry_after_s.get(key, 0.0):
                    continue
                try:
                    self._start_partition(view, topic, partition)
                except Exception:
                    self._start_retry_after_s[key] = time.monotonic() + PARTITION_START_RETRY_S
                    # One partition that cannot start must not keep the others down.
                    logger.exception("node=%d topic=%s partition=%d event=partition_start_failed",
                                     self.node_id, topic.name, partition)

    def _partition_dir(self, topic: TopicRecord, partition: int) -> str:
        # Topic names may be 249 characters, so only a prefix goes into the
        # folder name (Linux allows 255 bytes); the topic id keeps it unique.
        return os.path.join(self.config.data_dir, "partitions",
                            f"{topic.name[:80]}.{topic.topic_id}.{partition}")

    def _start_partition(self, view: MetadataView, topic: TopicRecord, partition: int) -> None:
        placement = topic.partitions[partition]
        addresses = {}
        for node_id in placement.replicas:
            node = view.nodes[node_id]
            addresses[node_id] = f"{node.raft_host}:{placement.raft_ports[node_id]}"
        data_dir = self._partition_dir(topic, partition)
        store = PartitionStore(os.path.join(data_dir, "state"),
                               sync=self.config.fsync_policy == "always")
        try:
            group = ReplicatedGroup(
                f"node={self.node_id} topic={topic.name} partition={partition}",
                addresses[self.node_id],
                [address for node_id, address in addresses.items() if node_id != self.node_id],
                data_dir, store, self.settings,
            )
        except Exception:
            store.close()
            raise
        hosted = HostedPartition(
            topic.name, partition, topic.topic_id, store, group, data_dir,
            {address: node_id for node_id, address in addresses.items()},
            placement.replicas[0],
        )
        with self._partitions_lock:
            self._partitions[(topic.name, partition)] = hosted

    def _stop_partition(self, hosted: HostedPartition, remove_data: bool) -> None:
        with self._partitions_lock:
            self._partitions.pop((hosted.topic, hosted.partition), None)
        hosted.group.stop()
        hosted.store.close()
        if remove_data:
            shutil.rmtree(hosted.data_dir, ignore_errors=True)
        logger.info("node=%d topic=%s partition=%d event=partition_removed",
                    self.node_id, hosted.topic, hosted.partition)

    def _maybe_report_leaders(self, view: MetadataView) -> None:
        now = time.monotonic()
        for partition in self.hosted_partitions():
            group = partition.group
            if not group.has_quorum():
                continue
            term = group.term()
            report = view.leaders.get((partition.topic, partition.partition))
            if report is not None and report.leader == self.node_id and report.term == term:
                continue
            if now - partition.last_report_s < REPORT_RETRY_INTERVAL_S:
                continue
            partition.last_report_s = now
            command = encode_command(
                "report_leader", topic=partition.topic, partition=partition.partition,
                topic_id=partition.topic_id, leader=self.node_id, term=term,
            )
            try:
                accepted = self.submit_metadata(command, METADATA_COMMAND_TIMEOUT_S)
                if accepted:
                    logger.info("node=%d topic=%s partition=%d term=%d event=leader_reported",
                                self.node_id, partition.topic, partition.partition, term)
                else:
                    logger.warning(
                        "node=%d topic=%s partition=%d term=%d event=leader_report_rejected "
                        "reason=a later term is recorded", self.node_id, partition.topic,
                        partition.partition, term)
            except Exception as exc:
                logger.warning("node=%d topic=%s partition=%d event=leader_report_retry error=%r",
                               self.node_id, partition.topic, partition.partition, exc)

    def _maybe_restore_preferred_leaders(self) -> None:
        now = time.monotonic()
        for partition in self.hosted_partitions():
            group = partition.group
            if not group.has_quorum():
                partition.leading_since_s = None
                continue
            if partition.leading_since_s is None:
                partition.leading_since_s = now
            if partition.preferred_leader == self.node_id:
                continue
            if (now - partition.leading_since_s < PREFERRED_LEADER_INTERVAL_S
                    or now - partition.last_transfer_s < PREFERRED_LEADER_INTERVAL_S):
                continue
            target = next((address for address, node_id in partition.node_by_raft_address.items()
                           if node_id == partition.preferred_leader), None)
            if target is None or target not in group.connected_partners():
                continue
            partition.last_transfer_s = now
            group.transfer_leadership_to(target)

    def _warn_unbound_groups(self) -> None:
        now = time.monotonic()
        for partition in self.hosted_partitions():
            if partition.bind_warned or partition.group.is_bound():
                continue
            if now - partition.started_s > BIND_WARNING_AFTER_S:
                partition.bind_warned = True
                logger.error(
                    "node=%d topic=%s partition=%d event=raft_bind_failed waited_s=%d "
                    "action=free the port or change raft_address; binding is retried every second",
                    self.node_id, partition.topic, partition.partition, now - partition.started_s)
