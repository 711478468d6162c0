"""Each bad request gets its status, a stable reason and the offending value,
and the node keeps serving without losing what it accepted before."""

import grpc
import pytest

from raftmq.client.errors import error_info_of
from raftmq.v1 import raftmq_pb2 as pb
from raftmq.v1 import raftmq_pb2_grpc as rpc

pytestmark = pytest.mark.cluster

TOPIC = "bad-input"


@pytest.fixture(scope="module")
def stubs(shared_cluster):
    channel = grpc.insecure_channel(
        shared_cluster.address(1),
        options=[("grpc.max_send_message_length", 64 * 2**20)],
    )
    admin = rpc.AdminServiceStub(channel)
    admin.CreateTopic(pb.CreateTopicRequest(name=TOPIC, partitions=2), timeout=30)
    producer = rpc.ProducerServiceStub(channel)
    accepted = producer.Produce(
        pb.ProduceRequest(topic=TOPIC, partition=0, records=[pb.Record(value=b"kept")]), timeout=30)
    yield admin, producer, rpc.ConsumerServiceStub(channel), accepted
    channel.close()


def failure(call, request):
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    info = error_info_of(caught.value)
    return caught.value.code(), (info.reason if info else None), dict(info.metadata) if info else {}


def test_unknown_topic(stubs):
    _, producer, _, _ = stubs
    code, reason, metadata = failure(
        producer.Produce, pb.ProduceRequest(topic="missing", records=[pb.Record(value=b"x")]))
    assert code == grpc.StatusCode.NOT_FOUND
    assert reason == "UNKNOWN_TOPIC"
    assert metadata["topic"] == "missing"


def test_partition_out_of_range(stubs):
    _, _, consumer, _ = stubs
    code, reason, metadata = failure(consumer.Fetch, pb.FetchRequest(topic=TOPIC, partition=7))
    assert code == grpc.StatusCode.NOT_FOUND
    assert reason == "UNKNOWN_PARTITION"
    assert metadata["partition"] == "7"
    assert metadata["partitions"] == "2"


def test_negative_offset(stubs):
    _, _, consumer, _ = stubs
    code, reason, metadata = failure(
        consumer.Fetch, pb.FetchRequest(topic=TOPIC, partition=0, offset=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "INVALID_OFFSET"
    assert metadata["offset"] == "-1"


def test_offset_past_end_reports_valid_range(stubs):
    _, _, consumer, _ = stubs
    code, reason, metadata = failure(
        consumer.Fetch, pb.FetchRequest(topic=TOPIC, partition=0, offset=1000))
    assert code == grpc.StatusCode.OUT_OF_RANGE
    assert reason == "OFFSET_OUT_OF_RANGE"
    assert metadata["offset"] == "1000"
    assert metadata["log_start_offset"] == "0"
    assert int(metadata["high_watermark"]) >= 1


def test_record_above_max_message_bytes(stubs):
    _, producer, _, _ = stubs
    records = [pb.Record(value=b"ok"), pb.Record(value=b"x" * (2**20 + 1))]
    code, reason, metadata = failure(
        producer.Produce, pb.ProduceRequest(topic=TOPIC, partition=0, records=records))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "RECORD_TOO_LARGE"
    assert metadata["index"] == "1"
    assert metadata["max_message_bytes"] == str(2**20)


def test_request_above_max_request_bytes(stubs):
    _, producer, _, _ = stubs
    records = [pb.Record(value=b"y" * (2**20 - 100)) for _ in range(5)]
    code, reason, metadata = failure(
        producer.Produce, pb.ProduceRequest(topic=TOPIC, partition=0, records=records))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason == "REQUEST_TOO_LARGE"
    assert int(metadata["size"]) > int(metadata["max_request_bytes"])


@pytest.mark.parametrize("name", ["", "has space", "slash/name", "..", "x" * 250, "ünïcode"])
def test_invalid_topic_name(stubs, name):
    admin, _, _, _ = stubs
    code, reason, metadata = failure(
        admin.CreateTopic, pb.CreateTopicRequest(name=name, partitions=1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "INVALID_TOPIC_NAME"
    assert metadata["topic"] == name


def test_empty_value_and_empty_key_accepted(stubs):
    _, producer, consumer, _ = stubs
    response = producer.Produce(
        pb.ProduceRequest(topic=TOPIC, partition=1, records=[pb.Record(key=b"", value=b"")]),
        timeout=30)
    offset = response.acks[0].offset
    fetched = consumer.Fetch(pb.FetchRequest(topic=TOPIC, partition=1, offset=offset), timeout=30)
    record = fetched.records[0]
    assert record.HasField("key")
    assert record.key == b""
    assert record.value == b""


def test_binary_non_utf8_key_accepted(stubs):
    _, producer, consumer, _ = stubs
    key = b"\xff\xfe\x00\x80binary"
    response = producer.Produce(
        pb.ProduceRequest(topic=TOPIC, records=[pb.Record(key=key, value=b"v")]), timeout=30)
    ack = response.acks[0]
    fetched = consumer.Fetch(
        pb.FetchRequest(topic=TOPIC, partition=ack.partition, offset=ack.offset), timeout=30)
    assert fetched.records[0].key == key


def test_node_keeps_serving_and_keeps_data(stubs):
    _, _, consumer, accepted = stubs
    offset = accepted.acks[0].offset
    fetched = consumer.Fetch(pb.FetchRequest(topic=TOPIC, partition=0, offset=offset), timeout=30)
    assert fetched.records[0].value == b"kept"
