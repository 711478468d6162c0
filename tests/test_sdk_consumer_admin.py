"""Consumer, Admin and CLI against real three-node clusters on 127.0.0.1.

Most tests share one cluster and use a topic of their own. The consumer
failover test kills a partition leader of a fresh cluster, and the TLS
tests run a cluster whose nodes serve gRPC over TLS with a self-signed
certificate. Tests without the cluster mark contact no node.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import re
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import LocalCluster
from raftmq.client import (
    Admin,
    Consumer,
    ConsumerRecord,
    Producer,
    RaftMQError,
    TopicPartition,
    cli,
)
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

cluster_test = pytest.mark.cluster


def unused_address() -> str:
    """Return an address on 127.0.0.1 that was free a moment ago, so a connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def create_topic(bootstrap: str, name: str, partitions: int = 2, **options) -> None:
    with Admin(bootstrap) as admin:
        admin.create_topic(name, partitions=partitions, **options)


def produce(bootstrap: str, topic: str, partition: int, values: list[bytes], **options) -> list:
    """Send values to one partition and return their RecordMetadata, in order."""
    with Producer(bootstrap, retry_backoff_ms=20, retry_backoff_max_ms=200) as producer:
        futures = [producer.send(topic, value, partition=partition, **options) for value in values]
        producer.flush(timeout=60)
    return [future.result() for future in futures]


def poll_until(consumer: Consumer, count: int, timeout_s: float = 30) -> list[ConsumerRecord]:
    """Poll until `count` records arrived or timeout_s passed, and return what arrived."""
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        for partition_records in consumer.poll(timeout_ms=200).values():
            records.extend(partition_records)
    return records


# -- consumer ------------------------------------------------------------------------


@cluster_test
def test_poll_reads_assigned_partitions(shared_cluster):
    topic = "c-poll"
    bootstrap = shared_cluster.bootstrap
    create_topic(bootstrap, topic)
    produce(bootstrap, topic, 0, [b"a0", b"a1", b"a2"], timestamp_ms=7)
    produce(bootstrap, topic, 1, [b"b0"], key=b"k", headers=[("h", b"1")], timestamp_ms=7)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    with Consumer(bootstrap, fetch_max_wait_ms=50) as consumer:
        consumer.assign([p0, p1])
        records = poll_until(consumer, 4)
        position_0 = consumer.position(p0)
        position_1 = consumer.position(p1)
    assert sorted(r.value for r in records) == [b"a0", b"a1", b"a2", b"b0"]
    assert position_0 == 3
    assert position_1 == 1
    b0 = next(r for r in records if r.value == b"b0")
    assert b0 == ConsumerRecord(topic, 1, 0, b"k", b"b0", (("h", b"1"),), 7)
    assert next(r for r in records if r.value == b"a0").key is None


@cluster_test
def test_poll_honors_max_records(shared_cluster):
    topic = "c-max-records"
    create_topic(shared_cluster.bootstrap, topic, partitions=1)
    produce(shared_cluster.bootstrap, topic, 0, [b"%d" % i for i in range(10)])
    tp = TopicPartition(topic, 0)
    with Consumer(shared_cluster.bootstrap, fetch_max_wait_ms=50) as consumer:
        consumer.assign([tp])
        batches = []
        for limit in (4, 4, None):
            batch: dict = {}
            deadline = time.monotonic() + 30
            while not batch and time.monotonic() < deadline:
                batch = consumer.poll(timeout_ms=200, max_records=limit)
            batches.append([r.offset for r in batch.get(tp, [])])
        position = consumer.position(tp)
    assert batches[0] == [0, 1, 2, 3]
    assert batches[1] == [4, 5, 6, 7]
    assert batches[2] == [8, 9]
    assert position == 10


@cluster_test
def test_max_poll_records_caps_poll(shared_cluster):
    topic = "c-max-poll-records"
    create_topic(shared_cluster.bootstrap, topic, partitions=1)
    produce(shared_cluster.bootstrap, topic, 0, [b"%d" % i for i in range(5)])
    tp = TopicPartition(topic, 0)
    with Consumer(shared_cluster.bootstrap, fetch_max_wait_ms=50, max_poll_records=3) as consumer:
        consumer.assign([tp])
        first = poll_until(consumer, 1)
    assert [r.offset for r in first] == [0, 1, 2]


@cluster_test
def test_long_poll_returns_new_record(shared_cluster):
    topic = "c-long-poll"
    create_topic(shared_cluster.bootstrap, topic, partitions=1)
    tp = TopicPartition(topic, 0)
    with Consumer(shared_cluster.bootstrap, fetch_max_wait_ms=5000) as consumer:
        consumer.assign([tp])
        empty = consumer.poll(timeout_ms=0)
        produce(shared_cluster.bootstrap, topic, 0, [b"late"])
        records = poll_until(consumer, 1)
    assert empty == {}
    assert [r.value for r in records] == [b"late"]


@cluster_test
def test_latest_reset_skips_old_records(shared_cluster):
    topic = "c-latest"
    create_topic(shared_cluster.bootstrap, topic, partitions=1)
    produce(shared_cluster.bootstrap, topic, 0, [b"old"] * 5)
    tp = TopicPartition(topic, 0)
    with Consumer(shared_cluster.bootstrap, auto_offset_reset="latest",
                  fetch_max_wait_ms=50) as consumer:
        consumer.assign([tp])
        position = consumer.position(tp)
        produce(shared_cluster.bootstrap, topic, 0, [b"new"])
        records = poll_until(consumer, 1)
    assert position == 5
    assert [(r.offset, r.value) for r in records] == [(5, b"new")]


@cluster_test
def test_seek_past_end_resets_to_earliest(shared_cluster):
    topic = "c-past-end-earliest"
    create_topic(shared_cluster.bootstrap, topic, partitions=1)
    produce(shared_cluster.bootstrap, topic, 0, [b"%d" % i for i in range(6)])
    tp = TopicPartition(topic, 0)
    with Consumer(shared_cluster.bootstrap, fetch_max_wait_ms=50) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 100)
        records = poll_until(consumer, 6)
    assert [r.offset for r in records] == [0, 1, 2, 3, 4, 5]


@cluster_test
def test_seek_past_end_resets_to_latest(shared_cluster):
    topic = "c-past-end-latest"
    create_topic(shared_cluster.bootstrap, topic, partitions=1)
    produce(shared_cluster.bootstrap, topic, 0, [b"%d" % i for i in range(5)])
    tp = TopicPartition(topic, 0)
    with Consumer(shared_cluster.bootstrap, auto_offset_reset="latest",
                  fetch_max_wait_ms=50) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 50)
        empty = consumer.poll(timeout_ms=1000)
        position = consumer.position(tp)
        produce(shared_cluster.bootstrap, topic, 0, [b"next"])
        records = poll_until(consumer, 1)
    assert empty == {}
    assert position == 5
    assert [(r.offset, r.value) for r in records] == [(5, b"next")]


@cluster_test
def test_reset_none_raises(shared_cluster):
    topic = "c-reset-none"
    create_topic(shared_cluster.bootstrap, topic, partitions=1)
    produce(shared_cluster.bootstrap, topic, 0, [b"x"])
    tp = TopicPartition(topic, 0)
    with Consumer(shared_cluster.bootstrap, auto_offset_reset="none",
                  fetch_max_wait_ms=50) as consumer:
        consumer.assign([tp])
        with pytest.raises(RaftMQError) as no_position:
            consumer.poll(timeout_ms=100)
        # The high watermark is a valid position, because the next record goes there.
        consumer.seek(tp, 1)
        at_end = consumer.poll(timeout_ms=500)
        consumer.seek(tp, 9)
        with pytest.raises(RaftMQError) as out_of_range:
            for _ in range(50):
                consumer.poll(timeout_ms=100)
    assert no_position.value.reason == "INVALID_OFFSET"
    assert at_end == {}
    assert out_of_range.value.reason == "OFFSET_OUT_OF_RANGE"
    assert out_of_range.value.metadata["high_watermark"] == "1"


@cluster_test
def test_unknown_topic_raises(shared_cluster):
    tp = TopicPartition("c-missing", 0)
    with Consumer(shared_cluster.bootstrap, fetch_max_wait_ms=50) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        with pytest.raises(RaftMQError) as raised:
            for _ in range(50):
                consumer.poll(timeout_ms=100)
    assert raised.value.reason == "UNKNOWN_TOPIC"


@cluster_test
def test_offset_helpers(shared_cluster):
    topic = "c-offsets"
    create_topic(shared_cluster.bootstrap, topic)
    produce(shared_cluster.bootstrap, topic, 1, [b"v"] * 8)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    with Consumer(shared_cluster.bootstrap) as consumer:
        end = consumer.end_offsets([p0, p1])
        beginning = consumer.beginning_offsets([p0, p1])
        consumer.assign([p1])
        consumer.seek_to_end()
        at_end = consumer.position(p1)
        consumer.seek_to_beginning(p1)
        at_beginning = consumer.position(p1)
    assert end == {p0: 0, p1: 8}
    assert beginning == {p0: 0, p1: 0}
    assert at_end == 8
    assert at_beginning == 0


@cluster_test
def test_iteration_yields_in_offset_order(shared_cluster):
    topic = "c-iterate"
    create_topic(shared_cluster.bootstrap, topic, partitions=1)
    produce(shared_cluster.bootstrap, topic, 0, [b"%d" % i for i in range(5)])
    with Consumer(shared_cluster.bootstrap, fetch_max_wait_ms=50) as consumer:
        consumer.assign([TopicPartition(topic, 0)])
        offsets = []
        for record in consumer:
            offsets.append(record.offset)
            if len(offsets) == 5:
                break
    assert offsets == [0, 1, 2, 3, 4]


@cluster_test
def test_consumer_continues_after_leader_kill(cluster):
    topic = "c-failover"
    create_topic(cluster.bootstrap, topic, partitions=1, replication_factor=3)
    with Admin(cluster.bootstrap) as admin:
        leader = admin.describe_topic(topic).partitions[0].leader
    assert leader != 0, "partition 0 has no leader right after create_topic"
    expected = [b"v-%d" % i for i in range(100)]
    produce(cluster.bootstrap, topic, 0, expected[:50])
    tp = TopicPartition(topic, 0)
    with Consumer(cluster.bootstrap, fetch_max_wait_ms=1000) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        records = poll_until(consumer, 50)
        # Leaves a long-poll fetch in flight on the leader, which the kill breaks.
        records.extend(r for batch in consumer.poll(timeout_ms=100).values() for r in batch)
        cluster.kill(leader)
        produce(cluster.bootstrap, topic, 0, expected[50:])
        records.extend(poll_until(consumer, 50, timeout_s=60))
    with Admin(cluster.bootstrap) as admin:
        new_leader = admin.describe_topic(topic).partitions[0].leader
    assert new_leader not in (0, leader)
    assert [r.offset for r in records] == list(range(100))
    assert [r.value for r in records] == expected


@pytest.mark.parametrize(
    ("options", "error_type", "expected_text"),
    [
        ({"auto_offset_reset": "smallest"}, ValueError,
         "auto_offset_reset must be one of earliest, latest, none"),
        ({"fetch_max_bytes": 2**31}, ValueError, "fetch_max_bytes must be <= 2147483647"),
        ({"max_poll_records": 0}, ValueError, "max_poll_records must be >= 1, got 0"),
        ({"fetch_max_wait_ms": -1}, ValueError, "fetch_max_wait_ms must be >= 0, got -1"),
        ({"request_timeout_ms": "1s"}, TypeError, "request_timeout_ms must be an int"),
    ],
)
def test_consumer_rejects_invalid_options(options, error_type, expected_text):
    with pytest.raises(error_type) as raised:
        Consumer(unused_address(), **options)
    assert expected_text in str(raised.value)


def test_consumer_rejects_invalid_use():
    tp = TopicPartition("events", 0)
    with Consumer(unused_address()) as consumer:
        with pytest.raises(TypeError) as bad_assign:
            consumer.assign([("events", 0)])
        with pytest.raises(ValueError) as unassigned:
            consumer.seek(tp, 0)
        consumer.assign([tp])
        with pytest.raises(ValueError) as negative:
            consumer.seek(tp, -1)
    with pytest.raises(RaftMQError) as closed:
        consumer.poll()
    assert "assign() takes TopicPartition values" in str(bad_assign.value)
    assert "events[0] is not assigned" in str(unassigned.value)
    assert "offset must be >= 0, got -1" in str(negative.value)
    assert "the consumer is closed" in str(closed.value)


def test_topic_partition_rejects_negative():
    with pytest.raises(ValueError) as raised:
        TopicPartition("events", -1)
    assert "must be >= 0, got -1" in str(raised.value)


def test_assign_keeps_kept_positions():
    # A position set by seek() needs no node, so no call is made here.
    p0, p1 = TopicPartition("events", 0), TopicPartition("events", 1)
    with Consumer(unused_address(), request_timeout_ms=1000) as consumer:
        consumer.assign([p0, p1])
        consumer.seek(p0, 2)
        consumer.seek(p1, 5)
        consumer.assign([p0])
        assignment = consumer.assignment()
        position = consumer.position(p0)
    assert assignment == {p0}
    assert position == 2


# -- admin ---------------------------------------------------------------------------


@cluster_test
def test_admin_topic_lifecycle(shared_cluster):
    with Admin(shared_cluster.bootstrap) as admin:
        created = admin.create_topic("a-lifecycle", 3, replication_factor=3)
        described = admin.describe_topic("a-lifecycle")
        listed = admin.list_topics()
        with pytest.raises(RaftMQError) as exists:
            admin.create_topic("a-lifecycle", 1)
        admin.delete_topic("a-lifecycle")
        with pytest.raises(RaftMQError) as missing:
            admin.describe_topic("a-lifecycle")
        listed_after_delete = admin.list_topics()
    assert created.name == "a-lifecycle"
    assert [p.partition for p in created.partitions] == [0, 1, 2]
    assert created.replication_factor == 3
    assert created.topic_id != 0
    assert described.topic_id == created.topic_id
    assert described.max_message_bytes == 2**20
    for partition in described.partitions:
        assert sorted(partition.replicas) == [1, 2, 3]
        assert partition.leader in partition.replicas
    assert "a-lifecycle" in listed
    assert listed == sorted(listed)
    assert exists.value.reason == "TOPIC_ALREADY_EXISTS"
    assert missing.value.reason == "UNKNOWN_TOPIC"
    assert "a-lifecycle" not in listed_after_delete


@cluster_test
def test_admin_describes_cluster(shared_cluster):
    with Admin(shared_cluster.bootstrap) as admin:
        admin.create_topic("a-describe", 1)
        described = admin.describe_cluster()
    addresses = {node.node_id: node.address for node in described.nodes}
    assert addresses == {i: shared_cluster.address(i) for i in shared_cluster.node_ids}
    assert all(node.alive for node in described.nodes)
    assert described.controller in shared_cluster.node_ids
    assert described.node_id in shared_cluster.node_ids
    assert "a-describe" in [topic.name for topic in described.topics]


@cluster_test
def test_admin_skips_unreachable_node(shared_cluster):
    bootstrap = f"{unused_address()},{shared_cluster.address(2)}"
    with Admin(bootstrap, request_timeout_ms=5000) as admin:
        described = admin.describe_cluster()
    assert described.node_id == 2
    assert sorted(node.node_id for node in described.nodes) == [1, 2, 3]


@cluster_test
def test_admin_reports_server_reason(shared_cluster):
    with Admin(shared_cluster.bootstrap) as admin:
        with pytest.raises(RaftMQError) as raised:
            admin.create_topic("a-too-many-replicas", 1, replication_factor=5)
    assert raised.value.reason == "INVALID_REPLICATION_FACTOR"
    assert raised.value.metadata["nodes"] == "3"


@pytest.mark.parametrize(
    ("call", "error_type", "expected_text"),
    [
        (lambda admin: admin.create_topic("t", 0), ValueError, "partitions must be >= 1, got 0"),
        (lambda admin: admin.create_topic("t", 1, replication_factor=-1), ValueError,
         "replication_factor must be >= 0, got -1"),
        (lambda admin: admin.create_topic("", 1), ValueError, "topic name must be a non-empty str"),
        (lambda admin: admin.describe_topic(None), TypeError,
         "topic name must be a str, got NoneType"),
        (lambda admin: admin.delete_topic(7), TypeError, "topic name must be a str, got int"),
    ],
)
def test_admin_validates_arguments(call, error_type, expected_text):
    with Admin(unused_address()) as admin:
        with pytest.raises(error_type) as raised:
            call(admin)
    assert expected_text in str(raised.value)


# -- CLI round trips -------------------------------------------------------------------


def run_cli(argv: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
    """Run the CLI in this process with byte-level stdin and stdout, as a shell pipe would."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    stderr = io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin = SimpleNamespace(buffer=io.BytesIO(stdin))
    sys.stdout, sys.stderr = stdout, stderr
    try:
        code = cli.run(argv)
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    stdout.flush()
    return code, stdout.buffer.getvalue().decode("utf-8"), stderr.getvalue()


def table_rows(lines: list[str]) -> list[list[str]]:
    """Split the rows of an aligned table at the column starts of its header, lines[0]."""
    header = lines[0]
    starts = [match.start() for match in re.finditer(r"\S+(?: \S+)*", header)]
    bounds = list(zip(starts, starts[1:] + [None]))
    return [[line[start:end].strip() for start, end in bounds] for line in lines[1:]]


@cluster_test
def test_cli_produce_then_consume(shared_cluster):
    bootstrap = ["--bootstrap-servers", shared_cluster.bootstrap]
    create_topic(shared_cluster.bootstrap, "cli-round-trip")
    code, _, produce_err = run_cli(
        [*bootstrap, "produce", "cli-round-trip", "--key-separator", ":"],
        stdin=b"u1:hello\nu2:world:again\n",
    )
    consume_code, out, consume_err = run_cli([*bootstrap, "consume", "cli-round-trip",
                                              "--from-beginning", "--max-messages", "2",
                                              "--print-key"])
    assert code == 0
    assert "2 records acknowledged" in produce_err
    assert consume_code == 0
    assert sorted(out.splitlines()) == ["u1\thello", "u2\tworld:again"]
    assert "consumed 2 records" in consume_err


@cluster_test
def test_cli_consume_stops_after_timeout(shared_cluster):
    create_topic(shared_cluster.bootstrap, "cli-timeout")
    produce(shared_cluster.bootstrap, "cli-timeout", 1, [b"one", b"two"])
    code, out, _ = run_cli(["--bootstrap-servers", shared_cluster.bootstrap, "consume",
                            "cli-timeout", "--partition", "1", "--offset", "1",
                            "--timeout-ms", "300", "--print-offset"])
    assert code == 0
    assert out.splitlines() == ["1:1\ttwo"]


@cluster_test
def test_cli_produce_reports_bad_line(shared_cluster, tmp_path):
    create_topic(shared_cluster.bootstrap, "cli-bad-line", partitions=1)
    source = tmp_path / "lines.txt"
    source.write_bytes(b"k:v\nmissing separator\n")
    code, _, err = run_cli(["--bootstrap-servers", shared_cluster.bootstrap, "produce",
                            "cli-bad-line", "--key-separator", ":", "--file", str(source)])
    with Consumer(shared_cluster.bootstrap) as consumer:
        stored = consumer.end_offsets([TopicPartition("cli-bad-line", 0)])
    assert code == 1
    assert "1 records acknowledged" in err
    assert "error: INVALID_REQUEST: 1 records failed" in err
    assert "line 2 has no key separator ':'" in err
    assert stored == {TopicPartition("cli-bad-line", 0): 1}


@cluster_test
def test_cli_topic_commands(shared_cluster):
    bootstrap = ["--bootstrap-servers", shared_cluster.bootstrap]
    create_code, create_out, _ = run_cli([*bootstrap, "topic", "create", "cli-topics",
                                          "--partitions", "2", "--replication-factor", "3"])
    _, list_out, _ = run_cli([*bootstrap, "topic", "list"])
    describe_code, describe_out, _ = run_cli([*bootstrap, "topic", "describe", "cli-topics"])
    delete_code, _, _ = run_cli([*bootstrap, "topic", "delete", "cli-topics"])
    _, list_after_delete, _ = run_cli([*bootstrap, "topic", "list"])
    missing_code, _, missing_err = run_cli([*bootstrap, "topic", "delete", "cli-topics"])

    assert create_code == 0
    assert create_out == "created topic cli-topics with 2 partitions, replication factor 3\n"
    assert "cli-topics" in list_out.splitlines()
    assert describe_code == 0
    lines = describe_out.splitlines()
    assert lines[0].startswith("topic cli-topics: 2 partitions, replication factor 3, ")
    assert lines[1] == ("backlog limits: max backlog messages none, max backlog bytes none, "
                        "overflow policy reject, retention forever")
    assert lines[2].split() == [
        "PARTITION", "LEADER", "REPLICAS", "IN-SYNC", "HIGH", "WATERMARK", "TERM",
        "LOG", "START", "BACKLOG", "BACKLOG", "BYTES", "DROPPED", "REJECTED",
    ]
    rows = table_rows(lines[2:])
    assert [row[0] for row in rows] == ["0", "1"]
    for partition, leader, replicas, _, high_watermark, term, *backlog in rows:
        assert leader in ("1", "2", "3")
        assert sorted(replicas.split(",")) == ["1", "2", "3"]
        assert high_watermark == "0"
        assert int(term) >= 1
        assert backlog == ["0", "0", "0", "0", "0"]
    assert delete_code == 0
    assert "cli-topics" not in list_after_delete.splitlines()
    assert missing_code == 1
    assert missing_err.startswith("error: UNKNOWN_TOPIC: ")


@cluster_test
def test_cli_cluster_status(shared_cluster):
    create_topic(shared_cluster.bootstrap, "cli-status", partitions=1)
    code, out, _ = run_cli(["--bootstrap-servers", shared_cluster.address(1), "cluster", "status"])
    assert code == 0
    lines = out.splitlines()
    controller = re.fullmatch(r"controller: node (\d); reported by node 1", lines[0])
    assert controller is not None
    node_rows = table_rows(lines[1:5])
    expected_rows = [
        [str(i), shared_cluster.address(i), f"127.0.0.1:{shared_cluster.raft_bases[i]}", "yes",
         "controller" if str(i) == controller.group(1) else ""]
        for i in shared_cluster.node_ids
    ]
    assert node_rows == expected_rows
    topic_rows = table_rows(lines[6:])
    assert ["cli-status", "0"] in [row[:2] for row in topic_rows]


@cluster_test
def test_cli_produce_missing_topic_fails(shared_cluster):
    code, _, err = run_cli(["--bootstrap-servers", shared_cluster.bootstrap, "produce",
                            "cli-missing"], stdin=b"x\n")
    assert code == 1
    assert err.startswith("error: UNKNOWN_TOPIC: ")


@cluster_test
def test_raftmq_command_round_trip(shared_cluster):
    script = Path(sysconfig.get_path("scripts")) / "raftmq"
    assert script.exists(), f"the raftmq console script is not installed at {script}"
    bootstrap = ["--bootstrap-servers", shared_cluster.bootstrap]
    create = subprocess.run([str(script), *bootstrap, "topic", "create", "cli-process",
                             "--partitions", "1"], capture_output=True, timeout=60)
    produced = subprocess.run([str(script), *bootstrap, "produce", "cli-process"],
                              input=b"first\nsecond\n", capture_output=True, timeout=60)
    consumed = subprocess.run([str(script), *bootstrap, "consume", "cli-process",
                               "--from-beginning", "--max-messages", "2", "--print-offset"],
                              capture_output=True, timeout=60)
    assert create.returncode == 0, create.stderr
    assert produced.returncode == 0, produced.stderr
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stdout.splitlines() == [b"0:0\tfirst", b"0:1\tsecond"]


# -- TLS -------------------------------------------------------------------------------


def write_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for IP 127.0.0.1 and its key.

    Returns the paths as (certificate, key).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raftmq-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_path, key_path


class TlsCluster(LocalCluster):
    """A LocalCluster whose nodes serve gRPC over TLS, health checks included."""

    def __init__(self, base_dir: Path, cert_path: Path, key_path: Path):
        super().__init__(base_dir, extra_args=[
            "--tls-cert-file", str(cert_path), "--tls-key-file", str(key_path),
        ])
        self.ca_path = str(cert_path)
        self.credentials = grpc.ssl_channel_credentials(cert_path.read_bytes())

    def healthy(self, node_id: int) -> bool:
        with grpc.secure_channel(self.address(node_id), self.credentials) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = write_self_signed_certificate(directory)
    with TlsCluster(directory / "cluster", cert_path, key_path) as local:
        local.start_all()
        local.wait_healthy(timeout_s=60)
        yield local


@cluster_test
def test_tls_admin_and_cli(tls_cluster):
    with Admin(tls_cluster.bootstrap, ssl_cafile=tls_cluster.ca_path) as admin:
        admin.create_topic("tls-admin", 1)
        names = admin.list_topics()
    code, out, _ = run_cli(["--bootstrap-servers", tls_cluster.bootstrap,
                            "--ssl-cafile", tls_cluster.ca_path, "topic", "list"])
    assert "tls-admin" in names
    assert code == 0
    assert "tls-admin" in out.splitlines()


@cluster_test
def test_tls_rejects_plaintext_client(tls_cluster):
    with Admin(tls_cluster.bootstrap, request_timeout_ms=2000) as plaintext:
        with pytest.raises(RaftMQError) as raised:
            plaintext.list_topics()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


@cluster_test
def test_tls_produce_then_consume(tls_cluster):
    topic = "tls-round-trip"
    with Admin(tls_cluster.bootstrap, ssl_cafile=tls_cluster.ca_path) as admin:
        admin.create_topic(topic, 2)
    with Producer(tls_cluster.bootstrap, ssl_cafile=tls_cluster.ca_path) as producer:
        sent = [producer.send(topic, b"s-%d" % i, partition=i % 2) for i in range(10)]
        producer.flush(timeout=60)
    with Consumer(tls_cluster.bootstrap, ssl_cafile=tls_cluster.ca_path,
                  fetch_max_wait_ms=50) as consumer:
        consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        records = poll_until(consumer, 10)
    assert [future.exception() for future in sent] == [None] * 10
    assert sorted(r.value for r in records) == sorted(b"s-%d" % i for i in range(10))


@cluster_test
def test_tls_follower_forwards_produce(tls_cluster):
    topic = "tls-forward"
    with Admin(tls_cluster.bootstrap, ssl_cafile=tls_cluster.ca_path) as admin:
        admin.create_topic(topic, 1)
        leader = admin.describe_topic(topic).partitions[0].leader
    follower = next(i for i in tls_cluster.node_ids if i != leader)
    request = raftmq_pb2.ProduceRequest(topic=topic, partition=0,
                                        records=[raftmq_pb2.Record(value=b"forwarded")])
    with grpc.secure_channel(tls_cluster.address(follower), tls_cluster.credentials) as channel:
        response = raftmq_pb2_grpc.ProducerServiceStub(channel).Produce(request, timeout=30)
    assert [ack.offset for ack in response.acks] == [0]


def test_missing_cafile_is_rejected(tmp_path):
    with pytest.raises(ValueError) as raised:
        Admin("127.0.0.1:1", ssl_cafile=str(tmp_path / "absent.pem"))
    assert "cannot read ssl_cafile" in str(raised.value)
    assert "absent.pem" in str(raised.value)
