"""A hardened pysyncobj group that replicates opaque commands into an LmdbStore.

This module and raft.fixes are the only places that talk to pysyncobj. The
0.3.17 defects they neutralize, under the short ids that the tests in
tests/test_raft_overrides.py also use:

- security: a group never starts without a cluster secret (every frame is
  then authenticated before it is unpickled) and binds only to its own
  configured address;
- B0: snapshots are LMDB copies written in the background without forking,
  then fsynced and renamed (raft.snapshot). The dump loader keeps journal
  entries above the snapshot instead of clearing the journal, and the
  journal is LMDB, so compaction is one atomic transaction (raft.journal);
- B1: appendEntriesBatchSizeBytes stays above the largest command the node
  accepts, so no command takes the broken chunked path;
- B2: each follower gets its own time budget per send round;
- B3: a follower truncates its log only where an entry conflicts with the
  leader's (same index, other term), as the AppendEntries rule of the Raft
  paper (Ongaro and Ousterhout, 2014) requires. It never truncates just
  because an append starts below its last index;
- B4: 4 MiB socket buffers, and POLLOUT re-armed after a partial send
  (raft.fixes);
- B5: apply never raises (LmdbStore.apply turns every failure into a result);
- B6: every submit has its own deadline; a callback that never fires after a
  leader change ends in CommitTimeout, not a hung caller;
- B7: journalFile and fullDumpFile are always both set;
- no fsync: the journal and the state follow the group's fsync policy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

from . import fixes
from .snapshot import AsyncSnapshotSerializer, read_snapshot, write_snapshot
from .store import ApplyError, LmdbStore, RaftIndex

logger = logging.getLogger(__name__)

_STATE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}


@dataclasses.dataclass(frozen=True)
class RaftSettings:
    """Timing and size settings shared by every group of a node."""

    cluster_secret: str
    election_timeout_min_ms: int = 1000
    election_timeout_max_ms: int = 2500
    heartbeat_interval_ms: int = 100
    connection_timeout_ms: int = 5000
    connection_retry_ms: int = 1000
    # A leader that has not heard from a majority for this long steps down.
    leader_fallback_timeout_ms: int = 3000
    # Log compaction: take a snapshot after this many entries (and at least
    # log_compaction_min_interval_ms after the previous one).
    log_compaction_min_entries: int = 20000
    log_compaction_min_interval_ms: int = 300_000
    # Also snapshot once the journal contains this many bytes of commands.
    # The journal is mirrored in memory, so this bounds a group's memory too.
    log_compaction_max_journal_bytes: int = 256 * 2**20
    fsync_policy: str = "interval"
    fsync_interval_ms: int = 200
    max_command_bytes: int = 2 * 2**20
    socket_buffer_bytes: int = 4 * 2**20

    def __post_init__(self) -> None:
        if not self.cluster_secret:
            raise ValueError(
                "a cluster secret is required: the Raft ports carry pickled data, "
                "so without one any peer could run code on this node; set "
                "--cluster-secret or RAFTMQ_CLUSTER_SECRET"
            )


class NotLeader(Exception):
    def __init__(self, leader_address: str | None):
        super().__init__(f"not the leader; leader is {leader_address or 'unknown'}")
        self.leader_address = leader_address


class CommitTimeout(Exception):
    """The command's outcome is unknown: it may still commit later."""


class CommandRejected(Exception):
    """The group did not take the command (queue full, leader lost, discarded)."""

    def __init__(self, reason_name: str, outcome_known: bool):
        super().__init__(f"command not committed: {reason_name}")
        self.reason_name = reason_name
        self.outcome_known = outcome_known


# Sentinel: no append_entries message is being handled.
_NO_GUARD = object()


class _HeldEntriesFilter(logging.Filter):
    """Drop pysyncobj's "truncating already-applied log entries" warning
    while the B3 guard is about to skip that very truncation, so the log
    only warns about truncations that happen (see _SyncObj__deleteEntriesFrom)."""

    def __init__(self) -> None:
        super().__init__()
        self.suppressing = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(self.suppressing, "active", False):
            return not str(record.msg).startswith("truncating already-applied")
        return True


_held_entries_filter = _HeldEntriesFilter()
logging.getLogger("pysyncobj.syncobj").addFilter(_held_entries_filter)

_FAIL_NAMES = {
    value: name for name, value in vars(FAIL_REASON).items() if not name.startswith("_")
}
# Reasons after which the command is known not to have committed.
_NOT_COMMITTED = {FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED,
                  FAIL_REASON.NOT_LEADER, FAIL_REASON.REQUEST_DENIED}


class ReplicatedGroup(SyncObj):
    """One Raft group replicating commands into `store`."""

    def __init__(
        self,
        name: str,
        self_address: str,
        partner_addresses: list[str],
        data_dir: str,
        store: LmdbStore,
        settings: RaftSettings,
        on_role_change: Callable[[str, str], None] | None = None,
    ):
        # Attributes set before SyncObj.__init__ are library state to
        # pysyncobj; with a custom serializer nothing of ours is pickled.
        self.group_name = name
        self.store = store
        self._on_role_change = on_role_change
        self._settings = settings
        self._stopped = threading.Event()
        os.makedirs(data_dir, exist_ok=True)
        self._snapshot_path = os.path.join(data_dir, "raft.snapshot")
        journal_path = os.path.join(data_dir, "raft.journal")
        if fixes.FIXES_ENABLED:
            fixes.install()
            fixes.register_journal(journal_path, sync_each_write=settings.fsync_policy == "always")
        conf = SyncObjConf(
            password=settings.cluster_secret,
            bindAddress=self_address,
            journalFile=journal_path,
            fullDumpFile=self._snapshot_path,
            serializer=self._write_snapshot,
            deserializer=self._read_snapshot,
            useFork=False,
            raftMinTimeout=settings.election_timeout_min_ms / 1000,
            raftMaxTimeout=settings.election_timeout_max_ms / 1000,
            appendEntriesPeriod=settings.heartbeat_interval_ms / 1000,
            connectionTimeout=settings.connection_timeout_ms / 1000,
            connectionRetryTime=settings.connection_retry_ms / 1000,
            leaderFallbackTimeout=settings.leader_fallback_timeout_ms / 1000,
            appendEntriesUseBatch=False,
            appendEntriesBatchSizeBytes=max(2**16, 2 * settings.max_command_bytes + 2**16),
            logCompactionBatchSize=2**20,
            sendBufferSize=settings.socket_buffer_bytes,
            recvBufferSize=settings.socket_buffer_bytes,
            logCompactionMinEntries=settings.log_compaction_min_entries,
            logCompactionMinTime=settings.log_compaction_min_interval_ms / 1000,
            commandsWaitLeader=False,
            onStateChanged=self._role_changed,
            dynamicMembershipChange=False,
        )
        self._member_count = len(partner_addresses) + 1
        self._append_guard: object = _NO_GUARD
        super().__init__(self_address, partner_addresses, conf)
        self._partners = frozenset(self.otherNodes)
        if fixes.FIXES_ENABLED:
            # Swapped in after construction: pysyncobj built its own Serializer
            # in __init__ and used it to load the snapshot, which is harmless.
            self._SyncObj__serializer = AsyncSnapshotSerializer(
                store, self._snapshot_path, 2**20, name)
        if fixes.FIXES_ENABLED:
            self.addOnTickCallback(self._maybe_force_compaction)
        self._fsync_thread = None
        if settings.fsync_policy == "interval":
            self._fsync_thread = threading.Thread(
                target=self._fsync_loop, name="fsync", daemon=True)
            self._fsync_thread.start()
        logger.info(
            "%s event=group_started address=%s partners=%s",
            name, self_address, ",".join(partner_addresses),
        )

    # --- apply -----------------------------------------------------------

    @replicated
    def apply_command(self, command: bytes) -> Any:
        # pysyncobj increments raftLastApplied after the call returns.
        index = RaftIndex(self.raftLastApplied + 1)
        return self.store.apply(index, command)

    # --- submit ----------------------------------------------------------

    def submit(self, command: bytes, timeout_s: float, forward: bool = False) -> Any:
        """Replicate `command` and return its apply result.

        With forward=False, raises NotLeader when this member does not lead
        the group; with forward=True a follower hands the command to the
        leader (pysyncobj's own forwarding) and waits for it to apply here.
        Raises
        CommandRejected when the group did not commit the command, and
        CommitTimeout when the outcome is unknown after timeout_s.
        """
        if not forward and not self._isLeader():
            raise NotLeader(self.leader_address())
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def on_result(result: Any, error: int) -> None:
            outcome["result"] = result
            outcome["error"] = error
            done.set()

        self.apply_command(command, callback=on_result)
        if not done.wait(timeout_s):
            raise CommitTimeout(f"no commit within {timeout_s:.3f}s")
        error = outcome["error"]
        if error != FAIL_REASON.SUCCESS:
            if error == FAIL_REASON.NOT_LEADER:
                raise NotLeader(self.leader_address())
            raise CommandRejected(_FAIL_NAMES.get(error, str(error)), error in _NOT_COMMITTED)
        result = outcome["result"]
        if isinstance(result, ApplyError):
            raise result
        return result

    # --- leadership ------------------------------------------------------

    def is_leader(self) -> bool:
        return self._isLeader()

    def leader_address(self) -> str | None:
        leader = self._getLeader()
        return None if leader is None else str(leader.id)

    def connected_partners(self) -> list[str]:
        return sorted(str(node.id) for node in self._partners if self.isNodeConnected(node))

    def has_quorum(self) -> bool:
        """True when this member leads and is connected to a majority.

        pysyncobj 0.3.17 has no check-quorum: a leader cut off from the rest
        keeps its role for leader_fallback_timeout_ms. Serving only while a
        majority is connected narrows that window to the connection timeout.
        """
        if not self._isLeader():
            return False
        return len(self.connected_partners()) + 1 > self._member_count // 2

    def transfer_leadership_to(self, address: str) -> None:
        """Ask the member at `address` to take over; pysyncobj denies it
        unless that member has every entry of the leader's log."""

        def on_result(_result: Any, error: int) -> None:
            if error != FAIL_REASON.SUCCESS:
                logger.info("%s event=leadership_transfer_denied target=%s reason=%s",
                            self.group_name, address, _FAIL_NAMES.get(error, error))

        logger.info("%s term=%d event=leadership_transfer target=%s",
                    self.group_name, self._getTerm(), address)
        self.transferLeadership(address, callback=on_result)

    def role(self) -> str:
        return _STATE_NAMES.get(self._SyncObj__raftState, "unknown")

    def is_bound(self) -> bool:
        """True once the group's Raft port is bound (pysyncobj retries every second)."""
        return bool(self._SyncObj__transport.ready)

    def read_ready(self) -> bool:
        """True when this member may serve reads: it leads with a connected
        majority and has applied the no-op entry of its own term, so every
        entry committed before it became leader is in its state."""
        if not self.has_quorum():
            return False
        noop_index = self._SyncObj__noopIDx
        return noop_index is not None and self.raftLastApplied >= noop_index

    def term(self) -> int:
        return self._getTerm()

    def _role_changed(self, old_state: int, new_state: int) -> None:
        old_name = _STATE_NAMES.get(old_state, str(old_state))
        new_name = _STATE_NAMES.get(new_state, str(new_state))
        logger.info(
            "%s term=%d event=role_changed from=%s to=%s",
            self.group_name, self._getTerm(), old_name, new_name,
        )
        if self._on_role_change is not None:
            self._on_role_change(old_name, new_name)

    # --- overrides of pysyncobj 0.3.17 internals -------------------------
    # Each keeps the original behaviour when RAFTMQ_PYSYNCOBJ_FIXES=off.

    def _SyncObj__loadDumpFile(self, clearJournal):
        """B0: keep the journal entries the snapshot does not cover.

        pysyncobj clears the whole journal when its first entries do not line
        up with the snapshot, which after a crash during compaction throws
        away acknowledged entries. The Raft rule for installing a snapshot is
        used instead. When the journal contains the snapshot's last entry
        with the same term, the entries after it stay. Otherwise the journal
        is reset to the snapshot.
        """
        if not fixes.FIXES_ENABLED:
            return SyncObj._SyncObj__loadDumpFile(self, clearJournal)
        try:
            data = self._SyncObj__serializer.deserialize()
        except Exception:
            logger.exception("%s event=snapshot_load_failed", self.group_name)
            return
        last_entry, previous_entry = data[1], data[2]
        snapshot_index, snapshot_term = last_entry[1], last_entry[2]
        journal = self._SyncObj__raftLog
        kept: list = []
        if len(journal) and journal[0][1] <= snapshot_index <= journal[-1][1]:
            position = snapshot_index - journal[0][1]
            if journal[position][2] == snapshot_term:
                kept = list(journal[position + 1:])
        entries = [previous_entry, last_entry] + kept
        if list(journal[:]) != entries:
            journal.replace_all(entries)
        self._SyncObj__raftLastApplied = snapshot_index
        commit_index = min(max(self._SyncObj__raftCommitIndex, snapshot_index), entries[-1][1])
        self._SyncObj__raftCommitIndex = commit_index
        journal.setRaftCommitIndex(commit_index)
        self._SyncObj__onSetCodeVersion(0)
        logger.info("%s event=snapshot_loaded raft_index=%d journal_entries_kept=%d",
                    self.group_name, snapshot_index, len(kept))

    def _SyncObj__onMessageReceived(self, node, message):
        """B3: let an append truncate the log only at a real conflict."""
        if (not fixes.FIXES_ENABLED or message.get("type") != "append_entries"
                or "prevLogIdx" not in message or "transmission" in message):
            return SyncObj._SyncObj__onMessageReceived(self, node, message)
        commit_before = self._SyncObj__raftCommitIndex
        verified_end = self._skip_entries_already_held(message)
        _held_entries_filter.suppressing.active = self._append_guard is None
        try:
            return SyncObj._SyncObj__onMessageReceived(self, node, message)
        finally:
            _held_entries_filter.suppressing.active = False
            self._append_guard = _NO_GUARD
            # Entries past verified_end were not checked against the leader's
            # log in this message, so they must not become committed here.
            commit = self._SyncObj__raftCommitIndex
            if commit > commit_before and commit > verified_end:
                commit = max(commit_before, verified_end)
                self._SyncObj__raftCommitIndex = commit
                self._SyncObj__raftLog.setRaftCommitIndex(commit)

    def _skip_entries_already_held(self, message) -> int:
        """Drop the leading entries of an append that this log already contains
        with the same term, and arm the truncation guard.

        Returns the last index that the message checks against the leader's log.
        """
        entries = message.get("entries") or []
        journal = self._SyncObj__raftLog
        first_index, last_index = journal[0][1], journal[-1][1]
        held = 0
        for entry in entries:
            index, term = entry[1], entry[2]
            if index < first_index or index > last_index or journal[index - first_index][2] != term:
                break
            held += 1
        if held:
            message["prevLogIdx"], message["prevLogTerm"] = entries[held - 1][1], entries[held - 1][2]
            entries = entries[held:]
            message["entries"] = entries
        # The first remaining entry conflicts when this log has its index.
        self._append_guard = entries[0][1] if entries and entries[0][1] <= last_index else None
        return entries[-1][1] if entries else message["prevLogIdx"]

    def _SyncObj__deleteEntriesFrom(self, fromIDx):
        guard = self._append_guard
        if fixes.FIXES_ENABLED and guard is not _NO_GUARD and guard != fromIDx:
            return  # no conflicting entry at fromIDx: keep the log
        if fromIDx <= self._SyncObj__raftLastApplied:
            logger.error("%s event=truncating_applied_entries from_index=%d applied_index=%d",
                         self.group_name, fromIDx, self._SyncObj__raftLastApplied)
        return SyncObj._SyncObj__deleteEntriesFrom(self, fromIDx)

    def _SyncObj__sendAppendEntries(self):
        """B2: give every follower its own time budget in a send round.

        pysyncobj measures one budget from the start of the round, so the
        first follower can use it all and the second gets one batch per
        heartbeat. Calling the original once per follower resets the budget.
        The transport holds its own reference to the member set, so the
        temporary one-member set seen here changes nothing else.
        """
        if not fixes.FIXES_ENABLED or len(self._partners) < 2:
            return SyncObj._SyncObj__sendAppendEntries(self)
        members = self._SyncObj__otherNodes
        try:
            for partner in list(members):
                self._SyncObj__otherNodes = {partner}
                SyncObj._SyncObj__sendAppendEntries(self)
        finally:
            self._SyncObj__otherNodes = members

    # --- snapshots and fsync -------------------------------------------

    def _write_snapshot(self, path: str, raft_data: Any) -> None:
        """Synchronous snapshot, used by pysyncobj's own Serializer only when
        the overrides are off or before the asynchronous one is swapped in."""
        size = write_snapshot(self.store, path, raft_data)
        logger.info("%s event=snapshot_written raft_index=%s bytes=%d",
                    self.group_name, raft_data[0][1], size)

    def _read_snapshot(self, path: str) -> Any:
        return read_snapshot(self.store, path)

    def _maybe_force_compaction(self) -> None:
        journal = self._SyncObj__raftLog
        if getattr(journal, "bytes", 0) > self._settings.log_compaction_max_journal_bytes:
            self._SyncObj__forceLogCompaction = True

    def _fsync_loop(self) -> None:
        interval_s = self._settings.fsync_interval_ms / 1000
        while not self._stopped.wait(interval_s):
            self.fsync()

    def fsync(self) -> None:
        """Flush the journal and the state to disk; callable from any thread."""
        try:
            journal = self._SyncObj__raftLog
            if hasattr(journal, "sync"):
                journal.sync()
            self.store.sync()
        except Exception:
            if not self._stopped.is_set():
                logger.exception("%s event=fsync_failed", self.group_name)

    def stop(self) -> None:
        """Stop the tick thread and close the group's sockets; the store stays open."""
        self._stopped.set()
        if self._fsync_thread is not None:
            self._fsync_thread.join()
        self.destroy_synchronous()
        serializer = self._SyncObj__serializer
        if isinstance(serializer, AsyncSnapshotSerializer):
            serializer.wait_idle()
        if self._settings.fsync_policy != "never":
            self.store.sync()
        logger.info("%s event=group_stopped", self.group_name)
