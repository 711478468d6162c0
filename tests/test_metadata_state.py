"""Tests of the cluster metadata state machine, MetadataStore: node
registration, topic placement and Raft port allocation, topic deletion and
leader reports."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftmq.coordinator.metadata import MetadataStore, MetadataView, encode_command
from raftmq.raft.store import ApplyError

MAP_SIZE_BYTES = 16 * 2**20
RAFT_PORT_BASE = 20000
RAFT_PORT_SPAN = 50


class Commands:
    """Apply metadata commands to a store at consecutive Raft indexes."""

    def __init__(self, store: MetadataStore):
        self.store = store
        self.indexes = itertools.count(store.applied_index + 1)

    def apply(self, op: str, **fields):
        return self.store.apply(next(self.indexes), encode_command(op, **fields))

    def register_node(self, node_id: int, port_base: int = RAFT_PORT_BASE, port_span: int = RAFT_PORT_SPAN):
        return self.apply(
            "register_node", node_id=node_id, address=f"10.0.0.{node_id}:9092",
            raft_host=f"10.0.0.{node_id}", raft_port_base=port_base, raft_port_span=port_span,
        )

    def create_topic(self, name: str, partitions: int = 1, replication_factor: int = 1):
        return self.apply(
            "create_topic", name=name, partitions=partitions,
            replication_factor=replication_factor, max_message_bytes=2**20,
        )

    def delete_topic(self, name: str):
        return self.apply("delete_topic", name=name)

    def report_leader(self, topic: str, topic_id: int, partition: int, leader: int, term: int):
        return self.apply(
            "report_leader", topic=topic, topic_id=topic_id, partition=partition,
            leader=leader, term=term,
        )


@pytest.fixture
def store(tmp_path):
    metadata = MetadataStore(str(tmp_path / "metadata"), map_size_bytes=MAP_SIZE_BYTES)
    yield metadata
    metadata.close()


@pytest.fixture
def commands(store):
    return Commands(store)


@pytest.fixture
def three_nodes(commands):
    for node_id in (1, 2, 3):
        commands.register_node(node_id)
    return commands


def port_problems(view: MetadataView) -> list[str]:
    """List every Raft port used twice on one node or outside that node's span."""
    problems = []
    used: dict[int, set[int]] = {}
    for topic in view.topics.values():
        for placement in topic.partitions:
            for node_id, port in placement.raft_ports.items():
                node = view.nodes[node_id]
                if not node.raft_port_base < port < node.raft_port_base + node.raft_port_span:
                    problems.append(f"{topic.name}/{placement.partition}: port {port} of node {node_id} is outside its span")
                if port in used.setdefault(node_id, set()):
                    problems.append(f"{topic.name}/{placement.partition}: port {port} of node {node_id} is taken twice")
                used[node_id].add(port)
    return problems


# --- placement ------------------------------------------------------------


def test_replicas_are_distinct_nodes(commands):
    for node_id in range(1, 6):
        commands.register_node(node_id)
    topic = commands.create_topic("orders", partitions=10, replication_factor=3)
    for placement in topic.partitions:
        assert len(set(placement.replicas)) == 3, placement


def test_replica_count_matches_replication_factor(three_nodes):
    topic = three_nodes.create_topic("orders", partitions=4, replication_factor=2)
    assert [len(placement.replicas) for placement in topic.partitions] == [2, 2, 2, 2]


def test_every_replica_has_a_raft_port(three_nodes):
    topic = three_nodes.create_topic("orders", partitions=4, replication_factor=2)
    for placement in topic.partitions:
        assert set(placement.raft_ports) == set(placement.replicas), placement


def test_created_topic_is_in_view(store, three_nodes):
    topic = three_nodes.create_topic("orders", partitions=2, replication_factor=3)
    assert store.view.topics["orders"] == topic


def test_topic_id_is_raft_index(store, three_nodes):
    topic = three_nodes.create_topic("orders")
    assert topic.topic_id == store.applied_index


def test_partition_ports_skip_port_base(three_nodes):
    topic = three_nodes.create_topic("orders", partitions=1, replication_factor=3)
    assert set(topic.partitions[0].raft_ports.values()) == {RAFT_PORT_BASE + 1}


def test_ports_stay_inside_span(store, commands):
    commands.register_node(1, port_base=30000, port_span=6)
    commands.create_topic("orders", partitions=5)
    ports = {port for placement in store.view.topics["orders"].partitions for port in placement.raft_ports.values()}
    assert ports == {30001, 30002, 30003, 30004, 30005}


def test_nodes_allocate_ports_separately(commands):
    commands.register_node(1, port_base=30000)
    commands.register_node(2, port_base=40000)
    topic = commands.create_topic("orders", partitions=1, replication_factor=2)
    assert topic.partitions[0].raft_ports == {1: 30001, 2: 40001}


def test_deleted_topic_frees_its_ports(commands):
    commands.register_node(1, port_span=4)
    commands.create_topic("orders", partitions=3)
    commands.delete_topic("orders")
    assert not isinstance(commands.create_topic("payments", partitions=3), ApplyError)


def test_exhausted_span_returns_apply_error(commands):
    commands.register_node(1, port_span=4)
    result = commands.create_topic("orders", partitions=4)
    assert isinstance(result, ApplyError)
    assert result.reason == "RAFT_PORTS_EXHAUSTED", result.message


def test_exhausted_span_creates_nothing(store, commands):
    commands.register_node(1, port_span=4)
    commands.create_topic("orders", partitions=3)
    commands.create_topic("payments", partitions=1)
    assert sorted(store.view.topics) == ["orders"]


def test_exhausted_span_still_advances_applied_index(store, commands):
    commands.register_node(1, port_span=4)
    commands.create_topic("orders", partitions=4)
    assert store.applied_index == 2


# --- hypothesis: create and delete sequences ----------------------------------

TOPIC_NAMES = ("alpha", "beta", "gamma")
# Each node gets 7 partition ports, few enough that create sequences run out.
SMALL_SPAN = 8

topic_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("create"), st.sampled_from(TOPIC_NAMES),
            st.integers(min_value=1, max_value=6), st.integers(min_value=1, max_value=3),
        ),
        st.tuples(st.just("delete"), st.sampled_from(TOPIC_NAMES)),
    ),
    min_size=1,
    max_size=20,
)

# Each example makes its own folder under tmp_path, so sharing the fixture
# between examples is safe.
sequence_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def run_ops(store: MetadataStore, ops) -> list:
    commands = Commands(store)
    for node_id in (1, 2, 3):
        commands.register_node(node_id, port_base=RAFT_PORT_BASE + 100 * node_id, port_span=SMALL_SPAN)
    results = []
    for op in ops:
        if op[0] == "create":
            _, name, partitions, replication_factor = op
            results.append(commands.create_topic(name, partitions, replication_factor))
        else:
            results.append(commands.delete_topic(op[1]))
    return results


def result_summary(result):
    """Return a comparable form of an apply result, because ApplyError instances compare by identity."""
    if isinstance(result, ApplyError):
        return ("ApplyError", result.reason, result.message)
    return result


@sequence_settings
@given(ops=topic_ops)
def test_placement_is_deterministic(tmp_path, ops):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    first = MetadataStore(str(folder / "first"), map_size_bytes=MAP_SIZE_BYTES)
    second = MetadataStore(str(folder / "second"), map_size_bytes=MAP_SIZE_BYTES)
    try:
        first_results = [result_summary(result) for result in run_ops(first, ops)]
        second_results = [result_summary(result) for result in run_ops(second, ops)]
        assert first_results == second_results
        assert first.view == second.view
    finally:
        first.close()
        second.close()
        shutil.rmtree(folder)


def min_free_ports(view: MetadataView) -> int:
    """Return the fewest partition ports still free on any node."""
    free = {node_id: node.raft_port_span - 1 for node_id, node in view.nodes.items()}
    for topic in view.topics.values():
        for placement in topic.partitions:
            for node_id in placement.replicas:
                free[node_id] -= 1
    return min(free.values())


@sequence_settings
@given(ops=topic_ops)
def test_ports_unique_across_create_delete(tmp_path, ops):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    store = MetadataStore(str(folder / "metadata"), map_size_bytes=MAP_SIZE_BYTES)
    try:
        commands = Commands(store)
        for node_id in (1, 2, 3):
            commands.register_node(node_id, port_base=RAFT_PORT_BASE + 100 * node_id, port_span=SMALL_SPAN)
        for op in ops:
            existing = set(store.view.topics)
            if op[0] == "create":
                _, name, partitions, replication_factor = op
                free_ports = min_free_ports(store.view)
                result = commands.create_topic(name, partitions, replication_factor)
                if name in existing:
                    assert isinstance(result, ApplyError)
                    assert result.reason == "TOPIC_ALREADY_EXISTS"
                elif partitions <= free_ports:
                    # A node hosts at most one replica of each partition, so
                    # it needs at most `partitions` free ports.
                    assert not isinstance(result, ApplyError), result.message
                if isinstance(result, ApplyError):
                    assert set(store.view.topics) == existing
            else:
                result = commands.delete_topic(op[1])
                if op[1] in existing:
                    assert op[1] not in store.view.topics
                else:
                    assert isinstance(result, ApplyError)
                    assert result.reason == "UNKNOWN_TOPIC"
            assert port_problems(store.view) == [], op
            placements = [
                (topic, placement) for topic in store.view.topics.values() for placement in topic.partitions
            ]
            for topic, placement in placements:
                assert len(placement.replicas) == topic.replication_factor, placement
                assert len(set(placement.replicas)) == len(placement.replicas), placement
    finally:
        store.close()
        shutil.rmtree(folder)


# --- invalid requests -----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a" * 250, "a/b", "a b", "topic:1", "caf\u00e9", "tab\there", "orders\n"],
)
def test_invalid_topic_name_rejected(three_nodes, name):
    result = three_nodes.create_topic(name)
    assert isinstance(result, ApplyError)
    assert result.reason == "INVALID_TOPIC_NAME"


@pytest.mark.parametrize("name", ["a", "a" * 249, "Orders.v2_eu-west", "..."])
def test_valid_topic_name_accepted(three_nodes, name):
    assert not isinstance(three_nodes.create_topic(name), ApplyError)


@pytest.mark.parametrize("partitions", [0, -1, 1025])
def test_invalid_partition_count_rejected(three_nodes, partitions):
    result = three_nodes.create_topic("orders", partitions=partitions)
    assert isinstance(result, ApplyError)
    assert result.reason == "INVALID_PARTITION_COUNT"


def test_max_partition_count_accepted(commands):
    commands.register_node(1, port_span=1100)
    assert len(commands.create_topic("orders", partitions=1024).partitions) == 1024


@pytest.mark.parametrize("replication_factor", [0, -1, 4])
def test_invalid_replication_factor_rejected(three_nodes, replication_factor):
    result = three_nodes.create_topic("orders", replication_factor=replication_factor)
    assert isinstance(result, ApplyError)
    assert result.reason == "INVALID_REPLICATION_FACTOR"


def test_topic_without_nodes_rejected(commands):
    result = commands.create_topic("orders", replication_factor=1)
    assert isinstance(result, ApplyError)
    assert result.reason == "NOT_ENOUGH_NODES"


def test_rejected_create_advances_applied_index(store, three_nodes):
    three_nodes.create_topic("orders", partitions=0)
    assert store.applied_index == 4


def test_duplicate_create_rejected(three_nodes):
    three_nodes.create_topic("orders")
    result = three_nodes.create_topic("orders", partitions=2)
    assert isinstance(result, ApplyError)
    assert result.reason == "TOPIC_ALREADY_EXISTS"


def test_duplicate_create_keeps_first_topic(store, three_nodes):
    first = three_nodes.create_topic("orders")
    three_nodes.create_topic("orders", partitions=2)
    assert store.view.topics["orders"] == first


def test_delete_unknown_topic_rejected(three_nodes):
    result = three_nodes.delete_topic("orders")
    assert isinstance(result, ApplyError)
    assert result.reason == "UNKNOWN_TOPIC"


def test_undecodable_command_rejected(store):
    result = store.apply(1, b"not json")
    assert isinstance(result, ApplyError)
    assert result.reason == "INVALID_REQUEST"


def test_unknown_op_rejected(commands):
    result = commands.apply("rename_topic", name="orders")
    assert isinstance(result, ApplyError)
    assert result.reason == "INVALID_REQUEST"


# --- leader reports -------------------------------------------------------------


def test_leader_report_is_stored(store, three_nodes):
    topic = three_nodes.create_topic("orders", partitions=2, replication_factor=3)
    assert three_nodes.report_leader("orders", topic.topic_id, 1, leader=2, term=5) is True
    assert store.view.leaders[("orders", 1)].leader == 2


def test_leader_report_with_higher_term_replaces(store, three_nodes):
    topic = three_nodes.create_topic("orders", replication_factor=3)
    three_nodes.report_leader("orders", topic.topic_id, 0, leader=1, term=5)
    three_nodes.report_leader("orders", topic.topic_id, 0, leader=2, term=6)
    assert store.view.leaders[("orders", 0)].leader == 2


def test_leader_report_with_lower_term_ignored(store, three_nodes):
    topic = three_nodes.create_topic("orders", replication_factor=3)
    three_nodes.report_leader("orders", topic.topic_id, 0, leader=1, term=5)
    assert three_nodes.report_leader("orders", topic.topic_id, 0, leader=2, term=4) is False
    assert store.view.leaders[("orders", 0)].leader == 1


def test_leader_report_with_stale_topic_id_ignored(store, three_nodes):
    old = three_nodes.create_topic("orders", replication_factor=3)
    three_nodes.delete_topic("orders")
    three_nodes.create_topic("orders", replication_factor=3)
    assert three_nodes.report_leader("orders", old.topic_id, 0, leader=1, term=9) is False
    assert ("orders", 0) not in store.view.leaders


def test_leader_report_for_unknown_topic_ignored(store, three_nodes):
    assert three_nodes.report_leader("orders", 1, 0, leader=1, term=1) is False
    assert store.view.leaders == {}


def test_delete_topic_drops_leader_reports(store, three_nodes):
    topic = three_nodes.create_topic("orders", partitions=2, replication_factor=3)
    three_nodes.report_leader("orders", topic.topic_id, 1, leader=3, term=2)
    three_nodes.delete_topic("orders")
    three_nodes.create_topic("orders", partitions=2, replication_factor=3)
    assert store.view.leaders == {}


@pytest.mark.parametrize("partition", [-1, 1, 7])
def test_leader_report_for_missing_partition_ignored(store, three_nodes, partition):
    topic = three_nodes.create_topic("orders", partitions=1, replication_factor=3)
    assert three_nodes.report_leader("orders", topic.topic_id, partition, leader=1, term=1) is False
    assert store.view.leaders == {}


# --- persistence ----------------------------------------------------------------


def test_view_survives_reopen(tmp_path):
    path = str(tmp_path / "metadata")
    store = MetadataStore(path, map_size_bytes=MAP_SIZE_BYTES)
    commands = Commands(store)
    for node_id in (1, 2, 3):
        commands.register_node(node_id)
    topic = commands.create_topic("orders", partitions=3, replication_factor=2)
    commands.create_topic("payments")
    commands.delete_topic("payments")
    commands.report_leader("orders", topic.topic_id, 2, leader=3, term=4)
    view, applied_index = store.view, store.applied_index
    store.close()

    reopened = MetadataStore(path, map_size_bytes=MAP_SIZE_BYTES)
    try:
        assert reopened.view == view
        assert reopened.applied_index == applied_index
    finally:
        reopened.close()


def test_reopened_store_keeps_allocating_free_ports(tmp_path):
    path = str(tmp_path / "metadata")
    store = MetadataStore(path, map_size_bytes=MAP_SIZE_BYTES)
    commands = Commands(store)
    commands.register_node(1)
    commands.create_topic("orders", partitions=2)
    store.close()

    reopened = MetadataStore(path, map_size_bytes=MAP_SIZE_BYTES)
    try:
        topic = Commands(reopened).create_topic("payments", partitions=1)
        assert topic.partitions[0].raft_ports == {1: RAFT_PORT_BASE + 3}
    finally:
        reopened.close()


def test_register_node_stores_internal_address(commands, store):
    commands.apply(
        "register_node", node_id=1, address="127.0.0.1:19092", raft_host="node1",
        raft_port_base=RAFT_PORT_BASE, raft_port_span=RAFT_PORT_SPAN,
        internal_address="node1:9092",
    )
    record = store.view.nodes[1]
    assert record.address == "127.0.0.1:19092"
    assert record.internal_address == "node1:9092"


def test_node_record_without_internal_address_loads(commands, store):
    # A register_node command journaled before internal_address existed.
    commands.register_node(1)
    assert store.view.nodes[1].internal_address == store.view.nodes[1].address
