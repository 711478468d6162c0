"""Helpers of the crash suite: seeds, a keyed produce workload, faults and a checker.

The workload produces keyed records with the SDK Producer and keeps every
acknowledged (topic, partition, offset, value) in memory. After the faults
and a restart, `check_cluster` waits until the replicas agree, reads every
partition from its leader and compares the replicas' log digests. The
result of one trial is a `TrialResult`, written as one JSON line when
RAFTMQ_CRASH_RESULTS names a file.

Every random choice of a trial comes from its seed. The seed fixes the
choices (fault moment, victims, keys, compaction threshold), not the
scheduling of the node processes, so a replayed trial repeats the same
faults at the same points of the run but may not fail the same way.

pytest does not collect this file because its name does not start with test_.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import grpc

from raftmq.client import Admin, Producer, RaftMQError
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

SEED_ENV = "RAFTMQ_CRASH_SEED"
TRIALS_ENV = "RAFTMQ_CRASH_TRIALS"
RESULTS_ENV = "RAFTMQ_CRASH_RESULTS"
# Set by the operator to run nodes on pysyncobj without raftmq's raft/
# overrides. The suite only passes it on (LocalCluster copies os.environ to
# every node) and records its value in each result.
FIXES_ENV = "RAFTMQ_PYSYNCOBJ_FIXES"

DEFAULT_TRIALS = 5
# A result line lists at most this many lost records; lost_count counts them all.
MAX_LOST_IN_RESULT = 100
RPC_TIMEOUT_S = 5.0
FETCH_PAGE_RECORDS = 500

_base_seed: int | None = None


# --- seeds and settings ---------------------------------------------------


def base_seed() -> int:
    """Return the session's base seed: RAFTMQ_CRASH_SEED, or one drawn once per process."""
    global _base_seed
    if _base_seed is None:
        text = os.environ.get(SEED_ENV, "").strip()
        if text:
            try:
                _base_seed = int(text)
            except ValueError:
                raise ValueError(
                    f"invalid {SEED_ENV} {text!r}: expected an integer, for example "
                    f"{SEED_ENV}=12345") from None
        else:
            _base_seed = random.SystemRandom().randrange(2**32)
    return _base_seed


def trial_seed(base: int, mode: str, trial: int) -> int:
    """Derive the seed of one trial from the base seed, the mode and the trial number."""
    # Seeding random.Random with a str hashes it with SHA-512, so the derived
    # seed is the same in every process, whatever PYTHONHASHSEED is.
    return random.Random(f"{base}/{mode}/{trial}").randrange(2**32)


def trial_count() -> int:
    """Return the number of trials per mode from RAFTMQ_CRASH_TRIALS (default 5)."""
    text = os.environ.get(TRIALS_ENV, "").strip()
    if not text:
        return DEFAULT_TRIALS
    try:
        count = int(text)
    except ValueError:
        raise ValueError(
            f"invalid {TRIALS_ENV} {text!r}: expected a positive integer, for example "
            f"{TRIALS_ENV}=20") from None
    if count < 1:
        raise ValueError(f"invalid {TRIALS_ENV} {count}: must be >= 1")
    return count


def fixes_setting() -> str:
    """Return RAFTMQ_PYSYNCOBJ_FIXES as the nodes see it ("" when unset)."""
    return os.environ.get(FIXES_ENV, "")


# --- the workload ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AckedRecord:
    topic: str
    partition: int
    offset: int
    value: bytes


class KeyedWorkload:
    """Produce keyed records from a background thread and keep every acknowledged one.

    Each value is b"key-K:N", where N counts the records sent for key K, so
    every value is unique and names its key. At most max_in_flight records
    are unacknowledged at once, so a stalled cluster does not fill the
    producer's buffer.
    """

    def __init__(self, bootstrap: str, topic: str, rng: random.Random, key_count: int = 32,
                 max_in_flight: int = 2000):
        self.topic = topic
        self._rng = random.Random(rng.getrandbits(64))
        self._key_count = key_count
        self._next_sequence = [0] * key_count
        self._in_flight = threading.Semaphore(max_in_flight)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._acked: list[AckedRecord] = []
        self._failures = 0
        self._first_errors: list[str] = []
        self._sent = 0
        self._producer = Producer(
            bootstrap,
            linger_ms=5,
            max_block_ms=5000,
            request_timeout_ms=5000,
            delivery_timeout_ms=60000,
            retry_backoff_ms=20,
            retry_backoff_max_ms=200,
        )
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="crash-workload", daemon=True)

    def __enter__(self) -> KeyedWorkload:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(flush_timeout_s=0)

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self._in_flight.acquire(timeout=0.1):
                continue
            key_index = self._rng.randrange(self._key_count)
            sequence = self._next_sequence[key_index]
            self._next_sequence[key_index] += 1
            key = f"key-{key_index}"
            value = f"{key}:{sequence}".encode()
            try:
                future = self._producer.send(self.topic, value, key=key.encode())
            except RaftMQError as error:
                self._in_flight.release()
                self._count_failure(error)
                continue
            with self._lock:
                self._sent += 1
            future.add_done_callback(partial(self._on_done, value))

    def _on_done(self, value: bytes, future) -> None:
        self._in_flight.release()
        try:
            metadata = future.result()
        except Exception as error:  # noqa: BLE001 - an unacknowledged record is only counted
            self._count_failure(error)
            return
        record = AckedRecord(metadata.topic, metadata.partition, metadata.offset, value)
        with self._lock:
            self._acked.append(record)

    def _count_failure(self, error: BaseException) -> None:
        with self._lock:
            self._failures += 1
            if len(self._first_errors) < 3:
                self._first_errors.append(repr(error))

    @property
    def acked_count(self) -> int:
        with self._lock:
            return len(self._acked)

    def acked(self) -> list[AckedRecord]:
        with self._lock:
            return list(self._acked)

    def wait_for_acks(self, count: int, timeout_s: float) -> bool:
        """Wait until at least `count` records are acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.acked_count < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, flush_timeout_s: float) -> None:
        """Stop sending, wait up to flush_timeout_s for outstanding acks, close the producer.

        Records still unacknowledged after that fail and are not counted as
        acked. A second call does nothing.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._thread.join(timeout=30)
        try:
            self._producer.flush(timeout=flush_timeout_s)
        except TimeoutError:
            pass
        self._producer.close(timeout=0)

    def summary(self) -> dict[str, object]:
        with self._lock:
            return {
                "sent": self._sent,
                "acked": len(self._acked),
                "unacked": self._failures,
                "first_errors": list(self._first_errors),
            }


# --- faults ---------------------------------------------------------------


def kill_nodes(cluster, node_ids: Iterable[int]) -> None:
    """SIGKILL the given nodes as close together as possible, then reap them."""
    node_ids = list(node_ids)
    for node_id in node_ids:
        process = cluster.processes[node_id]
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    for node_id in node_ids:
        cluster.kill(node_id)


def stop_nodes(cluster, node_ids: Iterable[int]) -> None:
    """SIGTERM the given nodes at once and wait until each has exited."""
    threads = [threading.Thread(target=cluster.stop, args=(node_id,)) for node_id in node_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class LogWatcher:
    """Follow a node's log file from its current end and match new lines."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float,
                 poll_s: float = 0.002) -> str | None:
        """Return the first new line that matches `pattern`, or None after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.new_lines():
                if pattern.search(line):
                    return line
            time.sleep(poll_s)
        return None


def log_contains(path: Path, text: str) -> bool:
    try:
        return text in Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return False


# --- observing the cluster ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReplicaState:
    role: str
    raft_term: int
    applied_index: int
    high_watermark: int
    log_digest: str


def describe_replicas(address: str, topic: str, include_digest: bool) -> dict[int, ReplicaState]:
    """Return the replicas of `topic` hosted by the node at `address`, by partition.

    Raises grpc.RpcError when the call fails.
    """
    with grpc.insecure_channel(address) as channel:
        response = raftmq_pb2_grpc.AdminServiceStub(channel).DescribeReplicas(
            raftmq_pb2.DescribeReplicasRequest(include_digest=include_digest),
            timeout=RPC_TIMEOUT_S)
    return {
        replica.partition: ReplicaState(replica.role, replica.raft_term, replica.applied_index,
                                        replica.high_watermark, replica.log_digest)
        for replica in response.replicas
        if replica.topic == topic
    }


def partition_leaders(cluster, topic: str) -> dict[int, int] | None:
    """Return partition -> leader node id (0 when none) per DescribeTopic, or None on error."""
    try:
        with Admin(cluster.bootstrap, request_timeout_ms=int(RPC_TIMEOUT_S * 1000)) as admin:
            description = admin.describe_topic(topic)
    except RaftMQError:
        return None
    return {p.partition: p.leader for p in description.partitions}


@dataclasses.dataclass
class Observation:
    """One look at the cluster: DescribeTopic leaders and every node's replicas."""

    leaders: dict[int, int] | None
    # node id -> partition -> state; a node whose call failed maps to None.
    replicas: dict[int, dict[int, ReplicaState] | None]

    def replica_states(self, partition: int) -> dict[int, ReplicaState | None]:
        return {
            node_id: (None if states is None else states.get(partition))
            for node_id, states in self.replicas.items()
        }

    def leaderless(self, partitions: Iterable[int]) -> list[int]:
        """Partitions without a DescribeTopic leader or without a replica in role leader."""
        result = []
        for partition in partitions:
            known = self.leaders is not None and self.leaders.get(partition, 0) != 0
            roles = [s.role for s in self.replica_states(partition).values() if s is not None]
            if not known or "leader" not in roles:
                result.append(partition)
        return result

    def settled(self, partitions: Iterable[int]) -> bool:
        """True when every partition has a leader and all its replicas report equal state."""
        partitions = list(partitions)
        if self.leaderless(partitions):
            return False
        for partition in partitions:
            states = list(self.replica_states(partition).values())
            if any(s is None for s in states):
                return False
            if len({(s.applied_index, s.high_watermark) for s in states}) != 1:
                return False
        return True

    def progress(self, partitions: Iterable[int]) -> dict[int, dict[int, object]]:
        """Per partition and node: (role, applied_index, high_watermark), for messages."""
        return {
            partition: {
                node_id: (None if s is None else (s.role, s.applied_index, s.high_watermark))
                for node_id, s in self.replica_states(partition).items()
            }
            for partition in partitions
        }


def observe(cluster, topic: str, include_digest: bool = False) -> Observation:
    replicas: dict[int, dict[int, ReplicaState] | None] = {}
    for node_id in cluster.node_ids:
        try:
            replicas[node_id] = describe_replicas(cluster.address(node_id), topic, include_digest)
        except grpc.RpcError:
            replicas[node_id] = None
    return Observation(partition_leaders(cluster, topic), replicas)


def wait_until_settled(cluster, topic: str, partitions: list[int],
                       timeout_s: float) -> tuple[Observation, bool]:
    """Poll until two looks in a row are settled and equal, or timeout_s passes.

    Returns the last look and whether it settled in time.
    """
    deadline = time.monotonic() + timeout_s
    previous: Observation | None = None
    while True:
        current = observe(cluster, topic)
        if (current.settled(partitions) and previous is not None
                and previous.settled(partitions)
                and previous.progress(partitions) == current.progress(partitions)):
            return current, True
        if time.monotonic() > deadline:
            return current, False
        previous = current
        time.sleep(0.3)


# --- reading the logs back ------------------------------------------------


def fetch_partition(address: str, topic: str, partition: int,
                    timeout_s: float = 30.0) -> dict[int, bytes]:
    """Read every committed record of a partition through the node at `address`.

    Returns offset -> value. Retries failed calls until timeout_s, then
    raises the last grpc.RpcError.
    """
    records: dict[int, bytes] = {}
    offset = 0
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * 2**20)]) as channel:
        stub = raftmq_pb2_grpc.ConsumerServiceStub(channel)
        while True:
            request = raftmq_pb2.FetchRequest(topic=topic, partition=partition, offset=offset,
                                              max_records=FETCH_PAGE_RECORDS, max_wait_ms=0)
            try:
                response = stub.Fetch(request, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            for record in response.records:
                records[record.offset] = record.value
            if response.records:
                offset = response.records[-1].offset + 1
            if offset >= response.high_watermark or not response.records:
                return records


# --- the checker ----------------------------------------------------------


@dataclasses.dataclass
class CheckOutcome:
    settled: bool
    # One entry per acknowledged record that is missing or has another value.
    lost: list[dict[str, object]]
    diverged: list[int]
    leaderless: list[int]
    # partition -> (high_watermark, digest) as the leader reported them.
    fingerprint: dict[int, tuple[int, str]]
    details: dict[str, object]


def _value_text(value: bytes | None) -> str | None:
    return None if value is None else value.decode(errors="backslashreplace")


def find_lost(acked: list[AckedRecord], partition: int,
              stored: dict[int, bytes]) -> list[dict[str, object]]:
    """Return the acknowledged records of `partition` that are missing from `stored` or differ."""
    lost = []
    for record in acked:
        if record.partition != partition:
            continue
        found = stored.get(record.offset)
        if found != record.value:
            lost.append({
                "partition": partition,
                "offset": record.offset,
                "expected": _value_text(record.value),
                "found": _value_text(found),
            })
    return lost


def check_cluster(cluster, topic: str, partitions: list[int], acked: list[AckedRecord],
                  settle_timeout_s: float = 45.0) -> CheckOutcome:
    """Check that every acknowledged record survived and that the replicas agree.

    The check runs in four steps. (a) It waits up to settle_timeout_s for
    every partition to have a leader and for all replicas to report equal
    applied_index and high_watermark. (b) It reads every partition through
    its leader and looks up each acknowledged record at its offset. (c) It
    compares the replicas' log digests. (d) It lists the partitions left
    without a leader.
    """
    observation, settled = wait_until_settled(cluster, topic, partitions, settle_timeout_s)
    details: dict[str, object] = {"settled": settled}
    if not settled:
        details["progress_at_timeout"] = {
            str(p): {str(n): v for n, v in nodes.items()}
            for p, nodes in observation.progress(partitions).items()
        }

    lost: list[dict[str, object]] = []
    fetch_errors: dict[str, str] = {}
    leaders = observation.leaders or {}
    for partition in partitions:
        leader = leaders.get(partition, 0)
        # With no known leader, any node forwards the fetch to the current leader.
        address = cluster.address(leader) if leader else cluster.bootstrap.split(",")[0]
        try:
            stored = fetch_partition(address, topic, partition)
        except grpc.RpcError as error:
            fetch_errors[str(partition)] = f"{error.code()}: {error.details()}"
            stored = {}
        lost.extend(find_lost(acked, partition, stored))
    if fetch_errors:
        details["fetch_errors"] = fetch_errors

    with_digests = observe(cluster, topic, include_digest=True)
    diverged = []
    fingerprint: dict[int, tuple[int, str]] = {}
    digests: dict[str, dict[str, object]] = {}
    for partition in partitions:
        states = with_digests.replica_states(partition)
        digests[str(partition)] = {
            str(node_id): (None if s is None else [s.high_watermark, s.log_digest[:16]])
            for node_id, s in states.items()
        }
        present = [s for s in states.values() if s is not None]
        if len(present) < len(states) or len({s.log_digest for s in present}) != 1:
            diverged.append(partition)
        leader = leaders.get(partition, 0)
        reference = states.get(leader) or (present[0] if present else None)
        if reference is not None:
            fingerprint[partition] = (reference.high_watermark, reference.log_digest)
    if diverged:
        details["digests"] = digests

    leaderless = with_digests.leaderless(partitions)
    return CheckOutcome(settled, lost, diverged, leaderless, fingerprint, details)


def compare_fingerprints(before: dict[int, tuple[int, str]], after: dict[int, tuple[int, str]],
                         cycle: int) -> list[dict[str, object]]:
    """Return one entry per partition whose high watermark or digest changed."""
    changes = []
    for partition in sorted(set(before) | set(after)):
        old = before.get(partition)
        new = after.get(partition)
        if old != new:
            changes.append({
                "cycle": cycle,
                "partition": partition,
                "before": None if old is None else [old[0], old[1][:16]],
                "after": None if new is None else [new[0], new[1][:16]],
            })
    return changes


# --- results --------------------------------------------------------------


@dataclasses.dataclass
class TrialResult:
    mode: str
    seed: int
    base_seed: int
    trial: int
    acked: int = 0
    unacked: int = 0
    # Distinct acknowledged records found missing or changed by any check.
    lost_count: int = 0
    # One entry per check that found a record missing or changed, at most
    # MAX_LOST_IN_RESULT entries.
    lost: list[dict[str, object]] = dataclasses.field(default_factory=list)
    # Check label -> records that check found missing or changed.
    lost_per_check: dict[str, int] = dataclasses.field(default_factory=dict)
    diverged: list[int] = dataclasses.field(default_factory=list)
    leaderless: list[int] = dataclasses.field(default_factory=list)
    # full_restart only: partitions whose high watermark or digest changed.
    restart_changes: list[dict[str, object]] = dataclasses.field(default_factory=list)
    # Labels of the checks whose replicas did not settle in time.
    unsettled: list[str] = dataclasses.field(default_factory=list)
    # repr of the exception that ended the trial before its checks, if any.
    error: str | None = None
    duration_s: float = 0.0
    pysyncobj_fixes: str = ""
    details: dict[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # (partition, offset) of every lost record; not a field, so not in the JSON.
        self._lost_positions: set[tuple[object, object]] = set()

    def add_outcome(self, outcome: CheckOutcome, label: str) -> None:
        """Merge one check into the result; `label` names the check in `details`."""
        for entry in outcome.lost:
            self._lost_positions.add((entry["partition"], entry["offset"]))
            if len(self.lost) < MAX_LOST_IN_RESULT:
                self.lost.append(dict(entry, check=label))
        self.lost_count = len(self._lost_positions)
        if outcome.lost:
            self.lost_per_check[label] = len(outcome.lost)
        self.diverged = sorted(set(self.diverged) | set(outcome.diverged))
        self.leaderless = sorted(set(self.leaderless) | set(outcome.leaderless))
        if not outcome.settled:
            self.unsettled.append(label)
        self.details[label] = outcome.details

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def write_result(result: TrialResult) -> None:
    """Append the result as one JSON line to RAFTMQ_CRASH_RESULTS, if it is set."""
    path = os.environ.get(RESULTS_ENV, "").strip()
    if not path:
        return
    line = result.to_json() + "\n"
    # One write() of an O_APPEND file, so parallel trials do not interleave lines.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def replay_hint(result: TrialResult, test_id: str) -> str:
    """Return the seed of a trial and the command that replays it."""
    trials = max(trial_count(), result.trial + 1)
    return (f"seed {result.seed} (base seed {result.base_seed}, trial {result.trial}); replay "
            f"with {SEED_ENV}={result.base_seed} {TRIALS_ENV}={trials} "
            f"python -m pytest '{test_id}'")
