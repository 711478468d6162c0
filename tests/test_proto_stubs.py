"""The committed Python stubs must equal a fresh generation from proto/."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GENERATED = ["raftmq_pb2.py", "raftmq_pb2.pyi", "raftmq_pb2_grpc.py"]


def test_committed_stubs_match_proto(tmp_path):
    shutil.copytree(PROTO_DIR / "raftmq", tmp_path / "raftmq",
                    ignore=shutil.ignore_patterns(*GENERATED, "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(tmp_path),
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         str(tmp_path / "raftmq" / "v1" / "raftmq.proto")],
        check=True,
    )
    stale = [
        name for name in GENERATED
        if not filecmp.cmp(tmp_path / "raftmq" / "v1" / name,
                           PROTO_DIR / "raftmq" / "v1" / name, shallow=False)
    ]
    assert stale == [], f"stale stubs {stale}: run sh proto/generate.sh and commit the result"
