"""Tests of consumer group cursors in the partition state machine
(PartitionStore): claim, commit and reset commands built with
codec.encode_group_command, applied to real LMDB stores."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftmq.partition.codec import AppendCommand, Record, encode_append, encode_group_command
from raftmq.partition.log import PartitionStore
from raftmq.raft.store import ApplyError

MAP_SIZE_BYTES = 16 * 2**20
GROUP = "billing"


class Partition:
    """Apply appends and group commands to a store at consecutive Raft indexes."""

    def __init__(self, store: PartitionStore):
        self.store = store
        self.indexes = itertools.count(store.applied_index + 1)

    def apply(self, command: bytes):
        return self.store.apply(next(self.indexes), command)

    def append(self, count: int) -> None:
        records = tuple(Record(value=f"value-{i}".encode()) for i in range(count))
        result = self.apply(encode_append(AppendCommand(records, append_time_ms=1000)))
        assert not isinstance(result, ApplyError), result

    def claim(self, member: str, generation: int, reset: str = "earliest", group: str = GROUP):
        return self.apply(encode_group_command(
            "claim", group=group, member=member, generation=generation, reset=reset))

    def commit(self, member: str, generation: int, offset: int, metadata: str = "",
               group: str = GROUP):
        return self.apply(encode_group_command(
            "commit", group=group, member=member, generation=generation, offset=offset,
            metadata=metadata))

    def reset(self, target, group: str = GROUP):
        return self.apply(encode_group_command("reset", group=group, target=target))


def open_store(path: Path) -> PartitionStore:
    return PartitionStore(str(path), map_size_bytes=MAP_SIZE_BYTES)


@pytest.fixture
def store(tmp_path):
    partition = open_store(tmp_path / "partition")
    yield partition
    partition.close()


@pytest.fixture
def partition(store):
    return Partition(store)


def committed(store: PartitionStore, group: str = GROUP):
    return store.cursor(group)["committed"]


def assert_rejected(result, reason: str) -> None:
    assert isinstance(result, ApplyError), result
    assert result.reason == reason, result.message


# --- claim ----------------------------------------------------------------


def test_cursor_absent_before_claim(store):
    assert store.cursor(GROUP) is None


@pytest.mark.parametrize("reset, expected", [("earliest", 0), ("latest", 3)])
def test_claim_stores_reset_position(store, partition, reset, expected):
    partition.append(3)
    cursor = partition.claim("m1", generation=1, reset=reset)
    assert cursor["committed"] == expected
    assert cursor["owner"] == "m1"
    assert cursor["generation"] == 1
    assert store.cursor(GROUP) == cursor


@pytest.mark.parametrize("reset", ["earliest", "latest"])
def test_claim_of_empty_log_starts_at_zero(partition, reset):
    assert partition.claim("m1", generation=1, reset=reset)["committed"] == 0


def test_later_claim_keeps_stored_position(store, partition):
    partition.append(3)
    partition.claim("m1", generation=1, reset="latest")
    partition.append(4)
    cursor = partition.claim("m2", generation=2, reset="latest")
    assert cursor["committed"] == 3
    assert cursor["owner"] == "m2"
    assert store.high_watermark == 7


def test_later_claim_ignores_other_reset(partition):
    partition.append(5)
    partition.claim("m1", generation=1, reset="latest")
    assert partition.claim("m2", generation=2, reset="earliest")["committed"] == 5


def test_claim_resumes_from_commit(partition):
    partition.append(5)
    partition.claim("m1", generation=1)
    partition.commit("m1", generation=1, offset=4, metadata="worker 1")
    cursor = partition.claim("m2", generation=2, reset="latest")
    assert cursor["committed"] == 4
    assert cursor["metadata"] == "worker 1"


def test_claim_without_offset_and_reset_none(store, partition):
    partition.append(2)
    index = store.applied_index
    result = partition.claim("m1", generation=1, reset="none")
    assert_rejected(result, "NO_COMMITTED_OFFSET")
    assert result.metadata["group_id"] == GROUP
    assert store.cursor(GROUP) is None
    assert store.applied_index == index + 1


def test_reset_none_claim_after_offset_reset(partition):
    partition.append(4)
    partition.reset(2)
    cursor = partition.claim("m1", generation=1, reset="none")
    assert cursor["committed"] == 2
    assert cursor["owner"] == "m1"


def test_reset_none_claim_after_commit(partition):
    partition.append(4)
    partition.claim("m1", generation=1, reset="earliest")
    partition.commit("m1", generation=1, offset=3)
    assert partition.claim("m2", generation=2, reset="none")["committed"] == 3


def test_older_generation_claim_rejected(store, partition):
    partition.append(2)
    partition.claim("m2", generation=5)
    before = store.cursor(GROUP)
    result = partition.claim("m1", generation=4)
    assert_rejected(result, "ILLEGAL_GENERATION")
    assert result.metadata["current_generation"] == "5"
    assert store.cursor(GROUP) == before


def test_groups_have_separate_cursors(store, partition):
    partition.append(6)
    partition.claim("m1", generation=1, reset="earliest", group="first")
    partition.claim("m1", generation=3, reset="latest", group="second")
    partition.commit("m1", generation=1, offset=2, group="first")
    assert committed(store, "first") == 2
    assert committed(store, "second") == 6
    assert store.cursor("second")["generation"] == 3


# --- commit ---------------------------------------------------------------


@pytest.fixture
def claimed(partition):
    """A partition of 10 records claimed by m1 in generation 2, committed at 4."""
    partition.append(10)
    partition.claim("m1", generation=2, reset="earliest")
    cursor = partition.commit("m1", generation=2, offset=4, metadata="at four")
    assert cursor["committed"] == 4
    return partition


def test_commit_by_owner_advances(store, claimed):
    cursor = claimed.commit("m1", generation=2, offset=7, metadata="at seven")
    assert cursor["committed"] == 7
    assert cursor["metadata"] == "at seven"
    assert store.cursor(GROUP) == cursor


def test_commit_by_non_owner_rejected(store, claimed):
    before = store.cursor(GROUP)
    result = claimed.commit("m2", generation=2, offset=8)
    assert_rejected(result, "NOT_PARTITION_OWNER")
    assert result.metadata["owner"] == "m1"
    assert store.cursor(GROUP) == before


def test_commit_with_older_generation_rejected(store, claimed):
    before = store.cursor(GROUP)
    assert_rejected(claimed.commit("m1", generation=1, offset=8), "NOT_PARTITION_OWNER")
    assert store.cursor(GROUP) == before


def test_commit_with_newer_generation_accepted(store, claimed):
    # A rebalance that leaves the partition with m1 raises the group
    # generation without a new claim.
    assert claimed.commit("m1", generation=3, offset=6)["committed"] == 6
    assert store.cursor(GROUP)["generation"] == 2


@pytest.mark.parametrize("offset", [4, 3, 0])
def test_stale_commit_keeps_offset(store, claimed, offset):
    cursor = claimed.commit("m1", generation=2, offset=offset, metadata="stale")
    assert not isinstance(cursor, ApplyError), cursor
    assert cursor["committed"] == 4
    assert cursor["metadata"] == "at four"
    assert committed(store) == 4


def test_commit_at_high_watermark_accepted(store, claimed):
    assert claimed.commit("m1", generation=2, offset=store.high_watermark)["committed"] == 10


@pytest.mark.parametrize("offset", [11, 2**40, -1])
def test_commit_outside_log_invalid(store, claimed, offset):
    result = claimed.commit("m1", generation=2, offset=offset)
    assert_rejected(result, "INVALID_OFFSET")
    assert result.metadata["high_watermark"] == "10"
    assert committed(store) == 4


def test_commit_before_claim_rejected(store, partition):
    partition.append(3)
    assert_rejected(partition.commit("m1", generation=0, offset=1), "NOT_PARTITION_OWNER")
    assert store.cursor(GROUP) is None


def test_later_claim_fences_earlier_owner(store, claimed):
    cursor = claimed.claim("m2", generation=3)
    assert cursor["owner"] == "m2"
    assert cursor["committed"] == 4

    assert_rejected(claimed.commit("m1", generation=2, offset=9), "NOT_PARTITION_OWNER")
    assert_rejected(claimed.commit("m1", generation=3, offset=9), "NOT_PARTITION_OWNER")
    assert_rejected(claimed.claim("m1", generation=2), "ILLEGAL_GENERATION")
    assert committed(store) == 4
    assert store.cursor(GROUP)["owner"] == "m2"

    assert claimed.commit("m2", generation=3, offset=9)["committed"] == 9


@settings(max_examples=40, deadline=None)
@given(records=st.integers(min_value=0, max_value=8),
       offsets=st.lists(st.integers(min_value=-2, max_value=11), max_size=10))
def test_commits_never_move_backwards(records, offsets):
    with tempfile.TemporaryDirectory() as folder:
        store = open_store(Path(folder) / "partition")
        try:
            partition = Partition(store)
            if records:
                partition.append(records)
            partition.claim("m1", generation=1, reset="earliest")
            expected = 0
            for offset in offsets:
                result = partition.commit("m1", generation=1, offset=offset)
                if 0 <= offset <= records:
                    expected = max(expected, offset)
                    assert result["committed"] == expected
                else:
                    assert_rejected(result, "INVALID_OFFSET")
                assert committed(store) == expected
        finally:
            store.close()


# --- reset ----------------------------------------------------------------


def test_reset_moves_offset_backwards(store, claimed):
    cursor = claimed.reset(1)
    assert cursor["committed"] == 1
    assert cursor["metadata"] == ""
    assert cursor["owner"] == "m1"
    assert committed(store) == 1


@pytest.mark.parametrize("target, expected", [
    ("earliest", 0), ("latest", 10), (25, 10), (-3, 0), (6, 6),
])
def test_reset_targets(store, claimed, target, expected):
    assert claimed.reset(target)["committed"] == expected
    assert committed(store) == expected


def test_reset_before_claim_creates_cursor(store, partition):
    partition.append(3)
    cursor = partition.reset("latest")
    assert cursor["committed"] == 3
    assert cursor["owner"] == ""
    assert store.cursor(GROUP) == cursor


def test_unknown_group_op_invalid(store, partition):
    result = partition.apply(encode_group_command("rewind", group=GROUP))
    assert_rejected(result, "INVALID_REQUEST")
    assert store.cursor(GROUP) is None


# --- persistence ------------------------------------------------------------


def test_cursor_survives_reopen(tmp_path):
    path = tmp_path / "partition"
    store = open_store(path)
    partition = Partition(store)
    partition.append(8)
    partition.claim("m1", generation=1, reset="earliest")
    partition.commit("m1", generation=1, offset=5, metadata="five")
    partition.claim("m2", generation=2, reset="latest")
    partition.claim("m1", generation=1, reset="latest", group="other")
    before = {group: store.cursor(group) for group in (GROUP, "other")}
    applied = store.applied_index
    store.close()

    store = open_store(path)
    try:
        assert store.applied_index == applied
        assert store.high_watermark == 8
        assert {group: store.cursor(group) for group in (GROUP, "other")} == before
        partition = Partition(store)
        assert_rejected(partition.commit("m1", generation=2, offset=7), "NOT_PARTITION_OWNER")
        assert_rejected(partition.claim("m1", generation=1), "ILLEGAL_GENERATION")
        assert partition.commit("m2", generation=2, offset=7)["committed"] == 7
    finally:
        store.close()


def test_replayed_index_is_skipped(store, claimed):
    index = store.applied_index
    command = encode_group_command("reset", group=GROUP, target="earliest")
    assert store.apply(index, command) is None
    assert committed(store) == 4
    assert store.applied_index == index
