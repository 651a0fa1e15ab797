"""Shared benchmark harness: environment record, copy-bandwidth ceiling, timing with rotated inputs, peak
memory, error against float64, JSON-lines results and a printed table.

Each `bench_<op>.py` beside this file exposes `run(args) -> list[dict]` and builds its rows with
`result_row`; `python -m kernels.benchmarks` adds the environment to every row, appends the rows to
`results.jsonl` and prints them. Method: docs/kernels.md ("How we measure").
"""

from __future__ import annotations

import functools
import itertools
import json
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_PATH = Path(__file__).with_name("results.jsonl")
REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE_COLUMNS = (
    ("op", "op"),
    ("case", "case"),
    ("dtype", "dtype"),
    ("pass", "pass"),
    ("impl", "impl"),
    ("time_ms", "ms"),
    ("speedups", "speedup"),
    ("gbps", "GB/s"),
    ("copy_bw_share", "% copy BW"),
    ("peak_mem_mb", "peak MB"),
    ("rel_err", "err vs f64"),
    ("dispatch_us", "host us"),
)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


@functools.cache
def environment() -> dict[str, Any]:
    """Device, versions and commit, recorded with every result row."""
    import triton

    return {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "host": platform.node(),
    }


@functools.cache
def copy_bandwidth_gbps(num_bytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import triton.testing

    def time_one_copy() -> float:
        source = torch.empty(num_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
        target = torch.empty_like(source)
        return triton.testing.do_bench(lambda: target.copy_(source), warmup=50, rep=300, return_mode="median")

    ms = time_one_copy()
    torch.cuda.empty_cache()  # the 2 GiB of buffers are out of scope now; give them back to the driver
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def time_ms(
    fn: Callable[..., Any], input_sets: Sequence[Sequence[Any]], warmup_ms: int = 50, rep_ms: int = 300
) -> float:
    """Median device time of `fn(*inputs)` in ms, cycling through `input_sets` so consecutive calls touch
    different memory and the L2 cache cannot keep a previous call's inputs."""
    import triton.testing

    cycle = itertools.cycle(input_sets)
    fn(*next(cycle))  # compile / autotune / first-call work stays outside the warm-up budget estimate
    torch.cuda.synchronize()
    return triton.testing.do_bench(
        lambda: fn(*next(cycle)), warmup=warmup_ms, rep=rep_ms, return_mode="median"
    )


def host_dispatch_us(fn: Callable[..., Any], inputs: Sequence[Any], calls: int = 20) -> float:
    """Host time per call with the device queue left running: the Python and launch overhead, which the
    device time hides only while the kernel is slower than its dispatch."""
    fn(*inputs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(*inputs)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def peak_memory_mb(fn: Callable[..., Any], inputs: Sequence[Any]) -> float:
    """Peak device memory allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fn(*inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


def relative_l2_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN or inf in `actual` gives inf."""
    actual = actual.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    expected = expected.detach().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def result_row(
    *,
    op: str,
    case: str,
    dtype: str,
    pass_name: str,
    impl: str,
    time_ms: float | None,
    compulsory_bytes: int | None = None,
    peak_mem_mb: float | None = None,
    rel_err: float | None = None,
    dispatch_us: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One measurement. Achieved bandwidth is compulsory bytes over time, also as a share of the measured
    device copy bandwidth. `time_ms=None` records an implementation that is not available."""
    row: dict[str, Any] = {
        "op": op,
        "case": case,
        "dtype": dtype,
        "pass": pass_name,
        "impl": impl,
        "time_ms": time_ms,
        "compulsory_bytes": compulsory_bytes,
        "peak_mem_mb": peak_mem_mb,
        "rel_err": rel_err,
        "dispatch_us": dispatch_us,
        **extra,
    }
    if time_ms and compulsory_bytes:
        row["gbps"] = compulsory_bytes / (time_ms * 1e-3) / 1e9
        row["copy_bw_gbps"] = copy_bandwidth_gbps()
        row["copy_bw_share"] = row["gbps"] / row["copy_bw_gbps"]
    return row


def add_speedups(rows: list[dict[str, Any]], baselines: Sequence[str]) -> None:
    """For each (op, case, dtype, pass) group, record every row's speedup over each baseline impl measured in
    the same run: `speedup_vs_<baseline>` = baseline time / row time."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["case"], row["dtype"], row["pass"]), []).append(row)
    for group in groups.values():
        times = {row["impl"]: row["time_ms"] for row in group}
        for row in group:
            for baseline in baselines:
                if row["impl"] != baseline and row["time_ms"] and times.get(baseline):
                    row[f"speedup_vs_{baseline}"] = times[baseline] / row["time_ms"]


def append_results(rows: Sequence[dict[str, Any]], path: Path = RESULTS_PATH) -> None:
    env = environment()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps({**env, "timestamp": stamp, **row}) + "\n")


def _format_cell(key: str, row: dict[str, Any]) -> str:
    if key == "speedups":
        parts = [
            f"{name[len('speedup_vs_') :]} {value:.2f}x"
            for name, value in row.items()
            if name.startswith("speedup_vs_")
        ]
        return ", ".join(parts)
    value = row.get(key)
    if value is None:
        return "not available" if key == "time_ms" else ""
    if key == "copy_bw_share":
        return f"{100 * value:.0f}%"
    if key == "rel_err":
        return f"{value:.1e}"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for _, header in TABLE_COLUMNS:
        table.add_column(header, justify="right" if header not in ("op", "case", "impl") else "left")
    for row in rows:
        table.add_row(*(_format_cell(key, row) for key, _ in TABLE_COLUMNS))
    Console(width=200).print(table)
