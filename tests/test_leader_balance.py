"""Partition leaders spread over the nodes: each returns to its preferred replica."""

import collections
import time

import pytest

from raftmq.client import Admin

pytestmark = pytest.mark.cluster


def test_leaders_move_to_preferred_replicas(shared_cluster):
    with Admin(shared_cluster.bootstrap) as admin:
        admin.create_topic("balanced", partitions=6, replication_factor=3)
        deadline = time.monotonic() + 90
        while True:
            partitions = admin.describe_topic("balanced").partitions
            on_preferred = [p.leader == p.replicas[0] for p in partitions]
            if all(on_preferred) or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert on_preferred == [True] * 6
    leaders_per_node = collections.Counter(p.leader for p in partitions)
    assert sorted(leaders_per_node.values()) == [2, 2, 2]
