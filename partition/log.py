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

Backlog limits: the backlog is the records from log_start_offset to the end
of the log, counted in records and in stored bytes (the encoded record
sizes). The store keeps the byte count, the dropped and rejected record
counts in its LMDB state next to the offsets, so no apply scans the log.
The limits are not configured in the store: the leader copies the topic's
max_backlog_messages, max_backlog_bytes and overflow_policy into every
APPEND command (codec.COMMAND_APPEND_LIMITED), so apply stays a function of
(state, command) and a replay enforces the limits each entry was written
with. With "reject", an append that would take the backlog over a limit
fails with BACKLOG_FULL and appends nothing, although the rejected record
count is still stored. A batch larger than a limit by itself can never be
accepted. With "drop_oldest", no append fails for its size: the store
appends the batch, then deletes the oldest records and advances
log_start_offset until the backlog fits.
That can delete records of the same batch when the batch alone is over a
limit. A repeated idempotent sequence returns its first offsets before any
limit is checked.
"""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass
from typing import NewType

import lmdb

from ..raft.store import ApplyError, LmdbStore, RaftIndex
from . import codec, delivery

DELIVERY_OPS = ("receive", "ack", "nack", "extend", "dlq_done")

Offset = NewType("Offset", int)

_U64 = struct.Struct(">Q")
_STATE_KEY = b"log_state"

# Retry hint of a BACKLOG_FULL error. It is a fixed value because the store
# cannot know when the backlog will shrink.
BACKLOG_FULL_RETRY_AFTER_MS = 1000


@dataclass(frozen=True)
class AppendResult:
    base_offset: Offset
    record_count: int
    # Leader-stamped time of the append, given to records sent with timestamp 0.
    append_time_ms: int
    duplicate: bool = False
    # Records that this append deleted under the drop_oldest policy.
    dropped_records: int = 0


@dataclass(frozen=True)
class _Backlog:
    """The counters of the log state that backlog limits use."""

    # Stored bytes of the records from log_start_offset to the end of the log.
    size_bytes: int
    dropped_records: int
    rejected_records: int

    def with_appended(self, batch_bytes: int) -> _Backlog:
        return _Backlog(self.size_bytes + batch_bytes, self.dropped_records, self.rejected_records)

    def with_dropped(self, records: int, size_bytes: int) -> _Backlog:
        return _Backlog(size_bytes, self.dropped_records + records, self.rejected_records)

    def with_rejected(self, records: int) -> _Backlog:
        return _Backlog(self.size_bytes, self.dropped_records, self.rejected_records + records)


@dataclass(frozen=True)
class FetchResult:
    records: list[tuple[Offset, bytes]]
    high_watermark: Offset
    log_start_offset: Offset


class PartitionStore(LmdbStore):
    DATABASES = (b"records", b"producers", b"cursors", b"deliveries")

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
        # State written before backlog limits existed lacks these counters;
        # its byte count is computed once here, and stored by the next append.
        backlog_bytes = state.get("backlog_bytes")
        if backlog_bytes is None:
            backlog_bytes = self.read(self._scan_backlog_bytes)
        self._backlog = _Backlog(backlog_bytes, state.get("dropped_records", 0),
                                 state.get("rejected_records", 0))
        self._staged_backlog: tuple[Offset, _Backlog] | None = None

    def _after_apply(self, committed: bool) -> None:
        staged_backlog, self._staged_backlog = self._staged_backlog, None
        if committed and staged_backlog is not None:
            self._log_start_offset, self._backlog = staged_backlog
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

    @property
    def backlog_messages(self) -> int:
        return self._next_offset - self._log_start_offset

    @property
    def backlog_bytes(self) -> int:
        """Stored bytes of the records from log_start_offset to the end of the log."""
        return self._backlog.size_bytes

    @property
    def dropped_records(self) -> int:
        """Records deleted by the drop_oldest policy since the partition was created."""
        return self._backlog.dropped_records

    @property
    def rejected_records(self) -> int:
        """Records of appends rejected by the reject policy, counting every attempt."""
        return self._backlog.rejected_records

    def _apply(self, txn: lmdb.Transaction, index: RaftIndex, command: bytes):
        try:
            kind = codec.command_kind(command)
            if kind == codec.COMMAND_GROUP:
                doc = codec.decode_group_command(command)
                if doc["op"] == "retention":
                    return self._apply_retention(txn, doc)
                return self._apply_group(txn, doc)
            if kind not in codec.APPEND_KINDS:
                raise ApplyError("INVALID_REQUEST", f"unknown partition command kind {kind}")
            append = codec.decode_append(command)
        except codec.CodecError as exc:
            raise ApplyError("INVALID_REQUEST", f"undecodable partition command: {exc}") from exc
        return self._apply_append(txn, append)

    # --- retention ------------------------------------------------------

    def oldest_timestamp_ms(self) -> int | None:
        """Timestamp of the record at the log start offset, None for an empty log."""

        def read(txn: lmdb.Transaction) -> int | None:
            raw = txn.get(_U64.pack(self._log_start_offset), db=self.dbs[b"records"])
            return None if raw is None else codec.record_timestamp(bytes(raw))

        return self.read(read)

    def _apply_retention(self, txn: lmdb.Transaction, doc: dict) -> dict:
        """Delete records from the log start while their timestamp is below
        before_ms, at most max_records of them. The log stays contiguous: the
        first record that is new enough stops the deletion, even if a later
        one carries an older producer timestamp."""
        before_ms, max_records = int(doc["before_ms"]), int(doc["max_records"])
        log_start_offset = self._log_start_offset
        size_bytes = self._backlog.size_bytes
        expired = 0
        cursor = txn.cursor(db=self.dbs[b"records"])
        if cursor.set_key(_U64.pack(log_start_offset)):
            while (expired < max_records and log_start_offset < self._next_offset
                   and codec.record_timestamp(bytes(cursor.value())) < before_ms):
                size_bytes -= len(cursor.value())
                cursor.delete()
                log_start_offset = Offset(log_start_offset + 1)
                expired += 1
        if expired:
            backlog = _Backlog(size_bytes, self._backlog.dropped_records,
                               self._backlog.rejected_records)
            self._write_log_state(txn, self._next_offset, log_start_offset, backlog)
            self._staged_backlog = (log_start_offset, backlog)
        return {"expired": expired, "log_start_offset": log_start_offset}

    # --- consumer group cursors ------------------------------------------

    def cursor(self, group_id: str) -> dict | None:
        """Return the group's cursor: committed (offset or None), metadata, owner, generation."""

        def read(txn: lmdb.Transaction) -> dict | None:
            raw = txn.get(group_id.encode(), db=self.dbs[b"cursors"])
            return json.loads(raw) if raw is not None else None

        return self.read(read)

    def delivery_entries(self, group_id: str) -> dict[int, dict]:
        """Unsettled records of an acks-mode group, by offset."""
        return self.read(lambda txn: delivery.read_entries(txn, self.dbs[b"deliveries"], group_id))

    def receive_may_deliver(self, group_id: str, member_id: str, request_id: int,
                            now_ms: int) -> tuple[bool, int | None]:
        """Return (whether a receive now could return anything, when that may change).

        A read-only forecast that lets the leader skip replicating receive
        commands that would find nothing; the apply decides for real.
        """

        def read(txn: lmdb.Transaction) -> tuple[bool, int | None]:
            raw = txn.get(group_id.encode(), db=self.dbs[b"cursors"])
            cursor = json.loads(raw) if raw is not None else None
            if cursor is None or cursor.get("committed") is None:
                return True, None
            previous = cursor.get("receives", {}).get(member_id)
            if request_id and previous is not None and previous["request_id"] == request_id:
                return True, None
            if any(offset < self._log_start_offset for offset in
                   delivery.read_entries(txn, self.dbs[b"deliveries"], group_id)):
                return True, None
            if cursor.get("next", cursor["committed"]) < self._next_offset:
                return True, None
            wake = None
            for entry in delivery.read_entries(txn, self.dbs[b"deliveries"], group_id).values():
                due = {"waiting": entry.get("due_ms"), "leased": entry.get("lease_until"),
                       "ready": now_ms}.get(entry["state"])
                if due is None:
                    continue
                if due <= now_ms:
                    return True, None
                wake = due if wake is None else min(wake, due)
            return False, wake

        return self.read(read)

    def groups_with_dead_letters(self) -> list[str]:
        """Groups whose records wait for their move to the dead-letter topic."""

        def read(txn: lmdb.Transaction) -> list[str]:
            return [bytes(key).decode() for key, raw in txn.cursor(db=self.dbs[b"cursors"])
                    if json.loads(raw).get("dead_pending")]

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
            if doc.get("delivery") == "acks":
                cursor.setdefault("next", cursor["committed"])
                cursor.setdefault("receives", {})
            if cursor["owner"] != doc["member"] and "receives" in cursor:
                # Only the owner receives, so other members' retry ids are dead.
                cursor["receives"] = {}
            cursor["owner"] = doc["member"]
            cursor["generation"] = doc["generation"]
        elif op in DELIVERY_OPS:
            if cursor["committed"] is None:
                raise ApplyError(
                    "NOT_PARTITION_OWNER",
                    f"group {doc['group']!r} has not claimed this partition yet; claim it first",
                    group_id=doc["group"])
            rules = delivery.DeliveryRules(self, txn, cursor, doc)
            result = getattr(rules, op)()
            txn.put(key, json.dumps(cursor, sort_keys=True).encode(), db=cursors)
            return result
        elif op == "commit":
            if "next" in cursor:
                raise ApplyError(
                    "INVALID_REQUEST",
                    f"group {doc['group']!r} settles records with ack and nack, not offset "
                    "commits", group_id=doc["group"])
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
            if "next" in cursor:
                # Acks mode: every unsettled record below or above the new
                # position is forgotten, and delivery starts there.
                delivery.delete_all(txn, self.dbs[b"deliveries"], doc["group"])
                cursor["next"] = cursor["committed"]
                cursor["receives"] = {}
                cursor["dead_pending"] = 0
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
        batch_bytes = sum(len(encoded) for encoded in command.encoded_records)
        if command.has_limits and command.overflow_policy == codec.OVERFLOW_REJECT:
            rejection = self._backlog_rejection(command, batch_bytes)
            if rejection is not None:
                # Returned, not raised, so the transaction commits the
                # rejected count; the log itself is left unchanged.
                backlog = self._backlog.with_rejected(len(command.encoded_records))
                self._write_log_state(txn, self._next_offset, self._log_start_offset, backlog)
                self._staged_backlog = (self._log_start_offset, backlog)
                return rejection
        base_offset = self._next_offset
        records = self.dbs[b"records"]
        offset = base_offset
        for encoded in command.encoded_records:
            if codec.record_timestamp(encoded) == 0:
                encoded = codec.with_timestamp(encoded, command.append_time_ms)
            txn.put(_U64.pack(offset), encoded, db=records, append=True)
            offset += 1
        log_start_offset = self._log_start_offset
        backlog = self._backlog.with_appended(batch_bytes)
        dropped = 0
        if command.has_limits and command.overflow_policy == codec.OVERFLOW_DROP_OLDEST:
            log_start_offset, backlog, dropped = self._drop_oldest(
                txn, command, log_start_offset, Offset(offset), backlog)
        # NOTE: producer entries are never expired, so the table grows by one
        # small row per producer id ever seen on this partition.
        if command.producer_id:
            txn.put(producer_key, json.dumps({
                "sequence": command.sequence,
                "base_offset": base_offset,
                "record_count": len(command.encoded_records),
                "append_time_ms": command.append_time_ms,
            }).encode(), db=producers)
        self._write_log_state(txn, Offset(offset), log_start_offset, backlog)
        self._staged_next_offset = Offset(offset)
        self._staged_backlog = (log_start_offset, backlog)
        return AppendResult(base_offset, len(command.encoded_records), command.append_time_ms,
                            dropped_records=dropped)

    # --- backlog limits ----------------------------------------------------

    def _write_log_state(self, txn: lmdb.Transaction, next_offset: Offset,
                         log_start_offset: Offset, backlog: _Backlog) -> None:
        txn.put(_STATE_KEY, json.dumps({
            "next_offset": next_offset, "log_start_offset": log_start_offset,
            "backlog_bytes": backlog.size_bytes, "dropped_records": backlog.dropped_records,
            "rejected_records": backlog.rejected_records,
        }).encode(), db=self._meta)

    def _backlog_rejection(self, command: codec.AppendCommand, batch_bytes: int) -> ApplyError | None:
        """Return the BACKLOG_FULL error when the batch does not fit, else None."""
        batch_records = len(command.encoded_records)
        backlog_messages = self.backlog_messages
        backlog_bytes = self._backlog.size_bytes
        if command.max_backlog_messages and (
                backlog_messages + batch_records > command.max_backlog_messages):
            limit, maximum, used, needed = (
                "max_backlog_messages", command.max_backlog_messages, backlog_messages, batch_records)
            unit = "records"
        elif command.max_backlog_bytes and backlog_bytes + batch_bytes > command.max_backlog_bytes:
            limit, maximum, used, needed = (
                "max_backlog_bytes", command.max_backlog_bytes, backlog_bytes, batch_bytes)
            unit = "bytes"
        else:
            return None
        metadata = {
            "limit": limit, "max_backlog_messages": command.max_backlog_messages,
            "max_backlog_bytes": command.max_backlog_bytes, "backlog_messages": backlog_messages,
            "backlog_bytes": backlog_bytes, "batch_records": batch_records,
            "batch_bytes": batch_bytes,
        }
        if needed > maximum:
            # No retry can succeed, so the error carries no retry hint.
            advice = (f"the batch alone is larger than the limit, so send at most {maximum} "
                      f"{unit} per request")
        else:
            metadata["retry_after_ms"] = BACKLOG_FULL_RETRY_AFTER_MS
            advice = (f"retry after {BACKLOG_FULL_RETRY_AFTER_MS} ms, or create the topic with a "
                      "higher limit or the drop_oldest overflow policy")
        return ApplyError(
            "BACKLOG_FULL",
            f"the partition backlog is full: it holds {used} {unit} and the batch adds "
            f"{needed}, above {limit}={maximum}; {advice}",
            **metadata,
        )

    def _drop_oldest(self, txn: lmdb.Transaction, command: codec.AppendCommand,
                     log_start_offset: Offset, next_offset: Offset,
                     backlog: _Backlog) -> tuple[Offset, _Backlog, int]:
        """Delete records from the start of the log until the backlog fits the limits."""
        max_messages, max_bytes = command.max_backlog_messages, command.max_backlog_bytes
        size_bytes = backlog.size_bytes
        dropped = 0
        cursor = txn.cursor(db=self.dbs[b"records"])
        if not cursor.set_key(_U64.pack(log_start_offset)):
            return log_start_offset, backlog, 0
        while log_start_offset < next_offset and (
                (max_messages and next_offset - log_start_offset > max_messages)
                or (max_bytes and size_bytes > max_bytes)):
            size_bytes -= len(cursor.value())
            cursor.delete()
            log_start_offset = Offset(log_start_offset + 1)
            dropped += 1
        return log_start_offset, backlog.with_dropped(dropped, size_bytes), dropped

    def _scan_backlog_bytes(self, txn: lmdb.Transaction) -> int:
        cursor = txn.cursor(db=self.dbs[b"records"])
        return sum(len(value) for value in cursor.iternext(keys=False, values=True))

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

    def read_records(self, offsets: list[int]) -> dict[int, bytes]:
        """Return the encoded records at `offsets` that are still stored."""

        def read(txn: lmdb.Transaction) -> dict[int, bytes]:
            found = {}
            for offset in offsets:
                raw = txn.get(_U64.pack(offset), db=self.dbs[b"records"])
                if raw is not None:
                    found[offset] = bytes(raw)
            return found

        return self.read(read)

    def wait_for_apply(self, applied_index: int, timeout_s: float) -> bool:
        """Block until a command after `applied_index` applied, or timeout_s passes."""
        with self._appended:
            return self._appended.wait_for(lambda: self.applied_index > applied_index, timeout_s)

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
