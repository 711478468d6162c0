"""Container health check: exit 0 when the local node's gRPC health service
reports SERVING (the node has joined the metadata group and registered).

Reads the address the node binds from RAFTMQ_GRPC_ADDRESS, as the node does,
and connects to it on the loopback interface. With TLS (RAFTMQ_TLS_CERT_FILE
set) it verifies the node with RAFTMQ_TLS_CA_FILE, or the node's own
certificate, for the host name of RAFTMQ_ADVERTISED_ADDRESS.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 2.0


def local_target() -> str:
    bind = os.environ.get("RAFTMQ_GRPC_ADDRESS", "0.0.0.0:9092")
    host, _, port = bind.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def open_channel(target: str) -> grpc.Channel:
    cert_file = os.environ.get("RAFTMQ_TLS_CERT_FILE")
    if not cert_file:
        return grpc.insecure_channel(target)
    with open(os.environ.get("RAFTMQ_TLS_CA_FILE") or cert_file, "rb") as ca_file:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read())
    advertised = os.environ.get("RAFTMQ_ADVERTISED_ADDRESS", target)
    host_name = advertised.rpartition(":")[0]
    return grpc.secure_channel(target, credentials,
                               options=[("grpc.ssl_target_name_override", host_name)])


def main() -> int:
    target = local_target()
    with open_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            print(f"unhealthy: health check of {target} failed: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {target} reports {status}", file=sys.stderr)
        return 1
    print(f"healthy: {target} reports {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
