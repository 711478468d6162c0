"""Snapshots of a group's LMDB state, written in the background.

A snapshot file is the compacted LMDB copy, then pysyncobj's own data (the
last two applied log entries and the member list, pickled), then a trailer
that gives both lengths. The copy reads through a read transaction opened on
the tick thread at the moment pysyncobj requests the snapshot. The copy
therefore contains exactly the state at the applied index that pysyncobj's
data names, while the tick thread goes on applying and sending heartbeats. The file is written
under a temporary name, fsynced and renamed, so a kill -9 mid-write leaves
the previous snapshot in place.

AsyncSnapshotSerializer replaces pysyncobj's Serializer object (same method
names, which pysyncobj calls) once the group is constructed.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import threading
import time
from typing import Any

from pysyncobj.config import SERIALIZER_STATE

from .store import LmdbStore

logger = logging.getLogger(__name__)

SNAPSHOT_MAGIC = b"RMQSNAP1"
TRAILER = struct.Struct(">QQ8s")  # lmdb_length, raft_data_length, magic


def write_snapshot(store: LmdbStore, path: str, raft_data: Any, txn=None) -> int:
    """Write a snapshot file at `path` (no rename); return its size in bytes."""
    with open(path, "wb") as snapshot:
        store.copy_to_fd(snapshot.fileno(), txn=txn)
        snapshot.seek(0, os.SEEK_END)
        lmdb_length = snapshot.tell()
        encoded = pickle.dumps(raft_data, protocol=pickle.HIGHEST_PROTOCOL)
        snapshot.write(encoded)
        snapshot.write(TRAILER.pack(lmdb_length, len(encoded), SNAPSHOT_MAGIC))
        snapshot.flush()
        os.fsync(snapshot.fileno())
        return snapshot.tell()


def read_snapshot(store: LmdbStore, path: str) -> Any:
    """Load the state of the snapshot at `path` into `store` if it is newer,
    and return pysyncobj's data stored with it."""
    with open(path, "rb") as snapshot:
        snapshot.seek(-TRAILER.size, os.SEEK_END)
        lmdb_length, raft_length, magic = TRAILER.unpack(snapshot.read(TRAILER.size))
        if magic != SNAPSHOT_MAGIC:
            raise ValueError(f"{path} is not a raftmq snapshot (magic {magic!r})")
        snapshot.seek(lmdb_length)
        raft_data = pickle.loads(snapshot.read(raft_length))
    store.replace_with(path, lmdb_length)
    return raft_data


def fsync_rename(source: str, target: str) -> None:
    os.replace(source, target)
    directory = os.open(os.path.dirname(os.path.abspath(target)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AsyncSnapshotSerializer:
    """Drop-in for pysyncobj's Serializer that copies in a thread and never forks.

    The tick thread waits for a copy in progress only when it installs a
    snapshot received from the leader or loads one at start-up.
    """

    def __init__(self, store: LmdbStore, path: str, transmission_batch_bytes: int, log_prefix: str):
        self._store = store
        self._path = path
        self._batch_bytes = transmission_batch_bytes
        self._log_prefix = log_prefix
        self._thread: threading.Thread | None = None
        self._outcome: int | None = None
        self._current_id = None
        self._transmissions: dict[Any, dict] = {}
        self._incoming = None

    # --- writing ---------------------------------------------------------

    def serialize(self, data: Any, snapshot_id: Any) -> None:
        if self._thread is not None:
            return
        self._current_id = snapshot_id
        self._outcome = None
        txn = self._store.env.begin()
        # data is (python_state, last_entry, previous_entry, members); with a
        # custom serializer pysyncobj passes None for the state.
        raft_data = data[1:]
        self._thread = threading.Thread(
            target=self._write, args=(txn, raft_data), name="snapshot", daemon=True)
        logger.info("%s event=snapshot_started raft_index=%s", self._log_prefix, raft_data[0][1])
        self._thread.start()

    def _write(self, txn, raft_data) -> None:
        started = time.monotonic()
        temporary = self._path + ".write.tmp"
        try:
            size = write_snapshot(self._store, temporary, raft_data, txn=txn)
            txn.abort()
            fsync_rename(temporary, self._path)
            self._outcome = SERIALIZER_STATE.SUCCESS
            logger.info("%s event=snapshot_written raft_index=%s bytes=%d duration_ms=%d",
                        self._log_prefix, raft_data[0][1], size, (time.monotonic() - started) * 1000)
        except Exception:
            txn.abort()
            logger.exception("%s event=snapshot_failed", self._log_prefix)
            self._outcome = SERIALIZER_STATE.FAILED

    def checkSerializing(self):
        thread = self._thread
        if thread is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if thread.is_alive():
            return SERIALIZER_STATE.SERIALIZING, self._current_id
        self._thread = None
        if self._outcome == SERIALIZER_STATE.SUCCESS:
            self._transmissions = {}
        return self._outcome, self._current_id

    def wait_idle(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()

    # --- reading ---------------------------------------------------------

    def deserialize(self):
        self.wait_idle()
        return (None,) + tuple(read_snapshot(self._store, self._path))

    # --- sending to a lagging follower -----------------------------------

    def getTransmissionData(self, transmission_id):
        if self._thread is not None and not os.path.exists(self._path):
            return None
        transmission = self._transmissions.get(transmission_id)
        if transmission is None:
            try:
                transmission = {"file": open(self._path, "rb"), "sent": 0}
            except OSError:
                logger.exception("%s event=snapshot_send_failed", self._log_prefix)
                return None
            self._transmissions[transmission_id] = transmission
        is_first = transmission["sent"] == 0
        try:
            chunk = transmission["file"].read(self._batch_bytes)
        except OSError:
            logger.exception("%s event=snapshot_send_failed", self._log_prefix)
            self._transmissions.pop(transmission_id, None)
            return False
        transmission["sent"] += len(chunk)
        is_last = not chunk
        if is_last:
            transmission["file"].close()
            self._transmissions.pop(transmission_id, None)
        return chunk, is_first, is_last

    def cancelTransmisstion(self, transmission_id) -> None:  # pysyncobj's spelling
        transmission = self._transmissions.pop(transmission_id, None)
        if transmission is not None:
            transmission["file"].close()

    # --- receiving from the leader ---------------------------------------

    def setTransmissionData(self, data) -> bool:
        """Append one received chunk; return True once a whole snapshot is in place."""
        if data is None:
            return False
        chunk, is_first, is_last = data
        temporary = self._path + ".recv.tmp"
        if is_first:
            if self._incoming is not None:
                self._incoming.close()
            self._incoming = open(temporary, "wb")
        elif self._incoming is None:
            return False
        self._incoming.write(chunk)
        if not is_last:
            return False
        self._incoming.flush()
        os.fsync(self._incoming.fileno())
        self._incoming.close()
        self._incoming = None
        self.wait_idle()
        fsync_rename(temporary, self._path)
        logger.info("%s event=snapshot_received bytes=%d", self._log_prefix,
                    os.path.getsize(self._path))
        return True
