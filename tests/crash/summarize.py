"""Summarize a crash-suite results file as Markdown tables.

    python tests/crash/summarize.py results.jsonl

The file is the JSON Lines output of tests/test_crash.py under
RAFTMQ_CRASH_RESULTS, which is also the default when no path is given. The
output has one table per RAFTMQ_PYSYNCOBJ_FIXES setting found in the file,
with one row per mode, and then lists every trial that failed with its seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable

MODE_ORDER = ("kill_all", "kill_leader_paused_follower", "kill_during_snapshot", "full_restart")


def load_results(path: str) -> list[dict]:
    """Read one result per non-blank line; raise ValueError naming the bad line."""
    results = []
    with open(path, encoding="utf-8") as results_file:
        for number, line in enumerate(results_file, start=1):
            if not line.strip():
                continue
            try:
                result = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON: {error}") from None
            if not isinstance(result, dict) or "mode" not in result:
                raise ValueError(f"{path}:{number}: not a crash trial result (no 'mode' field)")
            results.append(result)
    return results


def trial_failed(result: dict) -> bool:
    return bool(result.get("lost_count") or result.get("diverged") or result.get("leaderless")
                or result.get("unsettled") or result.get("restart_changes")
                or result.get("error") or not result.get("acked"))


def mode_sort_key(mode: str) -> tuple[int, str]:
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode)


def mode_row(mode: str, results: list[dict]) -> list[str]:
    durations = [float(r.get("duration_s", 0.0)) for r in results]
    return [
        mode,
        str(len(results)),
        str(sum(int(r.get("acked", 0)) for r in results)),
        str(sum(int(r.get("lost_count", 0)) for r in results)),
        str(sum(len(r.get("diverged", [])) for r in results)),
        str(sum(len(r.get("leaderless", [])) for r in results)),
        str(sum(1 for r in results if r.get("error"))),
        str(sum(1 for r in results if trial_failed(r))),
        f"{sum(durations) / len(durations):.1f}",
    ]


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def summarize(results: list[dict]) -> str:
    """Return the Markdown summary of `results`."""
    by_setting: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        setting = result.get("pysyncobj_fixes") or "unset"
        by_setting[setting][result["mode"]].append(result)

    header = ["mode", "trials", "acked records", "lost", "diverged partitions",
              "leaderless partitions", "errors", "failed trials", "mean duration (s)"]
    sections = []
    for setting in sorted(by_setting):
        modes = by_setting[setting]
        rows = [mode_row(mode, modes[mode]) for mode in sorted(modes, key=mode_sort_key)]
        sections.append(f"### RAFTMQ_PYSYNCOBJ_FIXES={setting}\n\n{markdown_table(header, rows)}")

    failed = [r for r in results if trial_failed(r)]
    if failed:
        failure_header = ["mode", "trial", "seed", "base seed", "acked", "lost", "diverged",
                          "leaderless", "unsettled", "error"]
        failure_rows = [
            [r["mode"], str(r.get("trial")), str(r.get("seed")), str(r.get("base_seed")),
             str(r.get("acked", 0)), str(r.get("lost_count", 0)), str(r.get("diverged", [])),
             str(r.get("leaderless", [])), str(r.get("unsettled", [])),
             (r.get("error") or "").replace("|", "/")[:120]]
            for r in sorted(failed, key=lambda r: (mode_sort_key(r["mode"]), r.get("trial", 0)))
        ]
        sections.append("### Failed trials\n\n" + markdown_table(failure_header, failure_rows))
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=os.environ.get("RAFTMQ_CRASH_RESULTS"),
                        help="JSON Lines results file (default: $RAFTMQ_CRASH_RESULTS)")
    args = parser.parse_args(argv)
    if not args.path:
        parser.error("missing results file: pass a path or set RAFTMQ_CRASH_RESULTS")
    try:
        results = load_results(args.path)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not results:
        print(f"error: {args.path} contains no results", file=sys.stderr)
        return 2
    sys.stdout.write(summarize(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
