"""Delivery guarantees: a lost produce ack, at-most-once and at-least-once settling."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest

from raftmq.client import Admin, Consumer, Producer, RetryPolicy, TopicPartition
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

pytestmark = pytest.mark.cluster


class ResponseDroppingProxy:
    """A TCP proxy in front of `target` that swallows the reply to a request.

    It relays every connection both ways until a client has sent
    `trigger_bytes` in total. From then on it forwards that client's bytes
    but none of the server's, and after `hold_s` it closes the connection
    and stops listening. The server handles the request; the client never
    sees the reply.
    """

    def __init__(self, target: tuple[str, int], trigger_bytes: int, hold_s: float = 2.0):
        self.target = target
        self.trigger_bytes = trigger_bytes
        self.hold_s = hold_s
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.dropped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.dropped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        server = socket.create_connection(self.target)
        swallowing = threading.Event()

        def server_to_client() -> None:
            try:
                while True:
                    data = server.recv(65536)
                    if not data:
                        return
                    if not swallowing.is_set():
                        client.sendall(data)
            except OSError:
                return

        threading.Thread(target=server_to_client, daemon=True).start()
        sent = 0
        deadline = None
        client.settimeout(0.1)
        try:
            while deadline is None or time.monotonic() < deadline:
                try:
                    data = client.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                server.sendall(data)
                sent += len(data)
                if deadline is None and sent >= self.trigger_bytes:
                    swallowing.set()
                    deadline = time.monotonic() + self.hold_s
        except OSError:
            pass
        if deadline is not None:
            self.dropped.set()
            self.listener.close()
        client.close()
        time.sleep(0.5)
        server.close()

    def close(self) -> None:
        self.listener.close()


def leader_address(cluster, topic: str) -> str:
    with Admin(cluster.bootstrap) as admin:
        deadline = time.monotonic() + 30
        while True:
            leader = admin.describe_topic(topic).partitions[0].leader
            if leader:
                return cluster.address(leader)
            assert time.monotonic() < deadline, "no leader in 30 s"
            time.sleep(0.2)


def test_retry_after_lost_ack_writes_once(cluster):
    topic = "lost-ack"
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(topic, partitions=1, replication_factor=3)
    address = leader_address(cluster, topic)
    host, port = address.rsplit(":", 1)
    request = raftmq_pb2.ProduceRequest(
        topic=topic, partition=0, producer_id=2**62 + 99, sequence=1,
        records=[raftmq_pb2.Record(key=b"k", value=b"x" * 4096)],
    )
    proxy = ResponseDroppingProxy((host, int(port)), trigger_bytes=4096)
    try:
        with grpc.insecure_channel(proxy.address) as channel:
            with pytest.raises(grpc.RpcError) as lost:
                raftmq_pb2_grpc.ProducerServiceStub(channel).Produce(request, timeout=20)
        assert proxy.dropped.is_set()
        assert lost.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        proxy.close()
    # The client never saw an ack, so it retries the same batch.
    with grpc.insecure_channel(address) as channel:
        retry = raftmq_pb2_grpc.ProducerServiceStub(channel).Produce(request, timeout=20)
    assert retry.duplicate, "the first attempt was not appended, so the ack was not lost"
    assert [a.offset for a in retry.acks] == [0]
    with Consumer(cluster.bootstrap) as consumer:
        tp = TopicPartition(topic, 0)
        assert consumer.end_offsets([tp])[tp] == 1


def produce(cluster, topic: str, count: int) -> None:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(topic, partitions=1, replication_factor=3)
    with Producer(cluster.bootstrap, linger_ms=5) as producer:
        for i in range(count):
            producer.send(topic, b"job-%d" % i, key=b"k%d" % i)
        producer.flush(timeout=60)


def receive(consumer: Consumer, want: int, timeout_s: float = 30) -> list:
    records = []
    deadline = time.monotonic() + timeout_s
    while len(records) < want and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=300, max_records=want - len(records)).values():
            records.extend(batch)
    return records


def test_ack_before_processing_is_at_most_once(cluster):
    produce(cluster, "at-most-once", 5)
    policy = RetryPolicy(visibility_timeout_ms=1000, backoff="immediate")
    options = dict(group_id="amo", delivery_mode="acks", retry_policy=policy,
                   auto_offset_reset="earliest", fetch_max_wait_ms=200)
    with Consumer(cluster.bootstrap, **options) as consumer:
        consumer.subscribe(["at-most-once"])
        records = receive(consumer, 5)
        assert len(records) == 5
        # Ack first, then the handler "crashes" before processing anything.
        consumer.ack(*records)
    with Consumer(cluster.bootstrap, **options) as consumer:
        consumer.subscribe(["at-most-once"])
        # Leases are 1 s, so anything unsettled would be back well within 4 s.
        again = receive(consumer, 1, timeout_s=4)
    assert again == []


WORKER = textwrap.dedent("""
    import sys, time
    from raftmq.client import Consumer, RetryPolicy
    bootstrap, out = sys.argv[1], sys.argv[2]
    policy = RetryPolicy(visibility_timeout_ms=2000, backoff="immediate")
    consumer = Consumer(bootstrap, group_id="alo", delivery_mode="acks", retry_policy=policy,
                        auto_offset_reset="earliest", fetch_max_wait_ms=200, session_timeout_ms=2000)
    consumer.subscribe(["at-least-once"])
    while True:
        for records in consumer.poll(timeout_ms=300).values():
            with open(out, "a") as f:
                for r in records:
                    f.write(f"{r.offset} {r.attempt}\\n")
        time.sleep(0.05)
""")


def test_unacked_records_return_after_a_crash(cluster, tmp_path):
    produce(cluster, "at-least-once", 3)
    out = tmp_path / "received.txt"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, cluster.bootstrap, str(out)])
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and len(out.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline, "the worker received fewer than 3 records"
            assert worker.poll() is None, "the worker exited"
            time.sleep(0.2)
        # The worker dies holding three leases and acking nothing.
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)
    first = sorted(tuple(map(int, line.split())) for line in out.read_text().splitlines())
    assert first == [(0, 1), (1, 1), (2, 1)]
    with Consumer(cluster.bootstrap, group_id="alo", delivery_mode="acks",
                  auto_offset_reset="earliest", fetch_max_wait_ms=200) as consumer:
        consumer.subscribe(["at-least-once"])
        again = receive(consumer, 3, timeout_s=60)
        consumer.ack(*again)
    assert sorted((r.offset, r.attempt) for r in again) == [(0, 2), (1, 2), (2, 2)]
