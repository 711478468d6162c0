"""Model-based tests of the partition state machine, PartitionStore.

A hypothesis state machine drives a real LMDB store and a plain Python model
(a list of encoded records and the last sequence of each producer) with the
same commands, and checks after every step that both agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from raftmq.partition.codec import AppendCommand, Record, encode_append, encode_record
from raftmq.partition.log import AppendResult, PartitionStore
from raftmq.raft.store import ApplyError

MAP_SIZE_BYTES = 64 * 2**20
PRODUCER_POOL = (7, 8, 2**64 - 1)
FETCH_ALL = 2**31

_U64 = struct.Struct(">Q")

record_strategy = st.builds(
    Record,
    value=st.binary(max_size=64),
    key=st.none() | st.binary(max_size=8),
    headers=st.lists(st.tuples(st.text(max_size=4), st.binary(max_size=4)), max_size=2).map(tuple),
    # A timestamp of 0 makes the store stamp the command's append_time_ms.
    timestamp_ms=st.just(0) | st.integers(min_value=1, max_value=2**50),
)
batches = st.lists(record_strategy, max_size=4).map(tuple)
append_times = st.integers(min_value=0, max_value=2**50)
first_sequences = st.integers(min_value=0, max_value=2**63)
# Commands that decode_append or the kind check rejects: empty, another kind,
# or an APPEND kind byte followed by less than a full header.
garbage_commands = (
    st.just(b"")
    | st.binary(min_size=1, max_size=32).filter(lambda data: data[0] != 1)
    | st.binary(max_size=20).map(lambda tail: b"\x01" + tail)
)


def stamped(record: Record, append_time_ms: int) -> bytes:
    """Return the encoding the store keeps for `record` appended at append_time_ms."""
    if record.timestamp_ms == 0:
        record = dataclasses.replace(record, timestamp_ms=append_time_ms)
    return encode_record(record)


class LogModel:
    """The partition as a list of records plus each producer's last batch."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        # producer_id -> (sequence, base_offset, record_count, append_time_ms)
        # of its last batch.
        self.producers: dict[int, tuple[int, int, int, int]] = {}
        self.applied_index = 0

    def append(self, batch: tuple[Record, ...], append_time_ms: int, producer_id: int,
               sequence: int) -> AppendResult:
        base_offset = len(self.records)
        self.records.extend(stamped(record, append_time_ms) for record in batch)
        if producer_id:
            self.producers[producer_id] = (sequence, base_offset, len(batch), append_time_ms)
        return AppendResult(base_offset, len(batch), append_time_ms)

    def fetch(self, offset: int, max_records: int, max_bytes: int) -> list[tuple[int, bytes]]:
        selected: list[tuple[int, bytes]] = []
        size = 0
        for position in range(offset, len(self.records)):
            record = self.records[position]
            if len(selected) == max_records:
                break
            # The first record is returned even when it alone exceeds max_bytes.
            if selected and size + len(record) > max_bytes:
                break
            selected.append((position, record))
            size += len(record)
        return selected

    def digest(self) -> str:
        sha = hashlib.sha256()
        for offset, record in enumerate(self.records):
            sha.update(_U64.pack(offset))
            sha.update(_U64.pack(len(record)))
            sha.update(record)
        return sha.hexdigest()


def append_command(batch, append_time_ms, producer_id=0, sequence=0) -> bytes:
    return encode_append(AppendCommand(batch, producer_id, sequence, append_time_ms))


class PartitionMachine(RuleBasedStateMachine):
    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder
        self.folder.mkdir()
        self.path_numbers = itertools.count()
        self.store = PartitionStore(self.new_path(), map_size_bytes=MAP_SIZE_BYTES)
        self.model = LogModel()
        # (snapshot file, LMDB length, applied index when taken), oldest first.
        self.snapshots: list[tuple[str, int, int]] = []

    def new_path(self) -> str:
        return str(self.folder / f"store-{next(self.path_numbers)}")

    def apply_next(self, command: bytes):
        self.model.applied_index += 1
        return self.store.apply(self.model.applied_index, command)

    def known_producers(self) -> list[int]:
        return sorted(self.model.producers)

    # --- appends ----------------------------------------------------------

    @rule(batch=batches, append_time_ms=append_times, sequence=first_sequences)
    def append_without_producer(self, batch, append_time_ms, sequence):
        result = self.apply_next(append_command(batch, append_time_ms, 0, sequence))
        assert result == self.model.append(batch, append_time_ms, 0, sequence)

    @rule(batch=batches, append_time_ms=append_times, producer_id=st.sampled_from(PRODUCER_POOL),
          first_sequence=first_sequences, step=st.integers(min_value=1, max_value=3))
    def append_new_sequence(self, batch, append_time_ms, producer_id, first_sequence, step):
        if producer_id in self.model.producers:
            sequence = self.model.producers[producer_id][0] + step
        else:
            sequence = first_sequence
        result = self.apply_next(append_command(batch, append_time_ms, producer_id, sequence))
        assert result == self.model.append(batch, append_time_ms, producer_id, sequence)

    @precondition(lambda self: self.model.producers)
    @rule(data=st.data(), batch=batches, append_time_ms=append_times)
    def append_repeat_sequence(self, data, batch, append_time_ms):
        producer_id = data.draw(st.sampled_from(self.known_producers()), label="producer_id")
        sequence, base_offset, record_count, first_append_time_ms = self.model.producers[producer_id]
        result = self.apply_next(append_command(batch, append_time_ms, producer_id, sequence))
        assert result == AppendResult(base_offset, record_count, first_append_time_ms, duplicate=True)

    @precondition(lambda self: any(entry[0] > 0 for entry in self.model.producers.values()))
    @rule(data=st.data(), batch=batches, append_time_ms=append_times)
    def append_lower_sequence(self, data, batch, append_time_ms):
        candidates = [pid for pid in self.known_producers() if self.model.producers[pid][0] > 0]
        producer_id = data.draw(st.sampled_from(candidates), label="producer_id")
        last_sequence = self.model.producers[producer_id][0]
        sequence = data.draw(st.integers(min_value=0, max_value=last_sequence - 1), label="sequence")
        result = self.apply_next(append_command(batch, append_time_ms, producer_id, sequence))
        assert isinstance(result, ApplyError)
        assert result.reason == "OUT_OF_ORDER_SEQUENCE"

    # --- replays and bad commands ------------------------------------------

    @precondition(lambda self: self.model.applied_index > 0)
    @rule(data=st.data(), batch=batches, append_time_ms=append_times,
          producer_id=st.sampled_from((0,) + PRODUCER_POOL), sequence=first_sequences)
    def reapply_applied_index(self, data, batch, append_time_ms, producer_id, sequence):
        index = data.draw(st.integers(min_value=1, max_value=self.model.applied_index), label="index")
        command = append_command(batch, append_time_ms, producer_id, sequence)
        assert self.store.apply(index, command) is None

    @rule(command=garbage_commands)
    def apply_garbage(self, command):
        assert isinstance(self.apply_next(command), ApplyError)

    # --- reads --------------------------------------------------------------

    @rule(data=st.data(), max_records=st.integers(min_value=1, max_value=6),
          max_bytes=st.integers(min_value=1, max_value=300))
    def fetch(self, data, max_records, max_bytes):
        offset = data.draw(st.integers(min_value=0, max_value=len(self.model.records) + 2), label="offset")
        result = self.store.fetch(offset, max_records, max_bytes)
        assert result.records == self.model.fetch(offset, max_records, max_bytes)
        assert result.high_watermark == len(self.model.records)
        assert result.log_start_offset == 0
        if offset < len(self.model.records):
            assert result.records, "a fetch below the high watermark returned no record"

    # --- persistence --------------------------------------------------------

    @rule()
    def reopen(self):
        self.store.close()
        self.store = PartitionStore(self.store.path, map_size_bytes=MAP_SIZE_BYTES)

    @rule()
    def snapshot_and_restore(self):
        snapshot_path = str(self.folder / f"snapshot-{len(self.snapshots)}")
        with open(snapshot_path, "wb") as snapshot:
            self.store.copy_to_fd(snapshot.fileno())
        lmdb_length = Path(snapshot_path).stat().st_size
        # A Raft group writes its own data after the LMDB copy, and passes
        # only the LMDB part's length to replace_with.
        with open(snapshot_path, "ab") as snapshot:
            snapshot.write(b"raft group data after the LMDB copy")
        self.snapshots.append((snapshot_path, lmdb_length, self.store.applied_index))

        restored = PartitionStore(self.new_path(), map_size_bytes=MAP_SIZE_BYTES)
        restored.replace_with(snapshot_path, lmdb_length)
        assert restored.digest() == self.store.digest()
        assert restored.high_watermark == self.store.high_watermark
        assert restored.applied_index == self.store.applied_index
        assert restored.fetch(0, FETCH_ALL, FETCH_ALL) == self.store.fetch(0, FETCH_ALL, FETCH_ALL)
        # Go on with the restored store, so later rules also check the
        # producer table that came through the snapshot.
        self.store.close()
        self.store = restored

    @precondition(lambda self: self.snapshots)
    @rule(data=st.data())
    def restore_older_snapshot(self, data):
        snapshot_path, lmdb_length, snapshot_index = data.draw(st.sampled_from(self.snapshots), label="snapshot")
        assert snapshot_index <= self.model.applied_index
        digest_before = self.store.digest()
        self.store.replace_with(snapshot_path, lmdb_length)
        assert self.store.digest() == digest_before

    # --- invariants -----------------------------------------------------------

    @invariant()
    def high_watermark_matches_model(self):
        assert self.store.high_watermark == len(self.model.records)

    @invariant()
    def applied_index_matches_model(self):
        assert self.store.applied_index == self.model.applied_index

    @invariant()
    def digest_matches_model(self):
        assert self.store.digest() == self.model.digest()

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def test_partition_store_matches_model(tmp_path):
    example_numbers = itertools.count()

    def new_machine() -> PartitionMachine:
        return PartitionMachine(tmp_path / f"example-{next(example_numbers)}")

    run_state_machine_as_test(
        new_machine,
        settings=settings(max_examples=150, stateful_step_count=40, deadline=None),
    )


# --- determinism and replay ----------------------------------------------------

command_lists = st.lists(
    st.one_of(
        st.builds(append_command, batches, append_times),
        st.builds(
            append_command, batches, append_times,
            st.sampled_from(PRODUCER_POOL), st.integers(min_value=0, max_value=4),
        ),
        garbage_commands,
    ),
    max_size=25,
)

# Each example makes its own folder under tmp_path, so sharing the fixture
# between examples is safe.
replay_settings = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def result_summary(result):
    """Return a comparable form of an apply result, because ApplyError instances compare by identity."""
    if isinstance(result, ApplyError):
        return ("ApplyError", result.reason, result.message)
    return result


def apply_all(store: PartitionStore, commands: list[bytes]) -> list:
    return [store.apply(index, command) for index, command in enumerate(commands, start=1)]


@replay_settings
@given(commands=command_lists)
def test_same_commands_give_same_state(tmp_path, commands):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    first = PartitionStore(str(folder / "first"), map_size_bytes=MAP_SIZE_BYTES)
    second = PartitionStore(str(folder / "second"), map_size_bytes=MAP_SIZE_BYTES)
    try:
        first_results = [result_summary(result) for result in apply_all(first, commands)]
        second_results = [result_summary(result) for result in apply_all(second, commands)]
        assert first_results == second_results
        assert first.digest() == second.digest()
        assert first.high_watermark == second.high_watermark
        assert first.applied_index == second.applied_index
    finally:
        first.close()
        second.close()
        shutil.rmtree(folder)


@replay_settings
@given(commands=command_lists)
def test_replaying_commands_changes_nothing(tmp_path, commands):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    store = PartitionStore(str(folder / "store"), map_size_bytes=MAP_SIZE_BYTES)
    try:
        apply_all(store, commands)
        digest = store.digest()
        high_watermark = store.high_watermark
        replay_results = apply_all(store, commands)
        assert all(result is None for result in replay_results)
        assert store.digest() == digest
        assert store.high_watermark == high_watermark
        assert store.applied_index == len(commands)
    finally:
        store.close()
        shutil.rmtree(folder)
