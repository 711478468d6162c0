"""Tests for the key-to-partition ring in raftmq.partition.ring.

The test vectors come from the tables in docs/ring.md, so the published spec
and the implementation cannot drift apart.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import mmh3
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from raftmq.partition.ring import VIRTUAL_NODES_DEFAULT, HashRing, partition_for_key

SPEC = Path(__file__).resolve().parent.parent / "docs" / "ring.md"

keys = st.binary(max_size=64)


def _section_table(heading: str) -> list[dict[str, str]]:
    """Parse the first Markdown table under `heading` in docs/ring.md into rows keyed by column name."""
    lines = SPEC.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading)
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(table) > 2, f"no table under {heading!r} in {SPEC}"
    header, separator, *rows = table
    assert set("".join(separator)) <= set("-: "), f"bad separator row {separator}"
    return [dict(zip(header, row, strict=True)) for row in rows]


def _key_from_hex(cell: str) -> bytes:
    return b"" if cell == "(empty)" else bytes.fromhex(cell)


KEY_VECTORS = _section_table("## Test vectors: keys")
TOKEN_VECTORS = _section_table("## Test vectors: tokens")


def test_doc_vectors_cover_the_required_cases():
    counts = {int(row["partition count"]) for row in KEY_VECTORS}
    key_bytes = [_key_from_hex(row["key (hex)"]) for row in KEY_VECTORS]
    assert len(KEY_VECTORS) >= 12
    assert {1, 3, 6, 12} <= counts
    assert b"" in key_bytes
    assert any(not key.isascii() for key in key_bytes), "no UTF-8 or binary key"
    assert any(_is_not_utf8(key) for key in key_bytes), "no non-UTF-8 key"
    assert len(TOKEN_VECTORS) >= 3


def _is_not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize(
    "row", KEY_VECTORS, ids=[f"{r['key (hex)']}-P{r['partition count']}" for r in KEY_VECTORS]
)
def test_doc_key_vector(row):
    key = _key_from_hex(row["key (hex)"])
    count = int(row["partition count"])
    expected = int(row["partition"])
    assert mmh3.hash(key, 0, signed=False) == int(row["murmur3 of key"])
    assert partition_for_key(key, count) == expected
    assert HashRing(count).partition_for(key) == expected
    # The text column is for readers, but it must still describe the key.
    text = row["key as text"].removesuffix(" (UTF-8)")
    if not text.startswith("("):
        assert key.decode("utf-8") == text


@pytest.mark.parametrize("row", TOKEN_VECTORS, ids=lambda r: f"p{r['partition']}-v{r['vnode']}")
def test_doc_token_vector(row):
    name = f"raftmq-partition-{row['partition']}-vnode-{row['vnode']}"
    assert mmh3.hash(name.encode("ascii"), 0, signed=False) == int(row["token"])


def test_doc_states_default_virtual_nodes():
    assert f"**`V = {VIRTUAL_NODES_DEFAULT}`**" in SPEC.read_text(encoding="utf-8")


@given(key=keys, count=st.integers(1, 40))
def test_same_key_same_partition_in_new_rings(key, count):
    assert HashRing(count).partition_for(key) == HashRing(count).partition_for(key)
    assert partition_for_key(key, count) == HashRing(count).partition_for(key)


_CHILD = """
import json, sys
from raftmq.partition.ring import partition_for_key
request = json.load(sys.stdin)
print(json.dumps({
    "str_hash": hash("raftmq"),
    "partitions": [partition_for_key(bytes.fromhex(k), request["count"]) for k in request["keys"]],
}))
"""


@settings(max_examples=5, deadline=None)
@given(
    sample=st.lists(keys, min_size=1, max_size=50),
    count=st.integers(1, 24),
    hash_seed=st.integers(1, 2**32 - 1),
)
def test_same_key_same_partition_in_new_process(sample, count, hash_seed):
    assume(str(hash_seed) != os.environ.get("PYTHONHASHSEED"))
    request = {"count": count, "keys": [key.hex() for key in sample]}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
        check=True,
    )
    output = json.loads(child.stdout)
    # A different str hash proves the child really runs with other hash
    # randomization, so equal partitions mean the ring ignores it.
    assert output["str_hash"] != hash("raftmq")
    assert output["partitions"] == [partition_for_key(key, count) for key in sample]


@given(key=keys, count=st.integers(1, 64), virtual_nodes=st.integers(1, 300))
def test_partition_in_range(key, count, virtual_nodes):
    assert partition_for_key(key, count) in range(count)
    assert HashRing(count, virtual_nodes).partition_for(key) in range(count)


@given(
    count=st.integers(1, 64),
    data=st.data(),
)
def test_token_name_routes_to_its_partition(count, data):
    # A key equal to a token's name hashes exactly onto that token. The first
    # equal tokens on the default ring need 152 partitions, so none tie here.
    partition = data.draw(st.integers(0, count - 1))
    vnode = data.draw(st.integers(0, VIRTUAL_NODES_DEFAULT - 1))
    key = f"raftmq-partition-{partition}-vnode-{vnode}".encode("ascii")
    assert partition_for_key(key, count) == partition


def test_equal_tokens_go_to_lower_partition():
    low, high = b"raftmq-partition-95-vnode-14", b"raftmq-partition-151-vnode-128"
    assert mmh3.hash(low, 0, signed=False) == mmh3.hash(high, 0, signed=False)
    ring = HashRing(152)
    assert ring.partition_for(high) == 95
    assert ring.partition_for(low) == 95


def _random_keys(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, 32)) for _ in range(count)]


@pytest.mark.parametrize("count", [1, 3, 6, 12, 24])
def test_adding_partition_moves_only_to_new_one(count):
    sample = _random_keys(20_000, seed=count)
    before, after = HashRing(count), HashRing(count + 1)
    moved = 0
    for key in sample:
        old, new = before.partition_for(key), after.partition_for(key)
        if old != new:
            assert new == count, f"key {key.hex()} moved {old} -> {new}, not to the new partition"
            moved += 1
    ideal = len(sample) / (count + 1)
    assert 0.5 * ideal <= moved <= 1.6 * ideal, f"{moved} keys moved, ideal {ideal:.0f}"


def test_default_ring_balances_six_partitions():
    # The exact shares of the hash space for 6 partitions are 0.94 to 1.07
    # of 1/6, so a factor of 1.2 leaves room for sampling noise only.
    factor = 1.2
    count = 6
    sample = _random_keys(60_000, seed=6)
    ring = HashRing(count)
    per_partition = [0] * count
    for key in sample:
        per_partition[ring.partition_for(key)] += 1
    ideal = len(sample) / count
    for partition, received in enumerate(per_partition):
        assert ideal / factor <= received <= ideal * factor, (partition, per_partition)


def test_empty_key_goes_to_owner_of_lowest_token():
    # b"" hashes to 0, which no token is below, so it takes the first token.
    assert mmh3.hash(b"", 0, signed=False) == 0
    lowest = min(
        (mmh3.hash(f"raftmq-partition-{p}-vnode-{v}".encode("ascii"), 0, signed=False), p)
        for p in range(12)
        for v in range(VIRTUAL_NODES_DEFAULT)
    )
    assert HashRing(12).partition_for(b"") == lowest[1]
    assert partition_for_key(bytearray(), 12) == lowest[1]


@given(key=keys, count=st.integers(1, 24))
def test_bytes_like_keys_route_alike(key, count):
    expected = partition_for_key(key, count)
    assert partition_for_key(bytearray(key), count) == expected
    assert partition_for_key(memoryview(key), count) == expected


def test_missing_key_raises_type_error():
    with pytest.raises(TypeError, match="round-robin"):
        HashRing(3).partition_for(None)
    with pytest.raises(TypeError, match="round-robin"):
        partition_for_key(None, 3)


@pytest.mark.parametrize("key", ["hello", ""])
def test_str_key_raises_type_error(key):
    with pytest.raises(TypeError, match="encode"):
        HashRing(3).partition_for(key)


@pytest.mark.parametrize("key", [42, 1.5, ["a"]])
def test_other_key_types_raise_type_error(key):
    with pytest.raises(TypeError, match="must be bytes"):
        partition_for_key(key, 3)


@pytest.mark.parametrize("bad", [0, -1, -100])
def test_bad_counts_raise_value_error(bad):
    with pytest.raises(ValueError, match=f"partition_count .*{bad}"):
        HashRing(bad)
    with pytest.raises(ValueError, match=f"virtual_nodes .*{bad}"):
        HashRing(3, bad)
    with pytest.raises(ValueError, match=f"partition_count .*{bad}"):
        partition_for_key(b"k", bad)


@pytest.mark.parametrize("bad", [3.0, True, "3", None])
def test_non_int_counts_raise_type_error(bad):
    partition_for_key(b"k", 3)  # caches the ring for 3, which 3.0 must not reuse
    with pytest.raises(TypeError, match="partition_count"):
        partition_for_key(b"k", bad)
    with pytest.raises(TypeError, match="virtual_nodes"):
        HashRing(3, bad)


def test_ring_reports_its_size():
    ring = HashRing(5, 7)
    assert ring.partition_count == 5
    assert ring.virtual_nodes == 7
    assert HashRing(5).virtual_nodes == VIRTUAL_NODES_DEFAULT
