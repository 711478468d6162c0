"""Partition assignment strategies of consumer groups.

Each strategy is a pure function of the group's members, their
subscriptions, the partitions of the subscribed topics and (for sticky) the
current owners. The coordinator runs them inside the metadata group's apply,
so they must return the same result on every replica. They iterate in
sorted order and never consult the clock or a random source.

A partition is only ever given to a member that subscribes to its topic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

TopicPartitionKey = tuple[str, int]
Assignment = dict[TopicPartitionKey, str]

STRATEGIES = ("sticky", "range", "roundrobin")


def assign(
    strategy: str,
    subscriptions: Mapping[str, Sequence[str]],
    partition_counts: Mapping[str, int],
    current: Mapping[TopicPartitionKey, str] | None = None,
) -> Assignment:
    """Map every partition of a subscribed topic to one subscribed member.

    `subscriptions` maps member id to topic names; `partition_counts` maps an
    existing topic to its partition count (topics absent from it get no
    partitions); `current` is the present assignment, used by "sticky".
    """
    if strategy == "range":
        return _range(subscriptions, partition_counts)
    if strategy == "roundrobin":
        return _round_robin(subscriptions, partition_counts)
    if strategy == "sticky":
        return _sticky(subscriptions, partition_counts, current or {})
    raise ValueError(f"unknown assignment strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def _subscribers(subscriptions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    by_topic: dict[str, list[str]] = {}
    for member in sorted(subscriptions):
        for topic in set(subscriptions[member]):
            by_topic.setdefault(topic, []).append(member)
    return by_topic


def _partitions(
    subscriptions: Mapping[str, Sequence[str]], partition_counts: Mapping[str, int]
) -> list[TopicPartitionKey]:
    topics = sorted({t for topics in subscriptions.values() for t in topics if t in partition_counts})
    return [(topic, p) for topic in topics for p in range(partition_counts[topic])]


def _range(subscriptions, partition_counts) -> Assignment:
    """Per topic, give each subscriber a contiguous block; earlier members get one more."""
    result: Assignment = {}
    for topic, members in sorted(_subscribers(subscriptions).items()):
        count = partition_counts.get(topic, 0)
        if not count:
            continue
        share, extra = divmod(count, len(members))
        start = 0
        for index, member in enumerate(members):
            size = share + (1 if index < extra else 0)
            for partition in range(start, start + size):
                result[(topic, partition)] = member
            start += size
    return result


def _round_robin(subscriptions, partition_counts) -> Assignment:
    """Deal all partitions, sorted, to the members in turn, skipping non-subscribers."""
    members = sorted(subscriptions)
    result: Assignment = {}
    if not members:
        return result
    turn = 0
    for topic, partition in _partitions(subscriptions, partition_counts):
        for step in range(len(members)):
            member = members[(turn + step) % len(members)]
            if topic in subscriptions[member]:
                result[(topic, partition)] = member
                turn = (turn + step + 1) % len(members)
                break
    return result


def _sticky(subscriptions, partition_counts, current) -> Assignment:
    """Keep every owner that is still eligible, place the rest on the least
    loaded members, then move single partitions from the most to the least
    loaded eligible member until no move would narrow the gap."""
    partitions = _partitions(subscriptions, partition_counts)
    result: Assignment = {}
    load = {member: 0 for member in subscriptions}
    for tp in partitions:
        owner = current.get(tp)
        if owner in subscriptions and tp[0] in subscriptions[owner]:
            result[tp] = owner
            load[owner] += 1
    subscribers = _subscribers(subscriptions)
    for tp in partitions:
        if tp in result:
            continue
        member = min(subscribers[tp[0]], key=lambda m: (load[m], m))
        result[tp] = member
        load[member] += 1
    # Each move lowers the sum of squared loads, so the loop ends.
    while True:
        move = _best_move(result, load, subscribers)
        if move is None:
            return result
        tp, target = move
        load[result[tp]] -= 1
        load[target] += 1
        result[tp] = target


def _best_move(result: Assignment, load: dict[str, int], subscribers: dict[str, list[str]]):
    """Find one partition whose move shrinks a gap of two or more, or None."""
    for source in sorted(load, key=lambda m: (-load[m], m)):
        owned = sorted((tp for tp, m in result.items() if m == source), reverse=True)
        for tp in owned:
            target = min(subscribers[tp[0]], key=lambda m: (load[m], m))
            if load[target] + 1 < load[source]:
                return tp, target
    return None
