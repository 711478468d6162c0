"""A chaos run: traffic, faults from a seed, then a check of what survived.

run_chaos() drives one run against any cluster it can reach:

1. It creates a fresh topic, starts the consumer groups and the keyed
   producers (client/chaos_workload.py) and waits for the first ack.
2. For duration_s it injects faults through a FaultTarget on the schedule
   of client/chaos_faults.py, or none without a target.
3. It repairs every fault, waits until the cluster is ready, produces for a
   few more seconds, stops the producers and waits until all replicas of
   every partition agree.
4. It reads the topic back, waits until both groups have received every
   stored record and the acks group has settled each one (acked, or moved
   to the dead-letter topic), reads the dead-letter topic, and runs the
   checker of client/chaos_check.py. It also compares the log digests of
   the replicas of every partition.

The result is a ChaosResult, written as JSON when results_path is set, with
a one-line summary and, on failure, the seed and the command that replays
the run. The same seed repeats the same workload keys and fault choices;
the scheduling of processes and network still differs between runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

from .admin import Admin
from .chaos_check import (
    CheckReport,
    StoredDeadLetter,
    StoredRecord,
    check,
    parse_stored,
    settled_for_acks,
    unconsumed_count,
)
from .chaos_faults import FaultSchedule, FaultSettings, FaultTarget
from .chaos_workload import (
    ACKS_GROUP,
    OFFSETS_GROUP,
    ConsumerWorkload,
    ProducerWorkload,
    WorkloadSettings,
    always_fails,
    parse_value,
)
from .consumer import Consumer
from .dlq import DeadLetter
from .errors import RaftMQError
from .types import TopicPartition

logger = logging.getLogger(__name__)

__all__ = ["ChaosSettings", "ChaosResult", "run_chaos"]

_RPC_TIMEOUT_S = 5.0
_READ_POLL_MS = 300


@dataclasses.dataclass(frozen=True)
class ChaosSettings:
    bootstrap: str
    seed: int
    # Length of the fault phase, in seconds.
    duration_s: float
    # None: "chaos-<seed in hex>-<random suffix>", a new topic per run.
    topic: str | None = None
    partitions: int = 4
    replication_factor: int = 3
    producers: int = 3
    keys_per_producer: int = 64
    rate_per_s: float = 200.0
    consumers_per_group: int = 2
    failing_per_mille: int = 10
    faults: FaultSettings = dataclasses.field(default_factory=FaultSettings)
    # Producing goes on this long after the last fault is repaired.
    quiet_s: float = 5.0
    settle_timeout_s: float = 120.0
    drain_timeout_s: float = 180.0
    first_ack_timeout_s: float = 60.0
    progress_interval_s: float = 60.0
    results_path: str | None = None
    # The command that repeats this run, printed when it fails.
    replay_command: str = ""


@dataclasses.dataclass
class ChaosResult:
    seed: int
    topic: str
    duration_s: float = 0.0
    fault_phase_s: float = 0.0
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    faults_skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    fault_errors: int = 0
    # Faults after which the cluster was not ready within the timeout.
    not_healed: int = 0
    records_acknowledged: int = 0
    lost: int = 0
    duplicated: int = 0
    order_violations: int = 0
    dead_letters_expected: int = 0
    dead_letters_missing: int = 0
    dead_letters_doubled: int = 0
    unconsumed: int = 0
    unsettled: int = 0
    # Partitions (topic[partition]) whose replicas hold different logs.
    diverged: list[str] = dataclasses.field(default_factory=list)
    # repr of an exception that ended the run before its checks.
    error: str | None = None
    passed: bool = False
    summary: str = ""
    replay_command: str = ""
    settings: dict[str, object] = dataclasses.field(default_factory=dict)
    workload: dict[str, object] = dataclasses.field(default_factory=dict)
    groups: dict[str, object] = dataclasses.field(default_factory=dict)
    check: dict[str, object] = dataclasses.field(default_factory=dict)
    fault_events: list[dict[str, object]] = dataclasses.field(default_factory=list)
    replicas: dict[str, object] = dataclasses.field(default_factory=dict)

    def failures(self) -> list[str]:
        problems = self.check.get("failures", [])
        failures = list(problems) if isinstance(problems, list) else []
        if self.diverged:
            failures.append(f"diverged={len(self.diverged)}")
        if self.not_healed:
            failures.append(f"not_healed={self.not_healed}")
        if self.error:
            failures.append("error")
        if not self.records_acknowledged:
            failures.append("no_records_acknowledged")
        return failures

    def summary_line(self) -> str:
        faults = ",".join(f"{kind}:{count}" for kind, count in self.faults.items()) or "none"
        verdict = "PASS" if self.passed else "FAIL " + " ".join(self.failures())
        return (f"chaos seed={self.seed} duration={self.duration_s:.0f}s faults={faults} "
                f"acked={self.records_acknowledged} lost={self.lost} "
                f"duplicated={self.duplicated} order_violations={self.order_violations} "
                f"dead_letters_missing={self.dead_letters_missing} "
                f"dead_letters_doubled={self.dead_letters_doubled} "
                f"unconsumed={self.unconsumed} unsettled={self.unsettled} "
                f"diverged={len(self.diverged)} {verdict}")

    def failure_message(self) -> str:
        lines = [self.summary, f"seed {self.seed}"]
        if self.error:
            lines.append(f"error: {self.error}")
        if self.replay_command:
            lines.append(f"replay with: {self.replay_command}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True, default=str)


# -- cluster state -------------------------------------------------------------


def _healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def cluster_ready(bootstrap: str, topics: list[str]) -> bool:
    """True when every node is healthy and every partition of `topics` has a leader."""
    try:
        with Admin(bootstrap, request_timeout_ms=int(_RPC_TIMEOUT_S * 1000)) as admin:
            cluster = admin.describe_cluster()
    except RaftMQError:
        return False
    if cluster.controller == 0:
        return False
    by_name = {topic.name: topic for topic in cluster.topics}
    for name in topics:
        topic = by_name.get(name)
        if topic is not None and any(p.leader == 0 for p in topic.partitions):
            return False
    return all(_healthy(node.address) for node in cluster.nodes)


def wait_ready(bootstrap: str, topics: list[str], timeout_s: float) -> bool:
    """Wait until cluster_ready() is true twice in a row, 0.5 s apart."""
    deadline = time.monotonic() + timeout_s
    ready_before = False
    while True:
        ready = cluster_ready(bootstrap, topics)
        if ready and ready_before:
            return True
        if time.monotonic() > deadline:
            return False
        ready_before = ready
        time.sleep(0.5)


def _node_addresses(bootstrap: str) -> dict[int, str]:
    with Admin(bootstrap, request_timeout_ms=int(_RPC_TIMEOUT_S * 1000)) as admin:
        return {node.node_id: node.address for node in admin.describe_cluster().nodes}


def _replica_states(addresses: dict[int, str], topics: set[str],
                    include_digest: bool) -> dict[str, dict[int, tuple[int, str] | None]]:
    """Return "topic[partition]" -> node -> (high watermark, digest), None for a failed call."""
    states: dict[str, dict[int, tuple[int, str] | None]] = {}
    for node_id, address in sorted(addresses.items()):
        try:
            with grpc.insecure_channel(address) as channel:
                response = raftmq_pb2_grpc.AdminServiceStub(channel).DescribeReplicas(
                    raftmq_pb2.DescribeReplicasRequest(include_digest=include_digest),
                    timeout=_RPC_TIMEOUT_S * 4)
        except grpc.RpcError:
            for nodes in states.values():
                nodes[node_id] = None
            continue
        for replica in response.replicas:
            if replica.topic in topics:
                name = f"{replica.topic}[{replica.partition}]"
                states.setdefault(name, {})[node_id] = (replica.high_watermark,
                                                        replica.log_digest)
    return states


def wait_replicas_agree(bootstrap: str, topics: set[str], replication_factor: int,
                        timeout_s: float) -> tuple[list[str], dict[str, object]]:
    """Wait until the replicas of every partition hold equal logs.

    Returns the partitions that still differ at timeout_s, with the
    states seen last.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            addresses = _node_addresses(bootstrap)
            states = _replica_states(addresses, topics, include_digest=True)
        except RaftMQError as error:
            states, addresses = {}, {}
            logger.info("chaos replica check: %s", error)
        diverged = sorted(
            name for name, nodes in states.items()
            if len(nodes) < min(replication_factor, len(addresses))
            or any(state is None for state in nodes.values())
            or len(set(nodes.values())) != 1)
        if states and not diverged:
            return [], {}
        if time.monotonic() > deadline:
            detail = {name: {str(node): (None if s is None else [s[0], s[1][:16]])
                             for node, s in states.get(name, {}).items()}
                      for name in diverged}
            return diverged or ["(no replica state)"], detail
        time.sleep(1.0)


def acks_group_state(bootstrap: str, group_id: str) -> dict[str, dict[str, int]]:
    """Return the delivery figures of each partition of an acks group, for the results.

    Admin.describe_group() leaves these figures out, so this calls
    DescribeGroup itself, on each bootstrap node until a call succeeds.
    """
    last_error: grpc.RpcError | None = None
    for address in bootstrap.split(","):
        try:
            with grpc.insecure_channel(address.strip()) as channel:
                response = raftmq_pb2_grpc.GroupServiceStub(channel).DescribeGroup(
                    raftmq_pb2.DescribeGroupRequest(group_id=group_id), timeout=_RPC_TIMEOUT_S)
        except grpc.RpcError as error:
            last_error = error
            continue
        return {
            f"{p.topic}[{p.partition}]": {
                "in_flight": p.in_flight, "waiting_retry": p.waiting_retry,
                "dead_letter_pending": p.dead_letter_pending, "dead_lettered": p.dead_lettered,
                "committed_offset": p.committed_offset, "high_watermark": p.high_watermark,
            }
            for p in response.partitions
        }
    return {"error": {"describe_group_failed": 1}} if last_error else {}


# -- reading topics back -------------------------------------------------------


def _partition_count(bootstrap: str, topic: str) -> int | None:
    try:
        with Admin(bootstrap, request_timeout_ms=int(_RPC_TIMEOUT_S * 1000)) as admin:
            return len(admin.describe_topic(topic).partitions)
    except RaftMQError as error:
        if error.reason == "UNKNOWN_TOPIC":
            return None
        raise


def scan_topic(bootstrap: str, topic: str, on_record: Callable, timeout_s: float = 300.0) -> None:
    """Call on_record(record) for every record of `topic` below its current end offsets."""
    count = _partition_count(bootstrap, topic)
    if count is None:
        return
    partitions = [TopicPartition(topic, p) for p in range(count)]
    deadline = time.monotonic() + timeout_s
    with Consumer(bootstrap, fetch_max_wait_ms=200, request_timeout_ms=10000) as consumer:
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        positions = {tp: consumer.position(tp) for tp in partitions}
        while any(positions[tp] < ends[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic!r} back took more than {timeout_s:.0f} s; "
                                   f"positions {positions}, end offsets {ends}")
            for tp, records in consumer.poll(timeout_ms=_READ_POLL_MS).items():
                for record in records:
                    if record.offset < ends[tp]:
                        on_record(record)
                    positions[tp] = record.offset + 1


def read_stored(bootstrap: str, topic: str, report: CheckReport) -> list[StoredRecord]:
    stored: list[StoredRecord] = []

    def keep(record) -> None:
        stored.extend(parse_stored(record.partition, [(record.offset, record.value)], report))

    scan_topic(bootstrap, topic, keep)
    return stored


def read_dead_letters(bootstrap: str, dlq_topic: str) -> list[StoredDeadLetter]:
    letters: list[StoredDeadLetter] = []

    def keep(record) -> None:
        letter = DeadLetter.from_record(record)
        parsed = parse_value(letter.value)
        letters.append(StoredDeadLetter(
            letter.dlq_partition, letter.dlq_offset, letter.source_partition,
            letter.source_offset, parsed[0] if parsed else None, parsed[1] if parsed else None))

    scan_topic(bootstrap, dlq_topic, keep)
    return letters


# -- the run -------------------------------------------------------------------


class _Progress:
    """Log a progress line every interval_s from a background thread."""

    def __init__(self, producers: ProducerWorkload, consumers: ConsumerWorkload,
                 schedule: FaultSchedule | None, log: Callable[[str], None],
                 interval_s: float):
        self._stop = threading.Event()
        self._started = time.monotonic()

        def report() -> None:
            while not self._stop.wait(interval_s):
                faults = schedule.counts() if schedule else {}
                groups = {k: g.delivery_count for k, g in consumers.groups.items()}
                log(f"chaos progress t={time.monotonic() - self._started:.0f}s "
                    f"acked={producers.acked_count} deliveries={groups} faults={faults}")

        self._thread = threading.Thread(target=report, name="chaos-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _topic_name(seed: int) -> str:
    return f"chaos-{seed:08x}-{secrets.token_hex(3)}"


def _write_result(result: ChaosResult, path: str | None) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(result.to_json() + "\n", encoding="utf-8")
    os.replace(temporary, target)


def run_chaos(settings: ChaosSettings, target: FaultTarget | None = None,
              log: Callable[[str], None] = logger.info) -> ChaosResult:
    """Run the workload with faults from `target` (none when None) and check the outcome."""
    topic = settings.topic or _topic_name(settings.seed)
    result = ChaosResult(seed=settings.seed, topic=topic, replay_command=settings.replay_command,
                         settings=_settings_dict(settings))
    started = time.monotonic()
    try:
        _run(settings, topic, target, result, log)
    except Exception as error:  # noqa: BLE001 - the result records why the run ended
        logger.exception("chaos run failed")
        result.error = repr(error)[:2000]
    result.duration_s = round(time.monotonic() - started, 1)
    result.passed = not result.failures()
    result.summary = result.summary_line()
    _write_result(result, settings.results_path)
    log(result.summary)
    return result


def _settings_dict(settings: ChaosSettings) -> dict[str, object]:
    values = dataclasses.asdict(settings)
    values["faults"] = dict(values["faults"], weights=dict(settings.faults.weights))
    return values


def _run(settings: ChaosSettings, topic: str, target: FaultTarget | None,
         result: ChaosResult, log: Callable[[str], None]) -> None:
    bootstrap = settings.bootstrap
    dlq_topic = f"{topic}.dlq"
    workload = WorkloadSettings(
        topic=topic, seed=settings.seed, producers=settings.producers,
        keys_per_producer=settings.keys_per_producer, rate_per_s=settings.rate_per_s,
        consumers_per_group=settings.consumers_per_group,
        failing_per_mille=settings.failing_per_mille)
    with Admin(bootstrap) as admin:
        admin.create_topic(topic, partitions=settings.partitions,
                           replication_factor=settings.replication_factor)
    if not wait_ready(bootstrap, [topic], settings.settle_timeout_s):
        raise RuntimeError(f"the cluster was not ready {settings.settle_timeout_s:.0f} s after "
                           f"creating topic {topic!r}")
    log(f"chaos run seed={settings.seed} topic={topic} faults for {settings.duration_s:.0f}s")

    producers = ProducerWorkload(bootstrap, workload)
    consumers = ConsumerWorkload(bootstrap, workload)
    schedule = None
    if target is not None:
        schedule = FaultSchedule(target, bootstrap, topic, settings.seed, settings.faults,
                                 lambda timeout_s: wait_ready(bootstrap, [topic], timeout_s),
                                 log)
    progress = _Progress(producers, consumers, schedule, log, settings.progress_interval_s)
    consumers.start()
    producers.start()
    try:
        _wait_first_ack(producers, settings.first_ack_timeout_s)
        fault_started = time.monotonic()
        if schedule is not None:
            schedule.run(settings.duration_s)
        else:
            time.sleep(settings.duration_s)
        result.fault_phase_s = round(time.monotonic() - fault_started, 1)
        _record_faults(result, schedule)
        log("chaos faults stopped; waiting for the cluster to settle")
        if not wait_ready(bootstrap, [topic], settings.settle_timeout_s):
            result.not_healed += 1
            log(f"chaos cluster not ready {settings.settle_timeout_s:.0f}s after the last fault")
        time.sleep(settings.quiet_s)
        producers.stop(flush_timeout_s=settings.faults.ready_timeout_s)
        result.workload = producers.summary()
        diverged, _ = wait_replicas_agree(bootstrap, {topic}, settings.replication_factor,
                                          settings.settle_timeout_s)
        if diverged:
            log(f"chaos replicas of {diverged} still differ before the read-back")
        report = CheckReport()
        stored = read_stored(bootstrap, topic, report)
        log(f"chaos read back {len(stored)} records; waiting for the groups to finish")
        if not _drain(bootstrap, dlq_topic, stored, consumers, workload,
                      settings.drain_timeout_s):
            result.groups["members_at_drain_timeout"] = consumers.member_states()
            result.groups["acks_partitions_at_drain_timeout"] = acks_group_state(
                bootstrap, workload.group_id(ACKS_GROUP))
            log(f"chaos groups did not finish within {settings.drain_timeout_s:.0f}s")
    finally:
        progress.stop()
        producers.stop(flush_timeout_s=0)
        consumers.stop()
        if schedule is not None:
            schedule.stop()
            schedule.repair_all()
    result.groups.update({name: group.summary() for name, group in consumers.groups.items()})
    result.groups["acks_partitions"] = acks_group_state(bootstrap, workload.group_id(ACKS_GROUP))
    diverged, detail = wait_replicas_agree(bootstrap, {topic, dlq_topic},
                                           settings.replication_factor, settings.settle_timeout_s)
    result.diverged = diverged
    result.replicas = detail
    dead_letters = read_dead_letters(bootstrap, dlq_topic)
    fails = _failing(workload)
    checked = check(producers.acked(), stored, consumers.groups, dead_letters, fails, report)
    _record_check(result, checked)


def _failing(workload: WorkloadSettings) -> Callable[[str, int], bool]:
    def fails(key: str, seq: int) -> bool:
        return always_fails(workload.seed, key, seq, workload.failing_per_mille)

    return fails


def _wait_first_ack(producers: ProducerWorkload, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while producers.acked_count == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no record acknowledged {timeout_s:.0f} s after the producers "
                               f"started: {producers.summary()}")
        time.sleep(0.1)


def _drain(bootstrap: str, dlq_topic: str, stored: list[StoredRecord],
           consumers: ConsumerWorkload, workload: WorkloadSettings, timeout_s: float) -> bool:
    """Wait until both groups received every stored record and the acks group settled each."""
    fails = _failing(workload)
    letters: set[tuple[int, int]] = set()

    def done() -> bool:
        if unconsumed_count(stored, consumers.groups[OFFSETS_GROUP]):
            return False
        acks = consumers.groups[ACKS_GROUP]
        if unconsumed_count(stored, acks):
            return False
        if settled_for_acks(stored, letters, acks, fails) == 0:
            return True
        letters.clear()
        letters.update((letter.source_partition, letter.source_offset)
                       for letter in read_dead_letters(bootstrap, dlq_topic))
        return settled_for_acks(stored, letters, acks, fails) == 0

    return consumers.wait(done, timeout_s, poll_s=2.0)


def _record_faults(result: ChaosResult, schedule: FaultSchedule | None) -> None:
    if schedule is None:
        return
    result.faults = schedule.counts()
    result.faults_skipped = dict(schedule.skipped)
    result.fault_errors = sum(1 for event in schedule.events if event.error)
    result.not_healed += len(schedule.not_ready_after)
    result.fault_events = [dataclasses.asdict(event) for event in schedule.events]


def _record_check(result: ChaosResult, report: CheckReport) -> None:
    result.records_acknowledged = report.acknowledged
    result.lost = report.lost.count
    result.duplicated = report.duplicated.count
    result.order_violations = report.order_violations
    result.dead_letters_expected = report.dead_letters_expected
    result.dead_letters_missing = report.dead_letters_missing.count
    result.dead_letters_doubled = report.dead_letters_doubled.count
    result.unconsumed = report.unconsumed_total
    result.unsettled = report.unsettled.count
    details = report.to_dict()
    details["failures"] = report.failures()
    result.check = details
