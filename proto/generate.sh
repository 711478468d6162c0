#!/bin/sh
# Regenerate the Python stubs of proto/raftmq/v1 beside the .proto file.
# Run from anywhere; needs the grpcio-tools version pinned in pyproject.toml,
# because tests/test_proto_stubs.py compares the committed stubs byte for byte
# with a fresh generation.
set -eu
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  raftmq/v1/raftmq.proto
