"""A Raft journal for pysyncobj 0.3.17 kept in LMDB.

pysyncobj's FileJournal compacts by clearing the file and writing the kept
entries back (clear-then-rewrite), so a kill -9 in between leaves a journal
that no longer lines up with the snapshot (defect B0), and it never flushes
its mmap. Here every change (append, truncation of a suffix, removal of a
compacted prefix, term and vote) is one LMDB write transaction: after a
crash the journal is either before or after the change, never in between.

The entries are mirrored in a Python list because pysyncobj slices its
journal on every send; LMDB is the durable copy. `bytes` counts the
commands held, so the group can force compaction before memory grows large.
"""

from __future__ import annotations

import json
import os
import struct
import threading

import lmdb

_U64 = struct.Struct(">Q")
_ENTRY_HEADER = struct.Struct(">Q")  # term, followed by the command bytes
_META_KEY = b"meta"


class LmdbJournal:
    """Implements the journal interface that pysyncobj's SyncObj calls."""

    def __init__(self, path: str, sync: bool = False):
        os.makedirs(path, exist_ok=True)
        self._env = lmdb.open(path, map_size=64 * 2**30, max_dbs=3, sync=sync, metasync=sync)
        self._entries_db = self._env.open_db(b"entries")
        self._meta_db = self._env.open_db(b"meta")
        self._lock = threading.Lock()
        self._entries: list[tuple[bytes, int, int]] = []
        self.bytes = 0
        with self._env.begin() as txn:
            raw = txn.get(_META_KEY, db=self._meta_db)
            self._meta = json.loads(raw) if raw else {}
            for key, value in txn.cursor(db=self._entries_db):
                index = _U64.unpack(key)[0]
                term = _ENTRY_HEADER.unpack_from(value)[0]
                command = bytes(value[_ENTRY_HEADER.size:])
                if self._entries:
                    assert index == self._entries[-1][1] + 1, (path, index, self._entries[-1][1])
                self._entries.append((command, index, term))
                self.bytes += len(command)
        self._meta_dirty = False

    # --- entries ---------------------------------------------------------

    def add(self, command: bytes, index: int, term: int) -> None:
        if self._entries:
            assert index == self._entries[-1][1] + 1, (index, self._entries[-1][1])
        with self._env.begin(write=True) as txn:
            txn.put(_U64.pack(index), _ENTRY_HEADER.pack(term) + command, db=self._entries_db)
            self._write_meta_if_dirty(txn)
        self._entries.append((command, index, term))
        self.bytes += len(command)

    def clear(self) -> None:
        with self._env.begin(write=True) as txn:
            txn.drop(self._entries_db, delete=False)
        self._entries = []
        self.bytes = 0

    def replace_all(self, entries: list[tuple[bytes, int, int]]) -> None:
        """Replace the whole journal with `entries` in one transaction."""
        with self._env.begin(write=True) as txn:
            txn.drop(self._entries_db, delete=False)
            for command, index, term in entries:
                txn.put(_U64.pack(index), _ENTRY_HEADER.pack(term) + command, db=self._entries_db)
        self._entries = list(entries)
        self.bytes = sum(len(entry[0]) for entry in entries)

    def __getitem__(self, item):
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def deleteEntriesFrom(self, position: int) -> None:
        """Remove the entries from list position `position` to the end."""
        removed = self._entries[position:]
        if not removed:
            return
        with self._env.begin(write=True) as txn:
            for _, index, _ in removed:
                txn.delete(_U64.pack(index), db=self._entries_db)
        del self._entries[position:]
        self.bytes -= sum(len(entry[0]) for entry in removed)

    def deleteEntriesTo(self, position: int) -> None:
        """Remove the entries before list position `position` (log compaction)."""
        removed = self._entries[:position]
        if not removed:
            return
        with self._env.begin(write=True) as txn:
            for _, index, _ in removed:
                txn.delete(_U64.pack(index), db=self._entries_db)
        del self._entries[:position]
        self.bytes -= sum(len(entry[0]) for entry in removed)

    # --- metadata --------------------------------------------------------

    def setRaftCommitIndex(self, index: int) -> None:
        # The commit index is a hint that a restart can recompute from the
        # leader, so it is written with the next entry or on the timer.
        if self._meta.get("raftCommitIndex") != index:
            self._meta["raftCommitIndex"] = index
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return self._meta.get("raftCommitIndex", 1)

    def setCurrentTerm(self, term: int, voted_for) -> None:
        # Raft needs the term and vote on disk before any message that
        # reflects them goes out, so this one is written at once.
        self._meta["currentTerm"] = term
        self._meta["votedForNodeId"] = voted_for
        with self._env.begin(write=True) as txn:
            self._meta_dirty = True
            self._write_meta_if_dirty(txn)
        if not self._env.flags()["sync"]:
            self._env.sync(True)

    def getCurrentTerm(self) -> int:
        return self._meta.get("currentTerm", 0)

    def getVotedForNodeId(self):
        return self._meta.get("votedForNodeId")

    def _write_meta_if_dirty(self, txn: lmdb.Transaction) -> None:
        if self._meta_dirty:
            txn.put(_META_KEY, json.dumps(self._meta).encode(), db=self._meta_db)
            self._meta_dirty = False

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty:
            with self._env.begin(write=True) as txn:
                self._write_meta_if_dirty(txn)

    def flush(self) -> None:
        self._env.sync(True)

    def sync(self) -> None:
        """fsync the journal; safe to call from any thread."""
        self._env.sync(True)

    def _destroy(self) -> None:
        self.onOneSecondTimer()
        self._env.close()
