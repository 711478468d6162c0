"""Binary encodings of records and partition commands.

The same record encoding is used in the Raft command and in the LMDB log, so
apply copies bytes instead of re-encoding, and a replica can verify its log
against another by digest. All integers are big-endian. A record is:

    timestamp_ms  int64
    key_length    int32   (-1 when the record has no key)
    key           bytes
    value_length  uint32
    value         bytes
    header_count  uint16
    headers       header_count x (name_length uint16, name utf-8,
                                  value_length uint32, value bytes)

An APPEND command is a fixed header followed by `record_count` records:

    kind          uint8   (COMMAND_APPEND)
    producer_id   uint64  (0: not idempotent)
    sequence      uint64
    append_time_ms int64  (stamped by the leader; used when a record has
                           timestamp_ms == 0)
    record_count  uint32

An APPEND_LIMITED command is an APPEND whose header also carries the
topic's backlog limits, stamped by the leader from the topic config so that
every replica enforces the same limits from the log alone:

    kind          uint8   (COMMAND_APPEND_LIMITED)
    producer_id, sequence, append_time_ms, record_count  as in APPEND
    max_backlog_messages  uint64  (0: no limit)
    max_backlog_bytes     uint64  (0: no limit)
    overflow_policy       uint8   (0: reject, 1: drop_oldest)

encode_append writes the plain APPEND header when the command has no limits,
so commands of topics without limits are unchanged.

A GROUP command (consumer group cursors and deliveries, and retention) is
the kind byte COMMAND_GROUP followed by a UTF-8 JSON object; it is small
and rare next to appends, so readability wins over size.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

COMMAND_APPEND = 1
COMMAND_GROUP = 2
COMMAND_APPEND_LIMITED = 3
APPEND_KINDS = (COMMAND_APPEND, COMMAND_APPEND_LIMITED)

# Overflow policies of a topic with backlog limits, by name and wire value.
OVERFLOW_REJECT = "reject"
OVERFLOW_DROP_OLDEST = "drop_oldest"
OVERFLOW_POLICIES = (OVERFLOW_REJECT, OVERFLOW_DROP_OLDEST)

_RECORD_TIMESTAMP = struct.Struct(">q")
_INT32 = struct.Struct(">i")
_UINT32 = struct.Struct(">I")
_UINT16 = struct.Struct(">H")
_APPEND_HEADER = struct.Struct(">BQQqI")
_LIMITS = struct.Struct(">QQB")

MAX_HEADER_COUNT = 0xFFFF
MAX_HEADER_NAME_BYTES = 0xFFFF


class CodecError(ValueError):
    """Bytes that do not decode as the expected structure."""


@dataclass(frozen=True)
class Record:
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0


@dataclass(frozen=True)
class AppendCommand:
    records: tuple[Record, ...]
    producer_id: int = 0
    sequence: int = 0
    append_time_ms: int = 0
    # Encoded records, kept so apply stores them without re-encoding.
    encoded_records: tuple[bytes, ...] = field(default=(), compare=False)
    # The topic's backlog limits (0: no limit) and overflow policy.
    max_backlog_messages: int = 0
    max_backlog_bytes: int = 0
    overflow_policy: str = OVERFLOW_REJECT

    @property
    def has_limits(self) -> bool:
        return bool(self.max_backlog_messages or self.max_backlog_bytes)


def encode_record(record: Record) -> bytes:
    parts = [_RECORD_TIMESTAMP.pack(record.timestamp_ms)]
    if record.key is None:
        parts.append(_INT32.pack(-1))
    else:
        parts.append(_INT32.pack(len(record.key)))
        parts.append(bytes(record.key))
    parts.append(_UINT32.pack(len(record.value)))
    parts.append(bytes(record.value))
    if len(record.headers) > MAX_HEADER_COUNT:
        raise CodecError(f"a record has {len(record.headers)} headers, at most {MAX_HEADER_COUNT}")
    parts.append(_UINT16.pack(len(record.headers)))
    for name, value in record.headers:
        name_bytes = name.encode("utf-8")
        if len(name_bytes) > MAX_HEADER_NAME_BYTES:
            raise CodecError(f"header name of {len(name_bytes)} bytes, at most {MAX_HEADER_NAME_BYTES}")
        parts.append(_UINT16.pack(len(name_bytes)))
        parts.append(name_bytes)
        parts.append(_UINT32.pack(len(value)))
        parts.append(bytes(value))
    return b"".join(parts)


def encoded_record_size(key: bytes | None, value: bytes,
                        headers: Iterable[tuple[str, bytes]]) -> int:
    """Return the length of encode_record's output for these fields."""
    size = _RECORD_TIMESTAMP.size + _INT32.size + _UINT32.size + len(value) + _UINT16.size
    if key is not None:
        size += len(key)
    for name, header_value in headers:
        size += _UINT16.size + len(name.encode("utf-8")) + _UINT32.size + len(header_value)
    return size


def _take(data: memoryview, pos: int, size: int) -> tuple[bytes, int]:
    end = pos + size
    if end > len(data):
        raise CodecError(f"record truncated: need {size} bytes at {pos}, have {len(data) - pos}")
    return bytes(data[pos:end]), end


def _unpack(fmt: struct.Struct, data: memoryview, pos: int) -> tuple[int, int]:
    if pos + fmt.size > len(data):
        raise CodecError(f"record truncated at byte {pos}")
    return fmt.unpack_from(data, pos)[0], pos + fmt.size


def decode_record_at(data: memoryview, pos: int) -> tuple[Record, int]:
    """Decode one record starting at `pos`; return it and the position after it."""
    timestamp_ms, pos = _unpack(_RECORD_TIMESTAMP, data, pos)
    key_length, pos = _unpack(_INT32, data, pos)
    key: bytes | None = None
    if key_length >= 0:
        key, pos = _take(data, pos, key_length)
    elif key_length != -1:
        raise CodecError(f"invalid key length {key_length}")
    value_length, pos = _unpack(_UINT32, data, pos)
    value, pos = _take(data, pos, value_length)
    header_count, pos = _unpack(_UINT16, data, pos)
    headers = []
    for _ in range(header_count):
        name_length, pos = _unpack(_UINT16, data, pos)
        name, pos = _take(data, pos, name_length)
        header_value_length, pos = _unpack(_UINT32, data, pos)
        header_value, pos = _take(data, pos, header_value_length)
        try:
            headers.append((name.decode("utf-8"), header_value))
        except UnicodeDecodeError as exc:
            raise CodecError(f"header name is not UTF-8: {name!r}") from exc
    return Record(value, key, tuple(headers), timestamp_ms), pos


def decode_record(data: bytes) -> Record:
    view = memoryview(data)
    record, end = decode_record_at(view, 0)
    if end != len(view):
        raise CodecError(f"{len(view) - end} trailing bytes after a record")
    return record


def with_timestamp(encoded: bytes, timestamp_ms: int) -> bytes:
    """Return an encoded record with its timestamp replaced."""
    return _RECORD_TIMESTAMP.pack(timestamp_ms) + encoded[_RECORD_TIMESTAMP.size :]


def record_timestamp(encoded: bytes) -> int:
    return _RECORD_TIMESTAMP.unpack_from(encoded, 0)[0]


def encode_append(command: AppendCommand) -> bytes:
    header = _APPEND_HEADER.pack(
        COMMAND_APPEND_LIMITED if command.has_limits else COMMAND_APPEND,
        command.producer_id,
        command.sequence,
        command.append_time_ms,
        len(command.records),
    )
    if command.has_limits:
        header += _LIMITS.pack(
            command.max_backlog_messages,
            command.max_backlog_bytes,
            OVERFLOW_POLICIES.index(command.overflow_policy),
        )
    return header + b"".join(encode_record(record) for record in command.records)


def decode_append(data: bytes) -> AppendCommand:
    view = memoryview(data)
    if len(view) < _APPEND_HEADER.size:
        raise CodecError(f"append command of {len(view)} bytes is shorter than its header")
    kind, producer_id, sequence, append_time_ms, count = _APPEND_HEADER.unpack_from(view, 0)
    if kind not in APPEND_KINDS:
        raise CodecError(f"command kind {kind} is not APPEND")
    pos = _APPEND_HEADER.size
    limits: dict = {}
    if kind == COMMAND_APPEND_LIMITED:
        if len(view) < pos + _LIMITS.size:
            raise CodecError(f"append command of {len(view)} bytes is shorter than its limits")
        max_messages, max_bytes, policy = _LIMITS.unpack_from(view, pos)
        if policy >= len(OVERFLOW_POLICIES):
            raise CodecError(f"unknown overflow policy {policy}")
        limits = {
            "max_backlog_messages": max_messages,
            "max_backlog_bytes": max_bytes,
            "overflow_policy": OVERFLOW_POLICIES[policy],
        }
        pos += _LIMITS.size
    records = []
    encoded = []
    for _ in range(count):
        start = pos
        record, pos = decode_record_at(view, pos)
        records.append(record)
        encoded.append(bytes(view[start:pos]))
    if pos != len(view):
        raise CodecError(f"{len(view) - pos} trailing bytes after {count} records")
    return AppendCommand(tuple(records), producer_id, sequence, append_time_ms, tuple(encoded),
                         **limits)


def encode_group_command(op: str, **fields: object) -> bytes:
    return bytes([COMMAND_GROUP]) + json.dumps({"op": op, **fields}, sort_keys=True).encode()


def decode_group_command(data: bytes) -> dict:
    if command_kind(data) != COMMAND_GROUP:
        raise CodecError(f"command kind {data[0]} is not GROUP")
    try:
        doc = json.loads(data[1:])
    except ValueError as exc:
        raise CodecError(f"group command is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or "op" not in doc:
        raise CodecError("group command lacks an op")
    return doc


def command_kind(data: bytes) -> int:
    if not data:
        raise CodecError("empty command")
    return data[0]
