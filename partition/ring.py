"""Consistent-hash ring that routes a record key to a partition of a topic.

The SDK and the server both route with this module, so it must return the
same partition in every process and on every platform. It therefore depends only on
MurmurHash3 (x86, 32-bit, seed 0, unsigned) and never on Python's built-in
hash(), whose value changes with PYTHONHASHSEED. docs/ring.md restates the
algorithm for clients written in other languages, with test vectors.

Each partition p owns VIRTUAL_NODES_DEFAULT tokens, and token v of p is the
hash of the ASCII string f"raftmq-partition-{p}-vnode-{v}". A key belongs to
the owner of the first token >= hash(key), wrapping around to the lowest
token. Adding a partition therefore moves only the keys that the new
partition's tokens take over, which is about 1/(P+1) of them.

This module must stay importable by the SDK alone: it imports no storage or
Raft code.
"""

from __future__ import annotations

import bisect
import functools

import mmh3

__all__ = ["VIRTUAL_NODES_DEFAULT", "HashRing", "partition_for_key"]

# Tokens per partition, chosen by measurement with `python -m
# raftmq.partition.ring` (the code at the bottom of this file). It computes
# the exact share of the 2**32 hash space that each partition owns from the
# arcs between tokens, so the figures involve no sampled keys and no hardware.
# For every P in 1..64, the share that moves when partition P is added,
# times (P+1), and the share of one partition of P, times P, were:
#    tokens   moved share x (P+1)   partition share x P
#       128      0.781 to 1.277        0.762 to 1.319
#       256      0.875 to 1.123        0.834 to 1.237
#       512      0.931 to 1.107        0.897 to 1.107
# 256 keeps both within about 25% of ideal, and a ring of 64 partitions is
# still only 16,384 tokens. Changing this value re-routes most keys, so it is
# part of the wire contract (docs/ring.md).
VIRTUAL_NODES_DEFAULT = 256

_TOKEN_NAME = "raftmq-partition-{partition}-vnode-{vnode}"
_SEED = 0
_HASH_SPACE = 2**32

# Maximum number of rings that partition_for_key keeps, one per partition
# count in use. Topics rarely differ in partition count, so a small bound is
# enough.
_RING_CACHE_SIZE = 64


def _hash(data: bytes) -> int:
    return mmh3.hash(data, _SEED, signed=False)


def _check_count(name: str, value: object) -> int:
    # bool is an int subclass, but True as a partition count is a caller bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _key_bytes(key: object) -> bytes:
    if isinstance(key, bytes):
        return key
    # mmh3 5.3.1 rejects bytearray and memoryview, so copy them to bytes.
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    if key is None:
        raise TypeError(
            "key is None, but the hash ring routes only records with a key. "
            "The producer spreads keyless records round-robin over the "
            "partitions instead. An empty key b'' is a real key and is hashed."
        )
    if isinstance(key, str):
        raise TypeError(
            "record key must be bytes, not str. Encode it first, "
            "for example key.encode('utf-8')"
        )
    raise TypeError(
        f"record key must be bytes, bytearray or memoryview, "
        f"got {type(key).__name__}"
    )


class HashRing:
    """Immutable ring of `virtual_nodes` tokens for each of `partition_count` partitions.

    Two rings with the same arguments route every key identically, in any
    process. Building costs partition_count * virtual_nodes hashes, and a
    lookup is a binary search over the sorted tokens.
    """

    __slots__ = ("_partition_count", "_virtual_nodes", "_tokens", "_owners")

    def __init__(
        self, partition_count: int, virtual_nodes: int = VIRTUAL_NODES_DEFAULT
    ) -> None:
        self._partition_count = _check_count("partition_count", partition_count)
        self._virtual_nodes = _check_count("virtual_nodes", virtual_nodes)
        # Sorting (token, partition) pairs puts the lower partition id first
        # when two tokens are equal, and bisect_left then picks it, so a tie
        # goes to the lower id. Such ties do occur: partition 95 vnode 14 and
        # partition 151 vnode 128 share token 82729143.
        ring = sorted(
            (_hash(_TOKEN_NAME.format(partition=p, vnode=v).encode("ascii")), p)
            for p in range(partition_count)
            for v in range(virtual_nodes)
        )
        self._tokens = [token for token, _ in ring]
        self._owners = [partition for _, partition in ring]

    @property
    def partition_count(self) -> int:
        """Number of partitions the ring routes to, numbered from 0."""
        return self._partition_count

    @property
    def virtual_nodes(self) -> int:
        """Number of tokens each partition owns on the ring."""
        return self._virtual_nodes

    def partition_for(self, key: bytes) -> int:
        """Return the partition, in range(partition_count), that owns `key`.

        An empty key is a valid key and hashes to 0. Raises TypeError for
        None, because keyless records are spread round-robin by the producer
        instead, and for str, which the caller must encode first.
        """
        index = bisect.bisect_left(self._tokens, _hash(_key_bytes(key)))
        if index == len(self._tokens):
            index = 0  # past the highest token: wrap to the lowest
        return self._owners[index]

    def __repr__(self) -> str:
        return (
            f"HashRing(partition_count={self._partition_count}, "
            f"virtual_nodes={self._virtual_nodes})"
        )


# typed=True keeps 3.0 or True from sharing a cache entry with 3 or 1, which
# would skip the type check in HashRing.__init__.
@functools.lru_cache(maxsize=_RING_CACHE_SIZE, typed=True)
def _cached_ring(partition_count: int) -> HashRing:
    return HashRing(partition_count)


def partition_for_key(key: bytes, partition_count: int) -> int:
    """Return the partition that owns `key` in a topic of `partition_count` partitions.

    Uses a HashRing with VIRTUAL_NODES_DEFAULT tokens, built once per
    partition count and cached. Raises like HashRing.partition_for, and
    ValueError or TypeError for a bad partition_count.
    """
    return _cached_ring(partition_count).partition_for(key)


def _owned_shares(ring: HashRing) -> list[float]:
    """Return the fraction of the hash space each partition owns, by partition id."""
    shares = [0] * ring.partition_count
    # The lowest token's arc starts just after the highest token, across 2**32.
    previous = ring._tokens[-1] - _HASH_SPACE
    for token, owner in zip(ring._tokens, ring._owners):
        shares[owner] += token - previous
        previous = token
    return [share / _HASH_SPACE for share in shares]


def _print_virtual_node_measurement(max_partitions: int = 64) -> None:
    """Print the figures behind VIRTUAL_NODES_DEFAULT (see the comment there)."""
    for virtual_nodes in (64, 128, 256, 512):
        moved, balance = [], []
        for count in range(1, max_partitions + 1):
            grown = _owned_shares(HashRing(count + 1, virtual_nodes))
            # Keys that move are exactly those the new partition now owns.
            moved.append(grown[count] * (count + 1))
            balance.extend(
                share * count for share in _owned_shares(HashRing(count, virtual_nodes))
            )
        print(
            f"{virtual_nodes:4d} tokens, P=1..{max_partitions}: "
            f"moved share x (P+1) {min(moved):.3f} to {max(moved):.3f}, "
            f"partition share x P {min(balance):.3f} to {max(balance):.3f}"
        )


if __name__ == "__main__":
    _print_virtual_node_measurement()
