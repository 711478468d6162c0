"""The checker of a chaos run: compare what was acknowledged with what is stored.

check() is a pure function of what the run recorded and of the logs read
back after the cluster settled:

- lost: an acknowledged record that is not at its acknowledged partition
  and offset (another record there, or nothing);
- duplicated: a (key, seq) stored more than once in the topic. The SDK
  producer is idempotent and the workload never resends a failed record,
  so the stated guarantee allows none;
- log order: for each key, seq must increase with the offset;
- group order: the violations the members saw while consuming (offsets
  group: per partition between two claims; acks group: per key among
  first deliveries);
- acks group: every stored record settled by an ack or moved to the
  dead-letter topic; each always-failing record exactly once in the
  dead-letter topic (missing and doubled counted);
- completeness: every acknowledged record delivered to each group at least
  once.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

from .chaos_workload import (
    ACKS_GROUP,
    MAX_EXAMPLES,
    AckedRecord,
    GroupObservations,
    parse_value,
)


@dataclasses.dataclass(frozen=True)
class StoredRecord:
    """A record read back from the topic, with its parsed (key, seq)."""

    partition: int
    offset: int
    key: str
    seq: int


@dataclasses.dataclass(frozen=True)
class StoredDeadLetter:
    """A record of the dead-letter topic and the source record it names."""

    dlq_partition: int
    dlq_offset: int
    source_partition: int
    source_offset: int
    key: str | None
    seq: int | None


@dataclasses.dataclass
class Finding:
    """The count of one kind of problem and its first examples."""

    count: int = 0
    examples: list[dict[str, object]] = dataclasses.field(default_factory=list)

    def add(self, example: dict[str, object], count: int = 1) -> None:
        self.count += count
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)


@dataclasses.dataclass
class CheckReport:
    acknowledged: int = 0
    stored: int = 0
    # Stored records whose send was never acknowledged: an unknown outcome,
    # allowed by the guarantee.
    stored_unacknowledged: int = 0
    # Stored values that the workload did not write.
    foreign_values: int = 0
    lost: Finding = dataclasses.field(default_factory=Finding)
    duplicated: Finding = dataclasses.field(default_factory=Finding)
    log_order: Finding = dataclasses.field(default_factory=Finding)
    group_order: dict[str, Finding] = dataclasses.field(default_factory=dict)
    # group -> acknowledged records that no member of the group received.
    unconsumed: dict[str, Finding] = dataclasses.field(default_factory=dict)
    # acks group: stored records neither acked nor dead-lettered.
    unsettled: Finding = dataclasses.field(default_factory=Finding)
    dead_letters_expected: int = 0
    dead_letters_stored: int = 0
    dead_letters_missing: Finding = dataclasses.field(default_factory=Finding)
    dead_letters_doubled: Finding = dataclasses.field(default_factory=Finding)
    # Dead letters of records the handler acks: their attempts ran out by
    # lease expiry. Counted, not a failure: at-least-once delivery allows it.
    dead_letters_unexpected: Finding = dataclasses.field(default_factory=Finding)

    @property
    def order_violations(self) -> int:
        return self.log_order.count + sum(f.count for f in self.group_order.values())

    @property
    def unconsumed_total(self) -> int:
        return sum(f.count for f in self.unconsumed.values())

    def failures(self) -> list[str]:
        """Name every check that failed, with its count; empty when all passed."""
        checks = {
            "lost": self.lost.count,
            "duplicated": self.duplicated.count,
            "order_violations": self.order_violations,
            "dead_letters_missing": self.dead_letters_missing.count,
            "dead_letters_doubled": self.dead_letters_doubled.count,
            "unconsumed": self.unconsumed_total,
            "unsettled": self.unsettled.count,
        }
        return [f"{name}={count}" for name, count in checks.items() if count]

    def to_dict(self) -> dict[str, object]:
        result = dataclasses.asdict(self)
        result["order_violations"] = self.order_violations
        return result


def parse_stored(partition: int, records: Iterable[tuple[int, bytes]],
                 report: CheckReport) -> list[StoredRecord]:
    """Parse (offset, value) pairs of one partition, counting foreign values in `report`."""
    parsed = []
    for offset, value in records:
        fields = parse_value(value)
        if fields is None:
            report.foreign_values += 1
            continue
        parsed.append(StoredRecord(partition, offset, fields[0], fields[1]))
    return parsed


def _check_lost(acked: list[AckedRecord], by_position: Mapping[tuple[int, int], StoredRecord],
                report: CheckReport) -> None:
    for record in acked:
        stored = by_position.get((record.partition, record.offset))
        if stored is None or (stored.key, stored.seq) != (record.key, record.seq):
            report.lost.add({
                "key": record.key, "seq": record.seq, "partition": record.partition,
                "offset": record.offset,
                "found": None if stored is None else f"{stored.key}|{stored.seq}",
            })


def _check_duplicates_and_order(stored: list[StoredRecord], report: CheckReport) -> None:
    positions: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    by_key: dict[str, list[StoredRecord]] = defaultdict(list)
    for record in stored:
        positions[(record.key, record.seq)].append((record.partition, record.offset))
        by_key[record.key].append(record)
    for (key, seq), where in positions.items():
        if len(where) > 1:
            report.duplicated.add({"key": key, "seq": seq, "positions": sorted(where)},
                                  count=len(where) - 1)
    for key, records in by_key.items():
        # One key maps to one partition; a key found in several is itself
        # an order problem, because offsets of two partitions do not compare.
        partitions = {r.partition for r in records}
        if len(partitions) > 1:
            report.log_order.add({"key": key, "partitions": sorted(partitions)})
            continue
        records.sort(key=lambda r: r.offset)
        for before, after in zip(records, records[1:]):
            if after.seq <= before.seq:
                report.log_order.add({
                    "key": key, "partition": after.partition,
                    "offset": after.offset, "seq": after.seq,
                    "previous_offset": before.offset, "previous_seq": before.seq,
                })


def _check_consumed(acked: list[AckedRecord], groups: Mapping[str, GroupObservations],
                    report: CheckReport) -> None:
    for name, observations in groups.items():
        finding = Finding()
        with observations.lock:
            for record in acked:
                if not observations.was_delivered(record.partition, record.offset):
                    finding.add({"key": record.key, "seq": record.seq,
                                 "partition": record.partition, "offset": record.offset})
            report.group_order[name] = Finding(observations.order.count,
                                               list(observations.order.examples))
        report.unconsumed[name] = finding


def _check_dead_letters(stored: list[StoredRecord], dead_letters: list[StoredDeadLetter],
                        acks: GroupObservations | None, fails: Callable[[str, int], bool],
                        report: CheckReport) -> None:
    report.dead_letters_stored = len(dead_letters)
    letters_by_source: dict[tuple[int, int], list[StoredDeadLetter]] = defaultdict(list)
    for letter in dead_letters:
        letters_by_source[(letter.source_partition, letter.source_offset)].append(letter)
    stored_positions = {(r.partition, r.offset): r for r in stored}
    for source, letters in letters_by_source.items():
        if len(letters) > 1:
            report.dead_letters_doubled.add({
                "source_partition": source[0], "source_offset": source[1],
                "dead_letters": [(x.dlq_partition, x.dlq_offset) for x in letters],
            }, count=len(letters) - 1)
        record = stored_positions.get(source)
        if record is not None and not fails(record.key, record.seq):
            report.dead_letters_unexpected.add({
                "key": record.key, "seq": record.seq,
                "source_partition": source[0], "source_offset": source[1],
            })
    for record in stored:
        position = (record.partition, record.offset)
        in_dlq = position in letters_by_source
        if fails(record.key, record.seq):
            report.dead_letters_expected += 1
            if not in_dlq:
                report.dead_letters_missing.add({"key": record.key, "seq": record.seq,
                                                 "partition": record.partition,
                                                 "offset": record.offset})
        elif acks is not None and not in_dlq and not acks.was_acked(*position):
            report.unsettled.add({"key": record.key, "seq": record.seq,
                                  "partition": record.partition, "offset": record.offset,
                                  "deliveries": acks.deliveries_of(*position),
                                  "last_ack_failure": acks.ack_failures.get(position)})


def check(acked: list[AckedRecord], stored: list[StoredRecord],
          groups: Mapping[str, GroupObservations], dead_letters: list[StoredDeadLetter],
          fails: Callable[[str, int], bool], report: CheckReport | None = None) -> CheckReport:
    """Run every check; `fails(key, seq)` is True for the records the acks group always nacks.

    `report` may carry counts filled in while the logs were parsed.
    """
    report = report or CheckReport()
    report.acknowledged = len(acked)
    report.stored = len(stored)
    by_position = {(r.partition, r.offset): r for r in stored}
    acked_positions = {(r.partition, r.offset) for r in acked}
    report.stored_unacknowledged = sum(1 for p in by_position if p not in acked_positions)
    _check_lost(acked, by_position, report)
    _check_duplicates_and_order(stored, report)
    _check_consumed(acked, groups, report)
    acks = groups.get(ACKS_GROUP)
    _check_dead_letters(stored, dead_letters, acks, fails, report)
    return report


def settled_for_acks(stored: list[StoredRecord], dead_letter_positions: set[tuple[int, int]],
                     acks: GroupObservations, fails: Callable[[str, int], bool]) -> int:
    """Count the stored records that the acks group has not settled yet.

    A record is settled when its ack succeeded, or when it is in the
    dead-letter topic. Always-failing records count until they are there.
    """
    pending = 0
    with acks.lock:
        for record in stored:
            position = (record.partition, record.offset)
            if position in dead_letter_positions:
                continue
            if fails(record.key, record.seq) or not acks.was_acked(*position):
                pending += 1
    return pending


def unconsumed_count(stored: list[StoredRecord], observations: GroupObservations) -> int:
    """Count the stored records that no member of the group has received."""
    with observations.lock:
        return sum(1 for r in stored if not observations.was_delivered(r.partition, r.offset))
