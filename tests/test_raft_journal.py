"""Tests of the Raft journal (raft.journal.LmdbJournal) and of snapshot files
(raft.snapshot).

A hypothesis state machine drives an LmdbJournal and a plain list with the
same operations and checks that both agree after every step, across clean
reopens.

The crash tests run the operation under test in a child process that sends
itself SIGKILL from inside the operation, then reopen the files in this
process. SIGKILL leaves the page cache intact, so they show what a crashed
process leaves on disk, not what survives a power loss. They show that
pysyncobj 0.3.17's FileJournal compacts by clearing the file and writing the
kept entries back, so a crash in between leaves a journal that contains
neither the old nor the new entries, while LmdbJournal's compaction is one
transaction: a crash leaves the old journal or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.journal import FileJournal

from raftmq.partition.codec import AppendCommand, Record, encode_append
from raftmq.partition.log import PartitionStore
from raftmq.raft import snapshot as snapshot_module
from raftmq.raft.journal import LmdbJournal
from raftmq.raft.snapshot import AsyncSnapshotSerializer, read_snapshot
from raftmq.raft.store import RaftIndex

TESTS_DIR = Path(__file__).resolve().parent
STORE_MAP_SIZE_BYTES = 64 * 2**20
CHILD_TIMEOUT_S = 60
VOTER = "127.0.0.1:7001"


# --- child processes -------------------------------------------------------


def _run_child(function_name: str, *args: str) -> subprocess.CompletedProcess:
    """Run `function_name(*args)` of this module in a new interpreter and
    require that it ended by SIGKILL, which every child here sends itself."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import test_raft_journal as module; getattr(module, sys.argv[2])(*sys.argv[3:])"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, str(TESTS_DIR), function_name, *args],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )
    assert completed.returncode == -signal.SIGKILL, (
        f"child {function_name}{args} exited with {completed.returncode}, "
        f"expected SIGKILL; stderr:\n{completed.stderr[-4000:]}"
    )
    return completed


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write_json(path: str, value) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as output:
        json.dump(value, output)
    os.replace(temporary, path)


# --- LmdbJournal against a list model -----------------------------------------

commands = st.binary(max_size=24)
voters = st.none() | st.sampled_from([VOTER, "127.0.0.1:7002", "node-3"])


class LmdbJournalMachine(RuleBasedStateMachine):
    """An LmdbJournal and a list of (command, index, term) tuples, changed alike.

    The metadata model follows LmdbJournal's contract. The term and vote are
    written at once. The commit index is written with the next entry, on the
    one-second timer or when the journal is closed. So all three survive a
    clean reopen.
    """

    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="lmdb-journal-")
        self.path = os.path.join(self.directory, "journal")
        self.journal = LmdbJournal(self.path)
        self.model: list[tuple[bytes, int, int]] = []
        self.current_term = 0
        self.voted_for = None
        self.commit_index = 1

    def teardown(self):
        self.journal._destroy()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _next_index_and_term(self, first_index: int, term_step: int) -> tuple[int, int]:
        if not self.model:
            return first_index, term_step
        _, last_index, last_term = self.model[-1]
        return last_index + 1, last_term + term_step

    @rule(command=commands, term_step=st.integers(0, 2), first_index=st.integers(1, 40))
    def add(self, command, term_step, first_index):
        index, term = self._next_index_and_term(first_index, term_step)
        self.journal.add(command, index, term)
        self.model.append((command, index, term))

    @rule(data=st.data())
    def delete_entries_from(self, data):
        position = data.draw(st.integers(0, len(self.model)), label="position")
        self.journal.deleteEntriesFrom(position)
        del self.model[position:]

    @rule(data=st.data())
    def delete_entries_to(self, data):
        position = data.draw(st.integers(0, len(self.model)), label="position")
        self.journal.deleteEntriesTo(position)
        del self.model[:position]

    @rule(first_index=st.integers(1, 40), term=st.integers(0, 5),
          new_commands=st.lists(commands, max_size=6))
    def replace_all(self, first_index, term, new_commands):
        entries = [(command, first_index + i, term) for i, command in enumerate(new_commands)]
        self.journal.replace_all(entries)
        self.model = list(entries)

    @rule()
    def clear(self):
        self.journal.clear()
        self.model = []

    @rule(term=st.integers(0, 2**40), voted_for=voters)
    def set_current_term(self, term, voted_for):
        self.journal.setCurrentTerm(term, voted_for)
        self.current_term = term
        self.voted_for = voted_for

    @rule(index=st.integers(0, 2**40))
    def set_commit_index(self, index):
        self.journal.setRaftCommitIndex(index)
        self.commit_index = index

    @rule()
    def one_second_timer(self):
        self.journal.onOneSecondTimer()

    @rule()
    def reopen(self):
        self.journal._destroy()
        self.journal = LmdbJournal(self.path)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def read_one_entry(self, data):
        position = data.draw(st.integers(-len(self.model), len(self.model) - 1), label="position")
        assert self.journal[position] == self.model[position]

    @invariant()
    def entries_match_model(self):
        assert len(self.journal) == len(self.model)
        assert list(self.journal[:]) == self.model
        assert self.journal.bytes == sum(len(command) for command, _, _ in self.model)

    @invariant()
    def metadata_matches_model(self):
        assert self.journal.getCurrentTerm() == self.current_term
        assert self.journal.getVotedForNodeId() == self.voted_for
        assert self.journal.getRaftCommitIndex() == self.commit_index


LmdbJournalMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLmdbJournalModel = LmdbJournalMachine.TestCase


# --- crash during compaction -------------------------------------------------------

JOURNAL_ENTRY_COUNT = 10
# deleteEntriesTo(KEEP_FROM) keeps list positions KEEP_FROM.. (indices 7 to 10).
KEEP_FROM = 6


def _journal_entries(count: int, command_bytes: int = 0) -> list[tuple[bytes, int, int]]:
    """Entries with indices 1..count whose term rises every four entries."""
    return [
        (b"command-%d-" % index + b"x" * command_bytes, index, 1 + index // 4)
        for index in range(1, count + 1)
    ]


def child_compact_file_journal(path: str, kill_at_add: str) -> None:
    """Fill a FileJournal, then compact it and die at the kill_at_add-th
    `add` of the rewrite (before that add writes), or after the compaction
    when kill_at_add is 0."""
    journal = FileJournal(path)
    for entry in _journal_entries(JOURNAL_ENTRY_COUNT):
        journal.add(*entry)
    kill_at = int(kill_at_add)
    original_add = FileJournal.add
    add_calls = 0

    def add_or_die(self, command, idx, term):
        nonlocal add_calls
        add_calls += 1
        if add_calls == kill_at:
            _die()
        original_add(self, command, idx, term)

    FileJournal.add = add_or_die
    journal.deleteEntriesTo(KEEP_FROM)
    _die()


@pytest.mark.parametrize("kill_at_add", range(1, JOURNAL_ENTRY_COUNT - KEEP_FROM + 1))
def test_file_journal_crash_mid_compaction_loses_entries(tmp_path, kill_at_add):
    """pysyncobj's FileJournal.deleteEntriesTo clears the file, then adds the
    kept entries back one by one: a crash during the rewrite leaves only the
    entries rewritten so far, which is neither the old nor the new journal."""
    path = str(tmp_path / "raft.journal")
    _run_child("child_compact_file_journal", path, str(kill_at_add))

    journal = FileJournal(path)
    try:
        on_disk = list(journal[:])
    finally:
        journal._destroy()
    old = _journal_entries(JOURNAL_ENTRY_COUNT)
    new = old[KEEP_FROM:]
    assert on_disk != old
    assert on_disk != new
    assert on_disk == new[:kill_at_add - 1]
    lost = [index for _, index, _ in new[kill_at_add - 1:]]
    assert lost, "the crash must have lost entries the compaction meant to keep"


def test_file_journal_completed_compaction_survives(tmp_path):
    path = str(tmp_path / "raft.journal")
    _run_child("child_compact_file_journal", path, "0")

    journal = FileJournal(path)
    try:
        on_disk = list(journal[:])
    finally:
        journal._destroy()
    assert on_disk == _journal_entries(JOURNAL_ENTRY_COUNT)[KEEP_FROM:]


class _EnvironmentThatDies:
    """Wraps an lmdb.Environment so that write transactions die at a chosen
    point inside LmdbJournal.deleteEntriesTo's single transaction."""

    def __init__(self, env, kill_point: str):
        self._env = env
        self.kill_point = kill_point
        self.deletes = 0

    def begin(self, **kwargs):
        transaction = self._env.begin(**kwargs)
        if kwargs.get("write"):
            return _TransactionThatDies(transaction, self)
        return transaction

    def __getattr__(self, name):
        return getattr(self._env, name)


class _TransactionThatDies:
    def __init__(self, transaction, owner: _EnvironmentThatDies):
        self._transaction = transaction
        self._owner = owner

    def __enter__(self):
        self._transaction.__enter__()
        return self

    def __exit__(self, *exc_info):
        if self._owner.kill_point == "before_commit":
            _die()
        return self._transaction.__exit__(*exc_info)

    def delete(self, *args, **kwargs):
        self._owner.deletes += 1
        if self._owner.kill_point == f"delete_{self._owner.deletes}":
            _die()
        return self._transaction.delete(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._transaction, name)


LMDB_ENTRY_COUNT = 300
LMDB_KEEP_FROM = 200
# 1 KiB commands make the compaction transaction touch many LMDB pages.
LMDB_COMMAND_BYTES = 1024


def child_compact_lmdb_journal(path: str, kill_point: str) -> None:
    """Fill an LmdbJournal, then compact it and die at `kill_point`: the
    n-th delete of the transaction (`delete_n`, before it runs), just
    before the commit, or after deleteEntriesTo returned."""
    journal = LmdbJournal(path)
    for entry in _journal_entries(LMDB_ENTRY_COUNT, LMDB_COMMAND_BYTES):
        journal.add(*entry)
    journal.setCurrentTerm(9, VOTER)
    journal._env = _EnvironmentThatDies(journal._env, kill_point)
    journal.deleteEntriesTo(LMDB_KEEP_FROM)
    _die()


@pytest.mark.parametrize("kill_point", [
    "delete_1", "delete_100", f"delete_{LMDB_KEEP_FROM}", "before_commit", "after_return",
])
def test_lmdb_journal_compaction_is_all_or_nothing(tmp_path, kill_point):
    path = str(tmp_path / "raft.journal")
    _run_child("child_compact_lmdb_journal", path, kill_point)

    journal = LmdbJournal(path)
    try:
        on_disk = list(journal[:])
        term, voted_for = journal.getCurrentTerm(), journal.getVotedForNodeId()
    finally:
        journal._destroy()
    old = _journal_entries(LMDB_ENTRY_COUNT, LMDB_COMMAND_BYTES)
    new = old[LMDB_KEEP_FROM:]
    expected = new if kill_point == "after_return" else old
    assert len(on_disk) == len(expected)
    assert on_disk == expected
    assert term == 9
    assert voted_for == VOTER


def child_write_then_die(path: str) -> None:
    """Write entries, the term, the vote and a commit index, then die without
    closing the journal."""
    journal = LmdbJournal(path)
    entries = _journal_entries(5)
    for entry in entries[:3]:
        journal.add(*entry)
    journal.setCurrentTerm(4, VOTER)
    # The commit index is stored with the next entry written.
    journal.setRaftCommitIndex(3)
    for entry in entries[3:]:
        journal.add(*entry)
    journal.deleteEntriesFrom(4)
    _die()


def test_lmdb_journal_survives_sigkill(tmp_path):
    path = str(tmp_path / "raft.journal")
    _run_child("child_write_then_die", path)

    journal = LmdbJournal(path)
    try:
        assert list(journal[:]) == _journal_entries(4)
        assert journal.getCurrentTerm() == 4
        assert journal.getVotedForNodeId() == VOTER
        assert journal.getRaftCommitIndex() == 3
    finally:
        journal._destroy()


# --- snapshot files -------------------------------------------------------------

MEMBERS = frozenset({"127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"})


def _open_store(path) -> PartitionStore:
    return PartitionStore(str(path), map_size_bytes=STORE_MAP_SIZE_BYTES)


def _apply_records(store: PartitionStore, first_index: int, count: int) -> None:
    for index in range(first_index, first_index + count):
        command = encode_append(AppendCommand(records=(Record(value=b"value-%d" % index),)))
        store.apply(RaftIndex(index), command)


def _raft_data(store: PartitionStore, term: int = 1) -> tuple:
    """pysyncobj's snapshot argument for a store at its applied index:
    (python state, last applied entry, the entry before it, members)."""
    last = store.applied_index
    return (None, (b"last", last, term), (b"previous", last - 1, term), MEMBERS)


def _take_snapshot(serializer: AsyncSnapshotSerializer, data: tuple) -> None:
    serializer.serialize(data, data[2][1])
    serializer.wait_idle()
    assert serializer.checkSerializing() == (SERIALIZER_STATE.SUCCESS, data[2][1])


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_snapshot_round_trip_restores_store(tmp_path):
    """A snapshot contains the state at the moment serialize() was called,
    even when commands apply while the background thread writes it."""
    store = _open_store(tmp_path / "state")
    fresh = _open_store(tmp_path / "fresh")
    try:
        _apply_records(store, 1, 40)
        digest, applied = store.digest(), store.applied_index
        serializer = AsyncSnapshotSerializer(store, str(tmp_path / "raft.snapshot"), 4096, "test")
        data = _raft_data(store)
        serializer.serialize(data, data[2][1])
        _apply_records(store, 41, 10)
        serializer.wait_idle()
        assert serializer.checkSerializing() == (SERIALIZER_STATE.SUCCESS, data[2][1])

        restored = read_snapshot(fresh, str(tmp_path / "raft.snapshot"))

        assert tuple(restored) == data[1:]
        assert fresh.digest() == digest
        assert fresh.applied_index == applied
        assert fresh.high_watermark == 40
        assert serializer.deserialize() == data
    finally:
        store.close()
        fresh.close()


def child_kill_during_snapshot(directory: str, kill_point: str) -> None:
    """Write a first snapshot, record it, then die while the second one is
    written: after the LMDB copy reached the temporary file, or just before
    the temporary file is renamed."""
    store = _open_store(Path(directory) / "state")
    snapshot_path = os.path.join(directory, "raft.snapshot")
    serializer = AsyncSnapshotSerializer(store, snapshot_path, 4096, "test")
    _apply_records(store, 1, 20)
    first = _raft_data(store)
    _take_snapshot(serializer, first)
    _write_json(os.path.join(directory, "first.json"), {
        "digest": store.digest(),
        "applied_index": store.applied_index,
        "sha256": _sha256(snapshot_path),
        "raft_data": pickle.dumps(first[1:]).hex(),
    })
    _apply_records(store, 21, 20)
    if kill_point == "after_copy":
        copy = store.copy_to_fd

        def copy_then_die(fd, txn=None):
            copy(fd, txn=txn)
            _die()

        store.copy_to_fd = copy_then_die
    else:
        snapshot_module.fsync_rename = lambda source, target: _die()
    serializer.serialize(_raft_data(store), store.applied_index - 1)
    serializer.wait_idle()
    _die()


@pytest.mark.parametrize("kill_point", ["after_copy", "before_rename"])
def test_kill_during_snapshot_keeps_previous(tmp_path, kill_point):
    _run_child("child_kill_during_snapshot", str(tmp_path), kill_point)

    first = json.loads((tmp_path / "first.json").read_text())
    snapshot_path = tmp_path / "raft.snapshot"
    temporary_path = tmp_path / "raft.snapshot.write.tmp"
    assert temporary_path.exists(), "the second snapshot must have been written to its own file"
    assert _sha256(snapshot_path) == first["sha256"]
    assert _sha256(temporary_path) != first["sha256"]

    fresh = _open_store(tmp_path / "fresh")
    try:
        restored = read_snapshot(fresh, str(snapshot_path))
        assert tuple(restored) == pickle.loads(bytes.fromhex(first["raft_data"]))
        assert fresh.digest() == first["digest"]
        assert fresh.applied_index == first["applied_index"]
    finally:
        fresh.close()


def test_received_snapshot_fsynced_then_renamed(tmp_path, monkeypatch):
    """A follower writes a snapshot sent by the leader to a temporary file,
    fsyncs it, renames it over its own snapshot and fsyncs the folder. Its
    previous snapshot stays intact until the last chunk arrives."""
    leader_store = _open_store(tmp_path / "leader" / "state")
    follower_store = _open_store(tmp_path / "follower" / "state")
    fresh = _open_store(tmp_path / "fresh")
    try:
        leader_path = str(tmp_path / "leader" / "raft.snapshot")
        follower_path = str(tmp_path / "follower" / "raft.snapshot")
        leader = AsyncSnapshotSerializer(leader_store, leader_path, 4096, "leader")
        follower = AsyncSnapshotSerializer(follower_store, follower_path, 4096, "follower")
        _apply_records(leader_store, 1, 200)
        _take_snapshot(leader, _raft_data(leader_store, term=2))
        _apply_records(follower_store, 1, 5)
        _take_snapshot(follower, _raft_data(follower_store))
        follower_previous = _sha256(follower_path)

        events: list[tuple[str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def recording_fsync(fd):
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def recording_replace(source, target):
            events.append(("replace", f"{os.path.realpath(source)} -> {os.path.realpath(target)}"))
            real_replace(source, target)

        monkeypatch.setattr(os, "fsync", recording_fsync)
        monkeypatch.setattr(os, "replace", recording_replace)

        chunk_count = 0
        while True:
            chunk = leader.getTransmissionData("follower-node")
            chunk_count += 1
            complete = follower.setTransmissionData(chunk)
            if chunk[2]:
                break
            assert not complete
            assert _sha256(follower_path) == follower_previous
        monkeypatch.undo()

        assert complete
        assert chunk_count > 2, "the snapshot must have been sent in several chunks"
        temporary = os.path.realpath(follower_path + ".recv.tmp")
        folder = os.path.realpath(os.path.dirname(follower_path))
        rename = ("replace", f"{temporary} -> {os.path.realpath(follower_path)}")
        assert events.index(("fsync", temporary)) < events.index(rename)
        assert events.index(rename) < events.index(("fsync", folder))
        assert not os.path.exists(temporary)
        assert _sha256(follower_path) == _sha256(leader_path)

        restored = read_snapshot(fresh, follower_path)
        assert tuple(restored) == _raft_data(leader_store, term=2)[1:]
        assert fresh.digest() == leader_store.digest()
        assert fresh.high_watermark == 200
    finally:
        leader_store.close()
        follower_store.close()
        fresh.close()
