"""Consumer group membership and assignment, applied in the metadata group.

A group is one JSON document. Its fields:

- generation: raised by every change of members or assignment;
- strategy, reset, delivery ("offsets" or "acks") and policy (the retry
  policy of "acks" groups): fixed by the first join;
- topics: every topic a member ever subscribed to, kept while the group is
  empty so its offsets can still be described and reset;
- members: member id -> instance id, client id, topics, timeouts;
- owners: "topic/partition" -> the member that owns the partition now;
- pending: "topic/partition" -> {"to": member, "since_ms": time}, a partition
  whose owner must give it up to `to`. The owner keeps it (and may commit)
  until it releases it, leaves, or the coordinator forces the release after
  the owner's rebalance timeout.

This two-step hand-over is what makes rebalances incremental: a partition
that does not move is never paused, and a partition that moves has one
owner at every moment.

Everything here is a pure function of (document, command). Time comes in as
`now_ms`, stamped by the node that built the command. Heartbeats are not
replicated: the coordinator (the metadata leader) tracks them in memory and
issues a `leave_group` command for a member whose session timed out.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from ..raft.store import ApplyError
from .assignment import STRATEGIES, assign

RESET_POLICIES = ("latest", "earliest", "none")
MAX_FENCED_MEMBERS = 100


def tp_key(topic: str, partition: int) -> str:
    return f"{topic}/{partition}"


def split_tp_key(key: str) -> tuple[str, int]:
    topic, _, partition = key.rpartition("/")
    return topic, int(partition)


@dataclass(frozen=True)
class MemberRecord:
    member_id: str
    instance_id: str
    client_id: str
    topics: tuple[str, ...]
    session_timeout_ms: int
    rebalance_timeout_ms: int


@dataclass(frozen=True)
class GroupRecord:
    group_id: str
    generation: int
    strategy: str
    reset: str
    members: dict[str, MemberRecord]
    owners: dict[tuple[str, int], str]
    # (topic, partition) -> (member the partition goes to, since when in ms)
    pending: dict[tuple[str, int], tuple[str, int]]
    topics: tuple[str, ...] = ()
    delivery: str = "offsets"
    policy: dict | None = None
    # member id -> instance id, for static members replaced by a newer join.
    fenced: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> str:
        if not self.members:
            return "empty"
        return "rebalancing" if self.pending else "stable"

    def owned_by(self, member_id: str) -> list[tuple[str, int]]:
        """Partitions the member owns and may consume, including those it is giving up."""
        return sorted(tp for tp, owner in self.owners.items() if owner == member_id)

    def revoking(self, member_id: str) -> list[tuple[str, int]]:
        return sorted(tp for tp in self.pending if self.owners.get(tp) == member_id)

    def incoming(self, member_id: str) -> list[tuple[str, int]]:
        return sorted(tp for tp, (target, _) in self.pending.items() if target == member_id)


def group_from_doc(doc: dict[str, Any]) -> GroupRecord:
    members = {
        member_id: MemberRecord(
            member_id, m["instance_id"], m["client_id"], tuple(m["topics"]),
            m["session_timeout_ms"], m["rebalance_timeout_ms"],
        )
        for member_id, m in doc["members"].items()
    }
    return GroupRecord(
        doc["group_id"], doc["generation"], doc["strategy"], doc["reset"], members,
        {split_tp_key(k): v for k, v in doc["owners"].items()},
        {split_tp_key(k): (v["to"], v["since_ms"]) for k, v in doc["pending"].items()},
        tuple(doc.get("topics", ())),
        doc.get("delivery", "offsets"),
        doc.get("policy"),
        {member_id: instance_id for member_id, instance_id in doc.get("fenced", ())},
    )


def member_result(doc: dict[str, Any], member_id: str) -> dict[str, Any]:
    group = group_from_doc(doc)
    return {
        "member_id": member_id,
        "generation": group.generation,
        "partitions": group.owned_by(member_id),
        "revoking": group.revoking(member_id),
    }


def apply_join(doc: dict | None, command: dict, partition_counts: dict[str, int]) -> tuple[dict, dict]:
    """Add or update a member; return (new document, the member's assignment)."""
    strategy = command.get("strategy") or ""
    reset = command.get("reset") or ""
    delivery = command.get("delivery") or ""
    policy = command.get("policy")
    if doc is None:
        doc = {
            "group_id": command["group"], "generation": 0,
            "strategy": strategy or "sticky", "reset": reset or "latest",
            "members": {}, "owners": {}, "pending": {},
            "delivery": delivery or "offsets",
        }
        if doc["delivery"] == "acks":
            doc["policy"] = policy or command.get("default_policy")
    else:
        doc = copy.deepcopy(doc)
    if doc["strategy"] not in STRATEGIES or doc["reset"] not in RESET_POLICIES:
        raise ApplyError("INVALID_REQUEST", f"invalid group settings {doc['strategy']!r}/{doc['reset']!r}")
    settings = [("assignment strategy", strategy, doc["strategy"]),
                ("auto_offset_reset", reset, doc["reset"]),
                ("delivery_mode", delivery, doc.get("delivery", "offsets"))]
    if policy and doc.get("delivery") == "acks":
        settings.append(("retry policy", json.dumps(policy, sort_keys=True),
                         json.dumps(doc.get("policy"), sort_keys=True)))
    for name, asked, fixed in settings:
        if asked and asked != fixed:
            raise ApplyError(
                "INCONSISTENT_GROUP_PROTOCOL",
                f"group {command['group']!r} uses {name} {fixed!r}, not {asked!r}; join with "
                f"{fixed!r} or an empty value, or use another group id",
                group_id=command["group"], asked=asked, group_value=fixed,
            )
    member_id = command["member_id"]
    entry = {
        "instance_id": command.get("instance_id", ""),
        "client_id": command.get("client_id", ""),
        "topics": sorted(set(command["topics"])),
        "session_timeout_ms": command["session_timeout_ms"],
        "rebalance_timeout_ms": command["rebalance_timeout_ms"],
    }
    members = doc["members"]
    doc["topics"] = sorted(set(doc.get("topics", ())) | set(entry["topics"]))
    replaced = None
    if entry["instance_id"]:
        replaced = next((mid for mid, m in sorted(members.items())
                         if m["instance_id"] == entry["instance_id"] and mid != member_id), None)
    if replaced is not None:
        # Static membership: the new member id takes over the old one's
        # partitions as they are, without a rebalance unless topics changed.
        topics_changed = members[replaced]["topics"] != entry["topics"]
        # A member that already belonged to the group under its own id may
        # bring other topics than the one it replaces.
        own = members.get(member_id)
        if own is not None and own["topics"] != entry["topics"]:
            topics_changed = True
        del members[replaced]
        members[member_id] = entry
        # The replaced id is remembered so that, if its consumer is still
        # running, it learns it was fenced instead of joining again and
        # taking the partitions back.
        fenced = doc.setdefault("fenced", [])
        fenced.append([replaced, entry["instance_id"]])
        del fenced[:-MAX_FENCED_MEMBERS]
        for key, owner in list(doc["owners"].items()):
            if owner == replaced:
                doc["owners"][key] = member_id
        for pending in doc["pending"].values():
            if pending["to"] == replaced:
                pending["to"] = member_id
        doc["generation"] += 1
        if topics_changed:
            _rebalance(doc, partition_counts, command["now_ms"])
        return doc, member_result(doc, member_id)
    if members.get(member_id) == entry:
        return doc, member_result(doc, member_id)
    members[member_id] = entry
    doc["generation"] += 1
    _rebalance(doc, partition_counts, command["now_ms"])
    return doc, member_result(doc, member_id)


def apply_leave(doc: dict, command: dict, partition_counts: dict[str, int]) -> tuple[dict, list[str]]:
    """Remove members; their partitions go straight to the others."""
    doc = copy.deepcopy(doc)
    removed = [mid for mid in sorted(set(command["member_ids"])) if mid in doc["members"]]
    if not removed:
        return doc, []
    for member_id in removed:
        del doc["members"][member_id]
    doc["generation"] += 1
    _rebalance(doc, partition_counts, command["now_ms"])
    return doc, removed


def apply_release(doc: dict, command: dict) -> tuple[dict, list[tuple[str, int]]]:
    """Hand released (or, when forced, overdue) partitions to their new owners."""
    doc = copy.deepcopy(doc)
    moved = []
    for topic, partition in command["partitions"]:
        key = tp_key(topic, partition)
        pending = doc["pending"].get(key)
        if pending is None:
            continue
        if not command.get("force") and doc["owners"].get(key) != command["member_id"]:
            continue
        doc["owners"][key] = pending["to"]
        del doc["pending"][key]
        moved.append((topic, partition))
    if moved:
        doc["generation"] += 1
    return doc, moved


def apply_topics_changed(doc: dict, partition_counts: dict[str, int], now_ms: int) -> dict:
    """Recompute the assignment after a topic was created or deleted."""
    doc = copy.deepcopy(doc)
    before = (doc["owners"], doc["pending"])
    before = copy.deepcopy(before)
    _rebalance(doc, partition_counts, now_ms)
    if (doc["owners"], doc["pending"]) != before:
        doc["generation"] += 1
    return doc


def _rebalance(doc: dict, partition_counts: dict[str, int], now_ms: int) -> None:
    members = doc["members"]
    owners: dict[str, str] = doc["owners"]
    pending: dict[str, dict] = doc["pending"]
    # The strategy gets where each partition is going, so an unfinished
    # hand-over is not undone by the next rebalance.
    intended = {}
    for key, owner in owners.items():
        target = pending[key]["to"] if key in pending else owner
        intended[split_tp_key(key)] = target
    subscriptions = {mid: m["topics"] for mid, m in members.items()}
    target = assign(doc["strategy"], subscriptions, partition_counts, intended)
    new_owners: dict[str, str] = {}
    new_pending: dict[str, dict] = {}
    for (topic, partition), member_id in sorted(target.items()):
        key = tp_key(topic, partition)
        owner = owners.get(key)
        if owner is None or owner not in members or owner == member_id:
            new_owners[key] = member_id
            continue
        new_owners[key] = owner
        previous = pending.get(key)
        since_ms = previous["since_ms"] if previous and previous["to"] == member_id else now_ms
        new_pending[key] = {"to": member_id, "since_ms": since_ms}
    doc["owners"] = new_owners
    doc["pending"] = new_pending
