"""`python -m raftmq.node ...` runs one node with the flags of `raftmq node`."""

import argparse
import sys

from .cli import run_node
from .config import add_node_arguments

parser = argparse.ArgumentParser(prog="raftmq node")
add_node_arguments(parser)
sys.exit(run_node(parser.parse_args()))
