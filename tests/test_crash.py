"""Crash trials: kill, pause and restart nodes under load, then prove no acknowledged loss.

Four modes, each run RAFTMQ_CRASH_TRIALS times (default 5, the fast
profile; 20 or more is the long profile):

- kill_all: SIGKILL all three nodes at a random moment after the first
  snapshot, then restart them.
- kill_leader_paused_follower: SIGSTOP a follower of one partition, SIGKILL
  that partition's leader, SIGCONT the follower, then restart the leader.
- kill_during_snapshot: SIGKILL one node, or all of them, as soon as the
  node logs event=snapshot_started. Nodes that do not log that event are
  killed at event=snapshot_written instead, after the snapshot file is done.
- full_restart: SIGTERM and restart all nodes three times, and check that
  no high watermark or log digest changes between restarts.

Each trial starts its own three-node cluster under tmp_path, with a topic of
three partitions replicated on all nodes. Every Raft group snapshots after
20 to 80 entries or 0.5 to 2 seconds. A failure message names the seed and
the command that replays the trial. With RAFTMQ_CRASH_RESULTS set, each
trial appends its result as one JSON line, and tests/crash/summarize.py
turns that file into tables. RAFTMQ_PYSYNCOBJ_FIXES reaches the nodes
unchanged.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster import LocalCluster
from crash import harness
from raftmq.client import Admin

pytestmark = [pytest.mark.cluster, pytest.mark.crash]

TOPIC = "crash"
PARTITIONS = 3
ALL_PARTITIONS = list(range(PARTITIONS))
TRIALS = range(harness.trial_count())
RESTART_CYCLES = 3
HEALTHY_TIMEOUT_S = 60
FIRST_ACK_TIMEOUT_S = 30
SNAPSHOT_EVENT_TIMEOUT_S = 30
# Ranges of --raft-log-compaction-min-entries and -min-interval-ms. A
# group snapshots when either is exceeded. One Raft entry carries one
# produce request, and the producer keeps one request in flight per
# partition, so fewer entries arrive when the machine is busy. The interval
# keeps a snapshot coming every 0.5 to 2 seconds even then.
COMPACTION_MIN_ENTRIES = (20, 80)
COMPACTION_MIN_INTERVAL_MS = (500, 2000)

SNAPSHOT_STARTED = "event=snapshot_started"
SNAPSHOT_WRITTEN = "event=snapshot_written"

Scenario = Callable[[random.Random, harness.TrialResult, Path], None]


def compaction_args(rng: random.Random, result: harness.TrialResult) -> list[str]:
    """Draw the trial's compaction settings, note them in the result, return the node flags."""
    min_entries = rng.randint(*COMPACTION_MIN_ENTRIES)
    min_interval_ms = rng.randint(*COMPACTION_MIN_INTERVAL_MS)
    result.details.update(compaction_min_entries=min_entries,
                          compaction_min_interval_ms=min_interval_ms)
    return ["--raft-log-compaction-min-entries", str(min_entries),
            "--raft-log-compaction-min-interval-ms", str(min_interval_ms)]


@contextlib.contextmanager
def running_cluster(base_dir: Path, extra_args: list[str]) -> Iterator[LocalCluster]:
    """Start three nodes and create the trial topic. Every node is stopped on exit."""
    with LocalCluster(base_dir, extra_args=extra_args) as cluster:
        cluster.start_all()
        cluster.wait_healthy(timeout_s=HEALTHY_TIMEOUT_S)
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
        yield cluster


@contextlib.contextmanager
def producing(cluster: LocalCluster, rng: random.Random) -> Iterator[harness.KeyedWorkload]:
    """Start the keyed workload and wait for its first ack. The workload stops on exit."""
    with harness.KeyedWorkload(cluster.bootstrap, TOPIC, rng) as workload:
        if not workload.wait_for_acks(1, FIRST_ACK_TIMEOUT_S):
            raise RuntimeError(f"no record acknowledged within {FIRST_ACK_TIMEOUT_S} s of "
                               f"starting the workload: {workload.summary()}")
        yield workload


def finish_workload(workload: harness.KeyedWorkload, result: harness.TrialResult,
                    flush_timeout_s: float) -> list[harness.AckedRecord]:
    workload.stop(flush_timeout_s)
    summary = workload.summary()
    result.acked = int(summary["acked"])
    result.unacked = int(summary["unacked"])
    result.details["workload"] = summary
    return workload.acked()


def restart(cluster: LocalCluster, node_ids: list[int]) -> None:
    for node_id in node_ids:
        cluster.start(node_id)
    cluster.wait_healthy(timeout_s=HEALTHY_TIMEOUT_S)


def count_in_logs(cluster: LocalCluster, text: str) -> int:
    total = 0
    for node_id in cluster.node_ids:
        with contextlib.suppress(FileNotFoundError):
            total += cluster.log_path(node_id).read_text(errors="replace").count(text)
    return total


def wait_for_leader(cluster: LocalCluster, partition: int, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leaders = harness.partition_leaders(cluster, TOPIC)
        if leaders and leaders.get(partition):
            return leaders[partition]
        time.sleep(0.1)
    raise RuntimeError(f"partition {partition} of {TOPIC!r} has no leader after {timeout_s} s")


# --- scenarios --------------------------------------------------------------


def wait_for_first_snapshot(cluster: LocalCluster, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while count_in_logs(cluster, SNAPSHOT_WRITTEN) == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_all(rng: random.Random, result: harness.TrialResult, base_dir: Path) -> None:
    node_args = compaction_args(rng, result)
    run_s = rng.uniform(0.2, 3.0)
    result.details.update(run_after_snapshot_s=round(run_s, 2))
    with running_cluster(base_dir, node_args) as cluster, producing(cluster, rng) as workload:
        # The kill lands at a random moment after compaction has begun, so
        # that the nodes restart from a snapshot plus the journal after it.
        result.details["snapshot_before_kill"] = wait_for_first_snapshot(
            cluster, SNAPSHOT_EVENT_TIMEOUT_S)
        time.sleep(run_s)
        harness.kill_nodes(cluster, cluster.node_ids)
        result.details["snapshots_before_kill"] = count_in_logs(cluster, SNAPSHOT_WRITTEN)
        acked = finish_workload(workload, result, flush_timeout_s=0.5)
        restart(cluster, cluster.node_ids)
        outcome = harness.check_cluster(cluster, TOPIC, ALL_PARTITIONS, acked)
        result.add_outcome(outcome, "restarted")


def kill_leader_paused_follower(rng: random.Random, result: harness.TrialResult,
                                base_dir: Path) -> None:
    node_args = compaction_args(rng, result)
    partition = rng.randrange(PARTITIONS)
    warmup_s = rng.uniform(0.3, 1.0)
    paused_s = rng.uniform(1.5, 4.0)
    after_kill_s = rng.uniform(0.5, 2.0)
    result.details.update(partition=partition, paused_s=round(paused_s, 2),
                          after_kill_s=round(after_kill_s, 2))
    with running_cluster(base_dir, node_args) as cluster, producing(cluster, rng) as workload:
        time.sleep(warmup_s)
        leader = wait_for_leader(cluster, partition)
        follower = rng.choice([node_id for node_id in cluster.node_ids if node_id != leader])
        result.details.update(killed_leader=leader, paused_follower=follower)
        cluster.pause(follower)
        time.sleep(paused_s)
        harness.kill_nodes(cluster, [leader])
        cluster.resume(follower)
        time.sleep(after_kill_s)
        acked = finish_workload(workload, result, flush_timeout_s=30)
        restart(cluster, [leader])
        outcome = harness.check_cluster(cluster, TOPIC, ALL_PARTITIONS, acked)
        result.add_outcome(outcome, "restarted")


def wait_for_snapshot_event(watcher: harness.LogWatcher, log_path: Path,
                            timeout_s: float) -> tuple[str, str] | None:
    """Return (event, line) for the next snapshot event of the watched node.

    Prefers snapshot_started. Nodes that never log it are caught at
    snapshot_written, that is after the snapshot file is complete.
    """
    pattern = re.compile(r"event=snapshot_(started|written)\b")
    started_logged = harness.log_contains(log_path, SNAPSHOT_STARTED)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = watcher.wait_for(pattern, max(deadline - time.monotonic(), 0))
        if line is None:
            return None
        if SNAPSHOT_STARTED in line:
            return "snapshot_started", line
        # A written line whose snapshot_started line went by before the watch began.
        started_logged = started_logged or harness.log_contains(log_path, SNAPSHOT_STARTED)
        if not started_logged:
            return "snapshot_written", line
    return None


def kill_during_snapshot(rng: random.Random, result: harness.TrialResult, base_dir: Path) -> None:
    node_args = compaction_args(rng, result)
    warmup_s = rng.uniform(0.5, 2.0)
    snapshots_to_skip = rng.randint(0, 2)
    kill_everyone = rng.random() < 0.5
    result.details.update(snapshots_skipped=snapshots_to_skip,
                          killed="all" if kill_everyone else "watched")
    with running_cluster(base_dir, node_args) as cluster, producing(cluster, rng) as workload:
        watched = rng.choice(cluster.node_ids)
        result.details["watched_node"] = watched
        time.sleep(warmup_s)
        watcher = harness.LogWatcher(cluster.log_path(watched))
        event = None
        for _ in range(snapshots_to_skip + 1):
            event = wait_for_snapshot_event(watcher, cluster.log_path(watched),
                                            SNAPSHOT_EVENT_TIMEOUT_S)
            if event is None:
                break
        if event is None:
            raise RuntimeError(f"node {watched} logged no snapshot event within "
                               f"{SNAPSHOT_EVENT_TIMEOUT_S} s under load")
        victims = list(cluster.node_ids) if kill_everyone else [watched]
        harness.kill_nodes(cluster, victims)
        result.details.update(trigger=event[0], trigger_line=event[1][-200:])
        acked = finish_workload(workload, result, flush_timeout_s=0.5 if kill_everyone else 30)
        restart(cluster, victims)
        outcome = harness.check_cluster(cluster, TOPIC, ALL_PARTITIONS, acked)
        result.add_outcome(outcome, "restarted")


def full_restart(rng: random.Random, result: harness.TrialResult, base_dir: Path) -> None:
    node_args = compaction_args(rng, result)
    run_s = rng.uniform(1.0, 3.0)
    result.details.update(run_s=round(run_s, 2), cycles=RESTART_CYCLES)
    with running_cluster(base_dir, node_args) as cluster, producing(cluster, rng) as workload:
        time.sleep(run_s)
        acked = finish_workload(workload, result, flush_timeout_s=30)
        baseline = harness.check_cluster(cluster, TOPIC, ALL_PARTITIONS, acked)
        result.add_outcome(baseline, "before_restart")
        for cycle in range(1, RESTART_CYCLES + 1):
            harness.stop_nodes(cluster, cluster.node_ids)
            restart(cluster, cluster.node_ids)
            outcome = harness.check_cluster(cluster, TOPIC, ALL_PARTITIONS, acked)
            result.add_outcome(outcome, f"restart_{cycle}")
            result.restart_changes.extend(
                harness.compare_fingerprints(baseline.fingerprint, outcome.fingerprint, cycle))


# --- running a trial ----------------------------------------------------------


def run_trial(mode: str, scenario: Scenario, trial: int, tmp_path: Path,
              test_id: str) -> tuple[harness.TrialResult, str]:
    """Run one trial, write its result line, and return it with the replay hint."""
    base = harness.base_seed()
    seed = harness.trial_seed(base, mode, trial)
    result = harness.TrialResult(mode=mode, seed=seed, base_seed=base, trial=trial,
                                 pysyncobj_fixes=harness.fixes_setting())
    base_dir = tmp_path / "cluster"
    hint = f"{harness.replay_hint(result, test_id)}; node logs in {base_dir}"
    print(f"crash trial {mode} #{trial}: {hint}")
    started = time.monotonic()
    try:
        scenario(random.Random(seed), result, base_dir)
    except Exception as error:
        result.error = repr(error)
        raise RuntimeError(f"{mode} trial {trial} failed before its checks: {error!r}; "
                           f"{hint}") from error
    finally:
        result.duration_s = round(time.monotonic() - started, 2)
        harness.write_result(result)
    return result, hint


def assert_no_loss(result: harness.TrialResult, hint: str) -> None:
    assert result.acked > 0, f"no record was acknowledged, so nothing was checked; {hint}"
    assert result.unsettled == [], (
        f"replicas did not reach equal applied_index and high_watermark in "
        f"{result.unsettled}: {result.details}; {hint}")
    assert result.lost_count == 0, (
        f"{result.lost_count} of {result.acked} acknowledged records are missing or changed, "
        f"first {result.lost[:5]}; {hint}")
    assert result.diverged == [], (
        f"replica log digests differ for partitions {result.diverged}: {result.details}; {hint}")
    assert result.leaderless == [], f"partitions {result.leaderless} have no leader; {hint}"


def cleanup(base_dir: Path) -> None:
    # Only a passing trial removes its folder, so a failing one keeps its logs and data.
    shutil.rmtree(base_dir, ignore_errors=True)


@pytest.mark.parametrize("trial", TRIALS)
def test_kill_all(trial, tmp_path, request):
    result, hint = run_trial("kill_all", kill_all, trial, tmp_path, request.node.nodeid)
    assert_no_loss(result, hint)
    cleanup(tmp_path / "cluster")


@pytest.mark.parametrize("trial", TRIALS)
def test_kill_leader_paused_follower(trial, tmp_path, request):
    result, hint = run_trial("kill_leader_paused_follower", kill_leader_paused_follower, trial,
                             tmp_path, request.node.nodeid)
    assert_no_loss(result, hint)
    cleanup(tmp_path / "cluster")


@pytest.mark.parametrize("trial", TRIALS)
def test_kill_during_snapshot(trial, tmp_path, request):
    result, hint = run_trial("kill_during_snapshot", kill_during_snapshot, trial, tmp_path,
                             request.node.nodeid)
    assert_no_loss(result, hint)
    cleanup(tmp_path / "cluster")


@pytest.mark.parametrize("trial", TRIALS)
def test_full_restart(trial, tmp_path, request):
    result, hint = run_trial("full_restart", full_restart, trial, tmp_path, request.node.nodeid)
    assert_no_loss(result, hint)
    assert result.restart_changes == [], (
        f"high watermark or digest changed across restarts: {result.restart_changes}; {hint}")
    cleanup(tmp_path / "cluster")
