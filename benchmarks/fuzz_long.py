"""The long fuzzing run of the untrusted-input decoders (the test suite runs a bounded one).

    python benchmarks/fuzz_long.py --inputs 100000 [--targets batch,packet,request] [--seed 7] [--jobs 2]

Each target's inputs are split into chunks, each run by a child process
(:mod:`ctrserve.fuzz`) under an address-space cap with per-input time and allocation
bounds; a crash or hang of a child is a failure of its chunk, and the other chunks go on. Prints
one JSON line per finished chunk, then a last line of JSON: per target the inputs tried,
seconds, slowest input, largest traced peak and every failure (with the seed and index that
reproduce it: ``python -m ctrserve.fuzz --target T --seed S --index I``). Exit status 1
when anything failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ctrserve.fuzz import TARGETS, run_in_subprocess


def chunks(total: int, size: int) -> list[tuple[int, int]]:
    """``(start, count)`` pieces covering ``range(total)``."""
    return [(start, min(size, total - start)) for start in range(0, total, size)] or [(0, 0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=20_000, help="generated inputs per target (default 20000)")
    parser.add_argument("--targets", default=",".join(sorted(TARGETS)), help="comma-separated targets")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="default: the current time")
    parser.add_argument("--chunk", type=int, default=5000, help="inputs per child process")
    parser.add_argument("--jobs", type=int, default=2, help="child processes at once")
    parser.add_argument("--time-bound", type=float, default=2.0, help="seconds one input may take")
    parser.add_argument("--address-space-mb", type=int, default=2048)
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
    started = time.perf_counter()
    jobs = [(t, start, count) for t in targets for start, count in chunks(args.inputs, args.chunk)]

    def run(job):
        target, start, count = job
        # A chunk may take long on a busy machine; its own inputs are bounded by --time-bound.
        summary = run_in_subprocess(
            target,
            count,
            args.seed,
            start=start,
            timeout=max(600, count * args.time_bound),
            time_bound=args.time_bound,
            address_space_mb=args.address_space_mb,
        )
        print(
            json.dumps({k: v for k, v in summary.items() if k != "failures"} | {"failures": len(summary["failures"])}),
            flush=True,
        )
        return summary

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        summaries = list(pool.map(run, jobs))
    report = {"seed": args.seed, "seconds": round(time.perf_counter() - started, 1), "targets": {}}
    for target in targets:
        mine = [s for s in summaries if s["target"] == target]
        report["targets"][target] = {
            "inputs": sum(s["inputs"] for s in mine),
            "seconds": round(sum(s.get("seconds", 0) for s in mine), 1),
            "max_input_seconds": max((s.get("max_input_seconds", 0) for s in mine), default=0),
            "max_peak_bytes": max((s.get("max_peak_bytes", 0) for s in mine), default=0),
            "failures": [f for s in mine for f in s["failures"]],
        }
    report["failures"] = sum(len(t["failures"]) for t in report["targets"].values())
    print(json.dumps(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
