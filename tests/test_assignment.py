"""Property tests of the consumer group assignment strategies
(coordinator/assignment.py): validity, determinism, balance and, for
"sticky", how few partitions move when members join or leave."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftmq.coordinator.assignment import STRATEGIES, assign

TOPICS = ("alpha", "beta", "gamma", "delta")
# Subscriptions may name this topic, which never has partitions.
MISSING_TOPIC = "missing"
MEMBER_IDS = ("a", "b", "c", "m-1", "m-2", "z")

# Applied per test, so other modules keep their own hypothesis settings.
examples = settings(max_examples=150, deadline=None)

partition_counts_strategy = st.dictionaries(
    st.sampled_from(TOPICS), st.integers(min_value=0, max_value=9), max_size=len(TOPICS))
topic_lists = st.lists(st.sampled_from(TOPICS + (MISSING_TOPIC,)), max_size=6)
subscriptions_strategy = st.dictionaries(st.sampled_from(MEMBER_IDS), topic_lists, max_size=len(MEMBER_IDS))
# A present assignment may name departed members and partitions that no
# longer exist.
current_strategy = st.dictionaries(
    st.tuples(st.sampled_from(TOPICS + (MISSING_TOPIC,)), st.integers(min_value=0, max_value=11)),
    st.sampled_from(MEMBER_IDS + ("gone",)),
    max_size=30,
)


@st.composite
def homogeneous_groups(draw, min_members=1):
    """Draw (subscriptions, partition_counts) where every member subscribes to the same topics."""
    counts = draw(st.dictionaries(st.sampled_from(TOPICS), st.integers(min_value=0, max_value=9),
                                  min_size=1, max_size=len(TOPICS)))
    topics = draw(st.lists(st.sampled_from(sorted(counts)), min_size=1, unique=True))
    members = draw(st.lists(st.sampled_from(MEMBER_IDS), min_size=min_members, unique=True))
    return {member: list(topics) for member in members}, counts


@st.composite
def balanced_assignments(draw, min_members=1):
    """Draw a homogeneous group and an assignment of it, balanced within one,
    dealt in a random partition and member order."""
    subscriptions, counts = draw(homogeneous_groups(min_members=min_members))
    partitions = draw(st.permutations(expected_partitions(subscriptions, counts)))
    members = draw(st.permutations(sorted(subscriptions)))
    current = {tp: members[i % len(members)] for i, tp in enumerate(partitions)}
    return subscriptions, counts, current


def expected_partitions(subscriptions, counts) -> list[tuple[str, int]]:
    """List every partition of a subscribed topic that exists, sorted."""
    topics = {topic for topics in subscriptions.values() for topic in topics if topic in counts}
    return sorted((topic, p) for topic in topics for p in range(counts[topic]))


def loads(subscriptions, assignment) -> Counter:
    """Count the partitions of each member, members without any included."""
    counter = Counter({member: 0 for member in subscriptions})
    counter.update(assignment.values())
    return counter


def spread(counter: Counter) -> int:
    return max(counter.values()) - min(counter.values())


def reversed_dict(mapping: dict) -> dict:
    return dict(reversed(list(mapping.items())))


# --- every strategy ---------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@examples
@given(subscriptions=subscriptions_strategy, counts=partition_counts_strategy, current=current_strategy)
def test_every_partition_has_one_subscribed_owner(strategy, subscriptions, counts, current):
    result = assign(strategy, subscriptions, counts, current)
    assert sorted(result) == expected_partitions(subscriptions, counts)
    for (topic, partition), member in result.items():
        assert member in subscriptions, (topic, partition, member)
        assert topic in subscriptions[member], (topic, partition, member)


@pytest.mark.parametrize("strategy", STRATEGIES)
@examples
@given(subscriptions=subscriptions_strategy, counts=partition_counts_strategy, current=current_strategy)
def test_assignment_is_deterministic(strategy, subscriptions, counts, current):
    first = assign(strategy, subscriptions, counts, current)
    assert assign(strategy, subscriptions, counts, current) == first


@pytest.mark.parametrize("strategy", STRATEGIES)
@examples
@given(subscriptions=subscriptions_strategy, counts=partition_counts_strategy, current=current_strategy)
def test_assignment_ignores_insertion_order(strategy, subscriptions, counts, current):
    first = assign(strategy, subscriptions, counts, current)
    # Same content, every dict and topic list built in reverse order, and
    # each topic list given twice over.
    shuffled_subscriptions = {member: list(reversed(topics)) * 2
                              for member, topics in reversed_dict(subscriptions).items()}
    second = assign(strategy, shuffled_subscriptions, reversed_dict(counts), reversed_dict(current))
    assert second == first


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_three_members_six_partitions_two_each(strategy):
    subscriptions = {"c": ["orders"], "a": ["orders"], "b": ["orders"]}
    result = assign(strategy, subscriptions, {"orders": 6})
    assert len(result) == 6
    assert loads(subscriptions, result) == {"a": 2, "b": 2, "c": 2}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_members_no_assignment(strategy):
    assert assign(strategy, {}, {"orders": 3}) == {}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_missing_topic_gets_nothing(strategy):
    assert assign(strategy, {"a": ["missing"], "b": ["missing"]}, {"orders": 3}) == {}


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="unknown assignment strategy"):
        assign("cooperative", {"a": ["orders"]}, {"orders": 1})


# --- range ----------------------------------------------------------------


def test_range_gives_contiguous_blocks():
    result = assign("range", {"b": ["orders"], "a": ["orders"], "c": ["orders"]}, {"orders": 7})
    assert result == {
        ("orders", 0): "a", ("orders", 1): "a", ("orders", 2): "a",
        ("orders", 3): "b", ("orders", 4): "b",
        ("orders", 5): "c", ("orders", 6): "c",
    }


def test_range_balances_each_topic_alone():
    # As in Kafka's RangeAssignor (see its Javadoc), the first member gets
    # the extra partition of each topic, so totals can differ by one per topic.
    subscriptions = {"a": ["t1", "t2"], "b": ["t1", "t2"]}
    result = assign("range", subscriptions, {"t1": 1, "t2": 1})
    assert result == {("t1", 0): "a", ("t2", 0): "a"}


@examples
@given(group=homogeneous_groups())
def test_range_balanced_within_one_per_topic(group):
    subscriptions, counts = group
    result = assign("range", subscriptions, counts)
    for topic in next(iter(subscriptions.values())):
        per_topic = loads(subscriptions, {tp: m for tp, m in result.items() if tp[0] == topic})
        assert spread(per_topic) <= 1, (topic, per_topic)


@examples
@given(members=st.lists(st.sampled_from(MEMBER_IDS), min_size=1, unique=True),
       count=st.integers(min_value=0, max_value=20))
def test_range_one_topic_balanced_within_one(members, count):
    subscriptions = {member: ["orders"] for member in members}
    counts = {"orders": count}
    assert spread(loads(subscriptions, assign("range", subscriptions, counts))) <= 1


# --- roundrobin -------------------------------------------------------------


def test_roundrobin_deals_in_member_order():
    result = assign("roundrobin", {"b": ["t1", "t2"], "a": ["t1", "t2"]}, {"t1": 2, "t2": 1})
    assert result == {("t1", 0): "a", ("t1", 1): "b", ("t2", 0): "a"}


def test_roundrobin_skips_members_without_the_topic():
    result = assign("roundrobin", {"a": ["t1"], "b": ["t1", "t2"]}, {"t1": 2, "t2": 2})
    assert result == {("t1", 0): "a", ("t1", 1): "b", ("t2", 0): "b", ("t2", 1): "b"}


@examples
@given(group=homogeneous_groups())
def test_roundrobin_balanced_within_one(group):
    subscriptions, counts = group
    assert spread(loads(subscriptions, assign("roundrobin", subscriptions, counts))) <= 1


# --- sticky ---------------------------------------------------------------


@examples
@given(group=homogeneous_groups(), current=current_strategy)
def test_sticky_balanced_within_one(group, current):
    subscriptions, counts = group
    result = assign("sticky", subscriptions, counts, current)
    assert spread(loads(subscriptions, result)) <= 1


@examples
@given(subscriptions=subscriptions_strategy, counts=partition_counts_strategy, current=current_strategy)
def test_sticky_unchanged_group_moves_nothing(subscriptions, counts, current):
    first = assign("sticky", subscriptions, counts, current)
    assert assign("sticky", subscriptions, counts, first) == first


@examples
@given(start=balanced_assignments(min_members=2), data=st.data())
def test_sticky_leave_keeps_survivors_partitions(start, data):
    subscriptions, counts, current = start
    leaving = data.draw(st.sampled_from(sorted(subscriptions)))
    survivors = {member: topics for member, topics in subscriptions.items() if member != leaving}
    result = assign("sticky", survivors, counts, current)
    for tp, owner in current.items():
        if owner != leaving:
            assert result[tp] == owner, (tp, owner, result[tp])
    assert spread(loads(survivors, result)) <= 1


@examples
@given(start=balanced_assignments(), joining=st.sampled_from(("0", "b2", "n", "zz")))
def test_sticky_join_moves_only_to_new_member(start, joining):
    subscriptions, counts, current = start
    if joining in subscriptions:
        joining += "-new"
    grown = {**subscriptions, joining: next(iter(subscriptions.values()))}
    result = assign("sticky", grown, counts, current)
    moved = [tp for tp, owner in current.items() if result[tp] != owner]
    for tp in moved:
        assert result[tp] == joining, (tp, current[tp], result[tp])
    total = len(current)
    members = len(subscriptions)
    assert len(moved) <= math.ceil(total / (members + 1))
    # The code moves exactly the minimum that balances the group: the new
    # member ends with the smaller share.
    assert len(moved) == total // (members + 1)
    assert spread(loads(grown, result)) <= 1


def test_sticky_keeps_owner_after_topic_added():
    current = {("t1", 0): "b", ("t1", 1): "a"}
    subscriptions = {"a": ["t1", "t2"], "b": ["t1", "t2"]}
    result = assign("sticky", subscriptions, {"t1": 2, "t2": 2}, current)
    assert result[("t1", 0)] == "b"
    assert result[("t1", 1)] == "a"
    assert loads(subscriptions, result) == {"a": 2, "b": 2}


def test_sticky_drops_unsubscribed_owner():
    current = {("t1", 0): "a", ("t1", 1): "a"}
    result = assign("sticky", {"a": ["t2"], "b": ["t1"]}, {"t1": 2, "t2": 1}, current)
    assert result == {("t1", 0): "b", ("t1", 1): "b", ("t2", 0): "a"}
