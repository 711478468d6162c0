"""Tests for the record and APPEND command encodings in raftmq.partition.codec."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftmq.partition.codec import (
    COMMAND_APPEND,
    AppendCommand,
    CodecError,
    Record,
    decode_append,
    decode_record,
    encode_append,
    encode_record,
    record_timestamp,
    with_timestamp,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
UINT64 = st.integers(min_value=0, max_value=2**64 - 1)

# st.text() leaves out lone surrogates, which have no UTF-8 encoding.
headers = st.lists(st.tuples(st.text(max_size=16), st.binary(max_size=32)), max_size=4).map(tuple)
records = st.builds(
    Record,
    value=st.binary(max_size=128),
    key=st.none() | st.binary(max_size=32),
    headers=headers,
    timestamp_ms=INT64,
)
append_commands = st.builds(
    AppendCommand,
    records=st.lists(records, max_size=5).map(tuple),
    producer_id=UINT64,
    sequence=UINT64,
    append_time_ms=INT64,
)


@st.composite
def corrupted_records(draw) -> bytes:
    """Return a valid record encoding with one byte replaced."""
    encoded = bytearray(encode_record(draw(records)))
    position = draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[position] = draw(st.integers(min_value=0, max_value=255))
    return bytes(encoded)


@st.composite
def corrupted_appends(draw) -> bytes:
    """Return a valid APPEND encoding with one byte replaced."""
    encoded = bytearray(encode_append(draw(append_commands)))
    position = draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[position] = draw(st.integers(min_value=0, max_value=255))
    return bytes(encoded)


# --- round trips ----------------------------------------------------------


@given(records)
def test_record_round_trip(record):
    assert decode_record(encode_record(record)) == record


def test_empty_key_stays_empty():
    decoded = decode_record(encode_record(Record(value=b"v", key=b"")))
    assert decoded.key == b""


def test_missing_key_stays_none():
    decoded = decode_record(encode_record(Record(value=b"v", key=None)))
    assert decoded.key is None


def test_empty_and_missing_key_encode_differently():
    assert encode_record(Record(value=b"", key=b"")) != encode_record(Record(value=b"", key=None))


@given(append_commands)
def test_append_round_trip(command):
    assert decode_append(encode_append(command)) == command


@given(append_commands)
def test_append_keeps_encoded_records(command):
    decoded = decode_append(encode_append(command))
    assert decoded.encoded_records == tuple(encode_record(record) for record in command.records)


@given(records, INT64)
def test_with_timestamp_replaces_only_timestamp(record, timestamp_ms):
    stamped = with_timestamp(encode_record(record), timestamp_ms)
    assert decode_record(stamped) == Record(record.value, record.key, record.headers, timestamp_ms)


@given(records)
def test_record_timestamp_reads_encoded_timestamp(record):
    assert record_timestamp(encode_record(record)) == record.timestamp_ms


# --- malformed input ------------------------------------------------------


def test_codec_error_is_value_error():
    assert issubclass(CodecError, ValueError)


@given(records, st.data())
def test_truncated_record_raises(record, data):
    encoded = encode_record(record)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(CodecError):
        decode_record(encoded[:cut])


@given(records, st.binary(min_size=1, max_size=16))
def test_trailing_bytes_after_record_raise(record, tail):
    with pytest.raises(CodecError):
        decode_record(encode_record(record) + tail)


@given(append_commands, st.data())
def test_truncated_append_raises(command, data):
    encoded = encode_append(command)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(CodecError):
        decode_append(encoded[:cut])


@given(append_commands, st.binary(min_size=1, max_size=16))
def test_trailing_bytes_after_append_raise(command, tail):
    with pytest.raises(CodecError):
        decode_append(encode_append(command) + tail)


def test_append_with_other_kind_raises():
    encoded = bytearray(encode_append(AppendCommand(records=(Record(b"v"),))))
    encoded[0] = COMMAND_APPEND + 1
    with pytest.raises(CodecError):
        decode_append(bytes(encoded))


def test_key_length_below_minus_one_raises():
    encoded = bytearray(encode_record(Record(value=b"v", key=None)))
    struct.pack_into(">i", encoded, 8, -2)
    with pytest.raises(CodecError):
        decode_record(bytes(encoded))


def test_non_utf8_header_name_raises():
    encoded = bytearray(encode_record(Record(value=b"", headers=(("n", b""),))))
    # The one-byte header name starts after the timestamp, key length, value
    # length, header count and name length, which take 8 + 4 + 4 + 2 + 2 bytes.
    encoded[20] = 0xFF
    with pytest.raises(CodecError):
        decode_record(bytes(encoded))


@given(st.binary(max_size=256) | corrupted_records())
def test_decode_record_raises_only_codec_error(data):
    try:
        decode_record(data)
    except CodecError:
        pass


@given(st.binary(max_size=256) | st.binary(max_size=256).map(lambda tail: b"\x01" + tail) | corrupted_appends())
def test_decode_append_raises_only_codec_error(data):
    try:
        decode_append(data)
    except CodecError:
        pass
