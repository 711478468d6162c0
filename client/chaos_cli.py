"""`raftmq chaos`: the chaos workload and checker against a running cluster.

This process cannot signal a remote cluster's processes or cut its links,
so every fault is a shell command template that the user gives with
`--fault ACTION=TEMPLATE` (see CommandTarget in client/chaos_faults.py).
A fault kind is injected only when all of its actions have a template:
kills need `kill` (and `restart`, unless the cluster restarts its nodes by
itself), pauses need `pause` and `resume`, partitions need `isolate` and
`heal`. With `--no-faults` the command only runs the traffic and checks it.
"""

from __future__ import annotations

import argparse
import logging
import random
import shlex
import sys

from .chaos import ChaosSettings, run_chaos
from .chaos_faults import ACTIONS, FAULT_KINDS, CommandTarget, FaultSettings, kinds_supported

DEFAULT_DURATION_S = 300.0
DEFAULT_RATE = 100.0


def add_chaos_command(commands: argparse._SubParsersAction) -> None:
    """Add `raftmq chaos` to the top-level subcommands."""
    chaos = commands.add_parser(
        "chaos",
        help="run keyed traffic and consumer groups while injecting faults, then check "
        "that nothing acknowledged was lost",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    chaos.add_argument("--seed", type=int, default=None,
                       help="seed of the workload and the fault schedule (default: random, "
                       "printed in the summary)")
    chaos.add_argument("--duration-s", type=_positive_float, default=DEFAULT_DURATION_S,
                       metavar="S", help=f"length of the fault phase in seconds "
                       f"(default: {DEFAULT_DURATION_S:g})")
    chaos.add_argument("--rate", type=_positive_float, default=DEFAULT_RATE, metavar="N",
                       help=f"records per second over all producers (default: {DEFAULT_RATE:g})")

    chaos.add_argument("--producers", type=_positive_int, default=3, metavar="N",
                       help="producer threads, each with its own keys (default: 3)")
    chaos.add_argument("--keys-per-producer", type=_positive_int, default=64, metavar="N",
                       help="keys of each producer (default: 64)")
    chaos.add_argument("--consumers-per-group", type=_positive_int, default=2, metavar="N",
                       help="members of the offsets group and of the acks group (default: 2)")
    chaos.add_argument("--partitions", type=_positive_int, default=4, metavar="N",
                       help="partitions of the run's new topic (default: 4)")
    chaos.add_argument("--replication-factor", type=_positive_int, default=3, metavar="R",
                       help="replicas per partition (default: 3)")

    chaos.add_argument("--topic", default=None,
                       help="name of the topic to create (default: chaos-<seed>-<random>)")
    chaos.add_argument("--results", metavar="PATH", default=None,
                       help="JSON results file (default: chaos-<seed>.json in the current folder)")

    chaos.add_argument("--fault", action="append", default=[], metavar="ACTION=TEMPLATE",
                       help=f"shell command of one fault action ({', '.join(ACTIONS)}); "
                       "placeholders {node}, {name}, {container}, {address}, {host}, {port}. "
                       "Repeat for each action")
    chaos.add_argument("--node-name", action="append", default=[], metavar="ID=NAME",
                       help="value of {name} and {container} for a node id (default: node<id>)")
    chaos.add_argument("--faults", default=None, metavar="KIND,...",
                       help=f"fault kinds to inject, out of {', '.join(FAULT_KINDS)} "
                       "(default: every kind whose actions have a template)")
    chaos.add_argument("--no-faults", action="store_true",
                       help="inject no faults: only run the traffic and the checker")

    chaos.add_argument("--fault-gap-s", type=_positive_float, nargs=2, default=(1.0, 5.0),
                       metavar=("LOW", "HIGH"),
                       help="range of the pause between two faults, in seconds (default: 1 5)")
    chaos.add_argument("--ready-timeout-s", type=_positive_float, default=90.0, metavar="S",
                       help="how long the cluster may take to recover from a fault (default: 90)")
    chaos.add_argument("--drain-timeout-s", type=_positive_float, default=None, metavar="S",
                       help="how long the groups may take to finish after the faults "
                       "(default: the larger of 180 and half the duration)")
    chaos.add_argument("--verbose", action="store_true",
                       help="also print the SDK's warnings (retries, reconnections)")
    chaos.set_defaults(func=run_chaos_command)


def run_chaos_command(args: argparse.Namespace) -> int:
    """Run one chaos run from the parsed arguments; exit code 0 when every check passed."""
    if args.ssl_cafile:
        # NOTE: the replica and health checks open plaintext channels, so a
        # TLS cluster cannot be checked yet.
        raise ValueError("raftmq chaos does not support TLS clusters yet (--ssl-cafile)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    templates = _parse_pairs(args.fault, "--fault", "ACTION=TEMPLATE")
    names = {_node_id(key): value
             for key, value in _parse_pairs(args.node_name, "--node-name", "ID=NAME").items()}
    if args.no_faults and templates:
        raise ValueError("--no-faults and --fault exclude each other")

    target = None
    kinds: tuple[str, ...] = ()
    if not args.no_faults:
        if not templates:
            raise ValueError("give fault commands with --fault ACTION=TEMPLATE, or pass "
                             "--no-faults to run the checker without faults")
        target = CommandTarget(_with_container_alias(templates), args.bootstrap_servers, names)
        kinds = _chosen_kinds(args.faults, kinds_supported(target))

    results = args.results or f"chaos-{seed}.json"
    settings = ChaosSettings(
        bootstrap=args.bootstrap_servers, seed=seed, duration_s=args.duration_s,
        topic=args.topic, partitions=args.partitions,
        replication_factor=args.replication_factor, producers=args.producers,
        keys_per_producer=args.keys_per_producer, rate_per_s=args.rate,
        consumers_per_group=args.consumers_per_group,
        faults=FaultSettings(kinds=kinds, gap_s=tuple(args.fault_gap_s),
                             ready_timeout_s=args.ready_timeout_s),
        drain_timeout_s=args.drain_timeout_s or max(180.0, args.duration_s / 2),
        results_path=results,
        replay_command=replay_command(args, seed),
    )

    if not args.verbose:
        logging.getLogger("raftmq.client").setLevel(logging.ERROR)
    print(f"chaos seed {seed}: {args.duration_s:g} s of faults "
          f"({', '.join(kinds) or 'none'}), results in {results}", flush=True)
    result = run_chaos(settings, target, log=lambda line: print(line, flush=True))
    if not result.passed:
        print(result.failure_message(), file=sys.stderr)
        return 1
    return 0


def replay_command(args: argparse.Namespace, seed: int) -> str:
    """Return the `raftmq chaos` command line that repeats this run with its seed."""
    words = ["raftmq", "--bootstrap-servers", args.bootstrap_servers, "chaos",
             "--seed", str(seed), "--duration-s", f"{args.duration_s:g}",
             "--rate", f"{args.rate:g}", "--producers", str(args.producers),
             "--keys-per-producer", str(args.keys_per_producer),
             "--consumers-per-group", str(args.consumers_per_group),
             "--partitions", str(args.partitions),
             "--replication-factor", str(args.replication_factor)]
    for pair in args.fault:
        words += ["--fault", pair]
    for pair in args.node_name:
        words += ["--node-name", pair]
    if args.faults:
        words += ["--faults", args.faults]
    if args.no_faults:
        words.append("--no-faults")
    return shlex.join(words)


def _with_container_alias(templates: dict[str, str]) -> dict[str, str]:
    return {action: template.replace("{container}", "{name}")
            for action, template in templates.items()}


def _chosen_kinds(text: str | None, supported: tuple[str, ...]) -> tuple[str, ...]:
    if text is None:
        if not supported:
            raise ValueError("the --fault templates enable no fault kind: kills need 'kill', "
                             "pauses 'pause' and 'resume', partitions 'isolate' and 'heal'")
        return supported
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind {', '.join(unknown)} in --faults: expected "
                         f"{', '.join(FAULT_KINDS)}")
    missing = [kind for kind in kinds if kind not in supported]
    if missing:
        raise ValueError(f"--faults asks for {', '.join(missing)}, but the --fault templates "
                         "do not give all of its actions")
    return kinds


def _parse_pairs(values: list[str], option: str, form: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, separator, rest = value.partition("=")
        if not separator or not key.strip() or not rest.strip():
            raise ValueError(f"invalid {option} {value!r}: expected {form}")
        pairs[key.strip()] = rest
    return pairs


def _node_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"invalid node id {text!r} in --node-name: expected an integer >= 1")
    return int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value:g}")
    return value
