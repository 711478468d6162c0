import sys
from pathlib import Path

import pytest

# Test helpers (cluster.py) are imported as plain modules from this folder.
sys.path.insert(0, str(Path(__file__).parent))

from cluster import LocalCluster  # noqa: E402


@pytest.fixture
def cluster(tmp_path):
    """A running, healthy three-node cluster, stopped after the test."""
    with LocalCluster(tmp_path / "cluster") as local:
        local.start_all()
        local.wait_healthy(timeout_s=60)
        yield local


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """One healthy three-node cluster shared by the tests of a module."""
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as local:
        local.start_all()
        local.wait_healthy(timeout_s=60)
        yield local
