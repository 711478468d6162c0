"""A client generated from proto/ alone produces and consumes through the cluster."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.cluster


def generate_standalone_stubs(target: Path) -> None:
    # A flat include path gives modules named raftmq_pb2 that share nothing
    # with the installed raftmq package.
    shutil.copy(ROOT / "proto" / "raftmq" / "v1" / "raftmq.proto", target / "raftmq.proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(target),
         f"--python_out={target}", f"--grpc_python_out={target}", str(target / "raftmq.proto")],
        check=True,
    )


def test_stubs_from_proto_produce_and_consume(shared_cluster, tmp_path):
    generate_standalone_stubs(tmp_path)
    script = ROOT / "tests" / "raw_client" / "produce_consume.py"
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path), shared_cluster.address(2), "raw-client"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["health"] == "SERVING"
    assert report["partitions"] == 3
    assert len(report["sent"]) == 100
    assert report["received"] == report["sent"]
    assert report["missing_topic"] == "NOT_FOUND/UNKNOWN_TOPIC"
