"""The client side of the `raftmq` command line: topics, produce, consume, status.

The node package adds the server commands (`raftmq node`, `raftmq cluster
up`) through the `server_commands` hook of build_parser() and run(), so
this module never imports it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import BinaryIO

from raftmq.partition.codec import OVERFLOW_POLICIES, OVERFLOW_REJECT

from . import dlq
from .admin import Admin, TopicDescription
from .chaos_cli import add_chaos_command
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
    _add_dlq_commands(commands)
    add_chaos_command(commands)
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
    create.add_argument(
        "--max-backlog-messages",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="maximum records per partition from its log start offset on (default: 0, no limit)",
    )
    create.add_argument(
        "--max-backlog-bytes",
        type=_non_negative_int,
        default=0,
        metavar="B",
        help="maximum stored bytes per partition from its log start offset on, at least the "
        "max message bytes (default: 0, no limit)",
    )
    create.add_argument(
        "--overflow-policy",
        choices=OVERFLOW_POLICIES,
        default=OVERFLOW_REJECT,
        help="what a partition at a backlog limit does with new records: reject them "
        "(producers get BACKLOG_FULL) or drop the oldest records (default: reject)",
    )
    create.add_argument(
        "--retention-ms",
        type=_non_negative_int,
        default=0,
        metavar="MS",
        help="delete records older than MS milliseconds (default: 0, keep forever)",
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
        help="start at the oldest stored record (default: only records produced from now on); "
        "with --group, this sets the reset policy of a group that does not exist yet",
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


def _add_dlq_commands(commands: argparse._SubParsersAction) -> None:
    dlq = commands.add_parser("dlq", help="list, inspect, redrive or requeue dead letters")
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    def add_filters(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--since", type=_time_ms, metavar="TIME",
                            help="last failure at or after TIME (ISO 8601 or ms since the epoch)")
        parser.add_argument("--until", type=_time_ms, metavar="TIME",
                            help="last failure at or before TIME (ISO 8601 or ms since the epoch)")
        parser.add_argument("--error-contains", metavar="TEXT",
                            help="only dead letters whose error text contains TEXT")

    list_ = actions.add_parser("list", help="print one line per dead letter")
    list_.add_argument("topic", metavar="DLQ_TOPIC")
    add_filters(list_)
    list_.add_argument("--limit", type=_positive_int, metavar="N", help="print at most N")
    list_.set_defaults(func=_dlq_list)

    show = actions.add_parser("show", help="print one dead letter with all its metadata")
    show.add_argument("topic", metavar="DLQ_TOPIC")
    show.add_argument("partition", type=_non_negative_int, metavar="PARTITION")
    show.add_argument("offset", type=_non_negative_int, metavar="OFFSET")
    show.set_defaults(func=_dlq_show)

    redrive = actions.add_parser(
        "redrive", help="send dead letters back to their source topic (resumable, no duplicates)")
    redrive.add_argument("topic", metavar="DLQ_TOPIC")
    redrive.add_argument("--to", metavar="TOPIC", help="target topic (default: each record's source)")
    redrive.add_argument("--id", default="default", metavar="ID",
                         help="redrive name; a run with the same ID resumes where it stopped")
    redrive.add_argument("--rate", type=float, metavar="N", help="at most N records per second")
    add_filters(redrive)
    redrive.set_defaults(func=_dlq_redrive)

    requeue = actions.add_parser("requeue", help="send one dead letter back, by its coordinates")
    requeue.add_argument("topic", metavar="DLQ_TOPIC")
    requeue.add_argument("partition", type=_non_negative_int, metavar="PARTITION")
    requeue.add_argument("offset", type=_non_negative_int, metavar="OFFSET")
    requeue.add_argument("--to", metavar="TOPIC", help="target topic (default: the record's source)")
    requeue.set_defaults(func=_dlq_requeue)


def _time_ms(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ISO 8601 (2026-01-31T12:00:00+00:00) or ms since the epoch, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def _format_ms(ms: int) -> str:
    if not ms:
        return "-"
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds")


def _dlq_list(args: argparse.Namespace) -> int:
    letters = dlq.list_dead_letters(
        args.bootstrap_servers, args.topic, since_ms=args.since, until_ms=args.until,
        error_contains=args.error_contains, limit=args.limit,
        request_timeout_ms=args.request_timeout_ms, ssl_cafile=args.ssl_cafile,
    )
    rows = [
        [f"{d.dlq_partition}:{d.dlq_offset}", f"{d.source_topic}[{d.source_partition}]@{d.source_offset}",
         d.group, str(d.attempts), _format_ms(d.last_failure_ms), d.error[:60]]
        for d in letters
    ]
    if rows:
        print(format_table(["DLQ POSITION", "SOURCE", "GROUP", "ATTEMPTS", "LAST FAILURE", "ERROR"],
                           rows))
    print(f"{len(rows)} dead letters", file=sys.stderr)
    return 0


def _dlq_show(args: argparse.Namespace) -> int:
    letters = [d for d in dlq.list_dead_letters(
        args.bootstrap_servers, args.topic, request_timeout_ms=args.request_timeout_ms,
        ssl_cafile=args.ssl_cafile,
    ) if d.dlq_partition == args.partition and d.dlq_offset == args.offset]
    if not letters:
        _print_error("INVALID_OFFSET", f"no dead letter at {args.topic}[{args.partition}] offset "
                     f"{args.offset}")
        return 1
    letter = letters[0]
    for name in ("source_topic", "source_partition", "source_offset", "group", "attempts", "error"):
        print(f"{name}: {getattr(letter, name)}")
    for name in ("first_failure_ms", "last_failure_ms", "original_timestamp_ms", "timestamp_ms"):
        print(f"{name}: {getattr(letter, name)} ({_format_ms(getattr(letter, name))})")
    print(f"key: {letter.key!r}")
    print(f"value: {letter.value!r}")
    for key, value in letter.headers:
        print(f"header {key}: {value!r}")
    return 0


def _dlq_redrive(args: argparse.Namespace) -> int:
    def show(result: dlq.RedriveResult) -> None:
        print(f"scanned {result.scanned}, redriven {result.redriven}, skipped {result.skipped}",
              file=sys.stderr)

    result = dlq.redrive(
        args.bootstrap_servers, args.topic, args.to, redrive_id=args.id, since_ms=args.since,
        until_ms=args.until, error_contains=args.error_contains, rate_per_s=args.rate,
        progress=show, request_timeout_ms=args.request_timeout_ms, ssl_cafile=args.ssl_cafile,
    )
    print(f"redrive {args.id}: scanned {result.scanned}, redriven {result.redriven} "
          f"({result.already_written} already written by an earlier run), skipped "
          f"{result.skipped}")
    return 0


def _dlq_requeue(args: argparse.Namespace) -> int:
    partition, offset = dlq.requeue(
        args.bootstrap_servers, args.topic, args.partition, args.offset, args.to,
        request_timeout_ms=args.request_timeout_ms, ssl_cafile=args.ssl_cafile,
    )
    target = args.to or "its source topic"
    where = f"partition {partition}" + (f" offset {offset}" if offset >= 0 else "")
    print(f"requeued {args.topic}[{args.partition}]@{args.offset} to {target}, {where}")
    return 0


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
            max_backlog_messages=args.max_backlog_messages,
            max_backlog_bytes=args.max_backlog_bytes,
            overflow_policy=args.overflow_policy,
            retention_ms=args.retention_ms,
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
    print(
        f"backlog limits: max backlog messages {topic.max_backlog_messages or 'none'}, "
        f"max backlog bytes {topic.max_backlog_bytes or 'none'}, "
        f"overflow policy {topic.overflow_policy}, retention "
        f"{f'{topic.retention_ms} ms' if topic.retention_ms else 'forever'}"
    )
    rows = [
        [*row, str(p.log_start_offset), str(p.backlog_messages), str(p.backlog_bytes),
         str(p.dropped_records), str(p.rejected_records)]
        for row, p in zip(_partition_rows([topic], with_topic=False), topic.partitions)
    ]
    print(format_table(_PARTITION_COLUMNS + _BACKLOG_COLUMNS, rows))
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
        f"auto_offset_reset {group.auto_offset_reset}, delivery mode {group.delivery_mode}"
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
        acks = group.delivery_mode == "acks"
        headers = ["TOPIC", "PARTITION", "OWNER", "COMMITTED", "HIGH WATERMARK", "LAG"]
        if acks:
            headers += ["IN FLIGHT", "WAITING RETRY", "DLQ PENDING", "DEAD-LETTERED"]
        rows = []
        for p in group.partitions:
            row = [p.topic, str(p.partition), p.member_id or "-",
                   "-" if p.committed_offset is None else str(p.committed_offset),
                   str(p.high_watermark), "-" if p.lag is None else str(p.lag)]
            if acks:
                row += [str(p.in_flight), str(p.waiting_retry), str(p.dead_letter_pending),
                        str(p.dead_lettered)]
            rows.append(row)
        print(format_table(headers, rows))
    return 0


def _group_reset(args: argparse.Namespace) -> int:
    if args.to_earliest:
        to = "earliest"
    elif args.to_latest:
        to = "latest"
    else:
        to = args.to_offset
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
_BACKLOG_COLUMNS = ["LOG START", "BACKLOG", "BACKLOG BYTES", "DROPPED", "REJECTED"]


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


def _consume_reset(args: argparse.Namespace) -> str | None:
    """Pick auto_offset_reset: a group keeps its own unless --from-beginning is given."""
    if args.from_beginning:
        return "earliest"
    return None if args.group else "latest"


def _consume(args: argparse.Namespace) -> int:
    if args.group and (args.partition or args.offset is not None):
        print("error: --group cannot be combined with --partition or --offset; the group "
              "assigns partitions and keeps the offsets", file=sys.stderr)
        return 2
    consumer = Consumer(
        args.bootstrap_servers,
        request_timeout_ms=args.request_timeout_ms,
        ssl_cafile=args.ssl_cafile,
        auto_offset_reset=_consume_reset(args),
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
