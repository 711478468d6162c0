"""Backlog limits of the partition state machine, on a real LMDB store.

The limits travel in each APPEND command, so every test builds commands with
the limits it needs. A hypothesis test drives the store and a list-based
model with random batches under both overflow policies and checks that
offsets, byte counts, counters and the stored records agree.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import Future
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftmq.client._batch import Batch, PendingRecord, record_stored_bytes
from raftmq.partition import codec
from raftmq.partition.codec import AppendCommand, Record, encode_append, encode_record
from raftmq.partition.log import BACKLOG_FULL_RETRY_AFTER_MS, AppendResult, PartitionStore
from raftmq.raft.store import ApplyError
from raftmq.v1 import raftmq_pb2

MAP_SIZE_BYTES = 64 * 2**20
FETCH_ALL = 2**31
APPEND_TIME_MS = 1_700_000_000_000
# Every test record has a timestamp, so the stored encoding is encode_record's.
TIMESTAMP_MS = 1_600_000_000_000


def records_of(count: int, value_bytes: int = 10, first: int = 0) -> tuple[Record, ...]:
    return tuple(
        Record(value=str(first + i).encode().ljust(value_bytes, b"."), timestamp_ms=TIMESTAMP_MS)
        for i in range(count)
    )


def stored_size(record: Record) -> int:
    return len(encode_record(record))


class Log:
    """A store plus the next Raft index to apply."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = PartitionStore(str(path), map_size_bytes=MAP_SIZE_BYTES)
        self.index = 0

    def append(self, batch: tuple[Record, ...], *, producer_id: int = 0, sequence: int = 0,
               **limits):
        self.index += 1
        command = encode_append(AppendCommand(batch, producer_id, sequence, APPEND_TIME_MS, **limits))
        return self.store.apply(self.index, command)

    def offsets_and_values(self) -> list[tuple[int, bytes]]:
        result = self.store.fetch(0, FETCH_ALL, FETCH_ALL)
        return [(offset, codec.decode_record(encoded).value) for offset, encoded in result.records]

    def reopen(self) -> None:
        self.store.close()
        self.store = PartitionStore(str(self.path), map_size_bytes=MAP_SIZE_BYTES)


@pytest.fixture
def log(tmp_path):
    opened = Log(tmp_path / "store")
    yield opened
    opened.store.close()


def log_figures(store: PartitionStore) -> tuple:
    return (store.log_start_offset, store.high_watermark, store.backlog_messages,
            store.backlog_bytes, store.dropped_records, store.digest())


# --- codec -------------------------------------------------------------------


def test_limited_append_round_trips():
    command = AppendCommand(records_of(2), 7, 3, APPEND_TIME_MS, max_backlog_messages=10,
                            max_backlog_bytes=4096, overflow_policy="drop_oldest")
    encoded = encode_append(command)
    assert codec.command_kind(encoded) == codec.COMMAND_APPEND_LIMITED
    decoded = codec.decode_append(encoded)
    assert decoded == command
    assert decoded.max_backlog_messages == 10
    assert decoded.max_backlog_bytes == 4096
    assert decoded.overflow_policy == "drop_oldest"


def test_append_without_limits_keeps_plain_kind():
    encoded = encode_append(AppendCommand(records_of(1), append_time_ms=APPEND_TIME_MS,
                                          overflow_policy="drop_oldest"))
    assert codec.command_kind(encoded) == codec.COMMAND_APPEND
    assert codec.decode_append(encoded).has_limits is False


def test_unknown_policy_fails_decoding():
    encoded = bytearray(encode_append(AppendCommand(
        records_of(1), append_time_ms=APPEND_TIME_MS, max_backlog_messages=5)))
    # The policy byte is the last byte of the limits, before the first record.
    policy_position = len(encoded) - stored_size(records_of(1)[0]) - 1
    encoded[policy_position] = 9
    with pytest.raises(codec.CodecError, match="overflow policy 9"):
        codec.decode_append(bytes(encoded))


# --- reject ------------------------------------------------------------------


def test_reject_keeps_log_unchanged(log):
    assert isinstance(log.append(records_of(3), max_backlog_messages=5), AppendResult)
    assert isinstance(log.append(records_of(2, first=3), max_backlog_messages=5), AppendResult)
    before = log_figures(log.store)
    stored_before = log.offsets_and_values()

    result = log.append(records_of(1, first=5), max_backlog_messages=5)

    assert isinstance(result, ApplyError)
    assert result.reason == "BACKLOG_FULL"
    assert result.metadata["limit"] == "max_backlog_messages"
    assert result.metadata["max_backlog_messages"] == "5"
    assert result.metadata["backlog_messages"] == "5"
    assert result.metadata["batch_records"] == "1"
    assert result.metadata["retry_after_ms"] == str(BACKLOG_FULL_RETRY_AFTER_MS)
    assert "max_backlog_messages=5" in result.message
    assert log_figures(log.store) == before
    assert log.offsets_and_values() == stored_before
    assert log.store.rejected_records == 1
    assert log.store.applied_index == log.index


def test_reject_names_byte_limit(log):
    size = stored_size(records_of(1)[0])
    limit = 3 * size
    assert isinstance(log.append(records_of(3), max_backlog_bytes=limit), AppendResult)
    assert log.store.backlog_bytes == limit

    result = log.append(records_of(1, first=3), max_backlog_bytes=limit)

    assert isinstance(result, ApplyError)
    assert result.reason == "BACKLOG_FULL"
    assert result.metadata["limit"] == "max_backlog_bytes"
    assert result.metadata["backlog_bytes"] == str(limit)
    assert result.metadata["batch_bytes"] == str(size)
    assert log.store.high_watermark == 3
    assert log.store.backlog_bytes == limit


def test_reject_fills_exactly_to_limit(log):
    for first in range(4):
        assert isinstance(log.append(records_of(1, first=first), max_backlog_messages=4), AppendResult)
    assert log.store.backlog_messages == 4
    assert isinstance(log.append(records_of(1, first=4), max_backlog_messages=4), ApplyError)


def test_batch_above_limit_gets_no_retry_hint(log):
    result = log.append(records_of(6), max_backlog_messages=5)

    assert isinstance(result, ApplyError)
    assert result.reason == "BACKLOG_FULL"
    assert "retry_after_ms" not in result.metadata
    assert "at most 5 records per request" in result.message
    assert log.store.high_watermark == 0
    assert log.store.rejected_records == 6


def test_idempotent_retry_when_full(log):
    first = log.append(records_of(2), producer_id=9, sequence=1, max_backlog_messages=3)
    assert isinstance(first, AppendResult)
    assert isinstance(log.append(records_of(1, first=2), max_backlog_messages=3), AppendResult)
    assert log.store.backlog_messages == 3

    retry = log.append(records_of(2), producer_id=9, sequence=1, max_backlog_messages=3)

    assert isinstance(retry, AppendResult)
    assert retry.duplicate is True
    assert retry.base_offset == first.base_offset
    assert retry.record_count == 2
    assert log.store.rejected_records == 0
    assert log.store.high_watermark == 3


def test_rejected_sequence_can_be_sent_again(log):
    assert isinstance(log.append(records_of(2), max_backlog_messages=2), AppendResult)
    rejected = log.append(records_of(1, first=2), producer_id=4, sequence=1, max_backlog_messages=2)
    assert isinstance(rejected, ApplyError)

    # A later command with a larger limit lets the same sequence in,
    # because the rejection stored no sequence.
    accepted = log.append(records_of(1, first=2), producer_id=4, sequence=1, max_backlog_messages=3)

    assert isinstance(accepted, AppendResult)
    assert accepted.duplicate is False
    assert accepted.base_offset == 2


# --- drop_oldest -------------------------------------------------------------


def test_drop_oldest_advances_log_start_and_bytes(log):
    size = stored_size(records_of(1)[0])
    limits = {"max_backlog_messages": 4, "overflow_policy": "drop_oldest"}
    for first in range(0, 6, 2):
        result = log.append(records_of(2, first=first), **limits)
        assert isinstance(result, AppendResult)

    assert log.store.log_start_offset == 2
    assert log.store.high_watermark == 6
    assert log.store.backlog_messages == 4
    assert log.store.backlog_bytes == 4 * size
    assert log.store.dropped_records == 2
    assert [offset for offset, _ in log.offsets_and_values()] == [2, 3, 4, 5]
    assert log.offsets_and_values()[0][1].startswith(b"2.")


def test_drop_oldest_reports_drops_per_append(log):
    limits = {"max_backlog_messages": 3, "overflow_policy": "drop_oldest"}
    assert log.append(records_of(3), **limits).dropped_records == 0
    result = log.append(records_of(2, first=3), **limits)
    assert result.dropped_records == 2
    assert result.base_offset == 3


def test_drop_oldest_by_bytes(log):
    small = records_of(4, value_bytes=40)
    large = records_of(1, value_bytes=100, first=4)
    limit = sum(stored_size(r) for r in small)
    limits = {"max_backlog_bytes": limit, "overflow_policy": "drop_oldest"}
    assert isinstance(log.append(small, **limits), AppendResult)

    result = log.append(large, **limits)

    # 4 x 58 + 118 bytes are over the limit of 232 until three small records go.
    assert result.dropped_records == 3
    assert log.offsets_and_values() == [(3, small[3].value), (4, large[0].value)]
    assert log.store.backlog_bytes == stored_size(small[3]) + stored_size(large[0])
    assert log.store.backlog_bytes <= limit


def test_oversized_record_empties_log(log):
    limits = {"max_backlog_bytes": 50, "overflow_policy": "drop_oldest"}
    log.append(records_of(1, value_bytes=10), **limits)

    result = log.append(records_of(1, value_bytes=100, first=1), **limits)

    assert result.dropped_records == 2
    assert log.store.log_start_offset == log.store.high_watermark == 2
    assert log.store.backlog_bytes == 0
    assert log.offsets_and_values() == []


def test_oversized_batch_keeps_newest(log):
    result = log.append(records_of(5), max_backlog_messages=2, overflow_policy="drop_oldest")

    assert result.base_offset == 0
    assert result.dropped_records == 3
    assert [offset for offset, _ in log.offsets_and_values()] == [3, 4]
    assert log.store.log_start_offset == 3


def test_fetch_below_log_start(log):
    log.append(records_of(5), max_backlog_messages=2, overflow_policy="drop_oldest")

    result = log.store.fetch(0, FETCH_ALL, FETCH_ALL)

    assert result.log_start_offset == 3
    assert [offset for offset, _ in result.records] == [3, 4]


def test_reset_to_earliest_uses_new_log_start(log):
    log.append(records_of(5), max_backlog_messages=2, overflow_policy="drop_oldest")
    log.index += 1
    cursor = log.store.apply(log.index, codec.encode_group_command(
        "reset", group="billing", target="earliest"))
    assert cursor["committed"] == 3


def test_commit_below_log_start_kept(log):
    limits = {"max_backlog_messages": 2, "overflow_policy": "drop_oldest"}
    log.append(records_of(2), **limits)
    log.index += 1
    log.store.apply(log.index, codec.encode_group_command(
        "claim", group="billing", member="m1", generation=1, reset="earliest"))
    log.index += 1
    log.store.apply(log.index, codec.encode_group_command(
        "commit", group="billing", member="m1", generation=1, offset=1))

    log.append(records_of(3, first=2), **limits)

    assert log.store.log_start_offset == 3
    assert log.store.cursor("billing")["committed"] == 1


# --- persistence -------------------------------------------------------------


def test_reopen_keeps_counts(log):
    log.append(records_of(5), max_backlog_messages=3, overflow_policy="drop_oldest")
    log.append(records_of(2, first=5), max_backlog_messages=5)
    log.append(records_of(1, first=7), max_backlog_messages=5)
    before = log_figures(log.store)
    rejected = log.store.rejected_records
    assert rejected == 1

    log.reopen()

    assert log_figures(log.store) == before
    assert log.store.rejected_records == rejected


def test_state_without_backlog_fields_loads(log):
    size = stored_size(records_of(1)[0])
    log.append(records_of(3))
    # Rewrite the state as stores wrote it before backlog limits existed.
    with log.store.env.begin(write=True) as txn:
        txn.put(b"log_state", json.dumps({"next_offset": 3, "log_start_offset": 0}).encode(),
                db=log.store._meta)

    log.reopen()

    assert log.store.backlog_bytes == 3 * size
    assert log.store.dropped_records == 0
    assert log.store.rejected_records == 0
    result = log.append(records_of(1, first=3), max_backlog_messages=3)
    assert isinstance(result, ApplyError)
    assert result.reason == "BACKLOG_FULL"


def test_snapshot_restore_keeps_counts(log, tmp_path):
    log.append(records_of(6), max_backlog_messages=4, overflow_policy="drop_oldest")
    log.append(records_of(1, first=6), max_backlog_messages=4)
    snapshot_path = tmp_path / "snapshot"
    with open(snapshot_path, "wb") as snapshot:
        log.store.copy_to_fd(snapshot.fileno())
    restored = PartitionStore(str(tmp_path / "restored"), map_size_bytes=MAP_SIZE_BYTES)
    try:
        restored.replace_with(str(snapshot_path), os.path.getsize(snapshot_path))

        assert log_figures(restored) == log_figures(log.store)
        assert restored.rejected_records == log.store.rejected_records == 1
    finally:
        restored.close()


def test_replay_gives_equal_state(tmp_path):
    commands = [
        AppendCommand(records_of(3), 0, 0, APPEND_TIME_MS, max_backlog_messages=4,
                      overflow_policy="drop_oldest"),
        AppendCommand(records_of(3, first=3), 5, 1, APPEND_TIME_MS, max_backlog_messages=4,
                      overflow_policy="drop_oldest"),
        AppendCommand(records_of(1, first=6), 0, 0, APPEND_TIME_MS, max_backlog_messages=4),
        AppendCommand(records_of(1, first=7), 0, 0, APPEND_TIME_MS),
    ]
    stores = [PartitionStore(str(tmp_path / name), map_size_bytes=MAP_SIZE_BYTES)
              for name in ("a", "b")]
    try:
        for store in stores:
            for index, command in enumerate(commands, start=1):
                store.apply(index, encode_append(command))
            # A journal replay after a restart applies the same indexes again.
            for index, command in enumerate(commands, start=1):
                assert store.apply(index, encode_append(command)) is None
        first, second = stores
        assert log_figures(first) == log_figures(second)
        assert first.rejected_records == second.rejected_records == 1
        assert first.high_watermark == 7
    finally:
        for store in stores:
            store.close()


# --- model-based ---------------------------------------------------------------

batch_sizes = st.lists(st.integers(min_value=0, max_value=40), min_size=0, max_size=4)
steps = st.lists(
    st.tuples(batch_sizes, st.sampled_from(codec.OVERFLOW_POLICIES)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps, max_messages=st.integers(min_value=0, max_value=6),
       max_bytes=st.sampled_from((0, 60, 120, 400)))
def test_limits_match_model(steps, max_messages, max_bytes):
    with tempfile.TemporaryDirectory() as folder:
        store = PartitionStore(os.path.join(folder, "store"), map_size_bytes=MAP_SIZE_BYTES)
        try:
            run_model(store, steps, max_messages, max_bytes)
        finally:
            store.close()


def run_model(store: PartitionStore, steps, max_messages: int, max_bytes: int) -> None:
    # The model: a list of (offset, encoded record) from log_start_offset on.
    kept: list[tuple[int, bytes]] = []
    next_offset = dropped = rejected = 0
    for index, (value_sizes, policy) in enumerate(steps, start=1):
        batch = tuple(Record(value=bytes([index % 256]) * size, timestamp_ms=TIMESTAMP_MS)
                      for size in value_sizes)
        encoded = [encode_record(record) for record in batch]
        command = AppendCommand(batch, 0, 0, APPEND_TIME_MS, max_backlog_messages=max_messages,
                                max_backlog_bytes=max_bytes, overflow_policy=policy)
        result = store.apply(index, encode_append(command))
        backlog_bytes = sum(len(record) for _, record in kept)
        over = ((max_messages and len(kept) + len(batch) > max_messages)
                or (max_bytes and backlog_bytes + sum(map(len, encoded)) > max_bytes))
        if policy == "reject" and over:
            assert isinstance(result, ApplyError), result
            assert result.reason == "BACKLOG_FULL"
            rejected += len(batch)
        else:
            assert isinstance(result, AppendResult), result
            assert result.base_offset == next_offset
            kept.extend((next_offset + i, record) for i, record in enumerate(encoded))
            next_offset += len(batch)
            dropped_now = 0
            if policy == "drop_oldest":
                while kept and ((max_messages and len(kept) > max_messages)
                                or (max_bytes and sum(len(r) for _, r in kept) > max_bytes)):
                    kept.pop(0)
                    dropped_now += 1
            assert result.dropped_records == dropped_now
            dropped += dropped_now
        assert store.high_watermark == next_offset
        assert store.log_start_offset == (kept[0][0] if kept else next_offset)
        assert store.backlog_messages == len(kept)
        assert store.backlog_bytes == sum(len(record) for _, record in kept)
        assert store.dropped_records == dropped
        assert store.rejected_records == rejected
        assert store.fetch(0, FETCH_ALL, FETCH_ALL).records == kept


# --- the producer's view of stored sizes ------------------------------------------


@given(
    key=st.none() | st.binary(max_size=40),
    value=st.binary(max_size=200),
    headers=st.lists(st.tuples(st.text(max_size=8), st.binary(max_size=20)), max_size=3),
)
def test_producer_stored_size_matches_codec(key, value, headers):
    wire = raftmq_pb2.Record(value=value, timestamp_ms=TIMESTAMP_MS,
                             headers=[raftmq_pb2.Header(key=k, value=v) for k, v in headers])
    if key is not None:
        wire.key = key
    stored = encode_record(Record(value, key, tuple(headers), TIMESTAMP_MS))
    assert record_stored_bytes(wire) == len(stored)


def test_producer_batch_respects_backlog_limits():
    batch = Batch("orders", 0, overhead_bytes=20, delivery_timeout_ms=1000)
    for _ in range(2):
        batch.add(PendingRecord(raftmq_pb2.Record(value=b"x"), Future(), 5, stored_bytes=30))
    assert batch.fits_backlog(30, max_messages=3, max_bytes=0)
    assert not batch.fits_backlog(30, max_messages=2, max_bytes=0)
    assert batch.fits_backlog(30, max_messages=0, max_bytes=90)
    assert not batch.fits_backlog(31, max_messages=0, max_bytes=90)
    assert batch.fits_backlog(10**6, max_messages=0, max_bytes=0)
