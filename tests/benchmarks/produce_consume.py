"""Produce and consume throughput, and produce latency, of a raftmq cluster.

Not a test: it asserts nothing and is not collected by pytest. Run it from
the repository root:

    python tests/benchmarks/produce_consume.py --records 50000 --value-bytes 100

Without --bootstrap it starts a local three-node cluster in a temporary
folder (node processes on 127.0.0.1) and removes it afterwards. Results go
to stdout as text and, with --json PATH, as a JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import LocalCluster  # noqa: E402

from raftmq.client import Admin, Consumer, Producer, TopicPartition  # noqa: E402


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_produce(bootstrap: str, topic: str, records: int, value_bytes: int,
                    linger_ms: int, batch_size: int) -> dict:
    value = os.urandom(value_bytes // 2).hex().encode()[:value_bytes].ljust(value_bytes, b"x")
    futures = []
    with Producer(bootstrap, linger_ms=linger_ms, batch_size=batch_size,
                  buffer_memory=256 * 2**20) as producer:
        started = time.perf_counter()
        for i in range(records):
            futures.append(producer.send(topic, value, key=b"key-%d" % (i % 1000)))
            if i and i % (records // 5 or 1) == 0:
                progress(f"produce: {i} of {records} sent")
        producer.flush()
        elapsed_s = time.perf_counter() - started
    failed = sum(1 for f in futures if f.exception() is not None)
    return {
        "records": records, "value_bytes": value_bytes, "failed": failed,
        "seconds": round(elapsed_s, 3),
        "records_per_s": round(records / elapsed_s),
        "mb_per_s": round(records * value_bytes / elapsed_s / 1e6, 2),
    }


def measure_latency(bootstrap: str, topic: str, samples: int, value_bytes: int) -> dict:
    latencies_ms = []
    with Producer(bootstrap, linger_ms=0) as producer:
        producer.send(topic, b"warm-up", key=b"warm-up").result(timeout=30)
        for i in range(samples):
            started = time.perf_counter()
            producer.send(topic, b"v" * value_bytes, key=b"latency-%d" % i).result(timeout=30)
            latencies_ms.append((time.perf_counter() - started) * 1000)
    latencies_ms.sort()

    def percentile(p: float) -> float:
        return round(latencies_ms[min(len(latencies_ms) - 1, int(p * len(latencies_ms)))], 2)

    return {
        "samples": samples, "p50_ms": percentile(0.50), "p95_ms": percentile(0.95),
        "p99_ms": percentile(0.99), "mean_ms": round(statistics.fmean(latencies_ms), 2),
    }


def measure_consume(bootstrap: str, topic: str, partitions: int) -> dict:
    count = 0
    size = 0
    with Consumer(bootstrap, fetch_max_wait_ms=100, max_poll_records=5000) as consumer:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(tps)
        started = time.perf_counter()
        while any(consumer.position(tp) < end[tp] for tp in tps):
            for batch in consumer.poll(timeout_ms=500).values():
                count += len(batch)
                size += sum(len(record.value) for record in batch)
        elapsed_s = time.perf_counter() - started
    return {
        "records": count, "seconds": round(elapsed_s, 3),
        "records_per_s": round(count / elapsed_s), "mb_per_s": round(size / elapsed_s / 1e6, 2),
    }


def node_rss_mib(cluster: LocalCluster | None) -> dict:
    if cluster is None:
        return {}
    sizes = {}
    for node_id, process in cluster.processes.items():
        try:
            with open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        sizes[f"node{node_id}"] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="existing cluster; default: start a local one")
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--linger-ms", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64 * 1024)
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--fsync-policy", choices=("always", "interval", "never"),
                        help="node fsync policy for the local cluster (default: the node's)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    cluster = None
    with tempfile.TemporaryDirectory(prefix="raftmq-bench-") as scratch:
        if args.bootstrap is None:
            progress("starting a local three-node cluster")
            extra = ["--fsync-policy", args.fsync_policy] if args.fsync_policy else []
            cluster = LocalCluster(Path(scratch), extra_args=extra)
            cluster.start_all()
            cluster.wait_healthy(timeout_s=60)
        bootstrap = args.bootstrap or cluster.bootstrap
        try:
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            with Admin(bootstrap) as admin:
                admin.create_topic(topic, partitions=args.partitions, replication_factor=3)
            progress(f"producing {args.records} records of {args.value_bytes} bytes")
            produce = measure_produce(bootstrap, topic, args.records, args.value_bytes,
                                      args.linger_ms, args.batch_size)
            progress("measuring produce latency")
            latency = measure_latency(bootstrap, topic, args.latency_samples, args.value_bytes)
            progress("consuming everything back")
            consume = measure_consume(bootstrap, topic, args.partitions)
            results = {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()},
                "settings": vars(args), "produce": produce, "produce_latency": latency,
                "consume": consume, "node_rss_mib": node_rss_mib(cluster),
            }
        finally:
            if cluster is not None:
                cluster.stop_all()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
