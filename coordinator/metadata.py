"""Cluster metadata as a replicated state machine: nodes, topics, placement,
the last reported leader of each partition, and consumer groups
(coordinator/groups.py).

Commands are small JSON documents. Placement (which nodes host a partition
and on which Raft port) is computed inside apply from the state alone, so
two racing CREATE_TOPIC commands can never hand out the same port; the
request handler only pre-checks to fail fast.

An in-memory view of the whole state is rebuilt after every applied command
and swapped in one assignment, so readers on other threads never see a half
applied command and never need the LMDB lock.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, NewType

import lmdb

from ..raft.store import ApplyError, LmdbStore, RaftIndex
from . import groups as group_rules
from .groups import GroupRecord, group_from_doc

NodeId = NewType("NodeId", int)
PartitionId = NewType("PartitionId", int)

TOPIC_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,249}")
MAX_PARTITIONS_PER_TOPIC = 1024


@dataclass(frozen=True)
class NodeRecord:
    node_id: NodeId
    address: str
    raft_host: str
    raft_port_base: int
    raft_port_span: int
    # gRPC address other nodes forward calls to, while `address` is the one
    # clients are given. Records written before this field existed load it
    # as `address`; empty means the same.
    internal_address: str = ""

    @property
    def raft_address(self) -> str:
        return f"{self.raft_host}:{self.raft_port_base}"


@dataclass(frozen=True)
class PartitionPlacement:
    partition: PartitionId
    replicas: tuple[NodeId, ...]
    # Raft port of this partition's group on each replica node.
    raft_ports: dict[NodeId, int]


@dataclass(frozen=True)
class TopicRecord:
    name: str
    topic_id: int
    replication_factor: int
    partitions: tuple[PartitionPlacement, ...]
    max_message_bytes: int
    # Backlog limits per partition (0: no limit) and what a partition at a
    # limit does: "reject" or "drop_oldest". Records written before these
    # fields existed load the defaults.
    max_backlog_messages: int = 0
    max_backlog_bytes: int = 0
    overflow_policy: str = "reject"
    # Records older than this are deleted; 0 keeps them forever.
    retention_ms: int = 0


@dataclass(frozen=True)
class LeaderReport:
    leader: NodeId
    term: int


@dataclass(frozen=True)
class MetadataView:
    nodes: dict[NodeId, NodeRecord] = field(default_factory=dict)
    topics: dict[str, TopicRecord] = field(default_factory=dict)
    leaders: dict[tuple[str, int], LeaderReport] = field(default_factory=dict)
    groups: dict[str, GroupRecord] = field(default_factory=dict)

    def partition_counts(self) -> dict[str, int]:
        return {name: len(topic.partitions) for name, topic in self.topics.items()}


def validate_group_id(group_id: str) -> str | None:
    """Return why `group_id` is not a valid group id, or None when it is."""
    if not TOPIC_NAME_PATTERN.fullmatch(group_id):
        return (
            f"invalid group id {group_id!r}: use 1 to 249 characters from "
            "A-Z, a-z, 0-9, '.', '_' and '-'"
        )
    return None


def validate_topic_name(name: str) -> str | None:
    """Return why `name` is not a valid topic name, or None when it is."""
    if not TOPIC_NAME_PATTERN.fullmatch(name):
        return (
            f"invalid topic name {name!r}: use 1 to 249 characters from "
            "A-Z, a-z, 0-9, '.', '_' and '-'"
        )
    if name in (".", ".."):
        return f"invalid topic name {name!r}: '.' and '..' are reserved"
    return None


def encode_command(op: str, **fields: Any) -> bytes:
    return json.dumps({"op": op, **fields}, sort_keys=True).encode()


class MetadataStore(LmdbStore):
    DATABASES = (b"nodes", b"topics", b"leaders", b"groups")

    def __init__(self, path: str, **kwargs):
        self.view = MetadataView()
        super().__init__(path, **kwargs)

    def _after_open(self) -> None:
        self.view = self.read(self._load_view)

    def _after_apply(self, committed: bool) -> None:
        if committed:
            self.view = self.read(self._load_view)

    def _load_view(self, txn: lmdb.Transaction) -> MetadataView:
        nodes = {}
        for _, raw in txn.cursor(db=self.dbs[b"nodes"]):
            doc = json.loads(raw)
            nodes[NodeId(doc["node_id"])] = NodeRecord(
                NodeId(doc["node_id"]), doc["address"], doc["raft_host"],
                doc["raft_port_base"], doc["raft_port_span"],
                doc.get("internal_address") or doc["address"],
            )
        topics = {}
        for _, raw in txn.cursor(db=self.dbs[b"topics"]):
            doc = json.loads(raw)
            placements = tuple(
                PartitionPlacement(
                    PartitionId(p["partition"]),
                    tuple(NodeId(n) for n in p["replicas"]),
                    {NodeId(int(n)): port for n, port in p["raft_ports"].items()},
                )
                for p in doc["partitions"]
            )
            topics[doc["name"]] = TopicRecord(
                doc["name"], doc["topic_id"], doc["replication_factor"], placements,
                doc["max_message_bytes"],
                max_backlog_messages=doc.get("max_backlog_messages", 0),
                max_backlog_bytes=doc.get("max_backlog_bytes", 0),
                overflow_policy=doc.get("overflow_policy") or "reject",
                retention_ms=doc.get("retention_ms", 0),
            )
        leaders = {}
        for key, raw in txn.cursor(db=self.dbs[b"leaders"]):
            doc = json.loads(raw)
            topic, _, partition = bytes(key).decode().rpartition("/")
            leaders[(topic, int(partition))] = LeaderReport(NodeId(doc["leader"]), doc["term"])
        groups = {}
        for _, raw in txn.cursor(db=self.dbs[b"groups"]):
            record = group_from_doc(json.loads(raw))
            groups[record.group_id] = record
        return MetadataView(nodes, topics, leaders, groups)

    # --- apply -----------------------------------------------------------

    def _apply(self, txn: lmdb.Transaction, index: RaftIndex, command: bytes) -> Any:
        try:
            doc = json.loads(command)
            op = doc["op"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ApplyError("INVALID_REQUEST", f"undecodable metadata command: {exc}") from exc
        if op == "register_node":
            return self._register_node(txn, doc)
        if op == "create_topic":
            return self._create_topic(txn, index, doc)
        if op == "delete_topic":
            return self._delete_topic(txn, doc)
        if op == "report_leader":
            return self._report_leader(txn, doc)
        if op == "join_group":
            return self._join_group(txn, doc)
        if op == "leave_group":
            return self._leave_group(txn, doc)
        if op == "release_partitions":
            return self._release_partitions(txn, doc)
        raise ApplyError("INVALID_REQUEST", f"unknown metadata command {op!r}")

    def _register_node(self, txn: lmdb.Transaction, doc: dict) -> NodeId:
        record = {key: doc[key] for key in
                  ("node_id", "address", "raft_host", "raft_port_base", "raft_port_span")}
        # Optional: register_node commands journaled before it existed lack it.
        if doc.get("internal_address"):
            record["internal_address"] = doc["internal_address"]
        txn.put(str(doc["node_id"]).encode(), json.dumps(record, sort_keys=True).encode(),
                db=self.dbs[b"nodes"])
        return NodeId(doc["node_id"])

    def _create_topic(self, txn: lmdb.Transaction, index: RaftIndex, doc: dict) -> TopicRecord:
        name = doc["name"]
        problem = validate_topic_name(name)
        if problem:
            raise ApplyError("INVALID_TOPIC_NAME", problem, topic=name)
        view = self.view
        if name in view.topics:
            raise ApplyError("TOPIC_ALREADY_EXISTS", f"topic {name!r} already exists", topic=name)
        partitions = doc["partitions"]
        if not 1 <= partitions <= MAX_PARTITIONS_PER_TOPIC:
            raise ApplyError(
                "INVALID_PARTITION_COUNT",
                f"invalid partition count {partitions}: use 1 to {MAX_PARTITIONS_PER_TOPIC}",
                partitions=partitions,
            )
        node_ids = sorted(view.nodes)
        if not node_ids:
            raise ApplyError("NOT_ENOUGH_NODES", "no node has registered yet; retry shortly")
        replication_factor = doc["replication_factor"]
        if not 1 <= replication_factor <= len(node_ids):
            raise ApplyError(
                "INVALID_REPLICATION_FACTOR",
                f"invalid replication factor {replication_factor}: the cluster has "
                f"{len(node_ids)} registered nodes",
                replication_factor=replication_factor, nodes=len(node_ids),
            )
        used_ports = _ports_in_use(view)
        topic_id = int(index)
        placements = []
        for partition in range(partitions):
            start = (partition + topic_id) % len(node_ids)
            replicas = [node_ids[(start + j) % len(node_ids)] for j in range(replication_factor)]
            ports = {}
            for node_id in replicas:
                ports[node_id] = _take_free_port(view.nodes[node_id], used_ports)
            placements.append({
                "partition": partition,
                "replicas": replicas,
                "raft_ports": {str(n): port for n, port in ports.items()},
            })
        record = {
            "name": name,
            "topic_id": topic_id,
            "replication_factor": replication_factor,
            "partitions": placements,
            "max_message_bytes": doc["max_message_bytes"],
            # Optional: create_topic commands journaled before backlog
            # limits existed lack them.
            "max_backlog_messages": doc.get("max_backlog_messages", 0),
            "max_backlog_bytes": doc.get("max_backlog_bytes", 0),
            "overflow_policy": doc.get("overflow_policy") or "reject",
            "retention_ms": doc.get("retention_ms", 0),
        }
        txn.put(name.encode(), json.dumps(record, sort_keys=True).encode(), db=self.dbs[b"topics"])
        counts = self.view.partition_counts()
        counts[name] = partitions
        self._topics_changed(txn, name, counts, doc.get("now_ms", 0))
        return self._load_view(txn).topics[name]

    def _delete_topic(self, txn: lmdb.Transaction, doc: dict) -> str:
        name = doc["name"]
        if name not in self.view.topics:
            raise ApplyError("UNKNOWN_TOPIC", f"topic {name!r} does not exist", topic=name)
        txn.delete(name.encode(), db=self.dbs[b"topics"])
        for partition in range(len(self.view.topics[name].partitions)):
            txn.delete(f"{name}/{partition}".encode(), db=self.dbs[b"leaders"])
        counts = self.view.partition_counts()
        del counts[name]
        self._topics_changed(txn, name, counts, doc.get("now_ms", 0))
        return name

    def _report_leader(self, txn: lmdb.Transaction, doc: dict) -> bool:
        topic = self.view.topics.get(doc["topic"])
        if topic is None or topic.topic_id != doc["topic_id"]:
            return False
        if not 0 <= doc["partition"] < len(topic.partitions):
            return False
        key = f"{doc['topic']}/{doc['partition']}".encode()
        current = self.view.leaders.get((doc["topic"], doc["partition"]))
        if current is not None and current.term > doc["term"]:
            return False
        txn.put(key, json.dumps({"leader": doc["leader"], "term": doc["term"]}).encode(),
                db=self.dbs[b"leaders"])
        return True

    # --- consumer groups -------------------------------------------------

    def _group_doc(self, txn: lmdb.Transaction, group_id: str) -> dict | None:
        raw = txn.get(group_id.encode(), db=self.dbs[b"groups"])
        return json.loads(raw) if raw is not None else None

    def _put_group(self, txn: lmdb.Transaction, doc: dict) -> None:
        txn.put(doc["group_id"].encode(), json.dumps(doc, sort_keys=True).encode(),
                db=self.dbs[b"groups"])

    def _join_group(self, txn: lmdb.Transaction, doc: dict) -> dict:
        problem = validate_group_id(doc["group"])
        if problem:
            raise ApplyError("INVALID_GROUP_ID", problem, group_id=doc["group"])
        group, result = group_rules.apply_join(
            self._group_doc(txn, doc["group"]), doc, self.view.partition_counts())
        self._put_group(txn, group)
        return result

    def _leave_group(self, txn: lmdb.Transaction, doc: dict) -> list[str]:
        group = self._group_doc(txn, doc["group"])
        if group is None:
            return []
        group, removed = group_rules.apply_leave(group, doc, self.view.partition_counts())
        if removed:
            self._put_group(txn, group)
        return removed

    def _release_partitions(self, txn: lmdb.Transaction, doc: dict) -> list:
        group = self._group_doc(txn, doc["group"])
        if group is None:
            return []
        group, moved = group_rules.apply_release(group, doc)
        if moved:
            self._put_group(txn, group)
        return moved

    def _topics_changed(self, txn: lmdb.Transaction, topic: str, counts: dict[str, int],
                        now_ms: int) -> None:
        for group_id, record in sorted(self.view.groups.items()):
            if any(topic in member.topics for member in record.members.values()):
                group = group_rules.apply_topics_changed(
                    self._group_doc(txn, group_id), counts, now_ms)
                self._put_group(txn, group)


def _ports_in_use(view: MetadataView) -> dict[NodeId, set[int]]:
    used: dict[NodeId, set[int]] = {node_id: set() for node_id in view.nodes}
    for topic in view.topics.values():
        for placement in topic.partitions:
            for node_id, port in placement.raft_ports.items():
                used.setdefault(node_id, set()).add(port)
    return used


def _take_free_port(node: NodeRecord, used: dict[NodeId, set[int]]) -> int:
    """Take the lowest free partition port of `node`; base itself is the metadata group's."""
    taken = used.setdefault(node.node_id, set())
    for port in range(node.raft_port_base + 1, node.raft_port_base + node.raft_port_span):
        if port not in taken:
            taken.add(port)
            return port
    raise ApplyError(
        "RAFT_PORTS_EXHAUSTED",
        f"node {node.node_id} has no free Raft port left in "
        f"{node.raft_port_base + 1}..{node.raft_port_base + node.raft_port_span - 1}; "
        "delete topics or raise raft_port_span",
        node_id=node.node_id,
    )
