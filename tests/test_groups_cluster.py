"""Consumer groups on real three-node clusters, with members as separate processes.

Each member is a tests/group_worker.py process that commits after every
poll batch and logs what it consumed and committed to a JSON-lines file, so
a member can be killed with SIGKILL and its file still records what it had
committed. Group state is read with raw GroupService calls (DescribeGroup,
FetchCommittedOffsets) on whichever node is up.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from cluster import LocalCluster
from raftmq.client import Producer
from raftmq.client.errors import REASONS, error_info_of
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

pytestmark = pytest.mark.cluster

WORKER_SCRIPT = Path(__file__).with_name("group_worker.py")
SESSION_TIMEOUT_MS = 3000
# Waits are generous because the machine may be loaded, and no test checks
# how long anything took.
SETTLE_TIMEOUT_S = SESSION_TIMEOUT_MS / 1000 + 60
CONSUME_TIMEOUT_S = 120
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- worker processes --------------------------------------------------------


class Worker:
    """One group_worker.py process and its output file."""

    def __init__(self, name: str, folder: Path, args: list[str]):
        self.name = name
        self.output = folder / f"{name}.jsonl"
        self.stderr_path = folder / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "ab")
        command = [sys.executable, str(WORKER_SCRIPT), "--output", str(self.output), *args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._stderr)
        self.pid = self.process.pid

    def events(self, kind: str | None = None) -> list[dict]:
        """Parse the complete lines of the output file, skipping a line cut short by a kill."""
        try:
            text = self.output.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        events = []
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or event["event"] == kind:
                events.append(event)
        return events

    def assignment(self) -> tuple[str, frozenset[int]] | None:
        """Return (member id, partitions) from the latest assignment line, or None."""
        lines = self.events("assignment")
        if not lines:
            return None
        return lines[-1]["member_id"], frozenset(lines[-1]["partitions"])

    def consumed(self) -> list[tuple[int, int, str]]:
        return [(e["partition"], e["offset"], e["key"]) for e in self.events("record")]

    def last_commits(self) -> dict[int, int]:
        """Return the highest committed offset the worker logged, per partition."""
        commits: dict[int, int] = {}
        for event in self.events("commit"):
            commits[event["partition"]] = max(commits.get(event["partition"], -1), event["offset"])
        return commits

    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Send SIGTERM, which makes the worker leave its group, then SIGKILL after 15 s."""
        try:
            if self.running():
                os.kill(self.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    progress(f"{self.name} (pid {self.pid}) ignored SIGTERM; killing it")
            if self.running():
                os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        finally:
            self._stderr.close()

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            text = ""
        return "\n".join(text.splitlines()[-lines:])


class WorkerPool:
    def __init__(self, folder: Path, cluster: LocalCluster):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.workers: list[Worker] = []

    def start(self, name: str, group: str, topic: str, *, record_sleep_ms: int = 0,
              max_poll_records: int = 500, max_poll_interval_ms: int = 300_000,
              session_timeout_ms: int = SESSION_TIMEOUT_MS) -> Worker:
        args = [
            "--bootstrap", self.cluster.bootstrap, "--group", group, "--topic", topic,
            "--client-id", name,
            "--session-timeout-ms", str(session_timeout_ms),
            "--max-poll-interval-ms", str(max_poll_interval_ms),
            "--record-sleep-ms", str(record_sleep_ms),
            "--max-poll-records", str(max_poll_records),
            "--auto-offset-reset", "earliest",
        ]
        worker = Worker(name, self.folder, args)
        self.workers.append(worker)
        progress(f"started {name} (pid {worker.pid}) in group {group}")
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def workers(cluster, tmp_path):
    pool = WorkerPool(tmp_path / "workers", cluster)
    try:
        yield pool
    finally:
        pool.stop_all()


# --- raw gRPC calls ------------------------------------------------------------


def reason_of(error: grpc.RpcError) -> str | None:
    info = error_info_of(error)
    return info.reason if info is not None else None


def call_any_node(cluster: LocalCluster, stub_type, method: str, request, timeout_s: float = 60):
    """Call `method` on the running nodes in turn until one succeeds.

    Retries unavailable nodes and retriable reasons (no leader yet, commit
    timeout) until `timeout_s`, and raises other errors at once.
    """
    deadline = time.monotonic() + timeout_s
    last = "no node was running"
    while True:
        for node_id in cluster.node_ids:
            if not cluster.is_running(node_id):
                continue
            with grpc.insecure_channel(cluster.address(node_id)) as channel:
                try:
                    return getattr(stub_type(channel), method)(request, timeout=10)
                except grpc.RpcError as error:
                    reason = reason_of(error)
                    if error.code() not in RETRY_CODES and not REASONS.get(reason or "", False):
                        raise
                    last = f"node {node_id}: {error.code().name} {reason}: {error.details()}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{method} failed on every node for {timeout_s} s; last: {last}")
        time.sleep(0.2)


def group_call(cluster: LocalCluster, method: str, request, timeout_s: float = 60):
    return call_any_node(cluster, raftmq_pb2_grpc.GroupServiceStub, method, request, timeout_s)


def describe_group(cluster: LocalCluster, group: str) -> raftmq_pb2.DescribeGroupResponse:
    return group_call(cluster, "DescribeGroup", raftmq_pb2.DescribeGroupRequest(group_id=group))


def committed_offsets(cluster: LocalCluster, group: str, topic: str) -> dict[int, tuple[int, int]]:
    """Return partition -> (committed offset, high watermark) for every partition."""
    response = group_call(cluster, "FetchCommittedOffsets",
                          raftmq_pb2.FetchCommittedOffsetsRequest(group_id=group, topic=topic))
    return {o.partition: (o.offset, o.high_watermark) for o in response.offsets}


def controller_of(cluster: LocalCluster) -> int:
    deadline = time.monotonic() + 60
    while True:
        response = call_any_node(cluster, raftmq_pb2_grpc.AdminServiceStub, "DescribeCluster",
                                 raftmq_pb2.DescribeClusterRequest())
        if response.controller:
            return response.controller
        assert time.monotonic() < deadline, "no node reported a controller for 60 s"
        time.sleep(0.2)


def create_topic(cluster: LocalCluster, name: str, partitions: int) -> None:
    call_any_node(cluster, raftmq_pb2_grpc.AdminServiceStub, "CreateTopic",
                  raftmq_pb2.CreateTopicRequest(name=name, partitions=partitions,
                                                replication_factor=3))


def member_partitions(description: raftmq_pb2.DescribeGroupResponse) -> dict[str, frozenset[int]]:
    return {m.member_id: frozenset(tp.partition for tp in m.partitions)
            for m in description.members}


# --- producing and waiting ---------------------------------------------------------


def produce(cluster: LocalCluster, topic: str, count: int,
            prefix: str) -> dict[tuple[int, int], str]:
    """Produce `count` keyed records and return (partition, offset) -> key of each acked one."""
    keys = [f"{prefix}-{i}" for i in range(count)]
    with Producer(cluster.bootstrap, linger_ms=5, retry_backoff_ms=20) as producer:
        futures = [(key, producer.send(topic, key.encode(), key=key.encode())) for key in keys]
        producer.flush(timeout=120)
    acked = {}
    for key, future in futures:
        metadata = future.result(timeout=0)
        acked[(metadata.partition, metadata.offset)] = key
    progress(f"produced {count} records to {topic}")
    return acked


def wait_until(condition, timeout_s: float, describe) -> None:
    """Poll `condition` until it is true, and fail with describe() after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s: {describe()}")
        time.sleep(0.1)


def wait_all_committed(cluster: LocalCluster, group: str, topic: str, pool: WorkerPool) -> None:
    """Wait until the group's committed offset is the high watermark on every partition."""
    state = {}

    def done() -> bool:
        state["offsets"] = committed_offsets(cluster, group, topic)
        return all(offset == high for offset, high in state["offsets"].values())

    def describe() -> str:
        tails = "\n".join(f"--- {w.name}:\n{w.tail()}" for w in pool.workers)
        return (f"group {group} did not commit up to the high watermark: "
                f"(committed, high watermark) {state.get('offsets')}\n{tails}")

    wait_until(done, CONSUME_TIMEOUT_S, describe)
    progress(f"group {group} committed every record of {topic}: {state['offsets']}")


def wait_balanced(cluster: LocalCluster, group: str, members: list[Worker], partitions: int,
                  *, per_member: int | None = None, checks: int = 1) -> None:
    """Wait until DescribeGroup and the workers' latest assignment lines agree.

    The group must be stable with exactly `members` as members, and their
    assignments disjoint and covering all partitions (per_member each, if
    given). With checks > 1 the condition must hold that many times in a row.
    """
    state = {"streak": 0}

    def balanced_now() -> bool:
        try:
            description = describe_group(cluster, group)
        except grpc.RpcError as error:
            if reason_of(error) == "UNKNOWN_GROUP":
                return False  # no member has joined yet
            raise
        state["description"] = description
        reported = {w.name: w.assignment() for w in members}
        state["reported"] = reported
        if description.state != "stable" or any(a is None for a in reported.values()):
            return False
        described = member_partitions(description)
        if set(described) != {member_id for member_id, _ in reported.values()}:
            return False
        if any(described[member_id] != owned for member_id, owned in reported.values()):
            return False
        owned_lists = [owned for _, owned in reported.values()]
        if sorted(p for owned in owned_lists for p in owned) != list(range(partitions)):
            return False
        return per_member is None or all(len(owned) == per_member for owned in owned_lists)

    def balanced() -> bool:
        state["streak"] = state["streak"] + 1 if balanced_now() else 0
        if state["streak"] < checks:
            if state["streak"]:
                time.sleep(0.5)
            return False
        return True

    def describe() -> str:
        description = state.get("description")
        described = member_partitions(description) if description is not None else None
        return (f"group {group} not balanced over {partitions} partitions; DescribeGroup: "
                f"state={getattr(description, 'state', None)} members={described}; "
                f"workers report {state.get('reported')}")

    wait_until(balanced, SETTLE_TIMEOUT_S, describe)
    progress(f"group {group} balanced: {member_partitions(state['description'])} "
             f"(generation {state['description'].generation})")


# --- the tests ---------------------------------------------------------------------


def test_killed_member_partitions_move(cluster, workers):
    topic, group = "orders", "billing"
    create_topic(cluster, topic, 6)
    members = [workers.start(f"member{i}", group, topic, record_sleep_ms=20, max_poll_records=10)
               for i in range(3)]
    wait_balanced(cluster, group, members, 6, per_member=2)

    produced = produce(cluster, topic, 600, "first")
    victim, survivors = members[0], members[1:]
    _, victim_partitions = victim.assignment()

    def victim_committed_some() -> bool:
        commits = victim.last_commits()
        return all(commits.get(p, 0) >= 40 for p in victim_partitions)

    wait_until(victim_committed_some, CONSUME_TIMEOUT_S,
               lambda: f"{victim.name} logged commits {victim.last_commits()}\n{victim.tail()}")
    victim.kill()
    victim_commits = victim.last_commits()
    progress(f"killed {victim.name}; it had logged commits {victim_commits} "
             f"on partitions {sorted(victim_partitions)}")
    ends = {p: 0 for p in range(6)}
    for partition, offset in produced:
        ends[partition] = max(ends[partition], offset + 1)
    assert any(victim_commits[p] < ends[p] for p in victim_partitions), (
        f"{victim.name} had committed all of partitions {sorted(victim_partitions)} before it "
        f"was killed (commits {victim_commits}, ends {ends}), so no records were left to move")

    wait_balanced(cluster, group, survivors, 6)
    produced.update(produce(cluster, topic, 120, "second"))
    wait_all_committed(cluster, group, topic, workers)
    workers.stop_all()

    consumed = collections.Counter()
    consumers_of: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
    for worker in members:
        for partition, offset, key in worker.consumed():
            position = (partition, offset)
            assert position in produced, (
                f"{worker.name} consumed {position}, which was never produced")
            assert key == produced[position], (
                f"{worker.name} read key {key!r} at {position}, produced {produced[position]!r}")
            consumed[position] += 1
            consumers_of[position].append(worker.name)
    skipped = sorted(set(produced) - set(consumed))
    assert skipped == [], f"{len(skipped)} records were never consumed, first {skipped[:10]}"

    consumed_again = sorted(
        (partition, offset) for worker in survivors for partition, offset, _ in worker.consumed()
        if partition in victim_partitions and offset < victim_commits[partition])
    assert consumed_again == [], (
        f"records below the offsets {victim_commits} that {victim.name} committed were consumed "
        f"again by the survivors: {consumed_again[:10]}")

    # Only records the victim had processed but not committed may be read twice.
    duplicated = sorted(
        position for position, count in consumed.items()
        if count > 1 and not (position[0] in victim_partitions
                              and position[1] >= victim_commits[position[0]]))
    assert duplicated == [], (
        f"records consumed more than once: {[(p, consumers_of[p]) for p in duplicated[:10]]}")
    moved = sum(count for (partition, offset), count in consumed.items()
                if partition in victim_partitions and offset >= victim_commits[partition])
    progress(f"{len(produced)} records consumed; {moved} reads of the victim's uncommitted tail")


def test_two_groups_get_every_record(cluster, workers):
    topic = "events"
    create_topic(cluster, topic, 3)
    groups = {"audit": 2, "search": 1}
    members = {group: [workers.start(f"{group}{i}", group, topic) for i in range(count)]
               for group, count in groups.items()}
    for group, group_members in members.items():
        wait_balanced(cluster, group, group_members, 3)

    produced = produce(cluster, topic, 150, "event")
    for group in groups:
        wait_all_committed(cluster, group, topic, workers)
    workers.stop_all()

    for group, group_members in members.items():
        consumed = {}
        for worker in group_members:
            for partition, offset, key in worker.consumed():
                consumed[(partition, offset)] = key
        missing = sorted(set(produced) - set(consumed))
        assert missing == [], f"group {group} never consumed {len(missing)} records: {missing[:10]}"
        extra = sorted(set(consumed) - set(produced))
        assert extra == [], f"group {group} consumed records never produced: {extra[:10]}"
        wrong_keys = [p for p in produced if consumed[p] != produced[p]]
        assert wrong_keys == [], f"group {group} read other keys at {wrong_keys[:10]}"


def commit(cluster, group: str, member_id: str, generation: int, topic: str, partition: int,
           offset: int) -> grpc.RpcError | int:
    """Send one CommitOffset and return the stored offset, or the RpcError it failed with."""
    request = raftmq_pb2.CommitOffsetRequest(
        group_id=group, member_id=member_id, generation=generation,
        partition=raftmq_pb2.TopicPartition(topic=topic, partition=partition), offset=offset)
    try:
        return group_call(cluster, "CommitOffset", request).offset
    except grpc.RpcError as error:
        return error


def assert_fenced(result, reason: str) -> None:
    assert isinstance(result, grpc.RpcError), f"commit was accepted (stored offset {result})"
    assert result.code() == grpc.StatusCode.FAILED_PRECONDITION, (
        f"expected FAILED_PRECONDITION, got {result.code().name}: {result.details()}")
    assert reason_of(result) == reason, (
        f"expected {reason}, got {reason_of(result)}: {result.details()}")


def test_old_generation_commit_rejected(cluster):
    topic, group = "ledger", "fencing"
    create_topic(cluster, topic, 2)
    with Producer(cluster.bootstrap, linger_ms=5) as producer:
        for i in range(20):
            producer.send(topic, f"entry-{i}".encode(), partition=i % 2)
        producer.flush(timeout=60)

    def join(name: str) -> raftmq_pb2.JoinGroupResponse:
        # A long session: these raw members send heartbeats only when the test does.
        return group_call(cluster, "JoinGroup", raftmq_pb2.JoinGroupRequest(
            group_id=group, topics=[topic], client_id=name, session_timeout_ms=60_000,
            auto_offset_reset="earliest"))

    def heartbeat(member_id: str, released=()) -> raftmq_pb2.MemberAssignment:
        return group_call(cluster, "Heartbeat", raftmq_pb2.HeartbeatRequest(
            group_id=group, member_id=member_id,
            released=[raftmq_pb2.TopicPartition(topic=topic, partition=p) for p in released],
        )).assignment

    def claim(member_id: str, generation: int, partition: int) -> int:
        return group_call(cluster, "ClaimPartition", raftmq_pb2.ClaimPartitionRequest(
            group_id=group, member_id=member_id, generation=generation,
            partition=raftmq_pb2.TopicPartition(topic=topic, partition=partition))).offset

    def committed(partition: int) -> int:
        return committed_offsets(cluster, group, topic)[partition][0]

    first = join("first")
    first_id, generation_1 = first.member_id, first.assignment.generation
    assert sorted(tp.partition for tp in first.assignment.partitions) == [0, 1]
    for partition in (0, 1):
        assert claim(first_id, generation_1, partition) == 0
        assert commit(cluster, group, first_id, generation_1, topic, partition, 4) == 4

    second = join("second")
    second_id, generation_2 = second.member_id, second.assignment.generation
    assert generation_2 > generation_1
    assignment = heartbeat(first_id)
    assert assignment.generation == generation_2
    revoking = [tp.partition for tp in assignment.revoking]
    assert len(revoking) == 1, f"expected one partition to move to the second member: {assignment}"
    moving = revoking[0]
    staying = 1 - moving
    progress(f"generation {generation_2}: partition {moving} moves, {staying} stays")

    result = commit(cluster, group, first_id, generation_1, topic, staying, 7)
    assert_fenced(result, "ILLEGAL_GENERATION")
    assert committed(staying) == 4
    # The same member in the current generation may still commit the partition it keeps.
    assert commit(cluster, group, first_id, generation_2, topic, staying, 6) == 6
    assert committed(staying) == 6

    generation_3 = heartbeat(first_id, released=[moving]).generation
    assert generation_3 > generation_2
    assignment = heartbeat(second_id)
    assert assignment.generation == generation_3
    assert [tp.partition for tp in assignment.partitions] == [moving]
    assert claim(second_id, generation_3, moving) == 4

    result = commit(cluster, group, first_id, generation_3, topic, moving, 9)
    assert_fenced(result, "NOT_PARTITION_OWNER")
    result = commit(cluster, group, first_id, generation_2, topic, moving, 9)
    assert_fenced(result, "ILLEGAL_GENERATION")
    assert committed(moving) == 4
    assert commit(cluster, group, second_id, generation_3, topic, moving, 8) == 8
    assert committed(moving) == 8


def test_slow_handler_keeps_partitions(cluster, workers):
    topic, group = "reports", "renderer"
    create_topic(cluster, topic, 2)
    record_sleep_ms = SESSION_TIMEOUT_MS + 1500
    worker = workers.start("slow", group, topic, record_sleep_ms=record_sleep_ms,
                           max_poll_records=1, max_poll_interval_ms=60_000)
    wait_balanced(cluster, group, [worker], 2)
    before = describe_group(cluster, group)
    member_id, owned = worker.assignment()
    assignment_lines = len(worker.events("assignment"))

    produced = produce(cluster, topic, 3, "report")
    samples = []

    def processed_all_or_changed() -> bool:
        description = describe_group(cluster, group)
        samples.append((description.generation, description.state,
                        member_partitions(description)))
        if description.generation != before.generation:
            return True  # the checks below report the change
        commits = worker.last_commits()
        ends = {}
        for partition, offset in produced:
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        return all(commits.get(p, 0) >= end for p, end in ends.items())

    wait_until(processed_all_or_changed, CONSUME_TIMEOUT_S,
               lambda: f"worker logged {worker.events()[-5:]}\n{worker.tail()}")
    progress(f"{len(samples)} DescribeGroup samples during {len(produced)} slow records")

    generations = sorted({generation for generation, _, _ in samples})
    assert generations == [before.generation], (
        f"the generation moved from {before.generation} during slow processing")
    states = sorted({state for _, state, _ in samples})
    assert states == ["stable"], f"the group left the stable state: {states}"
    memberships = [members for _, _, members in samples if members != {member_id: owned}]
    assert memberships == [], f"the group changed during slow processing: {memberships[:3]}"
    changes = worker.events("assignment")[assignment_lines:]
    assert changes == [], f"the worker's assignment changed during slow processing: {changes}"
    assert worker.events("commit_failed") == []
    assert sorted((p, o) for p, o, _ in worker.consumed()) == sorted(produced)


def test_controller_kill_during_rebalance(cluster, workers):
    topic, group = "payments", "settlement"
    create_topic(cluster, topic, 6)
    members = [workers.start(f"member{i}", group, topic) for i in range(2)]
    wait_balanced(cluster, group, members, 6, per_member=3)
    produce(cluster, topic, 60, "payment")

    members.append(workers.start("member2", group, topic))
    wait_until(lambda: members[2].assignment() is not None, SETTLE_TIMEOUT_S,
               lambda: f"member2 never joined\n{members[2].tail()}")
    controller = controller_of(cluster)
    with grpc.insecure_channel(cluster.address(controller)) as channel:
        state = raftmq_pb2_grpc.GroupServiceStub(channel).DescribeGroup(
            raftmq_pb2.DescribeGroupRequest(group_id=group), timeout=10).state
    cluster.kill(controller)
    progress(f"member2 joined; killed the controller, node {controller}, in group state {state}")
    # The old members learn of the hand-over only from their next heartbeat,
    # up to a second away, so the kill lands before they release their partitions.
    assert state == "rebalancing", f"the hand-over was over before the kill (state {state})"

    wait_balanced(cluster, group, members, 6, checks=3)
    description = describe_group(cluster, group)
    live_ids = {w.assignment()[0] for w in members}
    described_ids = {m.member_id for m in description.members}
    assert described_ids == live_ids, f"members {described_ids}, live workers {live_ids}"
    owners = collections.Counter(tp.partition for m in description.members for tp in m.partitions)
    assert sorted(owners) == list(range(6)), f"partitions without an owner: {owners}"
    assert set(owners.values()) == {1}, f"partitions with more than one owner: {owners}"
    revoking = {m.member_id: list(m.revoking) for m in description.members if m.revoking}
    assert revoking == {}, f"hand-overs still open: {revoking}"
    reported = [w.assignment()[1] for w in members]
    assert sorted(p for owned in reported for p in owned) == list(range(6)), (
        f"the workers' assignments overlap or leave gaps: {reported}")

    cluster.start(controller)
    cluster.wait_healthy(timeout_s=60)
    progress(f"node {controller} is healthy again")


def test_offsets_survive_full_restart(cluster, workers):
    topic, group = "inventory", "warehouse"
    create_topic(cluster, topic, 6)
    worker = workers.start("member0", group, topic)
    produce(cluster, topic, 120, "item")
    wait_all_committed(cluster, group, topic, workers)
    workers.stop_all()
    # Records after the last commit, so the committed offsets differ from the ends.
    produce(cluster, topic, 30, "later")

    before = {p: offset for p, (offset, _) in committed_offsets(cluster, group, topic).items()}
    assert sorted(before) == list(range(6))
    assert all(offset > 0 for offset in before.values()), before
    assert worker.last_commits() == before

    cluster.stop_all()
    progress("stopped all nodes")
    cluster.start_all()
    cluster.wait_healthy(timeout_s=60)
    progress("all nodes healthy again")
    after = {p: offset for p, (offset, _) in committed_offsets(cluster, group, topic).items()}
    assert after == before
