"""Requests that once stalled or confused a node are rejected cleanly."""

import grpc
import pytest

from raftmq.client.errors import error_info_of
from raftmq.v1 import raftmq_pb2 as pb
from raftmq.v1 import raftmq_pb2_grpc as rpc

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def stubs(shared_cluster):
    channel = grpc.insecure_channel(shared_cluster.address(1))
    rpc.AdminServiceStub(channel).CreateTopic(
        pb.CreateTopicRequest(name="hardening", partitions=1), timeout=30)
    yield rpc.ProducerServiceStub(channel), rpc.ConsumerServiceStub(channel), channel
    channel.close()


def reason_of(call, request, timeout=60):
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=timeout)
    info = error_info_of(caught.value)
    return caught.value.code(), info.reason if info else None, dict(info.metadata) if info else {}


def test_tiny_records_over_command_limit_rejected(stubs):
    producer, _, _ = stubs
    request = pb.ProduceRequest(topic="hardening", partition=0,
                                records=[pb.Record(value=b"")] * 400_000)
    code, reason, metadata = reason_of(producer.Produce, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason == "REQUEST_TOO_LARGE"
    assert int(metadata["size"]) > int(metadata["max_command_bytes"])


def test_header_name_too_long_rejected(stubs):
    producer, _, _ = stubs
    record = pb.Record(value=b"v", headers=[pb.Header(key="h" * 70_000)])
    code, reason, metadata = reason_of(
        producer.Produce, pb.ProduceRequest(topic="hardening", partition=0, records=[record]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "INVALID_REQUEST"
    assert metadata["header_name_bytes"] == "70000"


def test_sequence_reused_with_other_records_rejected(stubs):
    producer, _, _ = stubs
    first = pb.ProduceRequest(topic="hardening", partition=0, producer_id=4242, sequence=1,
                              records=[pb.Record(value=b"only")])
    producer.Produce(first, timeout=30)
    changed = pb.ProduceRequest(topic="hardening", partition=0, producer_id=4242, sequence=1,
                                records=[pb.Record(value=b"a"), pb.Record(value=b"b")])
    code, reason, metadata = reason_of(producer.Produce, changed)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert reason == "OUT_OF_ORDER_SEQUENCE"
    assert metadata["first_records"] == "1"


def test_long_poll_ends_before_deadline(stubs):
    _, consumer, _ = stubs
    end = consumer.ListOffsets(pb.ListOffsetsRequest(topic="hardening"), timeout=30)
    offset = end.partitions[0].high_watermark
    reply = consumer.Fetch(pb.FetchRequest(topic="hardening", partition=0, offset=offset,
                                           max_wait_ms=5000), timeout=2)
    assert list(reply.records) == []


def test_long_topic_name_does_not_block_others(shared_cluster, stubs):
    _, _, channel = stubs
    admin = rpc.AdminServiceStub(channel)
    admin.CreateTopic(pb.CreateTopicRequest(name="n" * 249, partitions=2), timeout=30)
    admin.CreateTopic(pb.CreateTopicRequest(name="after-long-name", partitions=3), timeout=30)
    topic = admin.DescribeTopic(pb.DescribeTopicRequest(name="after-long-name"), timeout=30).topic
    assert all(p.leader != 0 for p in topic.partitions)
    long_topic = admin.DescribeTopic(pb.DescribeTopicRequest(name="n" * 249), timeout=30).topic
    assert all(p.leader != 0 for p in long_topic.partitions)
