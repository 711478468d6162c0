"""The Raft ports need a cluster secret, bind only their address, and never
unpickle an unauthenticated frame."""

import os
import pickle
import socket
import struct
import subprocess
import time
import zlib

import pytest

from cluster import HOST, LocalCluster

pytestmark = pytest.mark.cluster


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port`, from /proc/net/tcp."""
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A is TCP_LISTEN
                found.add(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
    return found


def test_node_refuses_to_start_without_secret(tmp_path):
    local = LocalCluster(tmp_path, nodes=1)
    env = {k: v for k, v in os.environ.items() if k != "RAFTMQ_CLUSTER_SECRET"}
    result = subprocess.run(local.command(1), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "RAFTMQ_CLUSTER_SECRET" in result.stderr
    assert listening_addresses(local.raft_bases[1]) == set()


def test_raft_ports_bind_only_configured_address(shared_cluster):
    for node_id in shared_cluster.node_ids:
        assert listening_addresses(shared_cluster.raft_bases[node_id]) == {HOST}


class _WriteMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unauthenticated_pickle_frame_runs_nothing(shared_cluster, tmp_path):
    marker = tmp_path / "pwned"
    payload = zlib.compress(pickle.dumps(_WriteMarker(str(marker))), 3)
    frame = struct.pack("i", len(payload)) + payload
    with socket.create_connection((HOST, shared_cluster.raft_bases[1]), timeout=5) as sock:
        sock.sendall(frame)
        time.sleep(1.0)
    assert not marker.exists()
    assert shared_cluster.healthy(1)
