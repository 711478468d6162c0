"""Per-message delivery of a partition to a consumer group ("acks" mode).

This runs inside the partition's apply, in the caller's LMDB write
transaction. It is a pure function of the stored state and the command:
time is the command's `now_ms`, stamped by the leader, and the jitter of a
backoff comes from a hash of (group, offset, attempt), not a random source.

State per group, next to the group's cursor (partition/log.py):

- cursor["committed"] is the floor: every offset below it is settled (acked
  or moved to the dead-letter topic).
- cursor["next"] is the frontier: no offset at or above it was delivered.
- One entry per unsettled offset in [floor, next), keyed by group and
  offset, in one of four states:
  - "leased": delivered to `member` as attempt `attempt` until `lease_until`;
  - "waiting": attempt `attempt` failed; deliverable again from `due_ms`;
  - "ready": never delivered because an earlier record with the same key
    (or, with partition ordering, any earlier record) was unsettled;
  - "dead": out of attempts; waits for the node's dead-letter mover, which
    appends it to the dead-letter topic and then settles it with
    `dlq_done`. Its `dlq_seq` is the idempotent producer sequence of that
    append, so a move retried after a failover appends once.

Acked offsets above the floor have no entry. An expired lease counts as a
failed attempt. It is noticed by the next `receive` (or an ack or nack that
arrives too late), not by a timer.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import lmdb
import mmh3

from ..raft.store import ApplyError
from . import codec

_U64 = struct.Struct(">Q")

BACKOFFS = ("exponential", "fixed", "immediate")
ORDERINGS = ("key", "partition", "none")
MAX_ERROR_CHARS = 4096
# A receive looks at most this many new records per record it may return,
# so a long run of records blocked by one key cannot make apply slow.
SCAN_FACTOR = 10
EXPIRED_LEASE_ERROR = "visibility timeout expired before an ack or nack"

DEFAULT_POLICY: dict[str, Any] = {
    "backoff": "exponential",
    "initial_delay_ms": 1000,
    "multiplier": 2.0,
    "max_delay_ms": 60000,
    "jitter": 0.0,
    "max_attempts": 5,
    "visibility_timeout_ms": 30000,
    "ordering": "key",
    "dead_letter_topic": "",
}


@dataclass(frozen=True)
class Delivered:
    offset: int
    attempt: int
    lease_until: int


def retry_delay_ms(policy: dict, group: str, offset: int, attempt: int) -> int:
    """Return the delay after failed attempt `attempt` (1 for the first delivery)."""
    backoff = policy["backoff"]
    if backoff == "immediate":
        return 0
    delay = float(policy["initial_delay_ms"])
    maximum = float(policy["max_delay_ms"])
    if backoff == "exponential":
        multiplier = float(policy["multiplier"])
        # Compare exponents first: multiplier ** attempt overflows a float
        # long before max_attempts (1000) with a large multiplier.
        if multiplier > 1.0 and (attempt - 1) * math.log(multiplier) >= math.log(maximum / delay):
            delay = maximum
        else:
            delay *= multiplier ** (attempt - 1)
    delay = min(delay, maximum)
    jitter = float(policy["jitter"])
    if jitter:
        unit = mmh3.hash(f"{group}/{offset}/{attempt}", 0, signed=False) / 2**32
        delay *= 1.0 - jitter + 2.0 * jitter * unit
    return int(min(delay, float(policy["max_delay_ms"])))


def _entry_key(group: str, offset: int) -> bytes:
    return group.encode() + b"\x00" + _U64.pack(offset)


class GroupDeliveries:
    """The entries of one group in one partition, loaded for one command."""

    # NOTE: every receive, ack and nack loads and decodes all unsettled
    # entries of the group, so a partition with thousands of held-back
    # records (key ordering, few keys, large max_records) is settled slowly.

    def __init__(self, txn: lmdb.Transaction, db, group: str):
        self.txn = txn
        self.db = db
        self.group = group
        self.entries: dict[int, dict] = {}
        prefix = group.encode() + b"\x00"
        cursor = txn.cursor(db=db)
        if cursor.set_range(prefix):
            for key, raw in cursor:
                key = bytes(key)
                if not key.startswith(prefix):
                    break
                self.entries[_U64.unpack(key[len(prefix):])[0]] = json.loads(raw)
        self.changed: set[int] = set()
        self.deleted: set[int] = set()

    def put(self, offset: int, entry: dict) -> None:
        self.entries[offset] = entry
        self.changed.add(offset)
        self.deleted.discard(offset)

    def delete(self, offset: int) -> None:
        self.entries.pop(offset, None)
        self.deleted.add(offset)
        self.changed.discard(offset)

    def flush(self) -> None:
        for offset in self.changed:
            self.txn.put(_entry_key(self.group, offset),
                         json.dumps(self.entries[offset], sort_keys=True).encode(), db=self.db)
        for offset in self.deleted:
            self.txn.delete(_entry_key(self.group, offset), db=self.db)


def read_entries(txn: lmdb.Transaction, db, group: str) -> dict[int, dict]:
    return GroupDeliveries(txn, db, group).entries


def delete_all(txn: lmdb.Transaction, db, group: str) -> None:
    deliveries = GroupDeliveries(txn, db, group)
    for offset in list(deliveries.entries):
        deliveries.delete(offset)
    deliveries.flush()


class DeliveryRules:
    """Apply one delivery command to a group's cursor and entries."""

    def __init__(self, store, txn: lmdb.Transaction, cursor: dict, doc: dict):
        self.store = store
        self.txn = txn
        self.cursor = cursor
        self.doc = doc
        self.group = doc["group"]
        self.policy = doc.get("policy") or DEFAULT_POLICY
        self.now = int(doc["now_ms"])
        self.deliveries = GroupDeliveries(txn, store.dbs[b"deliveries"], self.group)
        cursor.setdefault("next", cursor["committed"])
        cursor.setdefault("dlq_seq", 0)
        cursor.setdefault("dead_lettered", 0)
        cursor.setdefault("receives", {})

    # -- commands -------------------------------------------------------------

    def receive(self) -> dict:
        doc = self.doc
        member = doc["member"]
        if self.cursor["owner"] != member or doc["generation"] < self.cursor["generation"]:
            raise ApplyError(
                "NOT_PARTITION_OWNER",
                f"member {member!r} of group {self.group!r} has not claimed this partition "
                f"(owner {self.cursor['owner'] or 'nobody'!r}); claim it after a heartbeat",
                member_id=member, owner=self.cursor["owner"],
            )
        self._forget_deleted()
        self._expire_leases()
        previous = self.cursor["receives"].get(member)
        # request_id 0 (the proto default) opts out of retry detection.
        if (doc["request_id"] and previous is not None
                and previous["request_id"] == doc["request_id"]):
            # A retry of a receive whose response was lost: the same
            # deliveries, minus any settled or re-leased since.
            repeated = []
            for offset, attempt in previous["deliveries"]:
                entry = self.deliveries.entries.get(offset)
                if (entry and entry["state"] == "leased" and entry["member"] == member
                        and entry["attempt"] == attempt):
                    repeated.append(Delivered(offset, attempt, entry["lease_until"]))
            return self._finish(repeated)
        delivered = self._select(max(1, int(doc["max_records"])), member,
                                 int(doc["lease_ms"]))
        if delivered and doc["request_id"]:
            self.cursor["receives"][member] = {
                "request_id": doc["request_id"],
                "deliveries": [[d.offset, d.attempt] for d in delivered],
            }
        return self._finish(delivered)

    def ack(self) -> dict:
        results = []
        for offset, attempt in self.doc["deliveries"]:
            problem = self._check_lease(offset, attempt, self.doc["member"])
            if problem is None:
                self.deliveries.delete(offset)
            results.append(problem or {"offset": offset})
        return self._finish([], results=results)

    def nack(self) -> dict:
        offset, attempt = self.doc["offset"], self.doc["attempt"]
        entry = self.deliveries.entries.get(offset)
        if (entry is not None and entry["state"] in ("waiting", "dead")
                and entry["attempt"] == attempt and entry.get("nacked_by") == self.doc["member"]):
            # The same nack again (its response was lost): nothing changes.
            return self._finish([], results=[{"offset": offset}],
                                dead_lettered=entry["state"] == "dead")
        problem = self._check_lease(offset, attempt, self.doc["member"])
        if problem is not None:
            return self._finish([], results=[problem])
        if offset not in self.deliveries.entries:
            # Settled already: a nack retried after its record was moved to
            # the dead-letter topic (or settled by a later delivery).
            return self._finish([], results=[{"offset": offset}],
                                dead_lettered=attempt >= int(self.policy["max_attempts"]))
        error = str(self.doc.get("error", ""))[:MAX_ERROR_CHARS]
        delay = self.doc.get("delay_ms")
        entry = self._fail(offset, self.deliveries.entries[offset], self.now, error, delay)
        entry["nacked_by"] = self.doc["member"]
        return self._finish([], results=[{"offset": offset}], dead_lettered=entry["state"] == "dead")

    def extend(self) -> dict:
        offset, attempt = self.doc["offset"], self.doc["attempt"]
        problem = self._check_lease(offset, attempt, self.doc["member"])
        if problem is not None:
            return self._finish([], results=[problem])
        if offset not in self.deliveries.entries:
            return self._finish([], results=[self._reject(
                offset, "STALE_DELIVERY", f"offset {offset} is already settled; there is no "
                "lease to extend")])
        entry = self.deliveries.entries[offset]
        entry["lease_until"] = self.now + int(self.doc["lease_ms"])
        self.deliveries.put(offset, entry)
        return self._finish([], results=[{"offset": offset, "lease_until": entry["lease_until"]}])

    def dlq_done(self) -> dict:
        offset = self.doc["offset"]
        entry = self.deliveries.entries.get(offset)
        if entry is not None and entry["state"] == "dead" and entry["dlq_seq"] == self.doc["dlq_seq"]:
            self.deliveries.delete(offset)
            self.cursor["dead_lettered"] += 1
        return self._finish([])

    # -- rules ------------------------------------------------------------------

    def _check_lease(self, offset: int, attempt: int, member: str) -> dict | None:
        """Return None when (offset, attempt) is a live lease of `member`, else a rejection."""
        entry = self.deliveries.entries.get(offset)
        if entry is None:
            if offset < self.cursor["next"]:
                # Settled already: a retried ack, or a record another delivery settled.
                return None
            return self._reject(offset, "INVALID_OFFSET", f"offset {offset} was never delivered")
        expired_here = (entry["state"] in ("waiting", "dead") and entry["attempt"] == attempt
                        and entry.get("lease_expired"))
        if expired_here:
            return self._reject(
                offset, "LEASE_EXPIRED",
                f"the lease of delivery {attempt} of offset {offset} expired; the record will "
                "be delivered again, so extend leases that need longer")
        if entry["state"] != "leased" or entry["attempt"] != attempt or entry["member"] != member:
            return self._reject(
                offset, "STALE_DELIVERY",
                f"delivery {attempt} of offset {offset} is not the current one (the record is "
                f"{entry['state']} at attempt {entry['attempt']}); drop it without side effects")
        if entry["lease_until"] <= self.now:
            self._fail(offset, entry, entry["lease_until"], EXPIRED_LEASE_ERROR, None,
                       lease_expired=True)
            return self._reject(
                offset, "LEASE_EXPIRED",
                f"the lease of delivery {attempt} of offset {offset} expired; the record will "
                "be delivered again, so extend leases that need longer")
        return None

    @staticmethod
    def _reject(offset: int, reason: str, message: str) -> dict:
        return {"offset": offset, "reason": reason, "message": message}

    def _fail(self, offset: int, entry: dict, failed_at: int, error: str, delay: int | None,
              lease_expired: bool = False) -> dict:
        entry = dict(entry)
        entry["lease_expired"] = lease_expired
        entry.pop("nacked_by", None)
        entry.setdefault("first_failure_ms", failed_at)
        entry["last_failure_ms"] = failed_at
        entry["error"] = error
        entry.pop("member", None)
        entry.pop("lease_until", None)
        if entry["attempt"] >= int(self.policy["max_attempts"]):
            self.cursor["dlq_seq"] += 1
            entry["state"] = "dead"
            entry["dlq_seq"] = self.cursor["dlq_seq"]
        else:
            if delay is None:
                delay = retry_delay_ms(self.policy, self.group, offset, entry["attempt"])
            entry["state"] = "waiting"
            entry["due_ms"] = failed_at + max(0, int(delay))
        self.deliveries.put(offset, entry)
        return entry

    def _forget_deleted(self) -> None:
        """Settle unsettled records that retention or a size limit deleted:
        there is nothing left to deliver."""
        start = self.store.log_start_offset
        for offset in [o for o in self.deliveries.entries if o < start]:
            if self.deliveries.entries[offset]["state"] != "dead":
                self.deliveries.delete(offset)
        self.cursor["next"] = max(self.cursor["next"], start)

    def _expire_leases(self) -> None:
        for offset, entry in sorted(self.deliveries.entries.items()):
            if entry["state"] == "leased" and entry["lease_until"] <= self.now:
                self._fail(offset, entry, entry["lease_until"], EXPIRED_LEASE_ERROR, None,
                           lease_expired=True)

    def _select(self, limit: int, member: str, lease_ms: int) -> list[Delivered]:
        ordering = self.policy["ordering"]
        # Unsettled records that hold back later ones: everything but dead letters.
        holding = {o: e for o, e in self.deliveries.entries.items() if e["state"] != "dead"}
        first_of_key: dict[str, int] = {}
        for offset in sorted(holding):
            first_of_key.setdefault(holding[offset].get("key") or f"#{offset}", offset)
        earliest = min(holding) if holding else None

        # Unsettled records that may go out again: due retries, and records
        # that were held back once no earlier record blocks them.
        chosen: list[int] = []
        for offset in sorted(holding):
            if len(chosen) >= limit:
                break
            entry = holding[offset]
            if entry["state"] == "leased":
                continue
            if entry["state"] == "waiting" and entry["due_ms"] > self.now:
                continue
            if ordering == "partition" and offset != earliest:
                continue
            if ordering == "key" and first_of_key.get(entry.get("key") or f"#{offset}") != offset:
                continue
            chosen.append(offset)
        # New records from the frontier; records a size limit dropped before
        # any delivery are skipped.
        next_offset = max(self.cursor["next"], self.store.log_start_offset)
        end = self.store.high_watermark
        scanned = 0
        records = self.store.dbs[b"records"]
        while (len(chosen) < limit and next_offset < end and scanned < limit * SCAN_FACTOR
               and not (ordering == "partition" and (holding or chosen))):
            raw = self.txn.get(_U64.pack(next_offset), db=records)
            scanned += 1
            key = None
            if raw is not None:
                record_key = codec.decode_record(bytes(raw)).key
                key = None if record_key is None else record_key.hex()
            entry = {"state": "ready", "attempt": 0, "key": key}
            if ordering == "key" and key is not None and key in first_of_key:
                self.deliveries.put(next_offset, entry)
                holding[next_offset] = entry
            elif raw is None:
                # Dropped by a size limit before any delivery: nothing to deliver.
                pass
            else:
                self.deliveries.put(next_offset, entry)
                holding[next_offset] = entry
                chosen.append(next_offset)
                if key is not None:
                    first_of_key[key] = next_offset
            next_offset += 1
        self.cursor["next"] = next_offset

        delivered = []
        for offset in chosen:
            entry = dict(self.deliveries.entries[offset])
            entry["state"] = "leased"
            entry["attempt"] += 1
            entry["member"] = member
            entry["lease_until"] = self.now + lease_ms
            entry.pop("due_ms", None)
            self.deliveries.put(offset, entry)
            delivered.append(Delivered(offset, entry["attempt"], entry["lease_until"]))
        return delivered

    def _finish(self, delivered: list[Delivered], results: list[dict] | None = None,
                dead_lettered: bool = False) -> dict:
        entries = self.deliveries.entries
        self.cursor["committed"] = min(entries) if entries else self.cursor["next"]
        self.cursor["dead_pending"] = sum(1 for e in entries.values() if e["state"] == "dead")
        self.deliveries.flush()
        wake = [e["due_ms"] for e in entries.values() if e["state"] == "waiting"]
        wake += [e["lease_until"] for e in entries.values() if e["state"] == "leased"]
        return {
            "deliveries": [[d.offset, d.attempt, d.lease_until] for d in delivered],
            "results": results or [],
            "dead_lettered": dead_lettered,
            "next_wake_ms": min(wake) if wake else None,
            "next": self.cursor["next"],
            "committed": self.cursor["committed"],
        }
