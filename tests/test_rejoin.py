"""A node restarted with an empty data folder rejoins from a snapshot."""

import shutil
import time

import grpc
import pytest

from raftmq.client import Admin, Consumer, Producer, TopicPartition
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

from cluster import LocalCluster

pytestmark = pytest.mark.cluster

TOPIC = "rejoin"
PARTITIONS = 2


def replicas_of(cluster: LocalCluster, node_id: int) -> dict:
    with grpc.insecure_channel(cluster.address(node_id)) as channel:
        reply = raftmq_pb2_grpc.AdminServiceStub(channel).DescribeReplicas(
            raftmq_pb2.DescribeReplicasRequest(include_digest=True), timeout=30)
    return {(r.topic, r.partition): r for r in reply.replicas}


def wait_for_replicas_equal(cluster: LocalCluster, node_ids: list[int], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        views = {node_id: replicas_of(cluster, node_id) for node_id in node_ids}
        digests = {key: {views[n][key].log_digest for n in node_ids if key in views[n]}
                   for key in views[node_ids[0]]}
        complete = all(len(views[n]) == PARTITIONS for n in node_ids)
        if complete and all(len(found) == 1 for found in digests.values()):
            return views
        if time.monotonic() > deadline:
            return views
        time.sleep(0.5)


def test_wiped_node_catches_up_and_serves(tmp_path):
    with LocalCluster(tmp_path, extra_args=["--raft-log-compaction-min-entries", "30",
                                            "--raft-log-compaction-min-interval-ms", "500"]) as cluster:
        cluster.start_all()
        cluster.wait_healthy(timeout_s=60)
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
        acked = {}
        with Producer(cluster.bootstrap, linger_ms=2, batch_size=2000) as producer:
            futures = [(i, producer.send(TOPIC, b"value-%d" % i, key=b"k%d" % (i % 10)))
                       for i in range(3000)]
            producer.flush(timeout=120)
        for i, future in futures:
            metadata = future.result(timeout=0)
            acked[(metadata.partition, metadata.offset)] = b"value-%d" % i

        wiped = 3
        cluster.kill(wiped)
        shutil.rmtree(cluster.data_dir(wiped))
        cluster.start(wiped)
        cluster.wait_healthy(timeout_s=60, node_ids=[wiped])
        views = wait_for_replicas_equal(cluster, cluster.node_ids, timeout_s=120)
        for key, replica in views[1].items():
            assert views[wiped][key].log_digest == replica.log_digest, f"{key} differs"
        assert "event=snapshot_loaded" in cluster.log_path(wiped).read_text()

        # With another node down, the wiped node is part of every majority:
        # the acknowledged records must come back through it.
        cluster.kill(1)
        records = {}
        with Consumer(cluster.address(wiped), fetch_max_wait_ms=100) as consumer:
            tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
            consumer.assign(tps)
            consumer.seek_to_beginning()
            end = consumer.end_offsets(tps)
            deadline = time.monotonic() + 120
            while any(consumer.position(tp) < end[tp] for tp in tps):
                assert time.monotonic() < deadline, "reading back did not finish in 120 s"
                for tp, batch in consumer.poll(timeout_ms=500).items():
                    for record in batch:
                        records[(tp.partition, record.offset)] = record.value
        missing = [key for key, value in acked.items() if records.get(key) != value]
        assert missing == [], f"{len(missing)} acknowledged records missing, first {missing[:5]}"


def test_wiped_node_alone_elects_nothing(tmp_path):
    with LocalCluster(tmp_path) as cluster:
        cluster.start_all()
        cluster.wait_healthy(timeout_s=60)
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic(TOPIC, partitions=1, replication_factor=3)
        with Producer(cluster.bootstrap) as producer:
            offset = producer.send(TOPIC, b"kept", partition=0).result(timeout=60).offset
        cluster.stop_all()

        wiped = 2
        shutil.rmtree(cluster.data_dir(wiped))
        log_size = cluster.log_path(wiped).stat().st_size
        cluster.start(wiped)
        time.sleep(8)  # several election timeouts (1 to 2.5 s)
        new_log = cluster.log_path(wiped).read_text()[log_size:]
        assert "to=leader" not in new_log
        assert not cluster.healthy(wiped)

        for node_id in cluster.node_ids:
            if node_id != wiped:
                cluster.start(node_id)
        cluster.wait_healthy(timeout_s=60)
        with Consumer(cluster.bootstrap) as consumer:
            tp = TopicPartition(TOPIC, 0)
            consumer.assign([tp])
            consumer.seek(tp, offset)
            batch = consumer.poll(timeout_ms=10_000).get(tp, [])
        assert [record.value for record in batch] == [b"kept"]
