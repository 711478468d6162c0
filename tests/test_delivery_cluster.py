"""Per-message delivery ("acks" groups) on real three-node clusters.

One scenario kills the partition leader twice while a consumer acks 180
records and nacks 20 records on every attempt until they go to the
dead-letter topic. Two tests check its outcome: the delivery counts and dead
letters, and the gaps between the attempts of each failing record against
the group's retry policy. Another test drops a Receive response, kills the
leader and checks that the retry with the same request_id returns the same
deliveries. The other tests share one cluster and check ordering while a
record waits for its retry, lease expiry and extension, the SDK's circuit
breaker, and a nack or lease extension repeated after its record was
settled.

The only timing asserted is the retry delay of the failover scenario, with
the tolerances below. Every other wait is a generous deadline.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import time
from pathlib import Path

import grpc
import pytest

from cluster import LocalCluster
from raftmq.client import (
    Admin,
    CircuitBreaker,
    Consumer,
    ConsumerRecord,
    Producer,
    RaftMQError,
    RetryPolicy,
    TopicPartition,
)
from raftmq.client.errors import error_info_of
from raftmq.partition.delivery import retry_delay_ms
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

pytestmark = pytest.mark.cluster

# --- failover scenario -------------------------------------------------------

FAILOVER_TOPIC = "payments"
FAILOVER_GROUP = "payments-workers"
MESSAGES = 200
KEYS = 10
# Records of these keys fail on every attempt when (index // KEYS) is even:
# ten per key, so each key works through a chain of ten records that each
# need five attempts. The chain keeps retries pending while the leader dies.
FAILING_KEYS = (3, 7)
MAX_ATTEMPTS = 5
FAILOVER_POLICY = RetryPolicy(
    backoff="exponential", initial_delay_ms=200, multiplier=2.0, max_delay_ms=2000,
    max_attempts=MAX_ATTEMPTS, visibility_timeout_ms=15000,
)
# Policy delays after failed attempts 1 to 4, written out from the policy.
EXPECTED_DELAYS_MS = {1: 200, 2: 400, 3: 800, 4: 1600}
RESTART_AFTER_S = 3.0
# Each kill follows the nack of a failing record's attempt at once, so that
# the record waits for its retry across the failover. The first kill also
# waits for a number of acks, so it lands while good records still flow.
# The second waits for a number of dead letters and for the first victim to
# be healthy again, so it lands midway through the failing chains.
FIRST_KILL_AFTER_ACKS = 50
FIRST_KILL_AFTER_NACK_OF_ATTEMPT = 2
SECOND_KILL_AFTER_DEAD = 8
SECOND_KILL_AFTER_NACK_OF_ATTEMPT = 3
KILLS = 2
SCENARIO_TIMEOUT_S = 150
# After the last expected settle, polling goes on this long to catch
# deliveries beyond the expected ones.
EXTRA_POLL_S = 3.0

# Retry gap tolerances, in ms, around the policy delay of the failed attempt.
# The due time of a retry is the nack's apply time plus the delay, and both
# the nack and the next delivery happen after the consumer stamps an
# arrival, so a gap is never shorter than the delay. The early tolerance
# covers the millisecond rounding of the leader's clock.
EARLY_TOLERANCE_MS = 50
# A gap may be longer by the nack's commit, the long poll waking up and the
# other records of the same poll being handled first.
LATE_TOLERANCE_MS = 1500
# A gap with a kill, restart or leader change in it also contains a leader
# election (timeouts of 1 to 2.5 s), the SDK's retry backoff (up to 1 s per
# failed call) and metadata refreshes.
FAILOVER_LATE_TOLERANCE_MS = 20000
# An event this long before an attempt's arrival still counts as inside its
# gap, because the nack after that arrival may meet the election.
FAILOVER_MARGIN_S = 1.0

# --- shared-cluster tests ------------------------------------------------------

CONSUME_TIMEOUT_S = 60
SHARED_SESSION_TIMEOUT_MS = 15000
# Raw GroupService calls retry these errors and raise any other.
TRANSIENT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
TRANSIENT_REASONS = ("NOT_LEADER", "LEADER_NOT_AVAILABLE", "COMMIT_TIMEOUT")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def leader_of(admin: Admin, topic: str, partition: int, timeout_s: float = 30) -> int:
    """Return the node id of the partition's leader, waiting while it has none."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            leader = admin.describe_topic(topic).partitions[partition].leader
        except RaftMQError as error:
            progress(f"describe_topic({topic}) failed: {error}")
            leader = 0
        if leader:
            return leader
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"partition {partition} of {topic} has no leader after {timeout_s} s")
        time.sleep(0.2)


def group_partition_state(cluster: LocalCluster, group_id: str, topic: str,
                          partition: int = 0) -> raftmq_pb2.CommittedOffset:
    """Return the group's cursor of one partition (committed offset, leases, retries)."""
    request = raftmq_pb2.FetchCommittedOffsetsRequest(
        group_id=group_id, topic=topic, partitions=[partition])
    return group_call(cluster, "FetchCommittedOffsets", request).offsets[0]


def wait_for_state(cluster: LocalCluster, group_id: str, topic: str, check, what: str,
                   timeout_s: float = 60) -> raftmq_pb2.CommittedOffset:
    """Poll the group's cursor of partition 0 until check(state) holds; return the last state."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = group_partition_state(cluster, group_id, topic)
        if check(state):
            return state
        if time.monotonic() > deadline:
            progress(f"timed out after {timeout_s} s waiting for {what}")
            return state
        time.sleep(0.2)


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60) -> list[ConsumerRecord]:
    """Read every record of every partition of `topic` with a plain consumer."""
    with Admin(bootstrap) as admin:
        partitions = len(admin.describe_topic(topic).partitions)
    records: list[ConsumerRecord] = []
    with Consumer(bootstrap, fetch_max_wait_ms=200) as consumer:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, (
                f"reading {topic} did not reach {end} in {timeout_s} s")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    return records


def acks_consumer(cluster: LocalCluster, group_id: str, policy: RetryPolicy, **options) -> Consumer:
    return Consumer(cluster.bootstrap, group_id=group_id, delivery_mode="acks",
                    retry_policy=policy, auto_offset_reset="earliest", fetch_max_wait_ms=200,
                    session_timeout_ms=SHARED_SESSION_TIMEOUT_MS, **options)


def produce(cluster: LocalCluster, topic: str, keyed_values: list[tuple[str, str]]) -> list:
    with Producer(cluster.bootstrap, linger_ms=5) as producer:
        futures = [producer.send(topic, value.encode(), key=key.encode())
                   for key, value in keyed_values]
        producer.flush(timeout=60)
    return [future.result(timeout=0) for future in futures]


def create_topic(cluster: LocalCluster, topic: str) -> None:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(topic, partitions=1, replication_factor=3)


def group_call(cluster: LocalCluster, method: str, request, timeout_s: float = 60):
    """Call GroupService.<method> on any running node, retrying transient errors only."""
    deadline = time.monotonic() + timeout_s
    last_error = "no node running"
    while True:
        for node_id in cluster.node_ids:
            if not cluster.is_running(node_id):
                continue
            with grpc.insecure_channel(cluster.address(node_id)) as channel:
                stub = raftmq_pb2_grpc.GroupServiceStub(channel)
                try:
                    return getattr(stub, method)(request, timeout=15)
                except grpc.RpcError as error:
                    info = error_info_of(error)
                    reason = info.reason if info is not None else ""
                    transient = (error.code() in TRANSIENT_CODES
                                 or reason in TRANSIENT_REASONS)
                    if not transient:
                        raise
                    last_error = f"node {node_id}: {reason or error.code().name} {error.details()}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{method} kept failing for {timeout_s} s, last: {last_error}")
        time.sleep(0.3)


def call_status(call) -> tuple[str, str, object]:
    """Run a gRPC call; return ("OK", "", response), or (error reason, details, None)."""
    try:
        return "OK", "", call()
    except grpc.RpcError as error:
        info = error_info_of(error)
        return (info.reason if info is not None else error.code().name), error.details(), None


def poll_one(consumer: Consumer, timeout_s: float = CONSUME_TIMEOUT_S) -> ConsumerRecord:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = [r for batch in consumer.poll(timeout_ms=200).values() for r in batch]
        if records:
            assert len(records) == 1, f"expected one record, got {records}"
            return records[0]
    raise AssertionError(f"no record delivered in {timeout_s} s")


def last_apply_failure(cluster: LocalCluster) -> str:
    """Return the latest apply_failed line of a node log with its traceback."""
    for node_id in cluster.node_ids:
        lines = cluster.log_path(node_id).read_text(errors="replace").splitlines()
        starts = [i for i, line in enumerate(lines) if "event=apply_failed" in line]
        if not starts:
            continue
        found = [f"node {node_id}: {lines[starts[-1]]}"]
        for following in lines[starts[-1] + 1:starts[-1] + 20]:
            if following[:4].isdigit():
                break  # the next log record
            found.append(following)
        return "\n".join(found)
    return "(no node logged event=apply_failed)"


def headers_of(record: ConsumerRecord) -> dict[str, str]:
    return {key: value.decode() for key, value in record.headers}


# --- the failover scenario ---------------------------------------------------


def message_value(index: int) -> bytes:
    outcome = "fail" if always_fails(index) else "ok"
    return f"msg-{index:03d}:{outcome}".encode()


def message_index(record: ConsumerRecord) -> int:
    return int(record.value.decode().split(":")[0].removeprefix("msg-"))


def always_fails(index: int) -> bool:
    return index % KEYS in FAILING_KEYS and (index // KEYS) % 2 == 0


def failure_text(index: int, attempt: int) -> str:
    return f"handler failed on msg-{index:03d} attempt {attempt}"


@dataclasses.dataclass
class FailoverTally:
    """What the scenario's consumer saw and did."""

    # Per message: (attempt, monotonic arrival time) of every delivery seen.
    arrivals: dict[int, list[tuple[int, float]]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))
    # Successful acks per message.
    acks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # Messages whose nack returned dead_lettered=True.
    dead_lettered: set[int] = dataclasses.field(default_factory=set)
    ack_errors: list[str] = dataclasses.field(default_factory=list)
    nack_errors: list[str] = dataclasses.field(default_factory=list)
    poll_errors: list[str] = dataclasses.field(default_factory=list)

    def handle(self, consumer: Consumer, record: ConsumerRecord, arrived: float) -> None:
        """Nack a failing record with its error text, ack any other."""
        index = message_index(record)
        self.arrivals[index].append((record.attempt, arrived))
        if always_fails(index):
            try:
                if consumer.nack(record, error=failure_text(index, record.attempt)):
                    self.dead_lettered.add(index)
            except RaftMQError as error:
                self.nack_errors.append(f"msg-{index:03d} attempt {record.attempt}: {error}")
                progress(f"nack of msg-{index:03d} raised {error}")
            return
        try:
            consumer.ack(record)
        except RaftMQError as error:
            self.ack_errors.append(f"msg-{index:03d} attempt {record.attempt}: {error}")
            progress(f"ack of msg-{index:03d} raised {error}")
        else:
            self.acks[index] += 1

    def settled_all(self, failing: set[int]) -> bool:
        return len(self.acks) == MESSAGES - len(failing) and len(self.dead_lettered) == len(failing)


@dataclasses.dataclass
class FailoverRun:
    log_dir: Path
    offsets: dict[int, int]
    timestamps: dict[int, int]
    tally: FailoverTally
    # (monotonic time, event, node id) of every kill, restart, recovery and
    # leader change of the partition.
    chaos: list[tuple[float, str, int]]
    final_state: raftmq_pb2.CommittedOffset
    dead_letters: list[ConsumerRecord]


class LeaderKiller:
    """Kill -9 the partition leader on request, and restart each victim later."""

    def __init__(self, cluster: LocalCluster, admin: Admin, topic: str):
        self.cluster = cluster
        self.admin = admin
        self.topic = topic
        self.events: list[tuple[float, str, int]] = []
        self.kills = 0
        self._down: tuple[int, float] | None = None
        self._restarting: int | None = None
        self._next_health_check = 0.0

    @property
    def idle(self) -> bool:
        """True when no node is down or restarting."""
        return self._down is None and self._restarting is None

    def step(self, kill_now: bool) -> None:
        now = time.monotonic()
        if self._down is not None:
            victim, killed_at = self._down
            if now - killed_at >= RESTART_AFTER_S:
                self.cluster.start(victim)
                self.events.append((time.monotonic(), "restart", victim))
                progress(f"restarted node {victim}")
                self._down = None
                self._restarting = victim
            return
        if self._restarting is not None:
            if now < self._next_health_check:
                return
            self._next_health_check = now + 0.5
            if not self.cluster.healthy(self._restarting):
                return
            self.events.append((time.monotonic(), "healthy", self._restarting))
            progress(f"node {self._restarting} is healthy again")
            self._restarting = None
            return
        if kill_now and self.kills < KILLS:
            victim = leader_of(self.admin, self.topic, 0)
            self.cluster.kill(victim)
            self.kills += 1
            self.events.append((time.monotonic(), "kill", victim))
            progress(f"kill {self.kills}: killed node {victim}, leader of {self.topic}[0]")
            self._down = (victim, time.monotonic())


def consume_through_kills(consumer: Consumer, killer: LeaderKiller, failing: set[int],
                          tally: FailoverTally) -> float:
    """Handle deliveries until all records settled and the killer is done; return the start."""
    started = time.monotonic()
    deadline = started + SCENARIO_TIMEOUT_S
    done_at: float | None = None
    last_report = started
    while time.monotonic() < deadline:
        now = time.monotonic()
        if done_at is None and tally.settled_all(failing):
            done_at = now
            progress(f"all records settled after {now - started:.1f} s; polling "
                     f"{EXTRA_POLL_S} s more for extra deliveries")
        if done_at is not None and now - done_at >= EXTRA_POLL_S and killer.idle:
            break
        try:
            batch = consumer.poll(timeout_ms=200)
        except RaftMQError as error:
            tally.poll_errors.append(f"{time.monotonic() - started:.1f} s: {error}")
            progress(f"poll raised {error}")
            time.sleep(0.2)
            batch = {}
        arrived = time.monotonic()
        records = [record for partition_records in batch.values() for record in partition_records]
        for record in records:
            tally.handle(consumer, record, arrived)
        nacked_attempts = {r.attempt for r in records if message_index(r) in failing}
        if killer.kills == 0:
            kill_now = (len(tally.acks) >= FIRST_KILL_AFTER_ACKS
                        and FIRST_KILL_AFTER_NACK_OF_ATTEMPT in nacked_attempts)
        else:
            kill_now = (len(tally.dead_lettered) >= SECOND_KILL_AFTER_DEAD
                        and SECOND_KILL_AFTER_NACK_OF_ATTEMPT in nacked_attempts)
        killer.step(kill_now and done_at is None)
        if time.monotonic() - last_report >= 5:
            last_report = time.monotonic()
            progress(f"{time.monotonic() - started:.0f} s: {len(tally.acks)} acked, "
                     f"{len(tally.dead_lettered)} dead-lettered, kills {killer.kills}")
    progress(f"scenario ended after {time.monotonic() - started:.1f} s: {len(tally.acks)} acked, "
             f"{len(tally.dead_lettered)} dead-lettered, {len(tally.ack_errors)} ack errors, "
             f"{len(tally.nack_errors)} nack errors, {len(tally.poll_errors)} poll errors")
    return started


def run_failover_scenario(cluster: LocalCluster) -> FailoverRun:
    admin = Admin(cluster.bootstrap, request_timeout_ms=10000)
    admin.create_topic(FAILOVER_TOPIC, partitions=1, replication_factor=3)
    with Producer(cluster.bootstrap, linger_ms=5) as producer:
        futures = [producer.send(FAILOVER_TOPIC, message_value(i), key=f"key-{i % KEYS}".encode())
                   for i in range(MESSAGES)]
        producer.flush(timeout=60)
    metadata = [future.result(timeout=0) for future in futures]
    failing = {i for i in range(MESSAGES) if always_fails(i)}
    progress(f"produced {MESSAGES} records, {len(failing)} of them always fail")

    tally = FailoverTally()
    killer = LeaderKiller(cluster, admin, FAILOVER_TOPIC)
    consumer = Consumer(
        cluster.bootstrap, group_id=FAILOVER_GROUP, delivery_mode="acks",
        retry_policy=FAILOVER_POLICY, auto_offset_reset="earliest", fetch_max_wait_ms=200,
        session_timeout_ms=15000, request_timeout_ms=30000,
    )
    try:
        consumer.subscribe([FAILOVER_TOPIC])
        started = consume_through_kills(consumer, killer, failing, tally)
    finally:
        consumer.close()

    final_state = wait_for_state(
        cluster, FAILOVER_GROUP, FAILOVER_TOPIC,
        lambda s: s.dead_letter_pending == 0 and s.dead_lettered >= len(failing),
        "all dead letters moved")
    progress(f"group state: committed {final_state.offset}, "
             f"in flight {final_state.in_flight}, waiting {final_state.waiting_retry}, "
             f"dead pending {final_state.dead_letter_pending}, "
             f"dead-lettered {final_state.dead_lettered}")
    dead_letters = read_topic(cluster.bootstrap, f"{FAILOVER_TOPIC}.dlq")
    progress(f"{len(dead_letters)} records in {FAILOVER_TOPIC}.dlq")
    admin.close()
    chaos = sorted(killer.events + leader_changes(cluster, FAILOVER_TOPIC, 0))
    progress("kills, restarts and leader changes, in seconds from the first poll:")
    for moment, event, node_id in chaos:
        print(f"  {moment - started:6.2f} s  {event} node {node_id}")
    return FailoverRun(
        log_dir=cluster.base_dir, offsets={i: m.offset for i, m in enumerate(metadata)},
        timestamps={i: m.timestamp_ms for i, m in enumerate(metadata)}, tally=tally,
        chaos=chaos, final_state=final_state, dead_letters=dead_letters,
    )


LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"


def leader_changes(cluster: LocalCluster, topic: str,
                   partition: int) -> list[tuple[float, str, int]]:
    """Return (monotonic time, "leader", node id) for each time a node logged
    that it became the partition's leader.

    Besides the elections after kills, these include the preferred-leader
    transfers that nodes start after a restart, which the test does not
    trigger itself.
    """
    wall_minus_monotonic = time.time() - time.monotonic()
    marker = f"topic={topic} partition={partition} "
    changes = []
    for node_id in cluster.node_ids:
        for line in cluster.log_path(node_id).read_text(errors="replace").splitlines():
            if marker not in line or "event=role_changed" not in line or "to=leader" not in line:
                continue
            stamp = datetime.datetime.strptime(line[:23], LOG_TIME_FORMAT).timestamp()
            changes.append((stamp - wall_minus_monotonic, "leader", node_id))
    return changes


@pytest.fixture(scope="module")
def failover_run(tmp_path_factory) -> FailoverRun:
    """Run the failover scenario once on its own cluster, which is stopped before the tests."""
    with LocalCluster(tmp_path_factory.mktemp("failover-cluster")) as local:
        local.start_all()
        local.wait_healthy(timeout_s=60)
        run = run_failover_scenario(local)
    progress(f"node logs of the failover scenario: {run.log_dir}")
    return run


def test_failover_counts_and_dead_letters(failover_run):
    run = failover_run
    failing = sorted(i for i in range(MESSAGES) if always_fails(i))
    good = sorted(set(range(MESSAGES)) - set(failing))

    kills = [node for _, event, node in run.chaos if event == "kill"]
    assert len(kills) == KILLS, f"the scenario killed {kills}, expected {KILLS} kills"
    tally = run.tally
    assert tally.poll_errors == [], f"poll() raised: {tally.poll_errors}"
    assert tally.ack_errors == [], f"acks raised: {tally.ack_errors}"
    assert tally.nack_errors == [], f"nacks raised: {tally.nack_errors}"

    assert len(tally.acks) == len(good), (
        f"{len(tally.acks)} distinct records acked, expected {len(good)}")
    assert sorted(tally.acks) == good
    acked_twice = {f"msg-{i:03d}": n for i, n in tally.acks.items() if n != 1}
    assert acked_twice == {}, f"records acked more than once: {acked_twice}"

    for index in good:
        attempts = [attempt for attempt, _ in tally.arrivals.get(index, [])]
        assert attempts == [1], (
            f"msg-{index:03d} (always acked) was delivered as attempts {attempts}")
    for index in failing:
        attempts = [attempt for attempt, _ in tally.arrivals.get(index, [])]
        assert attempts == list(range(1, MAX_ATTEMPTS + 1)), (
            f"msg-{index:03d} (always nacked) was delivered as attempts {attempts}")
    assert tally.dead_lettered == set(failing), (
        f"nacks that answered dead_lettered: {sorted(tally.dead_lettered)}")

    state = run.final_state
    assert state.dead_letter_pending == 0, f"{state.dead_letter_pending} dead letters not moved"
    assert state.dead_lettered == len(failing)
    assert state.in_flight == 0
    assert state.waiting_retry == 0
    assert state.offset == MESSAGES, f"the group's floor is {state.offset}, expected {MESSAGES}"

    by_source = collections.defaultdict(list)
    for record in run.dead_letters:
        by_source[int(headers_of(record)["raftmq.dlq.source_offset"])].append(record)
    assert len(run.dead_letters) == len(failing), (
        f"{len(run.dead_letters)} dead letters, expected {len(failing)}; source offsets "
        f"{sorted(by_source)}")
    expected_offsets = sorted(run.offsets[i] for i in failing)
    assert sorted(by_source) == expected_offsets
    for index in failing:
        (record,) = by_source[run.offsets[index]]
        headers = headers_of(record)
        label = f"dead letter of msg-{index:03d}"
        assert record.value == message_value(index), label
        assert record.key == f"key-{index % KEYS}".encode(), label
        assert record.partition == 0, label
        assert headers["raftmq.dlq.attempts"] == str(MAX_ATTEMPTS), f"{label}: {headers}"
        assert headers["raftmq.dlq.error"] == failure_text(index, MAX_ATTEMPTS), (
            f"{label}: {headers}")
        assert headers["raftmq.dlq.source_topic"] == FAILOVER_TOPIC, label
        assert headers["raftmq.dlq.source_partition"] == "0", label
        assert headers["raftmq.dlq.group"] == FAILOVER_GROUP, label
        assert headers["raftmq.dlq.original_timestamp_ms"] == str(run.timestamps[index]), label
        first = int(headers["raftmq.dlq.first_failure_ms"])
        last = int(headers["raftmq.dlq.last_failure_ms"])
        # The failure times are leader stamps, replicated across the kills, so
        # the four retry delays lie between the first and the last failure.
        assert last - first >= sum(EXPECTED_DELAYS_MS.values()) - EARLY_TOLERANCE_MS, (
            f"{label}: first failure {first}, last failure {last}")


def test_retry_delays_follow_policy(failover_run):
    run = failover_run
    policy = dataclasses.asdict(FAILOVER_POLICY)
    for attempt, expected in EXPECTED_DELAYS_MS.items():
        computed = retry_delay_ms(policy, FAILOVER_GROUP, 0, attempt)
        assert computed == expected, f"retry_delay_ms after attempt {attempt}: {computed}"

    chaos_times = [(t, f"{event} node {node}") for t, event, node in run.chaos]
    rows = []
    for index in sorted(i for i in range(MESSAGES) if always_fails(i)):
        seen = run.tally.arrivals.get(index, [])
        for (attempt, arrived), (next_attempt, next_arrived) in zip(seen, seen[1:]):
            if next_attempt != attempt + 1:
                continue  # the delivery-count test reports the wrong attempt numbers
            delay = retry_delay_ms(policy, FAILOVER_GROUP, run.offsets[index], attempt)
            gap_ms = (next_arrived - arrived) * 1000
            during = [label for t, label in chaos_times
                      if arrived - FAILOVER_MARGIN_S <= t <= next_arrived]
            rows.append((index, attempt, delay, gap_ms, during))

    progress("retry gaps (message, attempt n -> n+1, policy delay, measured gap, chaos in gap):")
    for index, attempt, delay, gap_ms, during in rows:
        print(f"  msg-{index:03d} {attempt}->{attempt + 1} delay {delay:5d} ms  "
              f"gap {gap_ms:7.0f} ms  {', '.join(during)}")
    across = [row for row in rows if row[4]]
    calm = [row for row in rows if not row[4]]
    if calm:
        excess = [gap - delay for _, _, delay, gap, _ in calm]
        print(f"  without failover: {len(calm)} gaps, gap - delay from {min(excess):.0f} to "
              f"{max(excess):.0f} ms")
    if across:
        excess = [gap - delay for _, _, delay, gap, _ in across]
        print(f"  across a failover: {len(across)} gaps, gap - delay from {min(excess):.0f} to "
              f"{max(excess):.0f} ms")

    failing = [i for i in range(MESSAGES) if always_fails(i)]
    assert len(rows) == len(failing) * (MAX_ATTEMPTS - 1), "some attempts are missing"
    for killed_at, event, node_id in run.chaos:
        if event != "kill":
            continue
        spanning = [row for row in rows if any(f"kill node {node_id}" == label for label in row[4])]
        assert spanning, f"no retry gap contains the kill of node {node_id}, so that failover " \
                         "was not measured"
    for index, attempt, delay, gap_ms, during in rows:
        label = (f"msg-{index:03d} attempt {attempt} -> {attempt + 1}: gap {gap_ms:.0f} ms, "
                 f"policy delay {delay} ms, chaos in gap: {during or 'none'}")
        assert gap_ms >= delay - EARLY_TOLERANCE_MS, label
        late = FAILOVER_LATE_TOLERANCE_MS if during else LATE_TOLERANCE_MS
        assert gap_ms <= delay + late, label


# --- retries of lost responses -------------------------------------------------


def test_receive_retry_returns_same_deliveries(cluster):
    """A Receive whose response is lost, retried with its request_id after the
    leader dies, returns the deliveries the old leader made, not new ones."""
    topic, group = "receipts", "receipt-workers"
    create_topic(cluster, topic)
    produce(cluster, topic, [(f"r{i}", f"receipt-{i}") for i in range(3)])
    policy = raftmq_pb2.RetryPolicy(max_attempts=5, visibility_timeout_ms=60000)
    joined = group_call(cluster, "JoinGroup", raftmq_pb2.JoinGroupRequest(
        group_id=group, topics=[topic], client_id="raw-receiver", session_timeout_ms=30000,
        auto_offset_reset="earliest", delivery_mode="acks", retry_policy=policy))
    generation = joined.assignment.generation
    partition = raftmq_pb2.TopicPartition(topic=topic, partition=0)
    assert list(joined.assignment.partitions) == [partition]
    group_call(cluster, "ClaimPartition", raftmq_pb2.ClaimPartitionRequest(
        group_id=group, member_id=joined.member_id, generation=generation, partition=partition))

    with Admin(cluster.bootstrap) as admin:
        leader = leader_of(admin, topic, 0)
    receive = raftmq_pb2.ReceiveRequest(
        group_id=group, member_id=joined.member_id, generation=generation, partition=partition,
        max_records=2, max_wait_ms=1000, request_id=1)
    with grpc.insecure_channel(cluster.address(leader)) as channel:
        lost = raftmq_pb2_grpc.GroupServiceStub(channel).Receive(receive, timeout=15)
    lost_deliveries = [(d.record.offset, d.attempt, d.lease_expires_ms) for d in lost.deliveries]
    progress(f"leader {leader} delivered {lost_deliveries}; the test drops this response")
    assert [(offset, attempt) for offset, attempt, _ in lost_deliveries] == [(0, 1), (1, 1)]

    cluster.kill(leader)
    progress(f"killed node {leader}; retrying the Receive with the same request_id")
    retried = group_call(cluster, "Receive", receive)
    retried_deliveries = [(d.record.offset, d.attempt, d.lease_expires_ms)
                          for d in retried.deliveries]
    progress(f"the retry returned {retried_deliveries}")
    assert retried_deliveries == lost_deliveries
    with Admin(cluster.bootstrap) as admin:
        deadline = time.monotonic() + 30
        while leader_of(admin, topic, 0) == leader and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leader_of(admin, topic, 0) != leader, "the killed node was not the leader"

    receive_next = raftmq_pb2.ReceiveRequest()
    receive_next.CopyFrom(receive)
    receive_next.request_id = 2
    following = group_call(cluster, "Receive", receive_next)
    assert [(d.record.offset, d.attempt) for d in following.deliveries] == [(2, 1)]
    state = group_partition_state(cluster, group, topic)
    assert state.in_flight == 3


# --- ordering while a record waits -----------------------------------------------


class DeliveryLog:
    """Deliveries and settles in the order the consumer saw them."""

    def __init__(self):
        self.events: list[tuple[str, str, int]] = []

    def add(self, kind: str, record: ConsumerRecord) -> None:
        self.events.append((kind, record.value.decode(), record.attempt))

    def first(self, kind: str, name: str, attempt: int | None = None) -> int:
        for position, (event_kind, event_name, event_attempt) in enumerate(self.events):
            if event_kind == kind and event_name == name and attempt in (None, event_attempt):
                return position
        raise AssertionError(f"no {kind} event for {name} attempt {attempt}: {self.events}")

    def attempts(self, name: str) -> list[int]:
        return [attempt for kind, event_name, attempt in self.events
                if kind == "delivered" and event_name == name]


def consume_with_failures(consumer: Consumer, names: set[str], fail: dict[str, int],
                          log: DeliveryLog) -> None:
    """Ack every record of `names`, nacking the first fail[name] attempts of some."""
    acked: set[str] = set()
    deadline = time.monotonic() + CONSUME_TIMEOUT_S
    while acked != names:
        assert time.monotonic() < deadline, (
            f"acked {sorted(acked)} of {sorted(names)}: {log.events}")
        for records in consumer.poll(timeout_ms=200).values():
            for record in records:
                log.add("delivered", record)
                name = record.value.decode()
                if record.attempt <= fail.get(name, 0):
                    consumer.nack(record, error=f"{name} failed on attempt {record.attempt}")
                    log.add("nacked", record)
                else:
                    consumer.ack(record)
                    log.add("acked", record)
                    acked.add(name)
    progress(f"events: {log.events}")


def test_key_ordering_blocks_failing_key(shared_cluster):
    topic, group = "keyed-orders", "keyed-workers"
    create_topic(shared_cluster, topic)
    sends = [("A", "A1"), ("B", "B1"), ("C", "C1"), ("A", "A2"), ("D", "D1"), ("B", "B2"),
             ("A", "A3"), ("C", "C2"), ("D", "D2"), ("B", "B3"), ("C", "C3"), ("D", "D3")]
    produce(shared_cluster, topic, sends)
    policy = RetryPolicy(backoff="fixed", initial_delay_ms=1500, max_attempts=5)
    log = DeliveryLog()
    with acks_consumer(shared_cluster, group, policy) as consumer:
        consumer.subscribe([topic])
        consume_with_failures(consumer, {name for _, name in sends}, {"A1": 2}, log)

    assert log.attempts("A1") == [1, 2, 3]
    assert log.first("delivered", "A2") > log.first("acked", "A1"), "A2 did not wait for A1"
    assert log.first("delivered", "A3") > log.first("acked", "A2"), "A3 did not wait for A2"
    final_attempt = log.first("delivered", "A1", 3)
    for key, name in sends:
        if key == "A":
            continue
        assert log.attempts(name) == [1], f"{name} was delivered as attempts {log.attempts(name)}"
        assert log.first("acked", name) < final_attempt, f"{name} waited for the failing key A"
    for key in "BCD":
        names = [name for k, name in sends if k == key]
        delivered = [log.first("delivered", name) for name in names]
        assert delivered == sorted(delivered), f"key {key} delivered out of order: {log.events}"


def test_partition_ordering_blocks_partition(shared_cluster):
    topic, group = "partition-ordered", "partition-workers"
    create_topic(shared_cluster, topic)
    sends = [("X", "X1"), ("Y", "Y1"), ("Z", "Z1")]
    produce(shared_cluster, topic, sends)
    policy = RetryPolicy(backoff="fixed", initial_delay_ms=1000, max_attempts=3,
                         ordering="partition")
    log = DeliveryLog()
    with acks_consumer(shared_cluster, group, policy) as consumer:
        consumer.subscribe([topic])
        consume_with_failures(consumer, {"X1", "Y1", "Z1"}, {"X1": 1}, log)

    assert log.attempts("X1") == [1, 2]
    for name in ("Y1", "Z1"):
        assert log.attempts(name) == [1]
        assert log.first("delivered", name) > log.first("acked", "X1"), (
            f"{name} was delivered while X1 waited for its retry: {log.events}")


def test_no_ordering_skips_waiting_record(shared_cluster):
    topic, group = "unordered", "unordered-workers"
    create_topic(shared_cluster, topic)
    sends = [("X", "X1"), ("X", "X2"), ("Y", "Y1")]
    produce(shared_cluster, topic, sends)
    policy = RetryPolicy(backoff="fixed", initial_delay_ms=1000, max_attempts=3, ordering="none")
    log = DeliveryLog()
    with acks_consumer(shared_cluster, group, policy) as consumer:
        consumer.subscribe([topic])
        consume_with_failures(consumer, {"X1", "X2", "Y1"}, {"X1": 1}, log)

    assert log.attempts("X1") == [1, 2]
    retry = log.first("delivered", "X1", 2)
    for name in ("X2", "Y1"):
        assert log.attempts(name) == [1]
        assert log.first("acked", name) < retry, f"{name} waited for X1's retry: {log.events}"


# --- leases ----------------------------------------------------------------------


def test_expired_lease_rejects_old_ack(shared_cluster):
    topic, group = "leases", "lease-workers"
    create_topic(shared_cluster, topic)
    (sent,) = produce(shared_cluster, topic, [("slow", "never-acked")])
    policy = RetryPolicy(backoff="immediate", max_attempts=5, visibility_timeout_ms=1000)
    with acks_consumer(shared_cluster, group, policy) as consumer:
        consumer.subscribe([topic])
        first = poll_one(consumer)
        assert first.offset == sent.offset
        assert first.attempt == 1
        progress(f"attempt 1 leased until {first.lease_expires_ms}, now {wall_ms()}")

        second = poll_one(consumer)
        progress(f"attempt {second.attempt} arrived at {wall_ms()}")
        assert second.offset == first.offset
        assert second.attempt == 2
        # Keep attempt 2 leased while the stale ack is checked.
        consumer.extend_lease(second, 30000)

        with pytest.raises(RaftMQError) as rejected:
            consumer.ack(first)
        progress(f"ack of attempt 1 raised {rejected.value}")
        assert rejected.value.reason in ("LEASE_EXPIRED", "STALE_DELIVERY")
        state = group_partition_state(shared_cluster, group, topic)
        assert state.offset == first.offset, "the rejected ack settled the record"
        assert state.in_flight == 1, "the rejected ack ended the lease of attempt 2"

        consumer.ack(second)
        state = group_partition_state(shared_cluster, group, topic)
        assert state.offset == first.offset + 1
        assert state.in_flight == 0


def test_ack_after_lease_expiry_is_rejected(shared_cluster):
    topic, group = "late-acks", "late-workers"
    visibility_ms = 1000
    create_topic(shared_cluster, topic)
    (sent,) = produce(shared_cluster, topic, [("late", "acked-too-late")])
    policy = RetryPolicy(backoff="immediate", max_attempts=5, visibility_timeout_ms=visibility_ms)
    with acks_consumer(shared_cluster, group, policy) as consumer:
        consumer.subscribe([topic])
        first = poll_one(consumer)
        assert first.attempt == 1
        # No poll in between, so nothing but the ack can notice the expiry.
        time.sleep(1.5 * visibility_ms / 1000)
        with pytest.raises(RaftMQError) as rejected:
            consumer.ack(first)
        progress(f"late ack raised {rejected.value}")
        assert rejected.value.reason == "LEASE_EXPIRED"
        state = group_partition_state(shared_cluster, group, topic)
        assert state.offset == sent.offset, "the late ack settled the record"
        assert state.waiting_retry == 1

        second = poll_one(consumer)
        assert second.offset == sent.offset
        assert second.attempt == 2
        consumer.ack(second)
        state = group_partition_state(shared_cluster, group, topic)
        assert state.offset == sent.offset + 1


def test_extend_lease_prevents_redelivery(shared_cluster):
    topic, group = "slow-work", "slow-workers"
    visibility_ms = 1000
    create_topic(shared_cluster, topic)
    (sent,) = produce(shared_cluster, topic, [("slow", "extended")])
    policy = RetryPolicy(backoff="immediate", max_attempts=5, visibility_timeout_ms=visibility_ms)
    with acks_consumer(shared_cluster, group, policy) as consumer:
        consumer.subscribe([topic])
        record = poll_one(consumer)
        assert record.attempt == 1
        # Four visibility timeouts, each extension for two of them.
        until = time.monotonic() + 4 * visibility_ms / 1000
        lease_ends = [record.lease_expires_ms]
        while time.monotonic() < until:
            lease_ends.append(consumer.extend_lease(record, 2 * visibility_ms))
            redelivered = consumer.poll(timeout_ms=300)
            assert redelivered == {}, f"the extended record was delivered again: {redelivered}"
        progress(f"{len(lease_ends) - 1} extensions, lease ends {lease_ends}")
        assert lease_ends == sorted(lease_ends)
        assert lease_ends[-1] > lease_ends[0]
        consumer.ack(record)
        state = group_partition_state(shared_cluster, group, topic)
        assert state.offset == sent.offset + 1
        assert state.in_flight == 0


# --- circuit breaker -------------------------------------------------------------


def test_circuit_breaker_pause_and_trial(shared_cluster):
    topic, group = "flaky-dependency", "breaker-workers"
    threshold, cooldown_ms, records = 3, 4000, 10
    create_topic(shared_cluster, topic)
    produce(shared_cluster, topic, [(f"k{i}", f"job-{i}") for i in range(records)])
    policy = RetryPolicy(backoff="immediate", max_attempts=10)
    breaker = CircuitBreaker(failure_threshold=threshold, cooldown_ms=cooldown_ms)
    with acks_consumer(shared_cluster, group, policy, circuit_breaker=breaker,
                       max_poll_records=threshold) as consumer:
        consumer.subscribe([topic])
        nacks = 0
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while nacks < threshold:
            assert time.monotonic() < deadline, f"only {nacks} records arrived"
            for batch in consumer.poll(timeout_ms=200).values():
                for record in batch:
                    consumer.nack(record, error="dependency unavailable")
                    nacks += 1
        opened_at = time.monotonic()
        assert nacks == threshold
        assert breaker.state == "open"
        progress(f"breaker open after {nacks} nacks")

        state = group_partition_state(shared_cluster, group, topic)
        assert state.in_flight == 0
        assert state.offset < state.high_watermark, "no record is available to receive"
        # Stop well before the cool-down ends, so that a slow poll cannot
        # reach the half-open state.
        quiet_until = opened_at + cooldown_ms / 1000 - 1.5
        quiet_polls = 0
        while time.monotonic() < quiet_until:
            during_cooldown = consumer.poll(timeout_ms=200)
            assert during_cooldown == {}, f"poll returned records while open: {during_cooldown}"
            quiet_polls += 1
        progress(f"{quiet_polls} polls returned nothing during the cool-down")

        trial = poll_one(consumer)
        assert breaker.state == "half_open"
        progress(f"trial record {trial.value!r} attempt {trial.attempt}")
        held_until = time.monotonic() + 1.5
        while time.monotonic() < held_until:
            more = consumer.poll(timeout_ms=200)
            assert more == {}, f"poll returned more than the trial record: {more}"

        consumer.ack(trial)
        assert breaker.state == "closed"
        acked = {trial.value}
        batch_sizes = []
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while len(acked) < records:
            assert time.monotonic() < deadline, f"acked {sorted(acked)} after the breaker closed"
            for batch in consumer.poll(timeout_ms=200).values():
                batch_sizes.append(len(batch))
                consumer.ack(*batch)
                acked.update(record.value for record in batch)
        progress(f"after the breaker closed, polls returned batches of {batch_sizes}")
        assert max(batch_sizes) > 1, "receiving stayed at one record per poll"
        state = group_partition_state(shared_cluster, group, topic)
        assert state.offset == records


# --- repeated settles of settled records ----------------------------------------


def test_nack_retry_after_move_succeeds(shared_cluster):
    """The last nack repeated after the mover settled the record, as an SDK
    retry after a lost response does, is recognised like a repeated ack."""
    topic, group = "one-shot", "one-shot-workers"
    create_topic(shared_cluster, topic)
    produce(shared_cluster, topic, [("once", "fails-once")])
    policy = RetryPolicy(max_attempts=1)
    with acks_consumer(shared_cluster, group, policy) as consumer:
        consumer.subscribe([topic])
        record = poll_one(consumer)
        assert consumer.nack(record, error="permanent failure") is True
        state = wait_for_state(shared_cluster, group, topic,
                               lambda s: s.dead_lettered == 1 and s.dead_letter_pending == 0,
                               "the record moved to the dead-letter topic")
        assert state.dead_lettered == 1, "the mover did not settle the dead letter"
        repeated = raftmq_pb2.NackRequest(
            group_id=group, member_id=consumer.member_id,
            partition=raftmq_pb2.TopicPartition(topic=topic, partition=0),
            delivery=raftmq_pb2.DeliveryRef(offset=record.offset, attempt=record.attempt),
            error="permanent failure")
        reason, details, response = call_status(
            lambda: group_call(shared_cluster, "Nack", repeated))
        progress(f"repeated nack: {reason} {details} {response}")
        assert reason == "OK", (f"the repeated nack failed with {reason}: {details}; node logs:\n"
                                + last_apply_failure(shared_cluster))
        assert response.result.reason == ""
    assert len(read_topic(shared_cluster.bootstrap, f"{topic}.dlq")) == 1


def test_extend_settled_record_rejected(shared_cluster):
    """Extending the lease of an acked record is rejected with a settle reason."""
    topic, group = "done-work", "done-workers"
    create_topic(shared_cluster, topic)
    produce(shared_cluster, topic, [("done", "acked-then-extended")])
    with acks_consumer(shared_cluster, group, RetryPolicy()) as consumer:
        consumer.subscribe([topic])
        record = poll_one(consumer)
        consumer.ack(record)
        extend = raftmq_pb2.ExtendLeaseRequest(
            group_id=group, member_id=consumer.member_id,
            partition=raftmq_pb2.TopicPartition(topic=topic, partition=0),
            delivery=raftmq_pb2.DeliveryRef(offset=record.offset, attempt=record.attempt),
            visibility_timeout_ms=1000)
        reason, details, response = call_status(
            lambda: group_call(shared_cluster, "ExtendLease", extend))
        progress(f"extension of an acked record: {reason} {details} {response}")
        assert reason == "OK", (f"ExtendLease failed with {reason}: {details}; node logs:\n"
                                + last_apply_failure(shared_cluster))
        assert response.result.reason in ("STALE_DELIVERY", "LEASE_EXPIRED", "INVALID_OFFSET"), (
            f"the extension of a settled record was not rejected: {response}")
