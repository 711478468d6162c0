"""Tests of node configuration loading: precedence of flags, environment
variables and the TOML file, and the errors for missing or invalid settings."""

from __future__ import annotations

import argparse
import re

import pytest

from raftmq.node.config import NodeConfig, add_node_arguments, load_config

REQUIRED_FLAGS = [
    "--node-id", "1",
    "--grpc-address", "127.0.0.1:9092",
    "--raft-address", "127.0.0.1:20000",
    "--peers", "1=127.0.0.1:20000,2=127.0.0.2:20000",
    "--data-dir", "/var/lib/raftmq",
]
SECRET_ENV = {"RAFTMQ_CLUSTER_SECRET": "s3cret"}

# Settings parsed as integers. A test that sets node_id elsewhere leaves out
# the --node-id flag, which would override it.
INT_SETTINGS = [
    "node_id", "raft_port_span", "default_replication_factor", "max_message_bytes",
    "max_request_bytes", "fetch_max_wait_ms", "produce_timeout_ms", "grpc_workers",
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    return parser.parse_args(argv)


def load(argv: list[str], environ: dict[str, str] | None = None) -> NodeConfig:
    return load_config(parse(argv), environ=SECRET_ENV if environ is None else environ)


def without_flag(flag: str) -> list[str]:
    position = REQUIRED_FLAGS.index(flag)
    return REQUIRED_FLAGS[:position] + REQUIRED_FLAGS[position + 2 :]


def with_flag(flag: str, value: str) -> list[str]:
    return without_flag(flag) + [flag, value]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('max_message_bytes = 300\nlog_level = "ERROR"\n', encoding="utf-8")
    return path


# --- precedence ---------------------------------------------------------------


def test_flag_overrides_env_and_file(config_file):
    config = load(
        REQUIRED_FLAGS + ["--config", str(config_file), "--max-message-bytes", "100"],
        {**SECRET_ENV, "RAFTMQ_MAX_MESSAGE_BYTES": "200"},
    )
    assert config.max_message_bytes == 100


def test_env_overrides_file(config_file):
    config = load(
        REQUIRED_FLAGS + ["--config", str(config_file)],
        {**SECRET_ENV, "RAFTMQ_MAX_MESSAGE_BYTES": "200"},
    )
    assert config.max_message_bytes == 200


def test_file_overrides_default(config_file):
    config = load(REQUIRED_FLAGS + ["--config", str(config_file)])
    assert config.max_message_bytes == 300


def test_default_applies_without_setting():
    assert load(REQUIRED_FLAGS).max_message_bytes == 2**20


def test_string_flag_overrides_env_and_file(config_file):
    config = load(
        REQUIRED_FLAGS + ["--config", str(config_file), "--log-level", "DEBUG"],
        {**SECRET_ENV, "RAFTMQ_LOG_LEVEL": "WARNING"},
    )
    assert config.log_level == "DEBUG"


def test_string_env_overrides_file(config_file):
    config = load(REQUIRED_FLAGS + ["--config", str(config_file)], {**SECRET_ENV, "RAFTMQ_LOG_LEVEL": "WARNING"})
    assert config.log_level == "WARNING"


def test_file_alone_supplies_every_setting(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(
        'node_id = 2\n'
        'grpc_address = "127.0.0.2:9092"\n'
        'raft_address = "127.0.0.2:20000"\n'
        'data_dir = "/data"\n'
        'cluster_secret = "from-file"\n'
        '[peers]\n'
        '1 = "127.0.0.1:20000"\n'
        '2 = "127.0.0.2:20000"\n',
        encoding="utf-8",
    )
    config = load(["--config", str(path)], environ={})
    assert config.node_id == 2
    assert config.peers == {1: "127.0.0.1:20000", 2: "127.0.0.2:20000"}
    assert config.cluster_secret == "from-file"


def test_peers_flag_overrides_file_table(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[peers]\n1 = "127.0.0.9:20000"\n', encoding="utf-8")
    config = load(REQUIRED_FLAGS + ["--config", str(path)])
    assert config.peers == {1: "127.0.0.1:20000", 2: "127.0.0.2:20000"}


def test_advertised_address_defaults_to_grpc_address():
    assert load(REQUIRED_FLAGS).grpc_advertised == "127.0.0.1:9092"


def test_unrelated_environment_ignored():
    config = load(REQUIRED_FLAGS, {**SECRET_ENV, "MAX_MESSAGE_BYTES": "5", "RAFTMQ_UNKNOWN": "x"})
    assert config.max_message_bytes == 2**20


# --- cluster secret -----------------------------------------------------------


def test_missing_secret_names_variable():
    with pytest.raises(ValueError, match="RAFTMQ_CLUSTER_SECRET"):
        load(REQUIRED_FLAGS, environ={})


def test_empty_secret_names_variable():
    with pytest.raises(ValueError, match="RAFTMQ_CLUSTER_SECRET"):
        load(REQUIRED_FLAGS, environ={"RAFTMQ_CLUSTER_SECRET": ""})


def test_secret_from_flag_accepted():
    config = load(REQUIRED_FLAGS + ["--cluster-secret", "flag-secret"], environ={})
    assert config.cluster_secret == "flag-secret"


def test_secret_not_in_repr():
    assert "s3cret" not in repr(load(REQUIRED_FLAGS))


# --- peers and raft address ---------------------------------------------------


def test_node_missing_from_peers_rejected():
    with pytest.raises(ValueError, match="node id 3 is not in peers"):
        load(with_flag("--node-id", "3"))


def test_raft_address_mismatch_rejected():
    with pytest.raises(ValueError, match=re.escape("binds 127.0.0.1:20001")):
        load(with_flag("--raft-address", "127.0.0.1:20001"))


@pytest.mark.parametrize(
    "bad_item",
    ["1=127.0.0.1", "x=127.0.0.1:20000", "127.0.0.1:20000", "=127.0.0.1:20000", "-1=127.0.0.1:20000"],
)
def test_malformed_peer_named_in_error(bad_item):
    with pytest.raises(ValueError) as caught:
        load(with_flag("--peers", f"1=127.0.0.1:20000,{bad_item}"))
    assert repr(bad_item) in str(caught.value)


def test_malformed_peer_from_env_named_in_error():
    with pytest.raises(ValueError) as caught:
        load(without_flag("--peers"), {**SECRET_ENV, "RAFTMQ_PEERS": "1=127.0.0.1:20000,2=nohost"})
    assert "'2=nohost'" in str(caught.value)


def test_peers_of_only_commas_rejected():
    with pytest.raises(ValueError, match="peers is empty"):
        load(with_flag("--peers", " , ,"))


def test_missing_peers_names_setting():
    with pytest.raises(ValueError, match="RAFTMQ_PEERS"):
        load(without_flag("--peers"))


# --- integers -----------------------------------------------------------------


@pytest.mark.parametrize("setting", INT_SETTINGS)
def test_non_integer_env_value_names_setting(setting):
    flags = without_flag("--node-id") if setting == "node_id" else REQUIRED_FLAGS
    with pytest.raises(ValueError, match=f"invalid {setting} 'many'"):
        load(flags, {**SECRET_ENV, f"RAFTMQ_{setting.upper()}": "many"})


@pytest.mark.parametrize("setting", INT_SETTINGS)
def test_non_integer_file_value_names_setting(tmp_path, setting):
    path = tmp_path / "node.toml"
    path.write_text(f'{setting} = "many"\n', encoding="utf-8")
    flags = without_flag("--node-id") if setting == "node_id" else REQUIRED_FLAGS
    with pytest.raises(ValueError, match=f"invalid {setting} 'many'"):
        load(flags + ["--config", str(path)])


def test_integer_env_value_parsed():
    config = load(REQUIRED_FLAGS, {**SECRET_ENV, "RAFTMQ_GRPC_WORKERS": "8"})
    assert config.grpc_workers == 8


@pytest.mark.parametrize("raft_address", ["127.0.0.1:many", "127.0.0.1", ":20000", "127.0.0.1:"])
def test_malformed_raft_address_names_setting(raft_address):
    with pytest.raises(ValueError, match=f"invalid raft_address {re.escape(repr(raft_address))}"):
        load(with_flag("--raft-address", raft_address))


def test_internal_address_defaults_to_advertised_address():
    config = load(REQUIRED_FLAGS + ["--advertised-address", "127.0.0.1:19092"])
    assert config.grpc_internal == "127.0.0.1:19092"


def test_internal_address_from_each_source(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('internal_address = "node1:9092"\n', encoding="utf-8")
    assert load(REQUIRED_FLAGS + ["--config", str(path)]).grpc_internal == "node1:9092"
    environ = {**SECRET_ENV, "RAFTMQ_INTERNAL_ADDRESS": "node2:9092"}
    assert load(REQUIRED_FLAGS + ["--config", str(path)], environ).grpc_internal == "node2:9092"
    flags = REQUIRED_FLAGS + ["--config", str(path), "--internal-address", "node3:9092"]
    assert load(flags, environ).grpc_internal == "node3:9092"
