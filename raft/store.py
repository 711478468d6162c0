"""LMDB-backed state for a replicated state machine.

Every Raft group of raftmq keeps its state in one LMDB environment. The Raft
index of the last applied command is written in the same write transaction
as the command's effects, so after a crash the state is exactly "all commands
up to applied_index". pysyncobj replays journal entries above its snapshot on
restart; `apply` skips any index at or below applied_index, which makes that
replay harmless.

Snapshots are consistent LMDB copies (`Environment.copyfd`), never pickled
Python objects, and are taken on the caller's thread without forking.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
from typing import Any, Callable, NewType

import lmdb

RaftIndex = NewType("RaftIndex", int)

logger = logging.getLogger(__name__)

_META_DB = b"meta"
_APPLIED_INDEX_KEY = b"applied_index"
_U64 = struct.Struct(">Q")

DEFAULT_MAP_SIZE_BYTES = 16 * 2**30


class ApplyError(Exception):
    """A command that cannot apply; apply records it as the command's result."""

    def __init__(self, reason: str, message: str, **metadata: Any):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = {key: str(value) for key, value in metadata.items()}


class LmdbStore:
    """Base of the partition and metadata state machines.

    Subclasses implement `_apply(txn, index, command)`, which runs inside the
    write transaction and returns the command's result, and may override
    `_after_open()` (load caches) and `_after_apply(committed)` (publish
    in-memory state staged by `_apply` once its transaction committed, or
    drop it when the transaction aborted; wake readers).
    """

    DATABASES: tuple[bytes, ...] = ()

    def __init__(self, path: str, map_size_bytes: int = DEFAULT_MAP_SIZE_BYTES, sync: bool = False):
        self.path = path
        self._map_size_bytes = map_size_bytes
        self._sync = sync
        # Guards swapping the environment during a snapshot restore; readers
        # hold it for the length of one read transaction.
        self._env_lock = threading.RLock()
        self._open()

    def _open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        # NOTE: sync=False leaves LMDB's durability to the page cache: a
        # kill -9 loses nothing, a power failure can lose the latest
        # transactions. The pysyncobj journal has the same window.
        self.env = lmdb.open(
            self.path,
            map_size=self._map_size_bytes,
            max_dbs=len(self.DATABASES) + 1,
            sync=self._sync,
            metasync=self._sync,
            subdir=True,
            lock=True,
        )
        self._meta = self.env.open_db(_META_DB)
        self.dbs = {name: self.env.open_db(name) for name in self.DATABASES}
        with self.env.begin() as txn:
            raw = txn.get(_APPLIED_INDEX_KEY, db=self._meta)
        self._applied_index = RaftIndex(_U64.unpack(raw)[0] if raw else 0)
        self._after_open()

    def _after_open(self) -> None:
        pass

    def _after_apply(self, committed: bool) -> None:
        pass

    def _apply(self, txn: lmdb.Transaction, index: RaftIndex, command: bytes) -> Any:
        raise NotImplementedError

    @property
    def applied_index(self) -> RaftIndex:
        return self._applied_index

    def apply(self, index: RaftIndex, command: bytes) -> Any:
        """Apply one committed command; never raises (it exits the process if
        even the applied index cannot be written).

        Returns None for an index already applied (a journal replay after a
        restart, whose callers are gone), the subclass's result otherwise, or
        an ApplyError instance when the command could not apply. A failed
        command still advances applied_index so every replica moves on alike.
        """
        if index <= self._applied_index:
            return None
        committed = False
        try:
            with self._env_lock, self.env.begin(write=True) as txn:
                result = self._apply(txn, index, command)
                txn.put(_APPLIED_INDEX_KEY, _U64.pack(index), db=self._meta)
            committed = True
        except ApplyError as exc:
            result = exc
        except Exception as exc:  # a bug; log it loudly but keep the group applying
            logger.exception("path=%s index=%d event=apply_failed", self.path, index)
            result = ApplyError("INTERNAL_ERROR", f"apply failed at index {index}: {exc!r}")
        if not committed:
            self._after_apply(False)
            try:
                self._record_applied(index)
            except Exception:
                # The state can no longer be written, so applying on would
                # leave memory and disk apart: stop the process loudly and
                # let the supervisor restart it once the disk is fixed.
                logger.critical("path=%s index=%d event=state_write_failed action=exit",
                                self.path, index, exc_info=True)
                os._exit(70)
        self._applied_index = index
        if committed:
            self._after_apply(True)
        return result

    def _record_applied(self, index: RaftIndex) -> None:
        with self._env_lock, self.env.begin(write=True) as txn:
            txn.put(_APPLIED_INDEX_KEY, _U64.pack(index), db=self._meta)

    def read(self, reader: Callable[[lmdb.Transaction], Any]) -> Any:
        with self._env_lock, self.env.begin() as txn:
            return reader(txn)

    def sync(self) -> None:
        """fsync the environment; safe to call from any thread."""
        with self._env_lock:
            self.env.sync(True)

    def copy_to_fd(self, fd: int, txn: lmdb.Transaction | None = None) -> None:
        """Write a consistent compacted copy of the environment to fd, as of
        `txn` when given (a read transaction), else as of now."""
        if txn is not None:
            self.env.copyfd(fd, compact=True, txn=txn)
            return
        with self._env_lock:
            self.env.copyfd(fd, compact=True)

    def replace_with(self, snapshot_path: str, length: int) -> None:
        """Replace the whole state with the LMDB file stored in the first
        `length` bytes of snapshot_path, if that state is newer than ours."""
        staging = self.path + ".restore"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        with open(snapshot_path, "rb") as source, open(os.path.join(staging, "data.mdb"), "wb") as target:
            remaining = length
            while remaining:
                chunk = source.read(min(remaining, 1 << 20))
                if not chunk:
                    raise OSError(f"snapshot {snapshot_path} is shorter than {length} bytes")
                target.write(chunk)
                remaining -= len(chunk)
            target.flush()
            os.fsync(target.fileno())
        staged_index = _read_applied_index(staging)
        if staged_index <= self._applied_index:
            logger.info(
                "path=%s event=snapshot_skipped snapshot_index=%d applied_index=%d",
                self.path, staged_index, self._applied_index,
            )
            shutil.rmtree(staging, ignore_errors=True)
            return
        with self._env_lock:
            self.env.close()
            old = self.path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.path, old)
            os.rename(staging, self.path)
            shutil.rmtree(old, ignore_errors=True)
            self._open()
        logger.info("path=%s event=snapshot_restored applied_index=%d", self.path, self._applied_index)
        self._after_apply(True)

    def close(self) -> None:
        with self._env_lock:
            self.env.close()


def _read_applied_index(path: str) -> int:
    env = lmdb.open(path, readonly=True, max_dbs=8, lock=False, subdir=True)
    try:
        meta = env.open_db(_META_DB, create=False)
        with env.begin() as txn:
            raw = txn.get(_APPLIED_INDEX_KEY, db=meta)
        return _U64.unpack(raw)[0] if raw else 0
    finally:
        env.close()
