"""The client side of the `raftmq` command line: topics, produce, consume, status.

The node package adds the server commands (`raftmq node`, `raftmq cluster
up`) through the `server_commands` hook of build_parser() and run(), so
this module never imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import BinaryIO

from .admin import Admin, TopicDescription
from .consumer import Consumer
from .errors import RaftMQError
from .producer import Producer
from .types import ConsumerRecord, TopicPartition

BOOTSTRAP_SERVERS_ENV = "RAFTMQ_BOOTSTRAP_SERVERS"
DEFAULT_BOOTSTRAP_SERVERS = "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094"

# How long one consume poll waits, so Ctrl-C and --timeout-ms are noticed.
_CONSUME_POLL_MS = 500

ServerCommands = Callable[[dict[str, "argparse._SubParsersAction"]], None]


def build_parser(server_commands: ServerCommands | None = None) -> argparse.ArgumentParser:
    """Build the `raftmq` parser; each leaf command sets `func(args) -> exit code`.

    `server_commands`, when given, is called with {"": the top-level
    subparsers, "cluster": the subparsers of `raftmq cluster`} to add more.
    """
    parser = argparse.ArgumentParser(
        prog="raftmq", description="Manage topics and produce or consume records on a raftmq cluster."
    )
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get(BOOTSTRAP_SERVERS_ENV) or DEFAULT_BOOTSTRAP_SERVERS,
        metavar="HOST:PORT,...",
        help=f"comma-separated gRPC addresses of cluster nodes (default: ${BOOTSTRAP_SERVERS_ENV}, "
        f"else {DEFAULT_BOOTSTRAP_SERVERS})",
    )
    parser.add_argument(
        "--request-timeout-ms",
        type=_positive_int,
        default=30000,
        metavar="MS",
        help="deadline of each request to a node, in milliseconds (default: 30000)",
    )
    parser.add_argument(
        "--ssl-cafile",
        metavar="PATH",
        help="PEM file of root certificates; connects with TLS when given, in plaintext otherwise",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_topic_commands(commands)
    _add_produce_command(commands)
    _add_consume_command(commands)
    _add_group_commands(commands)
    cluster = commands.add_parser("cluster", help="inspect the cluster")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    status = cluster_commands.add_parser(
        "status", help="show nodes, the controller, and each partition's leader and replicas"
    )
    status.set_defaults(func=_cluster_status)
    if server_commands is not None:
        server_commands({"": commands, "cluster": cluster_commands})
    return parser


def run(argv: Sequence[str] | None = None, server_commands: ServerCommands | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the command, and return its exit code."""
    parser = build_parser(server_commands)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits with 2 on a usage error and 0 after --help.
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.func(args)
    except RaftMQError as error:
        _print_error(error.reason, error.message)
    except BrokenPipeError:
        # The reader of stdout went away (for example `| head`): not an error.
        sys.stderr.close()
        return 0
    except (ValueError, OSError) as error:
        _print_error("INVALID_REQUEST", str(error))
    except KeyboardInterrupt:
        return 130
    return 1


def main() -> None:
    sys.exit(run())


# -- parser sections -----------------------------------------------------------


def _add_topic_commands(commands: argparse._SubParsersAction) -> None:
    topic = commands.add_parser("topic", help="create, list, describe or delete topics")
    actions = topic.add_subparsers(dest="topic_command", metavar="ACTION", required=True)

    create = actions.add_parser("create", help="create a topic")
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--partitions", type=_positive_int, required=True, metavar="N", help="number of partitions"
    )
    create.add_argument(
        "--replication-factor",
        type=_non_negative_int,
        default=0,
        metavar="R",
        help="replicas per partition (default: 0, the cluster default)",
    )
    create.add_argument(
        "--max-message-bytes",
        type=_non_negative_int,
        default=0,
        metavar="B",
        help="largest record the topic accepts, in bytes (default: 0, the node default)",
    )
    create.set_defaults(func=_topic_create)

    list_ = actions.add_parser("list", help="print topic names, one per line")
    list_.set_defaults(func=_topic_list)

    describe = actions.add_parser("describe", help="show a topic's partitions")
    describe.add_argument("name", metavar="NAME")
    describe.set_defaults(func=_topic_describe)

    delete = actions.add_parser("delete", help="delete a topic and its records")
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(func=_topic_delete)


def _add_produce_command(commands: argparse._SubParsersAction) -> None:
    produce = commands.add_parser(
        "produce", help="send one record per input line, from stdin or a file"
    )
    produce.add_argument("topic", metavar="TOPIC")
    produce.add_argument(
        "--key-separator",
        metavar="SEP",
        help="split each line at the first SEP: the text before it is the key, the rest the value",
    )
    produce.add_argument("--file", metavar="PATH", help="read lines from PATH instead of stdin")
    produce.set_defaults(func=_produce)


def _add_consume_command(commands: argparse._SubParsersAction) -> None:
    consume = commands.add_parser("consume", help="print record values, one per line")
    consume.add_argument("topic", metavar="TOPIC")
    consume.add_argument(
        "--partition",
        type=_non_negative_int,
        action="extend",
        nargs="+",
        metavar="P",
        help="partitions to read (default: all partitions of the topic)",
    )
    start = consume.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the oldest stored record (default: only records produced from now on)",
    )
    start.add_argument(
        "--offset", type=_non_negative_int, metavar="N", help="start at offset N of every partition"
    )
    consume.add_argument(
        "--max-messages", type=_positive_int, metavar="N", help="exit after printing N records"
    )
    consume.add_argument(
        "--timeout-ms",
        type=_positive_int,
        metavar="T",
        help="exit when no record arrived for T milliseconds (default: wait forever)",
    )
    consume.add_argument(
        "--group",
        metavar="GROUP",
        help="consume as a member of consumer group GROUP: the group assigns partitions and "
        "the offsets of printed records are committed",
    )
    consume.add_argument("--print-key", action="store_true", help="print KEY<TAB> before each value")
    consume.add_argument(
        "--print-offset", action="store_true", help="print PARTITION:OFFSET<TAB> before each record"
    )
    consume.set_defaults(func=_consume)


def _add_group_commands(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("group", help="list, describe or reset consumer groups")
    actions = group.add_subparsers(dest="group_command", metavar="ACTION", required=True)

    list_ = actions.add_parser("list", help="print each group with its state and member count")
    list_.set_defaults(func=_group_list)

    describe = actions.add_parser(
        "describe", help="show a group's members, assignment, committed offsets and lag"
    )
    describe.add_argument("group", metavar="GROUP")
    describe.set_defaults(func=_group_describe)

    reset = actions.add_parser(
        "reset-offsets", help="set the committed offsets of a group that has no members"
    )
    reset.add_argument("group", metavar="GROUP")
    reset.add_argument("--topic", required=True, metavar="TOPIC")
    reset.add_argument(
        "--partition", type=_non_negative_int, action="extend", nargs="+", metavar="P",
        help="partitions to reset (default: all partitions of the topic)",
    )
    target = reset.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-earliest", action="store_true", help="the oldest stored record")
    target.add_argument("--to-latest", action="store_true", help="the end of each partition")
    target.add_argument("--to-offset", type=_non_negative_int, metavar="N",
                        help="offset N (clamped to each partition's range)")
    reset.set_defaults(func=_group_reset)


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


# -- commands ------------------------------------------------------------------


def _admin(args: argparse.Namespace) -> Admin:
    return Admin(
        args.bootstrap_servers,
        request_timeout_ms=args.request_timeout_ms,
        ssl_cafile=args.ssl_cafile,
    )


def _topic_create(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        topic = admin.create_topic(
            args.name,
            args.partitions,
            replication_factor=args.replication_factor,
            max_message_bytes=args.max_message_bytes,
        )
    print(
        f"created topic {topic.name} with {len(topic.partitions)} partitions, "
        f"replication factor {topic.replication_factor}"
    )
    return 0


def _topic_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        names = admin.list_topics()
    for name in names:
        print(name)
    return 0


def _topic_describe(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        topic = admin.describe_topic(args.name)
    limit = topic.max_message_bytes or "node default"
    print(
        f"topic {topic.name}: {len(topic.partitions)} partitions, replication factor "
        f"{topic.replication_factor}, max message bytes {limit}, id {topic.topic_id}"
    )
    print(format_table(_PARTITION_COLUMNS, _partition_rows([topic], with_topic=False)))
    return 0


def _group_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        groups = admin.list_groups()
    if not groups:
        print("no groups")
        return 0
    rows = [[g.group_id, g.state, str(g.members), str(g.generation)] for g in groups]
    print(format_table(["GROUP", "STATE", "MEMBERS", "GENERATION"], rows))
    return 0


def _group_describe(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        group = admin.describe_group(args.group)
    print(
        f"group {group.group_id}: {group.state}, generation {group.generation}, "
        f"{len(group.members)} members, strategy {group.assignment_strategy}, "
        f"auto_offset_reset {group.auto_offset_reset}"
    )
    if group.members:
        rows = [
            [m.member_id, m.instance_id or "-", ",".join(m.topics),
             " ".join(str(tp) for tp in m.partitions) or "-",
             " ".join(str(tp) for tp in m.revoking) or "-"]
            for m in group.members
        ]
        print(format_table(["MEMBER", "INSTANCE", "TOPICS", "PARTITIONS", "GIVING UP"], rows))
    if group.partitions:
        print()
        rows = [
            [p.topic, str(p.partition), p.member_id or "-",
             "-" if p.committed_offset is None else str(p.committed_offset),
             str(p.high_watermark), "-" if p.lag is None else str(p.lag)]
            for p in group.partitions
        ]
        print(format_table(["TOPIC", "PARTITION", "OWNER", "COMMITTED", "HIGH WATERMARK", "LAG"],
                           rows))
    return 0


def _group_reset(args: argparse.Namespace) -> int:
    to = "earliest" if args.to_earliest else "latest" if args.to_latest else args.to_offset
    with _admin(args) as admin:
        offsets = admin.reset_offsets(args.group, args.topic, to, partitions=args.partition)
    for partition, offset in sorted(offsets.items()):
        print(f"{args.topic}[{partition}] -> {offset}")
    return 0


def _topic_delete(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.delete_topic(args.name)
    print(f"deleted topic {args.name}")
    return 0


def _cluster_status(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        cluster = admin.describe_cluster()
    controller = f"node {cluster.controller}" if cluster.controller else "unknown (election running)"
    print(f"controller: {controller}; reported by node {cluster.node_id}")
    node_rows = [
        [
            str(node.node_id),
            node.address,
            node.raft_address,
            "yes" if node.alive else "no",
            "controller" if node.node_id == cluster.controller else "",
        ]
        for node in sorted(cluster.nodes, key=lambda n: n.node_id)
    ]
    print(format_table(["NODE", "ADDRESS", "RAFT ADDRESS", "ALIVE", "ROLE"], node_rows))
    if not cluster.topics:
        print("\nno topics")
        return 0
    topics = sorted(cluster.topics, key=lambda t: t.name)
    print()
    print(format_table(["TOPIC", *_PARTITION_COLUMNS], _partition_rows(topics, with_topic=True)))
    return 0


_PARTITION_COLUMNS = ["PARTITION", "LEADER", "REPLICAS", "IN-SYNC", "HIGH WATERMARK", "TERM"]


def _partition_rows(topics: Iterable[TopicDescription], *, with_topic: bool) -> list[list[str]]:
    rows = []
    for topic in topics:
        for p in topic.partitions:
            row = [
                str(p.partition),
                str(p.leader) if p.leader else "none",
                ",".join(map(str, p.replicas)),
                ",".join(map(str, p.in_sync_replicas)),
                str(p.high_watermark),
                str(p.raft_term),
            ]
            rows.append([topic.name, *row] if with_topic else row)
    return rows


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Align columns with two spaces between them, headers first."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)


class _DeliveryCounter:
    """Counts acks and failures from Future callbacks, which run on SDK threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acknowledged = 0
        self.failed = 0
        self.first_error: BaseException | None = None

    def record(self, future: Future) -> None:
        error = future.exception()
        with self._lock:
            if error is None:
                self.acknowledged += 1
            else:
                self.failed += 1
                self.first_error = self.first_error or error

    def add_failure(self, error: BaseException) -> None:
        with self._lock:
            self.failed += 1
            self.first_error = self.first_error or error


def _produce(args: argparse.Namespace) -> int:
    separator = args.key_separator.encode("utf-8") if args.key_separator is not None else None
    if separator == b"":
        raise ValueError("--key-separator must not be empty")
    counter = _DeliveryCounter()
    stopped_by: RaftMQError | None = None
    source: BinaryIO = open(args.file, "rb") if args.file else sys.stdin.buffer
    try:
        # The producer would wait max_block_ms for a missing topic to appear,
        # so a typo in the name is reported at once instead.
        with _admin(args) as admin:
            admin.describe_topic(args.topic)
        with Producer(
            args.bootstrap_servers,
            request_timeout_ms=args.request_timeout_ms,
            ssl_cafile=args.ssl_cafile,
        ) as producer:
            for line_number, line in enumerate(source, start=1):
                key, value, problem = _split_line(line, separator, line_number)
                if problem is not None:
                    counter.add_failure(problem)
                    continue
                try:
                    future = producer.send(args.topic, value, key=key)
                except RaftMQError as error:
                    # send() raises when the cluster cannot take records at all
                    # (unknown topic, buffer full), so later lines would fail too.
                    stopped_by = error
                    counter.add_failure(error)
                    break
                future.add_done_callback(counter.record)
    finally:
        if args.file:
            source.close()
    print(f"{counter.acknowledged} records acknowledged by {args.topic}", file=sys.stderr)
    if stopped_by is not None:
        _print_error(stopped_by.reason, f"stopped reading input: {stopped_by.message}")
        return 1
    if counter.failed:
        first = counter.first_error
        reason = getattr(first, "reason", "INVALID_REQUEST")
        message = getattr(first, "message", str(first))
        _print_error(reason, f"{counter.failed} records failed; first failure: {message}")
        return 1
    return 0


def _split_line(
    line: bytes, separator: bytes | None, line_number: int
) -> tuple[bytes | None, bytes, ValueError | None]:
    """Return (key, value, problem) for one input line without its line ending."""
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    if separator is None:
        return None, line, None
    key, found, value = line.partition(separator)
    if not found:
        return None, b"", ValueError(
            f"line {line_number} has no key separator {separator.decode('utf-8')!r}; "
            "the line was not sent"
        )
    return key, value, None


def _consume(args: argparse.Namespace) -> int:
    if args.group and (args.partition or args.offset is not None):
        print("error: --group cannot be combined with --partition or --offset; the group "
              "assigns partitions and keeps the offsets", file=sys.stderr)
        return 2
    consumer = Consumer(
        args.bootstrap_servers,
        request_timeout_ms=args.request_timeout_ms,
        ssl_cafile=args.ssl_cafile,
        auto_offset_reset=("earliest" if args.from_beginning else None if args.group else "latest"),
        group_id=args.group,
    )
    printed = 0
    try:
        if args.group:
            consumer.subscribe([args.topic])
            printed = _print_records(consumer, args)
            consumer.close()
            print(f"consumed {printed} records", file=sys.stderr)
            return 0
        partitions = args.partition
        if not partitions:
            with _admin(args) as admin:
                topic = admin.describe_topic(args.topic)
            partitions = [p.partition for p in topic.partitions]
        assignment = [TopicPartition(args.topic, p) for p in dict.fromkeys(partitions)]
        consumer.assign(assignment)
        if args.offset is not None:
            for tp in assignment:
                consumer.seek(tp, args.offset)
        printed = _print_records(consumer, args)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # The reader of stdout went away (for example `| head`). Pointing
        # stdout at /dev/null stops the interpreter's final flush from
        # raising the same error again at exit.
        _silence_stdout()
        return 0
    finally:
        consumer.close()
    print(f"consumed {printed} records", file=sys.stderr)
    return 0


def _print_records(consumer: Consumer, args: argparse.Namespace) -> int:
    output = getattr(sys.stdout, "buffer", None)
    printed = 0
    last_record_monotonic = time.monotonic()
    while args.max_messages is None or printed < args.max_messages:
        poll_ms = _CONSUME_POLL_MS
        if args.timeout_ms is not None:
            idle_ms = (time.monotonic() - last_record_monotonic) * 1000.0
            if idle_ms >= args.timeout_ms:
                break
            poll_ms = max(1, min(poll_ms, int(args.timeout_ms - idle_ms)))
        limit = None if args.max_messages is None else args.max_messages - printed
        batch = consumer.poll(timeout_ms=poll_ms, max_records=limit)
        for records in batch.values():
            for record in records:
                line = _format_record(record, args)
                if output is not None:
                    output.write(line)
                else:
                    sys.stdout.write(line.decode("utf-8", errors="replace"))
                printed += 1
        if batch:
            last_record_monotonic = time.monotonic()
            sys.stdout.flush()
    return printed


def _format_record(record: ConsumerRecord, args: argparse.Namespace) -> bytes:
    fields: list[bytes] = []
    if args.print_offset:
        fields.append(f"{record.partition}:{record.offset}".encode("ascii"))
    if args.print_key:
        fields.append(b"null" if record.key is None else record.key)
    fields.append(record.value)
    return b"\t".join(fields) + b"\n"


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file, so exit will not flush into a pipe


def _print_error(reason: str, message: str) -> None:
    print(f"error: {reason}: {message}", file=sys.stderr)


if __name__ == "__main__":
    main()
