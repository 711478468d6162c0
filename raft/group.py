"""A hardened pysyncobj group that replicates opaque commands into an LmdbStore.

This module is the only place that talks to pysyncobj. It neutralizes the
0.3.17 defects that bite at the level of one group:

- security: a group never starts without a cluster secret (every frame is
  then authenticated before it is unpickled) and binds only to its own
  configured address;
- B1: appendEntriesBatchSizeBytes is kept above the largest command the node
  accepts, so no command takes the broken chunked path;
- B4: 4 MiB socket buffers, so heartbeats do not queue behind a large entry;
- B5: apply never raises (LmdbStore.apply turns every failure into a result);
- B6: every submit has its own deadline; a callback that never fires after a
  leader change ends in CommitTimeout, not a hung caller;
- B7: journalFile and fullDumpFile are always both set;
- B0 (in part): the snapshot serializer is custom, so pysyncobj never forks
  a writer that could outlive a killed node.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import struct
import threading
import time
from typing import Any, Callable

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

from .store import ApplyError, LmdbStore, RaftIndex

logger = logging.getLogger(__name__)

_SNAPSHOT_MAGIC = b"RMQSNAP1"
_TRAILER = struct.Struct(">QQ8s")  # lmdb_length, raft_data_length, magic

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
        os.makedirs(data_dir, exist_ok=True)
        self._snapshot_path = os.path.join(data_dir, "raft.snapshot")
        conf = SyncObjConf(
            password=settings.cluster_secret,
            bindAddress=self_address,
            journalFile=os.path.join(data_dir, "raft.journal"),
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
        super().__init__(self_address, partner_addresses, conf)
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
        return sorted(str(node.id) for node in self.otherNodes if self.isNodeConnected(node))

    def has_quorum(self) -> bool:
        """True when this member leads and is connected to a majority.

        pysyncobj 0.3.17 has no check-quorum: a leader cut off from the rest
        keeps its role for leader_fallback_timeout_ms. Serving only while a
        majority is connected narrows that window to the connection timeout.
        """
        if not self._isLeader():
            return False
        members = len(self.otherNodes) + 1
        return len(self.connected_partners()) + 1 > members // 2

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

    # --- snapshots -------------------------------------------------------

    def _write_snapshot(self, path: str, raft_data: Any) -> None:
        """Write the LMDB copy, then pysyncobj's own data, then a trailer.

        Runs synchronously on the group's tick thread, so the store is at
        exactly the applied index that raft_data describes.
        """
        started = time.monotonic()
        with open(path, "wb") as snapshot:
            self.store.copy_to_fd(snapshot.fileno())
            snapshot.seek(0, os.SEEK_END)
            lmdb_length = snapshot.tell()
            encoded = pickle.dumps(raft_data, protocol=pickle.HIGHEST_PROTOCOL)
            snapshot.write(encoded)
            snapshot.write(_TRAILER.pack(lmdb_length, len(encoded), _SNAPSHOT_MAGIC))
            snapshot.flush()
            os.fsync(snapshot.fileno())
        logger.info(
            "%s event=snapshot_written applied_index=%d bytes=%d duration_ms=%d",
            self.group_name, self.store.applied_index, lmdb_length + len(encoded),
            (time.monotonic() - started) * 1000,
        )

    def _read_snapshot(self, path: str) -> Any:
        with open(path, "rb") as snapshot:
            snapshot.seek(-_TRAILER.size, os.SEEK_END)
            lmdb_length, raft_length, magic = _TRAILER.unpack(snapshot.read(_TRAILER.size))
            if magic != _SNAPSHOT_MAGIC:
                raise ValueError(f"{path} is not a raftmq snapshot (magic {magic!r})")
            snapshot.seek(lmdb_length)
            raft_data = pickle.loads(snapshot.read(raft_length))
        self.store.replace_with(path, lmdb_length)
        return raft_data

    def stop(self) -> None:
        """Stop the tick thread and close the group's sockets; the store stays open."""
        self.destroy_synchronous()
        logger.info("%s event=group_stopped", self.group_name)
