"""raftmq: a message log cluster whose partitions are replicated by Raft."""

__version__ = "0.1.0"
