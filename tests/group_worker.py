"""A consumer-group member run as its own process by tests/test_groups_cluster.py.

The worker subscribes to one topic, processes each record of a poll batch
(optionally sleeping per record to act as a slow handler), then commits
the batch synchronously, one partition at a time. It appends one JSON
object per line to the output file and flushes after each line, so a test
can read the file at any time, including after a kill -9:

- {"event": "assignment", "member_id": ..., "partitions": [...]} whenever
  the member id or the set of claimed partitions changes;
- {"event": "record", "partition": p, "offset": o, "key": k} per processed record;
- {"event": "commit", "partition": p, "offset": o} per partition of a
  successful commit, with the offset the cluster stored;
- {"event": "commit_failed", ...} and {"event": "poll_failed", ...} for errors;
- {"event": "stopped"} after SIGTERM, once the consumer has left the group.

SDK logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from raftmq.client import Consumer, RaftMQError, TopicPartition


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True, help="comma-separated host:port list")
    parser.add_argument("--group", required=True, help="consumer group id")
    parser.add_argument("--topic", required=True, help="topic to subscribe to")
    parser.add_argument("--output", required=True, help="file the JSON lines are appended to")
    parser.add_argument("--session-timeout-ms", type=int, default=3000)
    parser.add_argument("--max-poll-interval-ms", type=int, default=300_000)
    parser.add_argument("--record-sleep-ms", type=int, default=0,
                        help="time spent processing each record, in ms")
    parser.add_argument("--max-poll-records", type=int, default=500)
    parser.add_argument("--auto-offset-reset", default="earliest",
                        choices=("earliest", "latest", "none"))
    parser.add_argument("--client-id", default=None)
    return parser.parse_args(argv)


class Output:
    """The worker's JSON-lines file, flushed after every line."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")

    def write(self, event: str, **fields) -> None:
        fields = {"event": event, "time": time.time(), **fields}
        self._file.write(json.dumps(fields, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = False

    def request_stop(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    output = Output(args.output)
    output.write("started", pid=os.getpid(), group=args.group, topic=args.topic)
    consumer = Consumer(
        args.bootstrap,
        group_id=args.group,
        client_id=args.client_id,
        session_timeout_ms=args.session_timeout_ms,
        max_poll_interval_ms=args.max_poll_interval_ms,
        max_poll_records=args.max_poll_records,
        auto_offset_reset=args.auto_offset_reset,
        enable_auto_commit=False,
        fetch_max_wait_ms=200,
    )
    consumer.subscribe([args.topic])
    reported = None

    def report_assignment() -> None:
        nonlocal reported
        current = (consumer.member_id, sorted(tp.partition for tp in consumer.assignment()))
        if current != reported:
            reported = current
            output.write("assignment", member_id=current[0], partitions=current[1])

    report_assignment()
    while not stopping:
        try:
            batches = consumer.poll(timeout_ms=200)
        except RaftMQError as error:
            output.write("poll_failed", reason=error.reason, error=str(error))
            time.sleep(0.2)
            continue
        report_assignment()
        if not batches:
            continue
        next_offsets: dict[TopicPartition, int] = {}
        for tp, records in sorted(batches.items()):
            for record in records:
                if args.record_sleep_ms:
                    time.sleep(args.record_sleep_ms / 1000.0)
                key = record.key.decode() if record.key is not None else None
                output.write("record", partition=tp.partition, offset=record.offset, key=key)
            next_offsets[tp] = records[-1].offset + 1
        # One commit per partition, so that each success is logged even when
        # another partition of the batch was taken away meanwhile.
        for tp, offset in sorted(next_offsets.items()):
            try:
                committed = consumer.commit({tp: offset})
            except RaftMQError as error:
                output.write("commit_failed", partition=tp.partition, offset=offset,
                             reason=error.reason, error=str(error))
                continue
            output.write("commit", partition=tp.partition, offset=committed[tp])
    consumer.close()
    output.write("stopped")
    output.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
