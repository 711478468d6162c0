"""Tests that each override of pysyncobj 0.3.17 in raft.group and raft.fixes
fixes the defect it is named after (the ids are those of raft.group's
docstring).

Every scenario runs in a child process, because raft.fixes reads
RAFTMQ_PYSYNCOBJ_FIXES once at import time and patches pysyncobj for the
whole process. A test named ..._with_overrides runs the scenario as raftmq
runs it and checks the correct outcome. Its twin, named ..._without_overrides
(or ..._without_clamp), runs the same scenario with the overrides switched
off and checks that the defect shows. The twin fails if the defect no longer
shows, for example after a pysyncobj upgrade, and then the override may no
longer be needed.

The scenarios use real ReplicatedGroup members on 127.0.0.1 with a
PartitionStore each. Where a race cannot be forced, a test hands a real
group a message dict shaped like the ones pysyncobj's __sendAppendEntries
builds, on the group's own tick thread, and its docstring states this. The
partial-send scenario drives pysyncobj's TcpConnection directly, because
that is the class raft.fixes patches.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from pysyncobj import FAIL_REASON, SyncObj
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection

from raftmq.partition.codec import AppendCommand, Record, decode_record, encode_append
from raftmq.partition.log import PartitionStore
from raftmq.raft import fixes
from raftmq.raft.group import _NO_GUARD, RaftSettings, ReplicatedGroup
from raftmq.raft.snapshot import TRAILER

TESTS_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
SECRET = "raftmq-override-tests"
STORE_MAP_SIZE_BYTES = 2**30
SCENARIO_TIMEOUT_S = 240


# --- running a scenario in a child process ------------------------------------


def _run_scenario(tmp_path: Path, name: str, overrides: bool, expect_sigkill: bool = False,
                  **arguments: Any) -> dict:
    """Run SCENARIOS[name](**arguments) in a new interpreter with the
    overrides on or off and return the dict it stored as JSON."""
    result_path = tmp_path / f"{name}-{'on' if overrides else 'off'}.json"
    arguments["result_path"] = str(result_path)
    environment = dict(os.environ, RAFTMQ_PYSYNCOBJ_FIXES="on" if overrides else "off")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import test_raft_overrides as module; module.child_main(sys.argv[2], sys.argv[3])"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, str(TESTS_DIR), name, json.dumps(arguments)],
        env=environment, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S,
    )
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    expected_code = -signal.SIGKILL if expect_sigkill else 0
    assert completed.returncode == expected_code, (
        f"scenario {name} (overrides {'on' if overrides else 'off'}) exited with "
        f"{completed.returncode}, expected {expected_code}; result: {result}; "
        f"stderr:\n{completed.stderr[-4000:]}"
    )
    assert result is not None, f"scenario {name} stored no result"
    assert "error" not in result, result["error"]
    return result


def child_main(name: str, arguments_json: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    arguments = json.loads(arguments_json)
    result_path = arguments.pop("result_path")
    result = SCENARIOS[name](result_path=result_path, **arguments)
    _write_json(result_path, result)


def _write_json(path: str, value: Any) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as output:
        json.dump(value, output)
    os.replace(temporary, path)


# --- helpers used inside the child ---------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _address(port: int) -> str:
    return f"{HOST}:{port}"


def _settings(**overrides: Any) -> RaftSettings:
    """Return settings for test groups. Snapshots happen only when forced.
    fsync is off because it matters only for power loss, which no test here
    simulates."""
    values: dict[str, Any] = dict(
        cluster_secret=SECRET,
        election_timeout_min_ms=400,
        election_timeout_max_ms=500,
        fsync_policy="never",
        log_compaction_min_entries=10**9,
        log_compaction_min_interval_ms=10**9,
    )
    values.update(overrides)
    return RaftSettings(**values)


def _open_store(path: str) -> PartitionStore:
    return PartitionStore(path, map_size_bytes=STORE_MAP_SIZE_BYTES)


def _append_command(value: bytes) -> bytes:
    return encode_append(AppendCommand(records=(Record(value=value),)))


def _record_values(store: PartitionStore) -> list[str]:
    fetched = store.fetch(0, 10**6, 2**31)
    return [decode_record(encoded).value.decode() for _, encoded in fetched.records]


def _submit_all(group: ReplicatedGroup, commands: list[bytes], timeout_s: float = 60.0) -> None:
    """Queue every command at once and wait until all committed. A
    single-member group commits in the tick after the one that appended, which
    waits for pysyncobj's autoTickPeriod (50 ms by default in 0.3.17), so
    one-by-one submits would take 50 ms each."""
    finished = threading.Semaphore(0)
    failures: list[int] = []

    def on_result(_result: Any, error: int) -> None:
        if error != FAIL_REASON.SUCCESS:
            failures.append(error)
        finished.release()

    for command in commands:
        group.apply_command(command, callback=on_result)
    deadline = time.monotonic() + timeout_s
    for _ in commands:
        if not finished.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{len(commands)} commands did not commit within {timeout_s} s")
    assert failures == [], f"commands failed with pysyncobj reasons {failures}"


def _wait_until(predicate: Callable[[], bool], timeout_s: float, description: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {description}")


def _journal(group: ReplicatedGroup):
    return group._SyncObj__raftLog


def _entries_as_json(entries) -> list[list]:
    return [[index, term, command.hex()] for command, index, term in entries]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _call_on_tick_thread(group: ReplicatedGroup, function: Callable[[], Any],
                         timeout_s: float = 10.0) -> Any:
    """Run `function` once inside the group's tick, where pysyncobj handles
    its own messages, so that it never races the tick thread."""
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def on_tick() -> None:
        if "started" in outcome:
            return
        outcome["started"] = True
        try:
            outcome["result"] = function()
        except BaseException as exc:  # re-raised on the calling thread below
            outcome["error"] = exc
        finally:
            done.set()

    group.addOnTickCallback(on_tick)
    try:
        if not done.wait(timeout_s):
            raise TimeoutError(f"the tick thread did not run the call within {timeout_s} s")
    finally:
        group.removeOnTickCallback(on_tick)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def _start_group(stack: contextlib.ExitStack, group_class: type, name: str, port: int,
                 partner_ports: list[int], data_dir: str,
                 settings: RaftSettings) -> tuple[ReplicatedGroup, PartitionStore]:
    """Start a group whose store is closed and which is stopped when `stack` closes."""
    store = _open_store(os.path.join(data_dir, "state"))
    stack.callback(store.close)
    group = group_class(name, _address(port), [_address(p) for p in partner_ports],
                        data_dir, store, settings)
    stack.callback(group.stop)
    return group, store


def _append_entries(term: int, prev_index: int, prev_term: int, entries: list,
                    commit_index: int) -> dict:
    """An append_entries message with the keys pysyncobj's __sendAppendEntries sets."""
    return {
        "type": "append_entries",
        "term": term,
        "commit_index": commit_index,
        "entries": list(entries),
        "prevLogIdx": prev_index,
        "prevLogTerm": prev_term,
    }


# --- dump loader: entries above the snapshot (B0) ------------------------------

MIN_APPLIED_ABOVE_SNAPSHOT = 5


def scenario_crash_at_compaction(result_path: str, data_dir: str) -> dict:
    """Run a single-member group under a stream of commands and force
    snapshots. SIGKILL the process at the moment pysyncobj would compact the
    journal after a snapshot was renamed into place. Wait for a compaction
    that has entries to remove and at least MIN_APPLIED_ABOVE_SNAPSHOT applied
    entries above its snapshot.

    This is the crash window between the snapshot rename and the journal
    compaction: the snapshot on disk is newer than the journal's start.
    Before dying, the process stores its journal and store state in
    `result_path`.
    """

    class CrashAtCompactionGroup(ReplicatedGroup):
        def _SyncObj__deleteEntriesTo(self, toIDx):
            # pysyncobj passes the index of the entry before the snapshot's last one.
            snapshot_index = toIDx + 1
            applied_index = self.raftLastApplied
            # Die only where the compaction has entries to remove, so that
            # the journal on disk starts before the snapshot's entries.
            if (toIDx <= _journal(self)[0][1]
                    or applied_index - snapshot_index < MIN_APPLIED_ABOVE_SNAPSHOT):
                return super()._SyncObj__deleteEntriesTo(toIDx)
            _write_json(result_path, {
                "snapshot_index": snapshot_index,
                "applied_index": applied_index,
                "store_applied_index": int(self.store.applied_index),
                "high_watermark": int(self.store.high_watermark),
                "journal": _entries_as_json(_journal(self)[:]),
            })
            _die()

    with contextlib.ExitStack() as stack:
        group, _ = _start_group(stack, CrashAtCompactionGroup, "crash", _free_ports(1)[0], [],
                                data_dir, _settings())
        _wait_until(group.is_leader, 30, "the single member to elect itself")
        sequence = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # Commands queued right after forceLogCompaction() usually enter
            # the journal in the tick that starts the snapshot, so they sit
            # above the snapshot's index.
            group.forceLogCompaction()
            for _ in range(50):
                group.apply_command(_append_command(b"record-%d" % sequence))
                sequence += 1
            time.sleep(0.02)
    return {"error": f"no compaction had {MIN_APPLIED_ABOVE_SNAPSHOT} applied entries "
                     f"above its snapshot within 60 s"}


def scenario_restart_after_crash(result_path: str, data_dir: str) -> dict:
    """Restart the crashed group, record its journal right after the dump
    loader ran, then submit one command and record its result."""
    loaded: dict[str, list] = {}

    class LoadRecordingGroup(ReplicatedGroup):
        def _SyncObj__loadDumpFile(self, clearJournal):
            super()._SyncObj__loadDumpFile(clearJournal)
            loaded["journal"] = _entries_as_json(_journal(self)[:])

    with contextlib.ExitStack() as stack:
        group, store = _start_group(stack, LoadRecordingGroup, "restart", _free_ports(1)[0], [],
                                    data_dir, _settings())
        _wait_until(lambda: "journal" in loaded and group.is_leader(), 30,
                    "the dump load and leadership after the restart")
        result = group.submit(_append_command(b"after-restart"), timeout_s=15)
        return {
            "loaded_journal": loaded["journal"],
            "submit_base_offset": None if result is None else result.base_offset,
            "high_watermark": int(store.high_watermark),
            "store_applied_index": int(store.applied_index),
        }


def _snapshot_last_index(path: Path) -> int:
    with open(path, "rb") as snapshot:
        snapshot.seek(-TRAILER.size, os.SEEK_END)
        lmdb_length, raft_length, _ = TRAILER.unpack(snapshot.read(TRAILER.size))
        snapshot.seek(lmdb_length)
        last_entry = pickle.loads(snapshot.read(raft_length))[0]
    return last_entry[1]


def _crash_and_restart(tmp_path: Path, overrides: bool) -> tuple[dict, dict]:
    data_dir = tmp_path / "group"
    crash = _run_scenario(tmp_path, "crash_at_compaction", overrides, expect_sigkill=True,
                          data_dir=str(data_dir))
    assert _snapshot_last_index(data_dir / "raft.snapshot") == crash["snapshot_index"]
    assert crash["journal"][0][0] < crash["snapshot_index"] - 1, \
        "the journal must start before the snapshot's entries"
    above = [entry for entry in crash["journal"] if entry[0] > crash["snapshot_index"]]
    assert len(above) >= MIN_APPLIED_ABOVE_SNAPSHOT, "the journal must reach past the snapshot"
    restart = _run_scenario(tmp_path, "restart_after_crash", overrides, data_dir=str(data_dir))
    return crash, restart


def test_dump_loader_keeps_entries_with_overrides(tmp_path):
    """After a crash between the snapshot rename and the journal compaction,
    the loader keeps every journal entry from the one before the snapshot's
    last entry onwards, and new commands apply after the restart."""
    crash, restart = _crash_and_restart(tmp_path, overrides=True)

    snapshot_index = crash["snapshot_index"]
    expected_journal = [entry for entry in crash["journal"] if entry[0] >= snapshot_index - 1]
    assert restart["loaded_journal"] == expected_journal
    assert restart["submit_base_offset"] is not None
    assert restart["high_watermark"] == restart["submit_base_offset"] + 1
    assert restart["high_watermark"] > crash["high_watermark"]


def test_dump_loader_clears_journal_without_overrides(tmp_path):
    """pysyncobj's loader finds a journal that does not start at the snapshot
    and replaces it with the snapshot's two entries. The applied entries above
    the snapshot are gone from the journal while the store holds them, so the
    indices the group hands out next are ones the store has applied: a
    command that pysyncobj reports as committed never reaches the store."""
    crash, restart = _crash_and_restart(tmp_path, overrides=False)

    snapshot_index = crash["snapshot_index"]
    assert [entry[0] for entry in restart["loaded_journal"]] == [snapshot_index - 1, snapshot_index]
    assert restart["submit_base_offset"] is None
    assert restart["high_watermark"] == crash["high_watermark"]
    assert restart["store_applied_index"] == crash["store_applied_index"]


# --- truncation only at a term conflict, and the commit clamp (B3) ---------------


def _leader_entries(data_dir: str, command_count: int) -> list:
    """Run a single-member group for `command_count` commands and return
    its journal: pysyncobj's initial no-op (index 1, term 0), the leader's no-op
    (index 2, term 1), then the commands (index 3 onwards, term 1). The
    command at index i appends the record "record-i"."""
    with contextlib.ExitStack() as leader_stack:
        group, _ = _start_group(leader_stack, ReplicatedGroup, "leader", _free_ports(1)[0], [],
                                data_dir, _settings())
        _wait_until(group.is_leader, 30, "the single member to elect itself")
        _submit_all(group, [_append_command(b"record-%d" % index)
                            for index in range(3, command_count + 3)])
        entries = list(_journal(group)[:])
    assert [entry[1] for entry in entries] == list(range(1, command_count + 3))
    assert [entry[2] for entry in entries] == [0] + [1] * (command_count + 1)
    return entries


def _isolated_follower(stack: contextlib.ExitStack, group_class: type, data_dir: str):
    """Start a member whose two partners are ports no process listens on. It is
    connected to no one, so it never starts an election and stays a follower
    of whoever sends it append_entries. Return the group, its store, the
    partner to deliver messages from, and the list its replies are recorded in."""
    port, *partner_ports = _free_ports(3)
    group, store = _start_group(stack, group_class, "follower", port, partner_ports, data_dir,
                                _settings())
    leader_node = sorted(group.otherNodes, key=lambda node: node.id)[0]
    replies: list[dict] = []
    transport = group._SyncObj__transport
    send = transport.send

    def record_reply(node, message):
        if message.get("type") == "next_node_idx":
            replies.append(dict(message))
        return send(node, message)

    transport.send = record_reply
    return group, store, leader_node, replies


def _deliver(group: ReplicatedGroup, node, message: dict) -> None:
    # The override rewrites the message in place, so each delivery gets a copy.
    _call_on_tick_thread(group, lambda: group._SyncObj__onMessageReceived(node, dict(message)))


def _wait_applied(group: ReplicatedGroup) -> None:
    _wait_until(lambda: group.raftLastApplied >= group.raftCommitIndex, 10,
                "the follower to apply its committed entries")


def scenario_resent_shorter_append(result_path: str, data_dir: str) -> dict:
    """Give a follower entries 2..14, then a resend of 7..10 that carries a
    commit index of 14.

    pysyncobj's leader resets nextIndex to the acknowledged point after each
    success and resends from there, in batches cut at the batch size, while
    the follower already contains more. The race cannot be forced with real
    members, so the messages are delivered on the follower's tick thread.
    """
    with contextlib.ExitStack() as stack:
        entries = _leader_entries(os.path.join(data_dir, "leader"), 12)
        group, store, leader_node, replies = _isolated_follower(
            stack, ReplicatedGroup, os.path.join(data_dir, "follower"))

        _deliver(group, leader_node, _append_entries(1, 1, 0, entries[1:], commit_index=1))
        after_first = _entries_as_json(_journal(group)[:])
        reply_to_first = replies[-1]

        _deliver(group, leader_node, _append_entries(1, 6, 1, entries[6:10], commit_index=14))
        after_resend = _entries_as_json(_journal(group)[:])
        commit_index = group.raftCommitIndex
        _wait_applied(group)
        return {
            "leader_journal": _entries_as_json(entries),
            "after_first": after_first,
            "reply_to_first": reply_to_first,
            "after_resend": after_resend,
            "reply_to_resend": replies[-1],
            "commit_index": commit_index,
            "records": _record_values(store),
        }


def _records(first_index: int, last_index: int) -> list[str]:
    return [f"record-{index}" for index in range(first_index, last_index + 1)]


def test_resent_append_keeps_log_with_overrides(tmp_path):
    result = _run_scenario(tmp_path, "resent_shorter_append", overrides=True,
                           data_dir=str(tmp_path))

    assert result["after_first"] == result["leader_journal"]
    assert result["reply_to_first"]["success"] is True
    assert result["reply_to_first"]["next_node_idx"] == 15
    assert result["after_resend"] == result["leader_journal"]
    assert result["reply_to_resend"]["success"] is True
    # The resend vouches for entries up to 10 only.
    assert result["commit_index"] == 10
    assert result["records"] == _records(3, 10)


def test_resent_append_truncates_without_overrides(tmp_path):
    """pysyncobj truncates the log after the resend's last entry: entries
    11..14 are gone although the follower acknowledged them (next_node_idx
    15) and the leader has counted that acknowledgement towards its commit."""
    result = _run_scenario(tmp_path, "resent_shorter_append", overrides=False,
                           data_dir=str(tmp_path))

    assert result["after_first"] == result["leader_journal"]
    assert result["reply_to_first"]["success"] is True
    assert result["reply_to_first"]["next_node_idx"] == 15
    assert result["after_resend"] == result["leader_journal"][:10]
    assert result["commit_index"] == 10


class _UnclampedGroup(ReplicatedGroup):
    """ReplicatedGroup's append override without its final commit clamp:
    held entries are skipped and truncation is guarded, but the commit index
    stays as pysyncobj computes it."""

    def _SyncObj__onMessageReceived(self, node, message):
        if (message.get("type") != "append_entries" or "prevLogIdx" not in message
                or "transmission" in message):
            return SyncObj._SyncObj__onMessageReceived(self, node, message)
        self._skip_entries_already_held(message)
        try:
            return SyncObj._SyncObj__onMessageReceived(self, node, message)
        finally:
            self._append_guard = _NO_GUARD


def scenario_stale_tail_after_leader_change(result_path: str, data_dir: str, clamp: bool) -> dict:
    """Give a follower an old leader's log 1..10 (term 1, committed to 5),
    then messages from a new leader of term 2 whose log shares 1..5 and
    continues with its own no-op and two commands at 6..8, committed.

    The new leader's first message covers only 4..5 but carries commit index
    8. Its entries 6..8 differ from the follower's, so the follower may
    commit only up to 5 on that message. The messages are delivered on the
    follower's tick thread. The entries are real ones from a group's journal,
    with the new leader's indices and term set by hand.
    """
    with contextlib.ExitStack() as stack:
        entries = _leader_entries(os.path.join(data_dir, "leader"), 12)
        no_op = entries[1][0]
        old_log = entries[:10]
        new_tail = [(no_op, 6, 2), (entries[12][0], 7, 2), (entries[13][0], 8, 2)]
        new_log = entries[:5] + new_tail
        group_class = ReplicatedGroup if clamp else _UnclampedGroup
        group, store, leader_node, _ = _isolated_follower(
            stack, group_class, os.path.join(data_dir, "follower"))

        _deliver(group, leader_node, _append_entries(1, 1, 0, old_log[1:], commit_index=5))
        _wait_applied(group)
        records_after_old_leader = _record_values(store)

        _deliver(group, leader_node, _append_entries(2, 3, 1, new_log[3:5], commit_index=8))
        commit_after_short_message = group.raftCommitIndex
        journal_after_short_message = _entries_as_json(_journal(group)[:])
        _wait_applied(group)
        records_after_short_message = _record_values(store)

        _deliver(group, leader_node, _append_entries(2, 5, 1, new_tail, commit_index=8))
        _wait_applied(group)
        return {
            "old_log": _entries_as_json(old_log),
            "new_log": _entries_as_json(new_log),
            "records_after_old_leader": records_after_old_leader,
            "commit_after_short_message": commit_after_short_message,
            "journal_after_short_message": journal_after_short_message,
            "records_after_short_message": records_after_short_message,
            "final_journal": _entries_as_json(_journal(group)[:]),
            "final_commit": group.raftCommitIndex,
            "final_records": _record_values(store),
        }


def test_commit_clamp_skips_unverified_tail(tmp_path):
    """The follower commits only what the new leader's message vouched for,
    truncates at the real conflict (index 6) on the next message, and ends
    with the new leader's log and records."""
    result = _run_scenario(tmp_path, "stale_tail_after_leader_change", overrides=True,
                           data_dir=str(tmp_path), clamp=True)

    assert result["records_after_old_leader"] == _records(3, 5)
    assert result["commit_after_short_message"] == 5
    assert result["journal_after_short_message"] == result["old_log"]
    assert result["records_after_short_message"] == _records(3, 5)
    assert result["final_journal"] == result["new_log"]
    assert result["final_commit"] == 8
    assert result["final_records"] == _records(3, 5) + _records(13, 14)


def test_commit_clamp_needed_without_clamp(tmp_path):
    """Without the clamp, the override keeps the old leader's entries 6..8
    and pysyncobj commits them on the new leader's commit index: the follower
    applies records the new leader never wrote, and its store keeps them
    after its log is corrected."""
    result = _run_scenario(tmp_path, "stale_tail_after_leader_change", overrides=True,
                           data_dir=str(tmp_path), clamp=False)

    assert result["commit_after_short_message"] == 8
    assert result["records_after_short_message"] == _records(3, 8)
    assert result["final_journal"] == result["new_log"]
    assert result["final_records"] == _records(3, 8)


# --- three members catching up: per-follower budget (B2), truncations (B3) -------

CATCH_UP_ENTRIES = 300
CATCH_UP_ENTRY_BYTES = 30_000
# A follower this many entries behind needs several batches of about 64 KiB.
LAGGING_ENTRIES = 10


def scenario_catch_up(result_path: str, data_dir: str) -> dict:
    """Let a leader with CATCH_UP_ENTRIES entries of random bytes in its log
    bring two empty followers up to date, on the default 100 ms heartbeat.

    Records, for every send round of the leader, how far each follower lagged
    at its start and how many append_entries messages each got, and every
    truncation of a follower's journal with the entries it removed.
    """
    ports = _free_ports(3)
    leader_dir = os.path.join(data_dir, "member0")
    # max_command_bytes only sizes append batches here. 1000 keeps them near
    # the 64 KiB floor (67,536 bytes), so a batch carries three entries.
    sizing = dict(max_command_bytes=1000)
    leader_settings = _settings(**sizing)
    # Followers time out late, so the member with the full log stays leader.
    follower_settings = _settings(election_timeout_min_ms=20_000, election_timeout_max_ms=30_000,
                                  connection_timeout_ms=30_000, **sizing)

    with contextlib.ExitStack() as preload_stack:
        group, _ = _start_group(preload_stack, ReplicatedGroup, "preload", ports[0], [],
                                leader_dir, leader_settings)
        _wait_until(group.is_leader, 30, "the single member to elect itself")
        _submit_all(group, [_append_command(os.urandom(CATCH_UP_ENTRY_BYTES))
                            for _ in range(CATCH_UP_ENTRIES)])

    rounds: list[dict] = []
    counting = threading.Event()

    class RoundCountingGroup(ReplicatedGroup):
        def _SyncObj__sendAppendEntries(self):
            if not counting.is_set():
                return super()._SyncObj__sendAppendEntries()
            last_index = _journal(self)[-1][1]
            lag = {node.id: last_index + 1 - next_index
                   for node, next_index in self._SyncObj__raftNextIndex.items()}
            messages: collections.Counter = collections.Counter()
            transport = self._SyncObj__transport
            send = transport.send

            def counting_send(node, message):
                if message.get("type") == "append_entries":
                    messages[node.id] += 1
                return send(node, message)

            transport.send = counting_send
            try:
                return super()._SyncObj__sendAppendEntries()
            finally:
                del transport.send
                rounds.append({"lag": lag, "messages": dict(messages)})

    truncations: list[dict] = []

    def record_truncations(member: int, journal) -> None:
        delete_entries_from = journal.deleteEntriesFrom

        def recording(position):
            removed = [[entry[1], entry[2]] for entry in journal[position:]]
            truncations.append({"member": member, "removed": removed})
            return delete_entries_from(position)

        journal.deleteEntriesFrom = recording

    with contextlib.ExitStack() as stack:
        leader, leader_store = _start_group(stack, RoundCountingGroup, "member0", ports[0],
                                            ports[1:], leader_dir, leader_settings)
        members = [(leader, leader_store)]
        for member in (1, 2):
            partners = [port for port in ports if port != ports[member]]
            group, store = _start_group(stack, ReplicatedGroup, f"member{member}", ports[member],
                                        partners, os.path.join(data_dir, f"member{member}"),
                                        follower_settings)
            record_truncations(member, _journal(group))
            members.append((group, store))
        _wait_until(leader.is_leader, 30, "the member with the full log to lead")
        counting.set()
        last_index = _journal(leader)[-1][1]
        _wait_until(lambda: all(_journal(group)[-1][1] >= last_index for group, _ in members[1:]),
                    120, "both followers to receive the whole log")
        counting.clear()
        _wait_until(lambda: all(group.raftLastApplied >= last_index for group, _ in members), 30,
                    "every member to apply the whole log")
        leader_terms = {entry[1]: entry[2] for entry in _journal(leader)[:]}
        for truncation in truncations:
            truncation["matching_leader"] = all(
                leader_terms.get(index) == term for index, term in truncation["removed"])
        leader_log = [entry[1:] for entry in _journal(leader)[:]]
        journals_equal = all([entry[1:] for entry in _journal(group)[:]] == leader_log
                             for group, _ in members[1:])
        return {
            "rounds": rounds,
            "truncations": truncations,
            "journals_equal": journals_equal,
            "digests": [store.digest() for _, store in members],
        }


@pytest.fixture(scope="module")
def catch_up_runs(tmp_path_factory) -> dict[bool, dict]:
    """The catch-up scenario run once with the overrides and once without."""
    runs = {}
    for overrides in (True, False):
        tmp_path = tmp_path_factory.mktemp(f"catch-up-{'on' if overrides else 'off'}")
        data_dir = tmp_path / "members"
        runs[overrides] = _run_scenario(tmp_path, "catch_up", overrides, data_dir=str(data_dir))
        # Each run leaves tens of megabytes of journals and stores.
        shutil.rmtree(data_dir)
    return runs


def _lagging_rounds(run: dict) -> list[dict]:
    """Send rounds at whose start both followers lagged by LAGGING_ENTRIES or more."""
    return [
        send_round for send_round in run["rounds"]
        if len(send_round["lag"]) == 2 and min(send_round["lag"].values()) >= LAGGING_ENTRIES
    ]


def _messages_per_follower(rounds: list[dict]) -> list[int]:
    totals: collections.Counter = collections.Counter()
    for send_round in rounds:
        for node_id in send_round["lag"]:
            totals[node_id] += send_round["messages"].get(node_id, 0)
    return sorted(totals.values())


def _check_catch_up_completed(run: dict) -> None:
    assert run["journals_equal"]
    assert len(set(run["digests"])) == 1


def test_both_followers_progress_with_overrides(catch_up_runs):
    """With a time budget per follower, both lagging followers get a similar
    number of append messages in each round."""
    run = catch_up_runs[True]
    _check_catch_up_completed(run)
    lagging = _lagging_rounds(run)
    assert len(lagging) >= 3, "both followers must have lagged for several rounds"
    fewer, more = _messages_per_follower(lagging)
    assert fewer >= 0.6 * more, (fewer, more)


def test_second_follower_starves_without_overrides(catch_up_runs):
    """pysyncobj measures one time budget from the start of the round: the
    follower served first uses it up, and the other gets the single batch
    the loop always sends, in nearly every round in which both lag."""
    run = catch_up_runs[False]
    _check_catch_up_completed(run)
    lagging = _lagging_rounds(run)
    assert len(lagging) >= 3, "both followers must have lagged for several rounds"
    fewer, more = _messages_per_follower(lagging)
    assert fewer <= 0.5 * more, (fewer, more)
    starved = [send_round for send_round in lagging
               if min(send_round["messages"].get(node_id, 0) for node_id in send_round["lag"]) == 1]
    assert len(starved) >= 0.8 * len(lagging), (len(starved), len(lagging))


def test_catch_up_never_truncates_with_overrides(catch_up_runs):
    """A follower catching up from a stable leader has no conflicting entry,
    so it never removes an entry that the leader's log contains."""
    run = catch_up_runs[True]
    _check_catch_up_completed(run)
    needless = [truncation for truncation in run["truncations"] if truncation["matching_leader"]]
    assert needless == []


def test_catch_up_truncates_without_overrides(catch_up_runs):
    """pysyncobj's follower truncates whenever an append's previous index is
    below its last index, removing entries identical to the leader's."""
    run = catch_up_runs[False]
    _check_catch_up_completed(run)
    needless = [truncation for truncation in run["truncations"] if truncation["matching_leader"]]
    assert len(needless) >= 1
    assert all(truncation["removed"] for truncation in needless)


# --- POLLOUT after a partial send (B4) -------------------------------------------

PARTIAL_SEND_BYTES = 4 * 2**20
# With POLLOUT subscribed, bytes move on every poll. A stall this long means
# nothing will move any more.
STALL_S = 2.0


def scenario_partial_send(result_path: str) -> dict:
    """Send one large append_entries message through pysyncobj's
    TcpConnection to a plain socket whose small buffers make the send
    partial, then keep polling and reading without sending anything else.
    TcpConnection.send is what raft.fixes patches, and fixes.install() does
    nothing when the overrides are off."""
    fixes.install()
    poller = createPoller("auto")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2**14)
    listener.bind((HOST, 0))
    listener.listen(1)
    connection = TcpConnection(poller, sendBufferSize=2**14, recvBufferSize=2**14, timeout=60.0)
    receiver = None
    try:
        assert connection.connect(HOST, listener.getsockname()[1])
        receiver, _ = listener.accept()
        receiver.setblocking(False)
        _poll_until(poller, lambda: connection.state == CONNECTION_STATE.CONNECTED)
        # The first POLLOUT after connecting resubscribes for reads only.
        for _ in range(3):
            poller.poll(0.05)

        connection.send(_append_entries(1, 1, 0, [(os.urandom(PARTIAL_SEND_BYTES), 2, 1)],
                                        commit_index=1))
        unsent_after_send = connection.getSendBufferSize()

        received = bytearray()
        last_progress = time.monotonic()
        while time.monotonic() - last_progress < STALL_S:
            poller.poll(0.05)
            try:
                while chunk := receiver.recv(2**16):
                    received += chunk
                    last_progress = time.monotonic()
            except BlockingIOError:
                pass
            if len(received) >= 4 and len(received) == 4 + struct.unpack("i", received[:4])[0]:
                break
        return {
            "unsent_after_send": unsent_after_send,
            "received": len(received),
            "frame_length": 4 + struct.unpack("i", received[:4])[0],
            "unsent_at_end": connection.getSendBufferSize(),
        }
    finally:
        connection.disconnect()
        if receiver is not None:
            receiver.close()
        listener.close()


def _poll_until(poller, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s polling")
        poller.poll(0.05)


def test_partial_send_drains_with_overrides(tmp_path):
    result = _run_scenario(tmp_path, "partial_send", overrides=True)

    assert result["unsent_after_send"] > 0, "the send must have been partial"
    assert result["received"] == result["frame_length"]
    assert result["unsent_at_end"] == 0


def test_partial_send_stalls_without_overrides(tmp_path):
    """Once connected, pysyncobj subscribes to POLLOUT again only while
    handling a POLLOUT event, never in send(). After a partial send, the rest
    waits in the write buffer until the next send, however long the socket
    has been writable."""
    result = _run_scenario(tmp_path, "partial_send", overrides=False)

    assert result["unsent_after_send"] > 0, "the send must have been partial"
    assert result["received"] < result["frame_length"]
    assert result["unsent_at_end"] > 0
    assert result["received"] + result["unsent_at_end"] == result["frame_length"]


SCENARIOS: dict[str, Callable[..., dict]] = {
    "crash_at_compaction": scenario_crash_at_compaction,
    "restart_after_crash": scenario_restart_after_crash,
    "resent_shorter_append": scenario_resent_shorter_append,
    "stale_tail_after_leader_change": scenario_stale_tail_after_leader_change,
    "catch_up": scenario_catch_up,
    "partial_send": scenario_partial_send,
}
