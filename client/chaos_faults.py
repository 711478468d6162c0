"""Faults of a chaos run: what can be broken, how, and on what schedule.

A FaultTarget breaks and repairs one node at a time. The test suite's
target signals node processes and cuts links between network namespaces;
CommandTarget runs shell commands that the user gives, for a cluster this
process cannot reach otherwise.

FaultSchedule draws every choice from its seed: the gap before each fault,
its kind, the role of its victim (the leader of a drawn partition, the
metadata leader, or any node) and how long it lasts. The node that has a
role is looked up when the fault starts, so a replay with the same seed
repeats the same kinds, roles and durations, but the victims and the
moments depend on how the cluster behaved.

One fault runs at a time, and the schedule waits for the cluster to be
ready again (every node healthy, every partition led) before the next gap,
so faults never take more than one node of three away at once.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shlex
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Protocol

from .admin import Admin
from .errors import RaftMQError

logger = logging.getLogger(__name__)

KILL_PARTITION_LEADER = "kill_partition_leader"
KILL_METADATA_LEADER = "kill_metadata_leader"
PAUSE = "pause"
PARTITION = "partition"
FAULT_KINDS = (KILL_PARTITION_LEADER, KILL_METADATA_LEADER, PAUSE, PARTITION)

# Actions a target may implement; a fault kind needs all of its actions.
ACTIONS_OF_KIND = {
    KILL_PARTITION_LEADER: ("kill",),
    KILL_METADATA_LEADER: ("kill",),
    PAUSE: ("pause", "resume"),
    PARTITION: ("isolate", "heal"),
}
ACTIONS = ("kill", "restart", "pause", "resume", "isolate", "heal")

ROLE_PARTITION_LEADER = "partition_leader"
ROLE_METADATA_LEADER = "metadata_leader"
ROLE_ANY = "any"


class FaultTarget(Protocol):
    """Breaks and repairs nodes by id; `actions` names the methods that work."""

    actions: frozenset[str]

    def kill(self, node_id: int) -> None: ...
    def restart(self, node_id: int) -> None: ...
    def pause(self, node_id: int) -> None: ...
    def resume(self, node_id: int) -> None: ...
    def isolate(self, node_id: int) -> None: ...
    def heal(self, node_id: int) -> None: ...


def kinds_supported(target: FaultTarget) -> tuple[str, ...]:
    return tuple(kind for kind in FAULT_KINDS
                 if all(action in target.actions for action in ACTIONS_OF_KIND[kind]))


@dataclasses.dataclass(frozen=True)
class FaultSettings:
    kinds: tuple[str, ...] = FAULT_KINDS
    # Relative weights of the kinds that are enabled.
    weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: {
        KILL_PARTITION_LEADER: 4.0, KILL_METADATA_LEADER: 1.5, PAUSE: 2.0, PARTITION: 2.0})
    # Ranges (low, high) in seconds, drawn uniformly.
    gap_s: tuple[float, float] = (1.0, 5.0)
    down_s: tuple[float, float] = (0.5, 4.0)
    pause_s: tuple[float, float] = (1.0, 6.0)
    partition_s: tuple[float, float] = (2.0, 10.0)
    # How long the cluster may take to be ready again after a fault.
    ready_timeout_s: float = 90.0
    # Start with one fault of each kind, in an order drawn from the seed,
    # so that a short run covers every kind.
    each_kind_first: bool = True


@dataclasses.dataclass
class FaultEvent:
    kind: str
    role: str
    node: int
    # Seconds since the schedule started.
    started_s: float
    duration_s: float
    detail: str = ""
    error: str = ""
    ready_after_s: float | None = None


class FaultSchedule:
    """Inject faults from a seed until a deadline, one at a time."""

    def __init__(self, target: FaultTarget, bootstrap: str, topic: str, seed: int,
                 settings: FaultSettings, wait_ready: Callable[[float], bool],
                 log: Callable[[str], None] = logger.info):
        self._target = target
        self._bootstrap = bootstrap
        self._topic = topic
        self._rng = random.Random(f"{seed}/faults")
        self._settings = settings
        self._wait_ready = wait_ready
        self._log = log
        self.kinds = tuple(k for k in settings.kinds if k in kinds_supported(target))
        self.events: list[FaultEvent] = []
        self.skipped: Counter[str] = Counter()
        self.not_ready_after: list[FaultEvent] = []
        self._first_kinds = list(self.kinds) if settings.each_kind_first else []
        self._rng.shuffle(self._first_kinds)
        self._stop = threading.Event()
        # Nodes currently broken, with the action that repairs them.
        self._broken: dict[int, str] = {}
        self._started = time.monotonic()

    def counts(self) -> dict[str, int]:
        counts = Counter(event.kind for event in self.events if not event.error)
        return {kind: counts.get(kind, 0) for kind in self.kinds}

    def stop(self) -> None:
        self._stop.set()

    def run(self, duration_s: float) -> None:
        """Inject faults for duration_s, then repair whatever is still broken."""
        self._started = time.monotonic()
        deadline = self._started + duration_s
        try:
            if not self.kinds:
                self._stop.wait(duration_s)
                return
            while not self._stop.is_set():
                gap_s = self._rng.uniform(*self._settings.gap_s)
                if self._stop.wait(gap_s) or time.monotonic() >= deadline:
                    break
                self._inject_one(deadline)
        finally:
            self.repair_all()

    def _draw_kind(self) -> str:
        if self._first_kinds:
            return self._first_kinds.pop()
        weights = [self._settings.weights.get(kind, 1.0) for kind in self.kinds]
        return self._rng.choices(self.kinds, weights=weights)[0]

    def _inject_one(self, deadline: float) -> None:
        kind = self._draw_kind()
        # Every draw happens before the cluster is asked anything, so the
        # sequence of draws depends on the seed alone.
        partition_draw = self._rng.random()
        role_draw = self._rng.random()
        if kind == PAUSE:
            duration_s = self._rng.uniform(*self._settings.pause_s)
        elif kind == PARTITION:
            duration_s = self._rng.uniform(*self._settings.partition_s)
        else:
            duration_s = self._rng.uniform(*self._settings.down_s)
        role = {KILL_PARTITION_LEADER: ROLE_PARTITION_LEADER,
                KILL_METADATA_LEADER: ROLE_METADATA_LEADER}.get(kind)
        if role is None:
            role = (ROLE_PARTITION_LEADER if role_draw < 0.5
                    else ROLE_METADATA_LEADER if role_draw < 0.7 else ROLE_ANY)

        node, detail = self._find_node(role, partition_draw, role_draw)
        if node is None:
            self.skipped[kind] += 1
            self._log(f"chaos fault {kind} skipped: {detail}")
            return
        event = FaultEvent(kind, role, node, round(time.monotonic() - self._started, 2),
                           round(duration_s, 2), detail)
        self.events.append(event)
        self._log(f"chaos fault {kind} node={node} role={role} {detail} "
                  f"for {duration_s:.1f}s")
        try:
            self._apply(kind, node, duration_s)
        except Exception as error:  # noqa: BLE001 - a failed fault is recorded, the run goes on
            event.error = repr(error)[:300]
            self._log(f"chaos fault {kind} on node {node} failed: {error!r}")
        finally:
            self.repair_all()

        waited = time.monotonic()
        ready = self._wait_ready(self._settings.ready_timeout_s)
        event.ready_after_s = round(time.monotonic() - waited, 2)
        if not ready:
            self.not_ready_after.append(event)
            self._log(f"chaos cluster not ready {self._settings.ready_timeout_s:.0f}s after "
                      f"{kind} on node {node}")

    def _apply(self, kind: str, node: int, duration_s: float) -> None:
        target = self._target
        if kind in (KILL_PARTITION_LEADER, KILL_METADATA_LEADER):
            self._broken[node] = "restart"
            target.kill(node)
        elif kind == PAUSE:
            self._broken[node] = "resume"
            target.pause(node)
        else:
            self._broken[node] = "heal"
            target.isolate(node)
        self._stop.wait(duration_s)

    def repair_all(self) -> None:
        """Undo every fault still in place: restart, resume or heal its node."""
        for node, action in list(self._broken.items()):
            if action == "restart" and "restart" not in self._target.actions:
                # The cluster restarts its own nodes (a restart policy).
                del self._broken[node]
                continue
            try:
                getattr(self._target, action)(node)
            except Exception as error:  # noqa: BLE001 - logged, and the next repair retries
                self._log(f"chaos repair {action} of node {node} failed: {error!r}")
                continue
            del self._broken[node]

    def _find_node(self, role: str, partition_draw: float,
                   any_draw: float) -> tuple[int | None, str]:
        """Return the node that has `role` now, and a description of it."""
        try:
            with Admin(self._bootstrap, request_timeout_ms=5000) as admin:
                if role == ROLE_METADATA_LEADER:
                    controller = admin.describe_cluster().controller
                    return (controller or None), "metadata leader"
                if role == ROLE_PARTITION_LEADER:
                    topic = admin.describe_topic(self._topic)
                    partition = topic.partitions[int(partition_draw * len(topic.partitions))]
                    return (partition.leader or None), f"leader of partition {partition.partition}"
                nodes = sorted(node.node_id for node in admin.describe_cluster().nodes)
                return nodes[int(any_draw * len(nodes)) % len(nodes)], "any node"
        except RaftMQError as error:
            return None, f"no {role} found: {error}"


class CommandTarget:
    """Faults as shell commands given by the user, one template per action.

    Templates may use {node} (the node id), {address} ("host:port" of its
    gRPC server as the cluster reports it), {host}, {port} and {name} (from
    `names`, else "node<id>"). The substituted values are shell-quoted.
    """

    def __init__(self, templates: Mapping[str, str], bootstrap: str,
                 names: Mapping[int, str] | None = None, timeout_s: float = 60.0):
        unknown = sorted(set(templates) - set(ACTIONS))
        if unknown:
            raise ValueError(f"unknown fault action {', '.join(unknown)}: expected one of "
                             f"{', '.join(ACTIONS)}")
        self._templates = dict(templates)
        self._bootstrap = bootstrap
        self._names = dict(names or {})
        self._timeout_s = timeout_s
        self.actions = frozenset(self._templates)
        self.commands_run: list[str] = []

    def _address_of(self, node_id: int) -> str:
        with Admin(self._bootstrap, request_timeout_ms=5000) as admin:
            for node in admin.describe_cluster().nodes:
                if node.node_id == node_id:
                    return node.address
        return ""

    def command(self, action: str, node_id: int, address: str) -> str:
        """Return the shell command of `action` for the node."""
        host, _, port = address.rpartition(":")
        values = {"node": str(node_id), "address": address, "host": host, "port": port,
                  "name": self._names.get(node_id, f"node{node_id}")}
        quoted = {name: shlex.quote(value) for name, value in values.items()}
        try:
            return self._templates[action].format(**quoted)
        except (KeyError, IndexError) as error:
            raise ValueError(f"fault template for {action!r} uses an unknown placeholder "
                             f"{error}; use {{node}}, {{address}}, {{host}}, {{port}} "
                             "or {name}") from None

    def _run(self, action: str, node_id: int) -> None:
        try:
            address = self._address_of(node_id)
        except RaftMQError:
            # A killed node's address is still in the metadata, but the
            # call may fail while the cluster is broken.
            address = ""
        command = self.command(action, node_id, address)
        self.commands_run.append(command)
        result = subprocess.run(command, shell=True, capture_output=True, text=True,
                                timeout=self._timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"{action} command {command!r} exited with {result.returncode}: "
                               f"{(result.stderr or result.stdout).strip()[:300]}")

    def kill(self, node_id: int) -> None:
        self._run("kill", node_id)

    def restart(self, node_id: int) -> None:
        self._run("restart", node_id)

    def pause(self, node_id: int) -> None:
        self._run("pause", node_id)

    def resume(self, node_id: int) -> None:
        self._run("resume", node_id)

    def isolate(self, node_id: int) -> None:
        self._run("isolate", node_id)

    def heal(self, node_id: int) -> None:
        self._run("heal", node_id)
