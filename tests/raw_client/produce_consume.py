"""A client built from the .proto file alone: no raftmq import anywhere.

Usage: produce_consume.py STUB_DIR ADDRESS TOPIC. Creates TOPIC, produces
keyed records without naming a partition (the server routes them), fetches
every partition back, and prints one JSON document with what it saw.
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
import raftmq_pb2 as pb  # noqa: E402
import raftmq_pb2_grpc as rpc  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402


def error_reason(error: grpc.RpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def main() -> None:
    _, _, address, topic = sys.argv
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    admin = rpc.AdminServiceStub(channel)
    created = admin.CreateTopic(pb.CreateTopicRequest(name=topic, partitions=3), timeout=30)
    producer = rpc.ProducerServiceStub(channel)
    sent = {}
    for batch in range(5):
        records = [pb.Record(key=f"key-{i % 7}".encode(), value=f"value-{batch}-{i}".encode())
                   for i in range(20)]
        response = producer.Produce(pb.ProduceRequest(topic=topic, records=records), timeout=30)
        for record, ack in zip(records, response.acks):
            sent[f"{ack.partition}/{ack.offset}"] = record.value.decode()
    consumer = rpc.ConsumerServiceStub(channel)
    received = {}
    for partition in range(len(created.topic.partitions)):
        offset = 0
        while True:
            reply = consumer.Fetch(pb.FetchRequest(topic=topic, partition=partition, offset=offset,
                                                   max_wait_ms=0), timeout=30)
            for record in reply.records:
                received[f"{partition}/{record.offset}"] = record.value.decode()
            if not reply.records:
                break
            offset = reply.records[-1].offset + 1
    try:
        consumer.Fetch(pb.FetchRequest(topic="no-such-topic", partition=0), timeout=10)
        missing_reason = "no error"
    except grpc.RpcError as error:
        missing_reason = f"{error.code().name}/{error_reason(error)}"
    print(json.dumps({
        "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
        "partitions": len(created.topic.partitions),
        "sent": sent,
        "received": received,
        "missing_topic": missing_reason,
    }))


main()
