"""Parsing and error output of the `raftmq` command line, with no cluster."""

from __future__ import annotations

import argparse
import socket

import pytest

from raftmq.client import cli


def unused_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Yield (command path, parser) for every parser without subcommands."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
        return
    for action in subparsers:
        for name, child in action.choices.items():
            yield from leaf_parsers(child, (*path, name))


def test_every_leaf_command_sets_func():
    leaves = dict(leaf_parsers(cli.build_parser()))
    assert set(leaves) == {
        ("topic", "create"),
        ("topic", "list"),
        ("topic", "describe"),
        ("topic", "delete"),
        ("produce",),
        ("consume",),
        ("cluster", "status"),
        ("group", "list"),
        ("group", "describe"),
        ("group", "reset-offsets"),
        ("dlq", "list"),
        ("dlq", "show"),
        ("dlq", "redrive"),
        ("dlq", "requeue"),
        ("chaos",),
    }
    for path, parser in leaves.items():
        assert callable(parser.get_default("func")), path


def test_topic_create_arguments():
    args = cli.build_parser().parse_args(
        ["topic", "create", "orders", "--partitions", "6", "--replication-factor", "3",
         "--max-message-bytes", "2048"]
    )
    assert args.name == "orders"
    assert args.partitions == 6
    assert args.replication_factor == 3
    assert args.max_message_bytes == 2048
    assert args.func is cli._topic_create


def test_topic_create_defaults():
    args = cli.build_parser().parse_args(["topic", "create", "orders", "--partitions", "1"])
    assert args.replication_factor == 0
    assert args.max_message_bytes == 0


@pytest.mark.parametrize(
    ("argv", "expected_text"),
    [
        (["topic", "create", "orders"], "the following arguments are required: --partitions"),
        (["topic", "create", "orders", "--partitions", "0"], "expected an integer >= 1, got '0'"),
        (["topic", "create", "orders", "--partitions", "two"], "expected an integer, got 'two'"),
        (["topic", "create", "orders", "--partitions", "1", "--replication-factor", "-1"],
         "expected an integer >= 0, got '-1'"),
        (["topic"], "the following arguments are required: ACTION"),
        ([], "the following arguments are required: COMMAND"),
        (["consume", "t", "--from-beginning", "--offset", "3"], "not allowed with argument"),
        (["consume", "t", "--partition"], "expected at least one argument"),
        (["consume", "t", "--max-messages", "0"], "expected an integer >= 1"),
        (["cluster"], "the following arguments are required: ACTION"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2(argv, expected_text, capsys):
    assert cli.run(argv) == 2
    assert expected_text in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.run(["--help"]) == 0
    assert "--bootstrap-servers" in capsys.readouterr().out


def test_consume_arguments():
    args = cli.build_parser().parse_args(
        ["consume", "orders", "--partition", "0", "1", "--partition", "3", "--offset", "42",
         "--max-messages", "10", "--timeout-ms", "500", "--print-key", "--print-offset"]
    )
    assert args.topic == "orders"
    assert args.partition == [0, 1, 3]
    assert args.offset == 42
    assert not args.from_beginning
    assert args.max_messages == 10
    assert args.timeout_ms == 500
    assert args.print_key
    assert args.print_offset


def test_consume_defaults():
    args = cli.build_parser().parse_args(["consume", "orders"])
    assert args.partition is None
    assert args.offset is None
    assert not args.from_beginning
    assert args.max_messages is None
    assert args.timeout_ms is None


def test_produce_arguments():
    args = cli.build_parser().parse_args(
        ["produce", "orders", "--key-separator", ":", "--file", "in.txt"]
    )
    assert args.topic == "orders"
    assert args.key_separator == ":"
    assert args.file == "in.txt"
    assert args.func is cli._produce


def test_bootstrap_default_without_env(monkeypatch):
    monkeypatch.delenv(cli.BOOTSTRAP_SERVERS_ENV, raising=False)
    args = cli.build_parser().parse_args(["topic", "list"])
    assert args.bootstrap_servers == "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094"


def test_bootstrap_default_from_env(monkeypatch):
    monkeypatch.setenv(cli.BOOTSTRAP_SERVERS_ENV, "10.0.0.1:1,10.0.0.2:2")
    args = cli.build_parser().parse_args(["topic", "list"])
    assert args.bootstrap_servers == "10.0.0.1:1,10.0.0.2:2"


def test_bootstrap_option_beats_env(monkeypatch):
    monkeypatch.setenv(cli.BOOTSTRAP_SERVERS_ENV, "10.0.0.1:1")
    args = cli.build_parser().parse_args(["--bootstrap-servers", "127.0.0.1:7", "topic", "list"])
    assert args.bootstrap_servers == "127.0.0.1:7"


def test_server_commands_hook_adds_commands():
    received = {}

    def add_server_commands(subparsers):
        received.update(subparsers)
        node = subparsers[""].add_parser("node")
        node.set_defaults(func=lambda args: 0)
        up = subparsers["cluster"].add_parser("up")
        up.add_argument("--nodes", type=int, default=3)
        up.set_defaults(func=lambda args: 0)

    parser = cli.build_parser(add_server_commands)
    assert set(received) == {"", "cluster"}
    assert parser.parse_args(["cluster", "up", "--nodes", "5"]).nodes == 5
    assert parser.parse_args(["cluster", "status"]).func is cli._cluster_status
    assert cli.run(["node"], server_commands=add_server_commands) == 0


def test_node_package_hook_registers():
    from raftmq.node.cli import register_server_commands

    leaves = dict(leaf_parsers(cli.build_parser(register_server_commands)))
    assert ("node",) in leaves
    assert ("cluster", "up") in leaves
    assert ("cluster", "status") in leaves


def test_unreachable_cluster_prints_one_error_line(capsys):
    argv = ["--bootstrap-servers", unused_address(), "--request-timeout-ms", "2000", "topic", "list"]
    assert cli.run(argv) == 1
    err_lines = capsys.readouterr().err.splitlines()
    assert len(err_lines) == 1
    assert err_lines[0].startswith("error: LEADER_NOT_AVAILABLE: ")


def test_invalid_bootstrap_prints_error(capsys):
    assert cli.run(["--bootstrap-servers", "nohost", "topic", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_REQUEST: invalid bootstrap server address 'nohost'")


def test_missing_input_file_prints_error(tmp_path, capsys):
    missing = tmp_path / "absent.txt"
    argv = ["--bootstrap-servers", unused_address(), "produce", "t", "--file", str(missing)]
    assert cli.run(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_REQUEST: ")
    assert "absent.txt" in err


@pytest.mark.parametrize(
    ("line", "separator", "expected"),
    [
        (b"hello\n", None, (None, b"hello")),
        (b"hello\r\n", None, (None, b"hello")),
        (b"no newline", None, (None, b"no newline")),
        (b"\n", None, (None, b"")),
        (b"user-1:clicked:twice\n", b":", (b"user-1", b"clicked:twice")),
        (b":value\n", b":", (b"", b"value")),
        (b"k=>v\n", b"=>", (b"k", b"v")),
    ],
)
def test_split_line_cases(line, separator, expected):
    key, value, problem = cli._split_line(line, separator, line_number=1)
    assert problem is None
    assert (key, value) == expected


def test_split_line_without_separator():
    _, _, problem = cli._split_line(b"no separator here\n", b"|", line_number=7)
    assert isinstance(problem, ValueError)
    assert "line 7 has no key separator '|'" in str(problem)


def test_format_table_aligns_columns():
    table = cli.format_table(["ID", "ADDRESS"], [["1", "127.0.0.1:9092"], ["10", "h:1"]])
    assert table.splitlines() == [
        "ID  ADDRESS",
        "1   127.0.0.1:9092",
        "10  h:1",
    ]


def test_group_reset_needs_one_target():
    parser = cli.build_parser()
    args = parser.parse_args(["group", "reset-offsets", "billing", "--topic", "orders",
                              "--to-offset", "7", "--partition", "0", "2"])
    assert args.group == "billing"
    assert args.to_offset == 7
    assert args.partition == [0, 2]
    assert args.func is cli._group_reset
    with pytest.raises(SystemExit):
        parser.parse_args(["group", "reset-offsets", "billing", "--topic", "orders"])
    with pytest.raises(SystemExit):
        parser.parse_args(["group", "reset-offsets", "billing", "--topic", "orders",
                           "--to-earliest", "--to-latest"])


def test_dlq_redrive_filters_parse_times():
    args = cli.build_parser().parse_args(
        ["dlq", "redrive", "orders.dlq", "--to", "orders", "--id", "fix-1", "--rate", "50",
         "--since", "2026-12-01T00:00:00+00:00", "--until", "1796400000000",
         "--error-contains", "timeout"])
    assert args.since == 1796083200000
    assert args.until == 1796400000000
    assert args.rate == 50.0
    assert args.id == "fix-1"
    assert args.error_contains == "timeout"
    assert args.func is cli._dlq_redrive


def test_dlq_time_without_zone_is_utc():
    assert cli._time_ms("2026-12-01T00:00:00") == 1796083200000


def test_dlq_time_rejects_text():
    with pytest.raises(argparse.ArgumentTypeError):
        cli._time_ms("yesterday")


def test_consume_group_excludes_partition(capsys):
    code = cli.run(["--bootstrap-servers", unused_address(), "consume", "orders",
                    "--group", "billing", "--partition", "0"])
    assert code == 2
    assert "--group cannot be combined" in capsys.readouterr().err
