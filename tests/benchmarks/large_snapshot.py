"""Does snapshotting a large partition stall its Raft group?

Not a test. It starts a three-node cluster on 127.0.0.1, fills one
partition (replication factor 3) with about --gib GiB of records, lets the
journal-size threshold trigger a snapshot of the whole log on every node,
and meanwhile produces one small record every 100 ms to the same partition.
It reports the snapshot durations from the node logs, the role changes
(elections) of the partition's group after the first election, and the
latency of the small produces while a snapshot ran.

    python tests/benchmarks/large_snapshot.py --gib 1.1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import LocalCluster  # noqa: E402

from raftmq.client import Admin, Producer  # noqa: E402

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def log_events(cluster: LocalCluster, topic: str) -> list[dict]:
    events = []
    for node_id in cluster.node_ids:
        for line in cluster.log_path(node_id).read_text(errors="replace").splitlines():
            if f"topic={topic} " not in line or "event=" not in line:
                continue
            stamp = LOG_TIME.match(line)
            when = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1000
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            events.append({"node": node_id, "time": when, **fields})
    return sorted(events, key=lambda e: e["time"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.1, help="log size to reach, GiB")
    parser.add_argument("--value-bytes", type=int, default=256 * 1024)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    target_bytes = int(args.gib * 2**30)
    threshold = int(target_bytes * 0.95)

    with tempfile.TemporaryDirectory(prefix="raftmq-snapshot-", dir=os.environ.get("TMPDIR")) as scratch:
        cluster = LocalCluster(Path(scratch), extra_args=[
            "--raft-log-compaction-max-journal-bytes", str(threshold),
            "--raft-log-compaction-min-entries", "10000000",
            "--raft-log-compaction-min-interval-ms", "86400000",
        ])
        cluster.start_all()
        try:
            cluster.wait_healthy(timeout_s=60)
            topic = "snapshot-bench"
            with Admin(cluster.bootstrap) as admin:
                admin.create_topic(topic, partitions=1, replication_factor=3)
            probes: list[tuple[float, float]] = []
            stop = threading.Event()

            def probe() -> None:
                with Producer(cluster.bootstrap, linger_ms=0) as producer:
                    while not stop.wait(0.1):
                        started = time.time()
                        try:
                            producer.send(topic, b"probe", key=b"probe").result(timeout=60)
                            probes.append((started, time.time() - started))
                        except Exception as exc:  # noqa: BLE001 - reported as a failed probe
                            probes.append((started, float("inf")))
                            progress(f"probe failed: {exc}")

            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            value = os.urandom(args.value_bytes // 2).hex().encode()
            records = target_bytes // args.value_bytes + 1
            progress(f"producing {records} records of {args.value_bytes} bytes")
            started = time.time()
            with Producer(cluster.bootstrap, linger_ms=5, batch_size=args.value_bytes * 2,
                          max_request_bytes=4 * 2**20, buffer_memory=64 * 2**20) as producer:
                for i in range(records):
                    producer.send(topic, value, key=b"k%d" % (i % 16))
                    if i % 500 == 0:
                        progress(f"{i} of {records} sent")
                producer.flush()
            produce_s = time.time() - started
            progress("waiting for the snapshots to finish")
            deadline = time.time() + 600
            while time.time() < deadline:
                written = [e for e in log_events(cluster, topic) if e.get("event") == "snapshot_written"]
                if len({e["node"] for e in written}) == 3:
                    break
                time.sleep(2)
            time.sleep(3)
            stop.set()
            prober.join(timeout=70)
            events = log_events(cluster, topic)
        finally:
            cluster.stop_all()

    snapshots = []
    windows = []
    for end in (e for e in events if e.get("event") == "snapshot_written"):
        start = max((e for e in events if e.get("event") == "snapshot_started"
                     and e["node"] == end["node"] and e["time"] <= end["time"]),
                    key=lambda e: e["time"])
        windows.append((start["time"], end["time"]))
        during = [latency for when, latency in probes if start["time"] <= when <= end["time"]]
        snapshots.append({
            "node": end["node"], "bytes": int(end["bytes"]), "duration_ms": int(end["duration_ms"]),
            "probes_during": len(during),
            "probe_max_ms": round(max(during) * 1000, 1) if during else None,
        })
    first_leader = next((e["time"] for e in events if e.get("to") == "leader"), None)
    elections = [e for e in events if e.get("event") == "role_changed" and e.get("to") == "candidate"
                 and first_leader is not None and e["time"] > first_leader]
    transfers = [e["time"] for e in events if e.get("event") == "leadership_transfer"]
    election_details = [{
        "node": e["node"],
        "after_transfer_request": any(0 <= e["time"] - t <= 3 for t in transfers),
        "during_snapshot": any(start <= e["time"] <= end for start, end in windows),
    } for e in elections]
    finite = sorted(latency for _, latency in probes if latency != float("inf"))
    results = {
        "log_bytes": target_bytes, "produce_seconds": round(produce_s, 1),
        "snapshots": snapshots, "elections_after_first": len(elections),
        "elections": election_details,
        "probes": len(probes), "probes_failed": sum(1 for _, l in probes if l == float("inf")),
        "probe_p99_ms": round(finite[int(0.99 * (len(finite) - 1))] * 1000, 1) if finite else None,
        "probe_max_ms": round(finite[-1] * 1000, 1) if finite else None,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
