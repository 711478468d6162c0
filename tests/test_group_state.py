"""Tests of the consumer group rules in coordinator/groups.py.

They cover joins, static membership, leaves, the two-step hand-over of
partitions, topic changes and generation numbers. The rules are tested as
pure functions first, then through MetadataStore on real LMDB files."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from raftmq.coordinator.groups import (
    apply_join,
    apply_leave,
    apply_release,
    apply_topics_changed,
    group_from_doc,
    split_tp_key,
)
from raftmq.coordinator.metadata import MetadataStore, encode_command
from raftmq.raft.store import ApplyError

MAP_SIZE_BYTES = 16 * 2**20
GROUP = "billing"


def join_command(member_id: str, topics, instance_id: str = "", strategy: str = "",
                 reset: str = "", now_ms: int = 1000, session_timeout_ms: int = 10000) -> dict:
    return {
        "op": "join_group", "group": GROUP, "member_id": member_id, "instance_id": instance_id,
        "client_id": f"client-{member_id}", "topics": list(topics),
        "session_timeout_ms": session_timeout_ms, "rebalance_timeout_ms": 30000,
        "strategy": strategy, "reset": reset, "now_ms": now_ms,
    }


def leave_command(*member_ids: str, now_ms: int = 2000) -> dict:
    return {"op": "leave_group", "group": GROUP, "member_ids": list(member_ids), "now_ms": now_ms}


def release_command(member_id: str, partitions, force: bool = False, now_ms: int = 3000) -> dict:
    return {"op": "release_partitions", "group": GROUP, "member_id": member_id,
            "partitions": [list(tp) for tp in partitions], "force": force, "now_ms": now_ms}


def owned(doc: dict, member_id: str) -> list[tuple[str, int]]:
    return group_from_doc(doc).owned_by(member_id)


def all_partitions(counts: dict[str, int], topics) -> set[str]:
    return {f"{topic}/{p}" for topic in topics if topic in counts for p in range(counts[topic])}


def without_generation(doc: dict) -> dict:
    return {key: value for key, value in doc.items() if key != "generation"}


# --- joins ----------------------------------------------------------------


def test_first_join_creates_group():
    doc, result = apply_join(None, join_command("m1", ["orders"]), {"orders": 3})
    assert doc["generation"] == 1
    assert doc["strategy"] == "sticky"
    assert doc["reset"] == "latest"
    assert doc["pending"] == {}
    assert result["generation"] == 1
    assert result["partitions"] == [("orders", 0), ("orders", 1), ("orders", 2)]
    assert result["revoking"] == []


def test_first_join_fixes_strategy_and_reset():
    doc, _ = apply_join(None, join_command("m1", ["orders"], strategy="range", reset="earliest"),
                        {"orders": 1})
    assert doc["strategy"] == "range"
    assert doc["reset"] == "earliest"


def test_noop_rejoin_keeps_generation():
    counts = {"orders": 4}
    doc, _ = apply_join(None, join_command("m1", ["orders"]), counts)
    doc, _ = apply_join(doc, join_command("m2", ["orders"]), counts)
    again, result = apply_join(doc, join_command("m2", ["orders"], now_ms=99999), counts)
    assert again == doc
    assert result["generation"] == doc["generation"]


def test_rejoin_topic_order_is_noop():
    counts = {"a": 1, "b": 1}
    doc, _ = apply_join(None, join_command("m1", ["a", "b"]), counts)
    again, _ = apply_join(doc, join_command("m1", ["b", "a", "b"]), counts)
    assert again == doc


def test_rejoin_with_new_settings_raises_generation():
    counts = {"orders": 2}
    doc, _ = apply_join(None, join_command("m1", ["orders"]), counts)
    again, _ = apply_join(doc, join_command("m1", ["orders"], session_timeout_ms=20000), counts)
    assert again["generation"] == doc["generation"] + 1
    assert again["members"]["m1"]["session_timeout_ms"] == 20000


def test_join_does_not_modify_input():
    counts = {"orders": 2}
    doc, _ = apply_join(None, join_command("m1", ["orders"]), counts)
    before = copy.deepcopy(doc)
    apply_join(doc, join_command("m2", ["orders"]), counts)
    assert doc == before


@pytest.mark.parametrize("field, value", [("strategy", "range"), ("reset", "earliest")])
def test_different_protocol_is_inconsistent(field, value):
    counts = {"orders": 2}
    doc, _ = apply_join(None, join_command("m1", ["orders"]), counts)
    with pytest.raises(ApplyError) as raised:
        apply_join(doc, join_command("m2", ["orders"], **{field: value}), counts)
    assert raised.value.reason == "INCONSISTENT_GROUP_PROTOCOL"
    assert raised.value.metadata["asked"] == value


def test_empty_protocol_joins_existing_group():
    counts = {"orders": 2}
    doc, _ = apply_join(None, join_command("m1", ["orders"], strategy="roundrobin", reset="none"), counts)
    doc, _ = apply_join(doc, join_command("m2", ["orders"]), counts)
    assert sorted(doc["members"]) == ["m1", "m2"]
    assert doc["strategy"] == "roundrobin"
    assert doc["reset"] == "none"


@pytest.mark.parametrize("field, value", [("strategy", "fastest"), ("reset", "middle")])
def test_unknown_group_setting_is_invalid(field, value):
    with pytest.raises(ApplyError) as raised:
        apply_join(None, join_command("m1", ["orders"], **{field: value}), {"orders": 1})
    assert raised.value.reason == "INVALID_REQUEST"


# --- two-step hand-over ---------------------------------------------------


@pytest.fixture
def handing_over():
    """Return (doc, counts): m1 owns all six partitions, m2 just joined."""
    counts = {"orders": 6}
    doc, _ = apply_join(None, join_command("m1", ["orders"]), counts)
    doc, _ = apply_join(doc, join_command("m2", ["orders"], now_ms=5000), counts)
    return doc, counts


def test_join_marks_moves_pending(handing_over):
    doc, _ = handing_over
    assert doc["generation"] == 2
    assert set(doc["owners"].values()) == {"m1"}
    assert len(doc["pending"]) == 3
    for pending in doc["pending"].values():
        assert pending == {"to": "m2", "since_ms": 5000}
    group = group_from_doc(doc)
    assert group.state == "rebalancing"
    assert group.owned_by("m2") == []
    assert group.incoming("m2") == sorted(split_tp_key(key) for key in doc["pending"])
    assert group.revoking("m1") == group.incoming("m2")


def test_release_by_owner_moves_partition(handing_over):
    doc, _ = handing_over
    key = sorted(doc["pending"])[0]
    tp = split_tp_key(key)
    released, moved = apply_release(doc, release_command("m1", [tp]))
    assert moved == [tp]
    assert released["owners"][key] == "m2"
    assert key not in released["pending"]
    assert released["generation"] == doc["generation"] + 1
    assert len(released["pending"]) == 2


def test_release_of_all_makes_group_stable(handing_over):
    doc, _ = handing_over
    tps = [split_tp_key(key) for key in sorted(doc["pending"])]
    released, moved = apply_release(doc, release_command("m1", tps))
    assert moved == tps
    assert released["generation"] == doc["generation"] + 1
    assert group_from_doc(released).state == "stable"
    assert len(owned(released, "m1")) == 3
    assert len(owned(released, "m2")) == 3


def test_release_by_non_owner_ignored(handing_over):
    doc, _ = handing_over
    tps = [split_tp_key(key) for key in sorted(doc["pending"])]
    released, moved = apply_release(doc, release_command("m2", tps))
    assert moved == []
    assert released == doc


def test_release_of_stable_partition_ignored(handing_over):
    doc, _ = handing_over
    staying = sorted(set(doc["owners"]) - set(doc["pending"]))[0]
    released, moved = apply_release(doc, release_command("m1", [split_tp_key(staying)]))
    assert moved == []
    assert released == doc


def test_forced_release_moves_partition(handing_over):
    doc, _ = handing_over
    key = sorted(doc["pending"])[-1]
    released, moved = apply_release(doc, release_command("", [split_tp_key(key)], force=True))
    assert moved == [split_tp_key(key)]
    assert released["owners"][key] == "m2"
    assert released["generation"] == doc["generation"] + 1


def test_rebalance_keeps_pending_since(handing_over):
    doc, counts = handing_over
    rejoined, _ = apply_join(doc, join_command("m1", ["orders"], session_timeout_ms=1, now_ms=9000), counts)
    assert rejoined["pending"] == doc["pending"]


def test_pending_target_leaving_cancels_move(handing_over):
    doc, counts = handing_over
    left, removed = apply_leave(doc, leave_command("m2"), counts)
    assert removed == ["m2"]
    assert left["pending"] == {}
    assert set(left["owners"].values()) == {"m1"}
    assert left["generation"] == doc["generation"] + 1


# --- leaves -----------------------------------------------------------------


def stable_pair(counts):
    """Return a stable doc where m1 and m2 share the partitions of `orders`."""
    doc, _ = apply_join(None, join_command("m1", ["orders"]), counts)
    doc, _ = apply_join(doc, join_command("m2", ["orders"]), counts)
    tps = [split_tp_key(key) for key in sorted(doc["pending"])]
    doc, _ = apply_release(doc, release_command("m1", tps))
    return doc


def test_leave_hands_partitions_directly():
    counts = {"orders": 6}
    doc = stable_pair(counts)
    left, removed = apply_leave(doc, leave_command("m2"), counts)
    assert removed == ["m2"]
    assert left["pending"] == {}
    assert left["owners"] == {f"orders/{p}": "m1" for p in range(6)}
    assert left["generation"] == doc["generation"] + 1


def test_leave_of_owner_hands_pending_directly(handing_over):
    doc, counts = handing_over
    left, _ = apply_leave(doc, leave_command("m1"), counts)
    assert left["pending"] == {}
    assert left["owners"] == {f"orders/{p}": "m2" for p in range(6)}


def test_leave_of_unknown_member_is_noop():
    counts = {"orders": 2}
    doc = stable_pair(counts)
    left, removed = apply_leave(doc, leave_command("nobody"), counts)
    assert removed == []
    assert left == doc


def test_last_leave_empties_group():
    counts = {"orders": 2}
    doc = stable_pair(counts)
    left, removed = apply_leave(doc, leave_command("m2", "m1", "m2"), counts)
    assert removed == ["m1", "m2"]
    assert left["owners"] == {}
    assert group_from_doc(left).state == "empty"
    assert left["generation"] == doc["generation"] + 1


# --- static membership ------------------------------------------------------


def test_static_member_keeps_partitions():
    counts = {"orders": 6}
    doc, _ = apply_join(None, join_command("m1-old", ["orders"], instance_id="host-1"), counts)
    doc, _ = apply_join(doc, join_command("m2", ["orders"]), counts)
    doc, _ = apply_release(doc, release_command("m1-old", [split_tp_key(k) for k in doc["pending"]]))
    before = owned(doc, "m1-old")
    rejoined, result = apply_join(doc, join_command("m1-new", ["orders"], instance_id="host-1"), counts)
    assert result["partitions"] == before
    assert owned(rejoined, "m1-new") == before
    assert "m1-old" not in rejoined["members"]
    assert rejoined["pending"] == {}
    assert owned(rejoined, "m2") == owned(doc, "m2")
    assert rejoined["generation"] == doc["generation"] + 1


def test_static_member_takes_over_pending():
    counts = {"orders": 4}
    doc, _ = apply_join(None, join_command("m1", ["orders"]), counts)
    doc, _ = apply_join(doc, join_command("m2-old", ["orders"], instance_id="host-2"), counts)
    rejoined, result = apply_join(doc, join_command("m2-new", ["orders"], instance_id="host-2"), counts)
    assert {p["to"] for p in rejoined["pending"].values()} == {"m2-new"}
    assert set(rejoined["pending"]) == set(doc["pending"])
    assert result["partitions"] == []


def test_static_member_with_new_topics_rebalances():
    counts = {"orders": 2, "payments": 2}
    doc, _ = apply_join(None, join_command("m1-old", ["orders"], instance_id="host-1"), counts)
    rejoined, result = apply_join(doc, join_command("m1-new", ["payments"], instance_id="host-1"), counts)
    assert result["partitions"] == [("payments", 0), ("payments", 1)]
    assert rejoined["owners"] == {"payments/0": "m1-new", "payments/1": "m1-new"}


def test_existing_member_taking_instance_rebalances():
    counts = {"a": 2, "b": 2}
    doc, _ = apply_join(None, join_command("y", ["b"], instance_id="host-1"), counts)
    doc, _ = apply_join(doc, join_command("x", ["a"]), counts)
    rejoined, _ = apply_join(doc, join_command("x", ["b"], instance_id="host-1"), counts)
    assert rejoined["members"]["x"]["topics"] == ["b"]
    # x subscribes to b only, so a's partitions must not stay with it.
    assert owned(rejoined, "x") == [("b", 0), ("b", 1)]


# --- topic changes ----------------------------------------------------------


def test_created_topic_is_assigned():
    doc, _ = apply_join(None, join_command("m1", ["orders", "payments"]), {"orders": 1})
    changed = apply_topics_changed(doc, {"orders": 1, "payments": 2}, now_ms=7000)
    assert changed["owners"] == {"orders/0": "m1", "payments/0": "m1", "payments/1": "m1"}
    assert changed["generation"] == doc["generation"] + 1


def test_deleted_topic_is_unassigned():
    counts = {"orders": 2, "payments": 2}
    doc, _ = apply_join(None, join_command("m1", ["orders", "payments"]), counts)
    doc, _ = apply_join(doc, join_command("m2", ["orders", "payments"]), counts)
    changed = apply_topics_changed(doc, {"orders": 2}, now_ms=7000)
    assert set(changed["owners"]) == {"orders/0", "orders/1"}
    assert all(not key.startswith("payments/") for key in changed["pending"])
    assert changed["generation"] == doc["generation"] + 1


def test_unrelated_topic_change_keeps_generation():
    counts = {"orders": 2}
    doc, _ = apply_join(None, join_command("m1", ["orders"]), counts)
    changed = apply_topics_changed(doc, {"orders": 2, "other": 5}, now_ms=7000)
    assert changed == doc


# --- model-based sequence of rules -----------------------------------------

# Member ids with their instance ids: m1 and m1b are two incarnations of the
# static instance host-1.
MEMBER_INSTANCES = {"m1": "host-1", "m1b": "host-1", "m2": "", "m3": "host-3", "m4": ""}
WORLD_TOPICS = ("orders", "payments", "audit")


class GroupRules(RuleBasedStateMachine):
    """Drive one group document through random joins, leaves, releases and
    topic changes, and check the rules after every step."""

    def __init__(self):
        super().__init__()
        self.doc: dict | None = None
        self.counts: dict[str, int] = {"orders": 3, "payments": 2}
        self.now_ms = 0

    def step(self, new_doc: dict) -> None:
        self.check_generation(self.doc, new_doc)
        self.doc = new_doc

    def check_generation(self, old: dict | None, new: dict) -> None:
        if old is None:
            assert new["generation"] == 1
        elif without_generation(old) == without_generation(new):
            assert new["generation"] == old["generation"]
        else:
            assert new["generation"] == old["generation"] + 1

    def tick(self) -> int:
        self.now_ms += 100
        return self.now_ms

    @rule(member=st.sampled_from(sorted(MEMBER_INSTANCES)),
          topics=st.lists(st.sampled_from(WORLD_TOPICS), min_size=1, max_size=3),
          strategy=st.sampled_from(("", "sticky", "range", "roundrobin")))
    def join(self, member, topics, strategy):
        command = join_command(member, topics, instance_id=MEMBER_INSTANCES[member],
                               strategy=strategy, now_ms=self.tick())
        old = self.doc
        try:
            new, result = apply_join(old, command, self.counts)
        except ApplyError as exc:
            assert old is not None
            assert exc.reason == "INCONSISTENT_GROUP_PROTOCOL"
            assert strategy != old["strategy"]
            return
        assert result["generation"] == new["generation"]
        assert result["partitions"] == owned(new, member)
        replaced = None
        if old is not None:
            replaced = next((mid for mid, m in old["members"].items()
                             if mid != member and MEMBER_INSTANCES[member]
                             and m["instance_id"] == MEMBER_INSTANCES[member]), None)
            for key, owner in old["owners"].items():
                if key not in new["owners"]:
                    continue
                if owner == replaced:
                    assert new["owners"][key] == member, (key, owner)
                else:
                    # A join never takes a partition from a living owner.
                    assert new["owners"][key] == owner, (key, owner)
        self.step(new)

    @rule(members=st.lists(st.sampled_from(sorted(MEMBER_INSTANCES)), min_size=1, max_size=2))
    def leave(self, members):
        if self.doc is None:
            return
        old = self.doc
        new, removed = apply_leave(old, leave_command(*members, now_ms=self.tick()), self.counts)
        assert removed == sorted(set(members) & set(old["members"]))
        for key, owner in old["owners"].items():
            if key in new["owners"] and owner not in removed:
                assert new["owners"][key] == owner, (key, owner)
        self.step(new)

    @rule(member=st.sampled_from(sorted(MEMBER_INSTANCES) + [""]), force=st.booleans(),
          picks=st.lists(st.integers(min_value=0, max_value=5), max_size=3))
    def release(self, member, force, picks):
        if self.doc is None:
            return
        old = self.doc
        keys = sorted(old["owners"])
        tps = [split_tp_key(keys[i % len(keys)]) for i in picks] if keys else []
        new, moved = apply_release(old, release_command(member, tps, force=force, now_ms=self.tick()))
        for key, owner in old["owners"].items():
            tp = split_tp_key(key)
            if tp in moved:
                assert key in old["pending"]
                assert force or owner == member
                assert new["owners"][key] == old["pending"][key]["to"]
            else:
                assert new["owners"][key] == owner
        self.step(new)

    @rule(topic=st.sampled_from(WORLD_TOPICS), partitions=st.integers(min_value=0, max_value=4))
    def change_topic(self, topic, partitions):
        """Create a topic with `partitions` partitions, or delete it for 0."""
        if partitions:
            if topic in self.counts:
                return
            self.counts[topic] = partitions
        else:
            self.counts.pop(topic, None)
        if self.doc is None:
            return
        old = self.doc
        new = apply_topics_changed(old, dict(self.counts), self.tick())
        for key, owner in old["owners"].items():
            if key in new["owners"]:
                assert new["owners"][key] == owner, (key, owner)
        self.step(new)

    @invariant()
    def owners_cover_subscribed_partitions(self):
        if self.doc is None:
            return
        subscribed = {t for m in self.doc["members"].values() for t in m["topics"]}
        assert set(self.doc["owners"]) == all_partitions(self.counts, subscribed)

    @invariant()
    def owners_and_targets_are_members(self):
        if self.doc is None:
            return
        members = self.doc["members"]
        for key, owner in self.doc["owners"].items():
            assert owner in members, (key, owner)
            topic, _ = split_tp_key(key)
            if key not in self.doc["pending"]:
                assert topic in members[owner]["topics"], (key, owner)
        for key, pending in self.doc["pending"].items():
            assert key in self.doc["owners"]
            assert pending["to"] in members, (key, pending)
            assert pending["to"] != self.doc["owners"][key], key
            assert split_tp_key(key)[0] in members[pending["to"]]["topics"], (key, pending)

    @invariant()
    def document_round_trips(self):
        if self.doc is None:
            return
        group = group_from_doc(self.doc)
        assert group.generation == self.doc["generation"]
        assert {f"{t}/{p}": m for (t, p), m in group.owners.items()} == self.doc["owners"]


def test_group_rules_model():
    run_state_machine_as_test(GroupRules, settings=settings(
        max_examples=60, stateful_step_count=25, deadline=None))


# --- through MetadataStore ----------------------------------------------------


class Commands:
    """Apply metadata commands to a store at consecutive Raft indexes."""

    def __init__(self, store: MetadataStore):
        self.store = store
        self.indexes = itertools.count(store.applied_index + 1)

    def apply(self, command: dict):
        fields = {key: value for key, value in command.items() if key != "op"}
        return self.store.apply(next(self.indexes), encode_command(command["op"], **fields))

    def register_node(self, node_id: int):
        return self.apply({"op": "register_node", "node_id": node_id, "address": f"10.0.0.{node_id}:9092",
                           "raft_host": f"10.0.0.{node_id}", "raft_port_base": 20000,
                           "raft_port_span": 50})

    def create_topic(self, name: str, partitions: int):
        return self.apply({"op": "create_topic", "name": name, "partitions": partitions,
                           "replication_factor": 1, "max_message_bytes": 2**20, "now_ms": 4000})

    def delete_topic(self, name: str):
        return self.apply({"op": "delete_topic", "name": name, "now_ms": 4000})


def open_store(path: Path) -> MetadataStore:
    return MetadataStore(str(path), map_size_bytes=MAP_SIZE_BYTES)


@pytest.fixture
def store(tmp_path):
    metadata = open_store(tmp_path / "metadata")
    yield metadata
    metadata.close()


@pytest.fixture
def commands(store):
    commands = Commands(store)
    commands.register_node(1)
    return commands


def test_store_join_assigns_partitions(store, commands):
    commands.create_topic("orders", 3)
    result = commands.apply(join_command("m1", ["orders"]))
    assert result["partitions"] == [("orders", 0), ("orders", 1), ("orders", 2)]
    group = store.view.groups[GROUP]
    assert group.generation == 1
    assert group.owned_by("m1") == result["partitions"]
    assert set(group.members) == {"m1"}


def test_store_records_applied_index(store, commands):
    commands.create_topic("orders", 2)
    commands.apply(join_command("m1", ["orders"]))
    index = store.applied_index
    assert store.apply(index, encode_command("leave_group", group=GROUP, member_ids=["m1"],
                                             now_ms=0)) is None
    assert set(store.view.groups[GROUP].members) == {"m1"}
    assert store.applied_index == index


def test_store_hand_over_and_leave(store, commands):
    commands.create_topic("orders", 4)
    commands.apply(join_command("m1", ["orders"]))
    commands.apply(join_command("m2", ["orders"]))
    group = store.view.groups[GROUP]
    assert group.state == "rebalancing"
    revoking = group.revoking("m1")
    assert len(revoking) == 2

    assert commands.apply(release_command("m2", revoking)) == []
    assert store.view.groups[GROUP] == group

    assert commands.apply(release_command("m1", revoking)) == revoking
    group = store.view.groups[GROUP]
    assert group.state == "stable"
    assert group.owned_by("m2") == revoking
    assert group.generation == 3

    assert commands.apply(leave_command("m2")) == ["m2"]
    group = store.view.groups[GROUP]
    assert group.owned_by("m1") == [("orders", p) for p in range(4)]
    assert group.generation == 4


def test_store_leave_or_release_of_unknown_group(store, commands):
    assert commands.apply(leave_command("m1")) == []
    assert commands.apply(release_command("m1", [("orders", 0)])) == []
    assert GROUP not in store.view.groups


def test_store_inconsistent_protocol_is_apply_error(store, commands):
    commands.create_topic("orders", 2)
    commands.apply(join_command("m1", ["orders"], strategy="range"))
    before = store.view.groups[GROUP]
    result = commands.apply(join_command("m2", ["orders"], strategy="sticky"))
    assert isinstance(result, ApplyError)
    assert result.reason == "INCONSISTENT_GROUP_PROTOCOL"
    assert store.view.groups[GROUP] == before


def test_store_invalid_group_id(store, commands):
    command = join_command("m1", ["orders"])
    command["group"] = "no spaces"
    result = commands.apply(command)
    assert isinstance(result, ApplyError)
    assert result.reason == "INVALID_GROUP_ID"
    assert store.view.groups == {}


def test_store_created_topic_is_assigned(store, commands):
    commands.apply(join_command("m1", ["orders", "payments"]))
    commands.apply(join_command("m2", ["payments"]))
    assert store.view.groups[GROUP].owners == {}
    generation = store.view.groups[GROUP].generation

    commands.create_topic("payments", 4)
    group = store.view.groups[GROUP]
    assert sorted(group.owners) == [("payments", p) for p in range(4)]
    assert len(group.owned_by("m1")) == 2
    assert len(group.owned_by("m2")) == 2
    assert group.generation == generation + 1


def test_store_deleted_topic_is_unassigned(store, commands):
    commands.create_topic("orders", 2)
    commands.create_topic("payments", 2)
    commands.apply(join_command("m1", ["orders", "payments"]))
    generation = store.view.groups[GROUP].generation

    commands.delete_topic("payments")
    group = store.view.groups[GROUP]
    assert sorted(group.owners) == [("orders", 0), ("orders", 1)]
    assert group.pending == {}
    assert group.generation == generation + 1


def test_store_unrelated_topic_keeps_group(store, commands):
    commands.create_topic("orders", 2)
    commands.apply(join_command("m1", ["orders"]))
    before = store.view.groups[GROUP]
    commands.create_topic("unrelated", 3)
    commands.delete_topic("unrelated")
    assert store.view.groups[GROUP] == before


def test_store_reopen_keeps_groups(tmp_path):
    path = tmp_path / "metadata"
    store = open_store(path)
    commands = Commands(store)
    commands.register_node(1)
    commands.create_topic("orders", 5)
    commands.apply(join_command("m1", ["orders"], instance_id="host-1", strategy="sticky",
                                reset="earliest"))
    commands.apply(join_command("m2", ["orders"]))
    commands.apply(join_command("m3", ["orders"]))
    other = join_command("solo", ["orders"], strategy="roundrobin")
    other["group"] = "audit"
    commands.apply(other)
    view = store.view
    applied = store.applied_index
    store.close()

    reopened = open_store(path)
    try:
        assert reopened.applied_index == applied
        assert reopened.view.groups == view.groups
        assert reopened.view == view
        assert set(reopened.view.groups) == {GROUP, "audit"}
        assert reopened.view.groups[GROUP].pending
    finally:
        reopened.close()


def test_store_replay_gives_same_groups(tmp_path):
    """Applying the same commands to a fresh store gives an equal view."""
    commands_log = [
        join_command("m1", ["orders"]),
        join_command("m2", ["orders"], instance_id="host-2"),
        release_command("m1", [("orders", p) for p in range(6)]),
        join_command("m2b", ["orders"], instance_id="host-2"),
        leave_command("m1"),
    ]
    views = []
    for name in ("first", "second"):
        store = open_store(tmp_path / name)
        commands = Commands(store)
        commands.register_node(1)
        commands.create_topic("orders", 6)
        for command in commands_log:
            result = commands.apply(command)
            assert not isinstance(result, ApplyError), result
        views.append(store.view)
        store.close()
    assert views[0] == views[1]
    assert views[0].groups[GROUP].owned_by("m2b") == [("orders", p) for p in range(6)]
