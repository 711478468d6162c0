"""The partition state machine: an append-only record log in LMDB.

Offsets are dense and start at 0; the offset of a record is fixed when its
APPEND command applies, so every replica assigns the same offsets from the
same Raft log. The Raft index and the partition offset are different
counters: one APPEND command (one Raft entry) carries a whole batch.

Idempotent producers: for each producer_id the store keeps the last applied
sequence number and the offsets it got. A command that repeats that
sequence returns the stored offsets instead of appending again, which makes
a producer's retry after a lost response safe.
"""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass
from typing import NewType

import lmdb

from ..raft.store import ApplyError, LmdbStore, RaftIndex
from . import codec

Offset = NewType("Offset", int)

_U64 = struct.Struct(">Q")
_STATE_KEY = b"log_state"


@dataclass(frozen=True)
class AppendResult:
    base_offset: Offset
    record_count: int
    # Leader-stamped time of the append, given to records sent with timestamp 0.
    append_time_ms: int
    duplicate: bool = False


@dataclass(frozen=True)
class FetchResult:
    records: list[tuple[Offset, bytes]]
    high_watermark: Offset
    log_start_offset: Offset


class PartitionStore(LmdbStore):
    DATABASES = (b"records", b"producers")

    def __init__(self, path: str, **kwargs):
        self._appended = threading.Condition()
        super().__init__(path, **kwargs)

    def _after_open(self) -> None:
        with self.env.begin() as txn:
            raw = txn.get(_STATE_KEY, db=self._meta)
        state = json.loads(raw) if raw else {"next_offset": 0, "log_start_offset": 0}
        self._next_offset = Offset(state["next_offset"])
        self._log_start_offset = Offset(state["log_start_offset"])
        self._staged_next_offset: Offset | None = None

    def _after_apply(self, committed: bool) -> None:
        staged, self._staged_next_offset = self._staged_next_offset, None
        if committed and staged is not None:
            self._next_offset = staged
        with self._appended:
            self._appended.notify_all()

    @property
    def high_watermark(self) -> Offset:
        return self._next_offset

    @property
    def log_start_offset(self) -> Offset:
        return self._log_start_offset

    def _apply(self, txn: lmdb.Transaction, index: RaftIndex, command: bytes):
        try:
            kind = codec.command_kind(command)
            if kind != codec.COMMAND_APPEND:
                raise ApplyError("INVALID_REQUEST", f"unknown partition command kind {kind}")
            append = codec.decode_append(command)
        except codec.CodecError as exc:
            raise ApplyError("INVALID_REQUEST", f"undecodable partition command: {exc}") from exc
        return self._apply_append(txn, append)

    def _apply_append(self, txn: lmdb.Transaction, command: codec.AppendCommand) -> AppendResult:
        producers = self.dbs[b"producers"]
        producer_key = _U64.pack(command.producer_id)
        if command.producer_id:
            raw = txn.get(producer_key, db=producers)
            if raw is not None:
                last = json.loads(raw)
                if command.sequence == last["sequence"]:
                    return AppendResult(Offset(last["base_offset"]), last["record_count"],
                                        last["append_time_ms"], duplicate=True)
                if command.sequence < last["sequence"]:
                    raise ApplyError(
                        "OUT_OF_ORDER_SEQUENCE",
                        f"producer {command.producer_id} sent sequence {command.sequence} "
                        f"after {last['sequence']}; restart the producer to get a new id",
                        last_sequence=last["sequence"],
                    )
        base_offset = self._next_offset
        records = self.dbs[b"records"]
        offset = base_offset
        for encoded in command.encoded_records:
            if codec.record_timestamp(encoded) == 0:
                encoded = codec.with_timestamp(encoded, command.append_time_ms)
            txn.put(_U64.pack(offset), encoded, db=records, append=True)
            offset += 1
        # NOTE: producer entries are never expired, so the table grows by one
        # small row per producer id ever seen on this partition.
        if command.producer_id:
            txn.put(producer_key, json.dumps({
                "sequence": command.sequence,
                "base_offset": base_offset,
                "record_count": len(command.encoded_records),
                "append_time_ms": command.append_time_ms,
            }).encode(), db=producers)
        txn.put(_STATE_KEY, json.dumps({
            "next_offset": offset, "log_start_offset": self._log_start_offset,
        }).encode(), db=self._meta)
        self._staged_next_offset = Offset(offset)
        return AppendResult(base_offset, len(command.encoded_records), command.append_time_ms)

    def fetch(self, offset: Offset, max_records: int, max_bytes: int) -> FetchResult:
        """Return encoded records from `offset`: at most max_records, and at
        most max_bytes unless the first record alone is larger."""
        assert max_records > 0, max_records
        assert max_bytes > 0, max_bytes

        def read(txn: lmdb.Transaction) -> FetchResult:
            out: list[tuple[Offset, bytes]] = []
            size = 0
            cursor = txn.cursor(db=self.dbs[b"records"])
            if cursor.set_range(_U64.pack(offset)):
                for key, value in cursor:
                    if out and size + len(value) > max_bytes:
                        break
                    out.append((Offset(_U64.unpack(key)[0]), bytes(value)))
                    size += len(value)
                    if len(out) >= max_records:
                        break
            return FetchResult(out, self._next_offset, self._log_start_offset)

        return self.read(read)

    def wait_for_offset(self, offset: Offset, timeout_s: float) -> bool:
        """Block until a record at `offset` exists or timeout_s passes."""
        with self._appended:
            return self._appended.wait_for(lambda: self._next_offset > offset, timeout_s)

    def digest(self) -> str:
        """SHA-256 over (offset, record) pairs, for comparing replicas."""
        import hashlib

        def read(txn: lmdb.Transaction) -> str:
            sha = hashlib.sha256()
            for key, value in txn.cursor(db=self.dbs[b"records"]):
                sha.update(key)
                sha.update(_U64.pack(len(value)))
                sha.update(value)
            return sha.hexdigest()

        return self.read(read)
