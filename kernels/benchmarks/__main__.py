"""Discover `bench_*.py` modules beside this file, run them on the GPU, append rows and print a table.

python -m kernels.benchmarks                      # every benchmark, full shapes
python -m kernels.benchmarks --ops ms_deform_attn --quick
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch

import kernels.benchmarks as package
from kernels.benchmarks import harness

NO_GPU_EXIT_CODE = 2


def available_ops() -> list[str]:
    return sorted(
        info.name.removeprefix("bench_")
        for info in pkgutil.iter_modules(package.__path__)
        if info.name.startswith("bench_")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kernels.benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ops",
        nargs="+",
        default=None,
        help=f"benchmarks to run (default: all of {', '.join(available_ops())})",
    )
    parser.add_argument("--quick", action="store_true", help="the main shape and dtype only, shorter timing")
    parser.add_argument(
        "--results", type=Path, default=harness.RESULTS_PATH, help="JSON-lines file to append to"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ops = args.ops or available_ops()
    unknown = sorted(set(ops) - set(available_ops()))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available_ops()}", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print(
            "kernels.benchmarks: no CUDA device here. These benchmarks time GPU kernels against GPU references; "
            "run them on a machine with a GPU (CPU timings of the Triton interpreter mean nothing).",
            file=sys.stderr,
        )
        return NO_GPU_EXIT_CODE
    env = harness.environment()
    print(", ".join(f"{key}={value}" for key, value in env.items()))
    print(f"measured device copy bandwidth: {harness.copy_bandwidth_gbps():.0f} GB/s (read + write)")
    for op in ops:
        torch.manual_seed(args.seed)
        module = importlib.import_module(f"kernels.benchmarks.bench_{op}")
        rows = module.run(args)
        harness.append_results(rows, args.results)
        harness.print_table(rows, title=f"{op} on {env['device']}")
    print(f"rows appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
