"""Chaos suite: faults on a schedule while keyed traffic flows, then a checker.

test_chaos_profile runs the workload of raftmq.client.chaos against three
node processes, each in its own network namespace (tests/chaos_net.py), and
injects SIGKILL of partition leaders and of the metadata leader, SIGSTOP
pauses and network partitions. Without root or nftables the nodes run on
127.0.0.1 and the partition faults are left out. Environment:

- RAFTMQ_CHAOS_SECONDS: length of the fault phase (default 60, the CI
  profile; 1800 or more is the long run of docs/chaos.md);
- RAFTMQ_CHAOS_SEED: the seed (default: drawn at random and printed);
- RAFTMQ_CHAOS_RATE: records per second over all producers (default 150);
- RAFTMQ_CHAOS_RESULTS: the JSON results file (default: in the test's
  temporary folder);
- RAFTMQ_CHAOS_DIR: folder for node data and logs (default: the test's
  temporary folder, which pytest removes after a few more sessions).

test_isolated_leader_acknowledges_nothing cuts one partition leader off
from its peers while the test process can still reach it, and shows that
its produce calls fail while the majority goes on, and that the node
catches up once the partition heals.

The checker tests at the end feed the checker made-up observations, to
show that each kind of problem is caught.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shlex
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from chaos_net import ClusterFaults, NamespaceCluster, NodeNetwork, remove_stale_namespaces
from chaos_net import unavailable_reason as namespaces_unavailable
from cluster import LocalCluster
from raftmq.client import Admin, Consumer, Producer, TopicPartition
from raftmq.client.chaos import ChaosSettings, run_chaos, wait_replicas_agree
from raftmq.client.chaos_check import StoredDeadLetter, StoredRecord, check
from raftmq.client.chaos_faults import (
    FAULT_KINDS,
    PARTITION,
    CommandTarget,
    FaultSettings,
    kinds_supported,
)
from raftmq.client.chaos_workload import (
    ACKS_GROUP,
    OFFSETS_GROUP,
    AckedRecord,
    GroupObservations,
    always_fails,
    parse_value,
    record_value,
)
from raftmq.client.errors import from_rpc_error
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

SECONDS_ENV = "RAFTMQ_CHAOS_SECONDS"
SEED_ENV = "RAFTMQ_CHAOS_SEED"
RATE_ENV = "RAFTMQ_CHAOS_RATE"
RESULTS_ENV = "RAFTMQ_CHAOS_RESULTS"
DIR_ENV = "RAFTMQ_CHAOS_DIR"
DEFAULT_SECONDS = 60.0
DEFAULT_RATE = 150.0
HEALTHY_TIMEOUT_S = 60


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid {name} {text!r}: expected a number, for example "
                         f"{name}={default:g}") from None
    if value <= 0:
        raise ValueError(f"invalid {name} {value:g}: must be > 0")
    return value


def chaos_seed() -> int:
    text = os.environ.get(SEED_ENV, "").strip()
    if not text:
        return random.SystemRandom().randrange(2**32)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"invalid {SEED_ENV} {text!r}: expected an integer") from None


def replay_command(seed: int, seconds: float, rate: float, test_id: str) -> str:
    return (f"{SEED_ENV}={seed} {SECONDS_ENV}={seconds:g} {RATE_ENV}={rate:g} "
            f"python -m pytest {shlex.quote(test_id)}")


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def chaos_cluster(base_dir: Path, with_network: bool) -> Iterator[tuple[LocalCluster, NodeNetwork | None]]:
    """Start three nodes, in namespaces when with_network; remove everything on exit.

    SIGTERM becomes SystemExit meanwhile, so that a terminated test run still
    stops its nodes and deletes its namespaces.
    """
    previous_handler = signal.getsignal(signal.SIGTERM)
    if previous_handler is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    network = None
    try:
        if with_network:
            remove_stale_namespaces()
            network = NodeNetwork([1, 2, 3]).create()
        cluster = (NamespaceCluster(base_dir, network) if network is not None
                   else LocalCluster(base_dir))
        with cluster:
            cluster.start_all()
            cluster.wait_healthy(timeout_s=HEALTHY_TIMEOUT_S)
            yield cluster, network
    finally:
        if previous_handler is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if network is not None:
            network.close()
            leftovers = network.leftovers()
            assert leftovers == [], f"namespaces or links left behind: {leftovers}"


def chaos_dir(tmp_path: Path, name: str) -> Path:
    root = os.environ.get(DIR_ENV, "").strip()
    if not root:
        return tmp_path / name
    path = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def print_line(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


@pytest.mark.chaos
@pytest.mark.cluster
def test_chaos_profile(tmp_path, request):
    seconds = _env_number(SECONDS_ENV, DEFAULT_SECONDS)
    rate = _env_number(RATE_ENV, DEFAULT_RATE)
    seed = chaos_seed()
    results = os.environ.get(RESULTS_ENV, "").strip() or str(tmp_path / "chaos-result.json")
    reason = namespaces_unavailable()
    base_dir = chaos_dir(tmp_path, "chaos")
    print_line(f"chaos seed {seed}, {seconds:g} s of faults, node logs in {base_dir}, "
               f"results in {results}" + (f"; no partitions: {reason}" if reason else ""))
    settings = ChaosSettings(
        bootstrap="", seed=seed, duration_s=seconds, rate_per_s=rate,
        # A long run builds a backlog in the acks group while faults
        # slow it down; it gets time in proportion to finish it.
        drain_timeout_s=max(180.0, seconds / 2),
        results_path=results,
        replay_command=replay_command(seed, seconds, rate, request.node.nodeid),
    )
    with chaos_cluster(base_dir, with_network=reason is None) as (cluster, network):
        target = ClusterFaults(cluster, network, healthy_timeout_s=HEALTHY_TIMEOUT_S)
        settings = dataclasses.replace(settings, bootstrap=cluster.bootstrap)
        result = run_chaos(settings, target, log=print_line)

    message = result.failure_message() + f"\nnode logs: {base_dir}\nresults: {results}"
    assert result.error is None, message
    assert result.records_acknowledged > 0, message
    assert result.lost == 0, message
    assert result.duplicated == 0, message
    assert result.order_violations == 0, message
    assert result.dead_letters_missing == 0, message
    assert result.dead_letters_doubled == 0, message
    assert result.unconsumed == 0, message
    assert result.unsettled == 0, message
    assert result.diverged == [], message
    assert result.not_healed == 0, message
    expected_kinds = set(kinds_supported(target))
    assert expected_kinds == (set(FAULT_KINDS) if network else set(FAULT_KINDS) - {PARTITION})
    injected = {kind for kind, count in result.faults.items() if count}
    assert injected == expected_kinds, message
    assert result.passed, message


# -- a minority partition ----------------------------------------------------------

TOPIC = "minority"
ISOLATION_S = 12.0
PRODUCE_DEADLINE_S = 3.0


def produce_raw(address: str, partition: int, value: bytes) -> raftmq_pb2.ProduceResponse:
    """Send one record straight to the node at `address`, without retries."""
    with grpc.insecure_channel(address) as channel:
        return raftmq_pb2_grpc.ProducerServiceStub(channel).Produce(
            raftmq_pb2.ProduceRequest(topic=TOPIC, partition=partition,
                                      records=[raftmq_pb2.Record(value=value)]),
            timeout=PRODUCE_DEADLINE_S)


def read_values(bootstrap: str, partition: int) -> list[bytes]:
    tp = TopicPartition(TOPIC, partition)
    values = []
    with Consumer(bootstrap, fetch_max_wait_ms=200) as consumer:
        consumer.assign([tp])
        consumer.seek_to_beginning()
        end = consumer.end_offsets([tp])[tp]
        deadline = time.monotonic() + 60
        while consumer.position(tp) < end:
            assert time.monotonic() < deadline, f"reading {tp} did not reach offset {end}"
            for records in consumer.poll(timeout_ms=300).values():
                values.extend(record.value for record in records)
    return values


def replica_of(address: str, partition: int) -> raftmq_pb2.ReplicaInfo | None:
    with grpc.insecure_channel(address) as channel:
        response = raftmq_pb2_grpc.AdminServiceStub(channel).DescribeReplicas(
            raftmq_pb2.DescribeReplicasRequest(include_digest=True), timeout=10)
    return next((r for r in response.replicas
                 if r.topic == TOPIC and r.partition == partition), None)


@pytest.mark.chaos
@pytest.mark.cluster
def test_isolated_leader_acknowledges_nothing(tmp_path):
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"needs network namespaces: {reason}")
    with chaos_cluster(tmp_path / "minority", with_network=True) as (cluster, network):
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic(TOPIC, partitions=1, replication_factor=3)
            leader = admin.describe_topic(TOPIC).partitions[0].leader
        assert leader != 0, "partition 0 has no leader after create_topic"
        assert produce_raw(cluster.address(leader), 0, b"before").acks

        majority = ",".join(cluster.address(n) for n in cluster.node_ids if n != leader)
        network.isolate(leader)
        outcomes: list[str] = []
        acked_by_isolated: list[bytes] = []
        acked_by_majority = []
        with Producer(majority, linger_ms=5, request_timeout_ms=5000,
                      delivery_timeout_ms=60000) as producer:
            deadline = time.monotonic() + ISOLATION_S
            sequence = 0
            while time.monotonic() < deadline:
                value = f"sent-to-isolated-{sequence}".encode()
                sequence += 1
                try:
                    produce_raw(cluster.address(leader), 0, value)
                except grpc.RpcError as error:
                    outcomes.append(f"{error.code().name} {from_rpc_error(error).reason}")
                else:
                    acked_by_isolated.append(value)
                future = producer.send(TOPIC, f"sent-to-majority-{sequence}".encode(), partition=0)
                future.add_done_callback(acked_by_majority.append)
            producer.flush(timeout=60)
        network.heal(leader)
        print_line(f"calls to the isolated node {leader}: {dict(Counter(outcomes))}")

        assert acked_by_isolated == [], (
            f"the isolated leader (node {leader}) acknowledged {len(acked_by_isolated)} records")
        assert len(outcomes) >= 3, f"only {len(outcomes)} produce calls reached the isolated node"
        majority_acks = [f for f in acked_by_majority if f.exception() is None]
        assert majority_acks, "the majority acknowledged nothing while the leader was isolated"

        # The old leader catches up: every replica ends with the same log.
        diverged, detail = wait_replicas_agree(cluster.bootstrap, {TOPIC}, 3, timeout_s=90)
        assert diverged == [], f"replicas still differ after the partition healed: {detail}"
        rejoined = replica_of(cluster.address(leader), 0)
        assert rejoined is not None
        values = read_values(cluster.bootstrap, 0)
        assert rejoined.high_watermark == len(values)
        assert not [v for v in values if v.startswith(b"sent-to-isolated-")], (
            "a record sent to the isolated leader was committed after the partition healed")
        for future in majority_acks:
            assert values[future.result().offset].startswith(b"sent-to-majority-")


# -- raftmq chaos -------------------------------------------------------------------


@pytest.mark.chaos
@pytest.mark.cluster
def test_chaos_command_pauses_nodes_through_templates(cluster, tmp_path):
    from raftmq.client.cli import run

    for node_id, process in cluster.processes.items():
        (tmp_path / f"node{node_id}.pid").write_text(str(process.pid))
    results = tmp_path / "cli-result.json"
    pid_file = shlex.quote(str(tmp_path)) + "/node{node}.pid"
    code = run([
        "--bootstrap-servers", cluster.bootstrap, "chaos", "--seed", "11",
        "--duration-s", "15", "--rate", "60", "--results", str(results),
        "--fault", f"pause=kill -STOP $(cat {pid_file})",
        "--fault", f"resume=kill -CONT $(cat {pid_file})",
    ])
    result = json.loads(results.read_text())
    assert code == 0, result["summary"]
    assert result["passed"], result["summary"]
    assert result["faults"] == {"pause": result["faults"]["pause"]}
    assert result["faults"]["pause"] >= 1
    assert result["records_acknowledged"] > 0
    assert result["lost"] == 0
    assert "--seed 11" in result["replay_command"]
    assert all(cluster.is_running(node_id) for node_id in cluster.node_ids)


def test_chaos_command_rejects_faults_without_templates(capsys):
    from raftmq.client.cli import run

    assert run(["--bootstrap-servers", "127.0.0.1:1", "chaos", "--duration-s", "1"]) == 1
    assert "--no-faults" in capsys.readouterr().err
    assert run(["--bootstrap-servers", "127.0.0.1:1", "chaos", "--no-faults",
                "--fault", "kill=true"]) == 1
    assert run(["--bootstrap-servers", "127.0.0.1:1", "chaos",
                "--fault", "pause=true", "--faults", "partition"]) == 1
    assert "do not give all of its actions" in capsys.readouterr().err


# -- the checker, on made-up observations -------------------------------------------

SEED = 7


def fails(key: str, seq: int) -> bool:
    return always_fails(SEED, key, seq, 100)


def make_groups() -> dict[str, GroupObservations]:
    return {OFFSETS_GROUP: GroupObservations(OFFSETS_GROUP),
            ACKS_GROUP: GroupObservations(ACKS_GROUP)}


def healthy_run(records: int = 40) -> tuple[list[AckedRecord], list[StoredRecord],
                                              dict[str, GroupObservations],
                                              list[StoredDeadLetter]]:
    """A run in which everything went right: two keys on partition 0, one on 1."""
    acked, stored, letters = [], [], []
    groups = make_groups()
    offsets = {0: 0, 1: 0}
    for index in range(records):
        key = ("a", "b", "c")[index % 3]
        partition = 1 if key == "c" else 0
        seq = index // 3
        offset = offsets[partition]
        offsets[partition] += 1
        acked.append(AckedRecord(key, seq, partition, offset))
        stored.append(StoredRecord(partition, offset, key, seq))
        for group in groups.values():
            with group.lock:
                group.delivered(partition, offset)
        if fails(key, seq):
            letters.append(StoredDeadLetter(partition, len(letters), partition, offset, key, seq))
        else:
            groups[ACKS_GROUP].settled_by_ack(partition, offset)
    return acked, stored, groups, letters


def test_checker_passes_healthy_run():
    acked, stored, groups, letters = healthy_run()
    report = check(acked, stored, groups, letters, fails)
    assert report.failures() == []
    assert report.dead_letters_expected == len(letters) > 0


def test_checker_counts_lost_record():
    acked, stored, groups, letters = healthy_run()
    missing = stored.pop(5)
    report = check(acked, stored, groups, letters, fails)
    assert report.lost.count == 1
    assert report.lost.examples[0]["offset"] == missing.offset


def test_checker_counts_overwritten_record():
    acked, stored, groups, letters = healthy_run()
    victim = stored[4]
    stored[4] = StoredRecord(victim.partition, victim.offset, "z", 99)
    report = check(acked, stored, groups, letters, fails)
    assert report.lost.count == 1
    assert report.lost.examples[0]["found"] == "z|99"


def test_checker_counts_duplicate():
    acked, stored, groups, letters = healthy_run()
    first = stored[0]
    end = max(r.offset for r in stored if r.partition == first.partition) + 1
    stored.append(StoredRecord(first.partition, end, first.key, first.seq))
    report = check(acked, stored, groups, letters, fails)
    assert report.duplicated.count == 1
    # The copy is also out of order for its key.
    assert report.log_order.count == 1


def test_checker_counts_log_order_violation():
    acked, stored, groups, letters = healthy_run()
    a_records = [i for i, r in enumerate(stored) if r.key == "a"]
    i, j = a_records[1], a_records[2]
    stored[i], stored[j] = (StoredRecord(stored[i].partition, stored[i].offset, "a", stored[j].seq),
                            StoredRecord(stored[j].partition, stored[j].offset, "a", stored[i].seq))
    report = check(acked, stored, groups, letters, fails)
    assert report.log_order.count == 1
    assert report.lost.count == 2


def test_checker_counts_key_in_two_partitions():
    acked, stored, groups, letters = healthy_run()
    stored.append(StoredRecord(1, 500, "a", 1000))
    report = check(acked, stored, groups, letters, fails)
    assert report.log_order.count == 1
    assert report.log_order.examples[0]["partitions"] == [0, 1]


def test_checker_counts_unconsumed_record():
    acked, stored, groups, letters = healthy_run()
    groups[OFFSETS_GROUP].deliveries[0][3] = 0
    report = check(acked, stored, groups, letters, fails)
    assert report.unconsumed[OFFSETS_GROUP].count == 1
    assert report.unconsumed[ACKS_GROUP].count == 0


def test_checker_counts_missing_and_doubled_dead_letters():
    acked, stored, groups, letters = healthy_run(records=90)
    assert len(letters) >= 2
    doubled = letters[0]
    letters = letters[1:-1] + [doubled, StoredDeadLetter(
        doubled.dlq_partition, 999, doubled.source_partition, doubled.source_offset,
        doubled.key, doubled.seq)]
    report = check(acked, stored, groups, letters, fails)
    assert report.dead_letters_missing.count == 1
    assert report.dead_letters_doubled.count == 1


def test_checker_counts_unsettled_record():
    acked, stored, groups, letters = healthy_run()
    settled = next(r for r in stored if not fails(r.key, r.seq))
    groups[ACKS_GROUP].acked[settled.partition][settled.offset] = 0
    report = check(acked, stored, groups, letters, fails)
    assert report.unsettled.count == 1
    assert report.failures() == ["unsettled=1"]


def test_checker_reports_group_order_violations():
    acked, stored, groups, letters = healthy_run()
    groups[ACKS_GROUP].order.add({"key": "a", "seq": 1, "after_seq": 2})
    report = check(acked, stored, groups, letters, fails)
    assert report.group_order[ACKS_GROUP].count == 1
    assert report.order_violations == 1


def test_record_value_round_trips():
    value = record_value("p1k7", 42, 64)
    assert len(value) == 64
    assert parse_value(value) == ("p1k7", 42)
    assert parse_value(b"not a workload value") is None


def test_failing_subset_depends_on_seed():
    picks = [always_fails(SEED, "k", seq, 100) for seq in range(2000)]
    assert picks == [always_fails(SEED, "k", seq, 100) for seq in range(2000)]
    assert 100 < sum(picks) < 300
    assert picks != [always_fails(SEED + 1, "k", seq, 100) for seq in range(2000)]


def test_command_target_fills_placeholders():
    target = CommandTarget({"kill": "docker kill {name} # {node} {host} {port}"},
                           "127.0.0.1:1", names={2: "raftmq-2"})
    assert target.command("kill", 2, "10.0.0.3:9092") == "docker kill raftmq-2 # 2 10.0.0.3 9092"
    assert target.command("kill", 3, "h:1") == "docker kill node3 # 3 h 1"
    assert kinds_supported(target) == ("kill_partition_leader", "kill_metadata_leader")


def test_command_target_quotes_values():
    target = CommandTarget({"pause": "echo {name}", "resume": "true"}, "127.0.0.1:1",
                           names={1: "a b; rm -rf x"})
    assert target.command("pause", 1, "") == "echo 'a b; rm -rf x'"


def test_command_target_rejects_unknown_action_and_placeholder():
    with pytest.raises(ValueError, match="unknown fault action"):
        CommandTarget({"explode": "true"}, "127.0.0.1:1")
    target = CommandTarget({"kill": "kill {pid}"}, "127.0.0.1:1")
    with pytest.raises(ValueError, match="unknown placeholder"):
        target.command("kill", 1, "h:1")


def test_fault_settings_cover_every_kind():
    assert set(FaultSettings().kinds) == set(FAULT_KINDS)
