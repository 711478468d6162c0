"""The partition state machine: an append-only record log in LMDB.

Offsets are dense and start at 0; the offset of a record is fixed when its
APPEND command applies, so every replica assigns the same offsets from the
same Raft log. The Raft index and the partition offset are different
counters: one APPEND command (one Raft entry) carries a whole batch.

Idempotent producers: for each producer_id the store keeps the last applied
sequence number and the offsets it got. A command that repeats that
sequence returns the stored offsets instead of appending again, which makes
a producer's retry after a lost response safe.

Consumer group cursors: for each group the store keeps the committed offset
and the member that claimed the partition last, with the generation of that
claim. A claim by a later generation takes the partition over; from then on
only that member may commit, so a member that lost the partition in a
rebalance is fenced here even if its request was already on the way. A
commit never moves the offset backwards; only a reset does.
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
    DATABASES = (b"records", b"producers", b"cursors")

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
            if kind == codec.COMMAND_GROUP:
                return self._apply_group(txn, codec.decode_group_command(command))
            if kind != codec.COMMAND_APPEND:
                raise ApplyError("INVALID_REQUEST", f"unknown partition command kind {kind}")
            append = codec.decode_append(command)
        except codec.CodecError as exc:
            raise ApplyError("INVALID_REQUEST", f"undecodable partition command: {exc}") from exc
        return self._apply_append(txn, append)

    # --- consumer group cursors ------------------------------------------

    def cursor(self, group_id: str) -> dict | None:
        """The group's cursor: committed (offset or None), metadata, owner, generation."""

        def read(txn: lmdb.Transaction) -> dict | None:
            raw = txn.get(group_id.encode(), db=self.dbs[b"cursors"])
            return json.loads(raw) if raw is not None else None

        return self.read(read)

    def _apply_group(self, txn: lmdb.Transaction, doc: dict) -> dict:
        cursors = self.dbs[b"cursors"]
        key = doc["group"].encode()
        raw = txn.get(key, db=cursors)
        cursor = json.loads(raw) if raw is not None else {
            "committed": None, "metadata": "", "owner": "", "generation": -1,
        }
        op = doc["op"]
        if op == "claim":
            if doc["generation"] < cursor["generation"]:
                raise ApplyError(
                    "ILLEGAL_GENERATION",
                    f"generation {doc['generation']} of group {doc['group']!r} is older than "
                    f"the claim of generation {cursor['generation']}; send a heartbeat to learn "
                    "the current assignment",
                    generation=doc["generation"], current_generation=cursor["generation"],
                )
            if cursor["committed"] is None:
                reset = doc["reset"]
                if reset == "none":
                    raise ApplyError(
                        "NO_COMMITTED_OFFSET",
                        f"group {doc['group']!r} has no committed offset here and its "
                        "auto_offset_reset is 'none'; reset the group's offsets first "
                        "(raftmq group reset-offsets)", group_id=doc["group"],
                    )
                cursor["committed"] = (self._log_start_offset if reset == "earliest"
                                       else self._next_offset)
            cursor["owner"] = doc["member"]
            cursor["generation"] = doc["generation"]
        elif op == "commit":
            if cursor["owner"] != doc["member"] or doc["generation"] < cursor["generation"]:
                raise ApplyError(
                    "NOT_PARTITION_OWNER",
                    f"member {doc['member']!r} of group {doc['group']!r} does not own this "
                    f"partition (claimed by {cursor['owner'] or 'nobody'!r} in generation "
                    f"{cursor['generation']}); rejoin or heartbeat to learn the assignment",
                    member_id=doc["member"], owner=cursor["owner"],
                )
            offset = doc["offset"]
            if not 0 <= offset <= self._next_offset:
                raise ApplyError(
                    "INVALID_OFFSET",
                    f"cannot commit offset {offset}: the partition's offsets run from 0 to "
                    f"the high watermark {self._next_offset}", offset=offset,
                    high_watermark=self._next_offset,
                )
            if cursor["committed"] is None or offset > cursor["committed"]:
                cursor["committed"] = offset
                cursor["metadata"] = doc.get("metadata", "")
        elif op == "reset":
            target = doc["target"]
            if target == "earliest":
                cursor["committed"] = self._log_start_offset
            elif target == "latest":
                cursor["committed"] = self._next_offset
            else:
                cursor["committed"] = max(self._log_start_offset, min(int(target), self._next_offset))
            cursor["metadata"] = ""
        else:
            raise ApplyError("INVALID_REQUEST", f"unknown group command {op!r}")
        txn.put(key, json.dumps(cursor, sort_keys=True).encode(), db=cursors)
        return cursor

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
