"""Network namespaces for the chaos suite: one per node, joined by a bridge.

Each node runs in its own network namespace with one address on a private
/24. The namespaces connect through veth pairs to a Linux bridge that lives
in a namespace of its own (the switch), so the host's firewall never filters
the bridged traffic. Docker sets the host's FORWARD policy to DROP, and with
br_netfilter loaded that policy would also drop traffic between the nodes
if the bridge were on the host. The test process reaches the nodes through
one more veth pair, whose host end carries the subnet's first address.

A network partition is an nftables table inside the cut-off node's
namespace that drops packets to and from the other nodes' addresses, so the
node keeps serving the host's clients while it cannot reach its peers. The
tables live inside namespaces the test created and vanish with them, and no
rule is added to the host's firewall.

Every name starts with "rmc", then the creating PID in hex and a counter, so
concurrent runs never collide, and remove_stale_namespaces() can
distinguish leftovers of a run that was killed from those of a live one.

pytest does not collect this file because its name does not start with test_.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cluster import LocalCluster

NAME_PREFIX = "rmc"
GRPC_PORT = 9092
RAFT_PORT = 20000
RAFT_PORT_SPAN = 40
NFT_TABLE = "raftmq_chaos"
# Subnets are drawn from 10.200.0.0/16 to 10.250.255.0/24 and skipped when
# they overlap any route or address the host has.
_SUBNET_SECOND_OCTETS = (200, 250)
_COMMAND_TIMEOUT_S = 20
_counter = itertools.count()
_STALE_NAME = re.compile(rf"^{NAME_PREFIX}([0-9a-f]{{6}})[0-9a-f]+-")


class NamespaceError(RuntimeError):
    """A namespace, link or firewall command failed."""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    if check and result.returncode != 0:
        raise NamespaceError(
            f"command {' '.join(args)!r} failed with exit code {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()}")
    return result


def unavailable_reason() -> str | None:
    """Return why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is not installed"
    probe = f"{NAME_PREFIX}{os.getpid():06x}{next(_counter):x}-probe"
    result = _run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"'ip netns add' failed: {result.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by chaos runs whose creating process is gone.

    Only names of this module's pattern are touched. Returns the names deleted.
    """
    result = _run("ip", "netns", "list", check=False)
    removed = []
    for line in result.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _STALE_NAME.match(name)
        if match and not _pid_alive(int(match.group(1), 16)):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def _host_networks() -> list[ipaddress.IPv4Network]:
    networks = []
    for command in (("ip", "-4", "-o", "addr", "show"), ("ip", "-4", "route", "show", "table", "all")):
        for word in _run(*command).stdout.split():
            if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/\d+)?", word):
                networks.append(ipaddress.ip_network(word, strict=False))
    return networks


def pick_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """Pick a /24 that overlaps nothing the host routes or has an address in."""
    host_networks = _host_networks()
    for _ in range(500):
        candidate = ipaddress.ip_network(
            f"10.{rng.randint(*_SUBNET_SECOND_OCTETS)}.{rng.randrange(256)}.0/24")
        if not any(candidate.overlaps(network) for network in host_networks):
            return candidate
    raise NamespaceError("no free /24 found in 10.200.0.0 to 10.250.255.255")


class NodeNetwork:
    """The switch namespace, one namespace per node, and the links between them.

    create() builds everything and close() removes it. close() runs at
    interpreter exit too, so an exception or Ctrl-C in the middle of a test
    leaves nothing behind. Node processes must be stopped before close(),
    because a namespace with a process inside outlives `ip netns del`.
    """

    def __init__(self, node_ids: list[int], rng: random.Random | None = None):
        self.node_ids = list(node_ids)
        self.tag = f"{NAME_PREFIX}{os.getpid():06x}{next(_counter):x}"
        self.subnet = pick_subnet(rng or random.Random())
        hosts = list(self.subnet.hosts())
        self.host_address = str(hosts[0])
        self.addresses = {node_id: str(hosts[index + 1])
                          for index, node_id in enumerate(self.node_ids)}
        self.switch = f"{self.tag}-sw"
        self._namespaces: list[str] = []
        self._host_link: str | None = None
        self._isolated: set[int] = set()
        self._closed = False
        atexit.register(self.close)

    def namespace(self, node_id: int) -> str:
        return f"{self.tag}-n{node_id}"

    def create(self) -> NodeNetwork:
        try:
            self._add_namespace(self.switch)
            self._in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
            self._in(self.switch, "ip", "link", "set", "br0", "up")
            for node_id in self.node_ids:
                namespace = self.namespace(node_id)
                self._add_namespace(namespace)
                self._in(namespace, "ip", "link", "set", "lo", "up")
                inside = f"{self.tag}n{node_id}"
                self._add_switch_port(inside, namespace)
                self._in(namespace, "ip", "addr", "add",
                         f"{self.addresses[node_id]}/{self.subnet.prefixlen}", "dev", inside)
                self._in(namespace, "ip", "link", "set", inside, "up")
            host_link = f"{self.tag}h"
            self._add_switch_port(host_link, None)
            _run("ip", "addr", "add", f"{self.host_address}/{self.subnet.prefixlen}",
                 "dev", host_link)
            _run("ip", "link", "set", host_link, "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)

    def _add_switch_port(self, link: str, namespace: str | None) -> None:
        """Create a veth pair: `link` in `namespace` (the host when None), its peer on br0."""
        port = f"{link}s"
        _run("ip", "link", "add", link, "type", "veth", "peer", "name", port)
        if namespace is None:
            self._host_link = link
        else:
            _run("ip", "link", "set", link, "netns", namespace)
        _run("ip", "link", "set", port, "netns", self.switch)
        self._in(self.switch, "ip", "link", "set", port, "master", "br0")
        self._in(self.switch, "ip", "link", "set", port, "up")

    @staticmethod
    def _in(namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", namespace, *args, check=check)

    def exec_prefix(self, node_id: int) -> list[str]:
        """Command prefix that runs a program inside the node's namespace.

        `ip netns exec` calls exec after joining the namespace, so the PID
        of the started process is the program's own.
        """
        return ["ip", "netns", "exec", self.namespace(node_id)]

    # -- network partitions ---------------------------------------------------

    def isolate(self, node_id: int) -> None:
        """Drop every packet between the node and the other nodes; the host still reaches it."""
        peers = ", ".join(self.addresses[other] for other in self.node_ids if other != node_id)
        ruleset = (
            f"table inet {NFT_TABLE} {{\n"
            f"  chain input {{ type filter hook input priority 0; policy accept;"
            f" ip saddr {{ {peers} }} drop; }}\n"
            f"  chain output {{ type filter hook output priority 0; policy accept;"
            f" ip daddr {{ {peers} }} drop; }}\n"
            "}\n"
        )
        result = subprocess.run(["ip", "netns", "exec", self.namespace(node_id), "nft", "-f", "-"],
                                input=ruleset, capture_output=True, text=True,
                                timeout=_COMMAND_TIMEOUT_S)
        if result.returncode != 0:
            raise NamespaceError(f"nft failed to isolate node {node_id}: {result.stderr.strip()}")
        self._isolated.add(node_id)

    def heal(self, node_id: int) -> None:
        """Remove the node's partition table; a node that is not cut off is left as it is."""
        if node_id not in self._isolated:
            return
        self._in(self.namespace(node_id), "nft", "delete", "table", "inet", NFT_TABLE)
        self._isolated.discard(node_id)

    def isolated(self) -> set[int]:
        return set(self._isolated)

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        """Delete every namespace and link this object created; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        # Deleting a namespace destroys the veth ends inside it, and with them
        # their peers; the explicit deletes below cover a half-built network.
        for namespace in reversed(self._namespaces):
            _run("ip", "netns", "del", namespace, check=False)
        if self._host_link is not None:
            if _run("ip", "link", "show", self._host_link, check=False).returncode == 0:
                _run("ip", "link", "del", self._host_link, check=False)
        self._namespaces.clear()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network that still exist (empty after close())."""
        names = _run("ip", "netns", "list", check=False).stdout
        links = _run("ip", "-o", "link", "show", check=False).stdout
        found = [line.split()[0] for line in names.splitlines()
                 if line.startswith(self.tag)]
        found += [word.rstrip(":").split("@")[0] for word in links.split()
                  if word.startswith(self.tag)]
        return found


class NamespaceCluster(LocalCluster):
    """LocalCluster whose nodes run in the namespaces of a NodeNetwork.

    Every node has its own address, so all nodes use the same ports. The
    test process reaches them through the network's host link.
    """

    def __init__(self, base_dir: Path, network: NodeNetwork,
                 extra_args: list[str] | None = None, secret: str = "test-cluster-secret"):
        super().__init__(base_dir, nodes=len(network.node_ids), extra_args=extra_args,
                         secret=secret)
        self.network = network
        self.grpc_ports = {node_id: GRPC_PORT for node_id in self.node_ids}
        self.raft_bases = {node_id: RAFT_PORT for node_id in self.node_ids}

    def address(self, node_id: int) -> str:
        return f"{self.network.addresses[node_id]}:{GRPC_PORT}"

    def raft_address(self, node_id: int) -> str:
        return f"{self.network.addresses[node_id]}:{RAFT_PORT}"

    def command(self, node_id: int) -> list[str]:
        peers = ",".join(f"{i}={self.raft_address(i)}" for i in self.node_ids)
        return [
            *self.network.exec_prefix(node_id),
            sys.executable, "-m", "raftmq.node",
            "--node-id", str(node_id),
            "--grpc-address", self.address(node_id),
            "--raft-address", self.raft_address(node_id),
            "--raft-port-span", str(RAFT_PORT_SPAN),
            "--peers", peers,
            "--data-dir", str(self.data_dir(node_id)),
            *self.extra_args,
        ]


class ClusterFaults:
    """FaultTarget for a LocalCluster, or a NamespaceCluster when partitions are wanted.

    kill is SIGKILL, restart starts the node again and waits until it
    serves, pause and resume are SIGSTOP and SIGCONT, and isolate and heal
    cut and restore the node's links to its peers.
    """

    def __init__(self, cluster: LocalCluster, network: NodeNetwork | None,
                 healthy_timeout_s: float = 60.0):
        self.cluster = cluster
        self.network = network
        self._healthy_timeout_s = healthy_timeout_s
        actions = {"kill", "restart", "pause", "resume"}
        if network is not None:
            actions |= {"isolate", "heal"}
        self.actions = frozenset(actions)

    def kill(self, node_id: int) -> None:
        self.cluster.kill(node_id)

    def restart(self, node_id: int) -> None:
        if not self.cluster.is_running(node_id):
            self.cluster.start(node_id)
        self.cluster.wait_healthy(timeout_s=self._healthy_timeout_s, node_ids=[node_id])

    def pause(self, node_id: int) -> None:
        self.cluster.pause(node_id)

    def resume(self, node_id: int) -> None:
        self.cluster.resume(node_id)

    def isolate(self, node_id: int) -> None:
        assert self.network is not None
        self.network.isolate(node_id)

    def heal(self, node_id: int) -> None:
        assert self.network is not None
        self.network.heal(node_id)
