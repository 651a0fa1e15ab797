"""`make gpu-check`: what a CUDA machine must confirm about this project, in one command of under 10 minutes.

Stages, each in its own process with its own time limit (a stage that fails or runs out of time is recorded
as such and the next one runs):
1. tests: the kernel tests on CUDA tensors against their references (ms_deform_attn, mask losses,
   neighborhood attention including the FlexAttention backward and the variable-size compiled forward).
2. kernels: the kernel benchmarks at ADE20K 640 and COCO 1024 (deformable attention vs the grid_sample
   reference, fused mask losses vs the unfused reference, neighborhood attention FlexAttention vs reference).
3. models: one bf16 training step and one inference of every backbone preset at 640x640, batch 2: time,
   peak memory, images/s.
   Training is measured plain and with activation checkpointing of every repeated block.
4. transformers: our model (plain and checkpointed) and Hugging Face's port side by side (Swin-L 640, fp32,
   the official dtype).
5. compile: Swin-L's bf16 training step eager and with its repeated blocks compiled (gets what time is left).

Every row goes to kernels/benchmarks/results.jsonl (with device, versions and commit); a short table is
printed at the end. Without a GPU it prints one line and exits 2.

    python benchmarks/gpu_check.py [--stages tests kernels models transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_EXIT_CODE = 2
TOTAL_BUDGET_S = 540  # under 10 minutes with process start-up
# Caps per stage. Measured on an H200 (torch 2.11): tests 28 s, kernels 86 s, models (3 presets, without
# DiNAT-L) 110 s, transformers 122 s; compile gets what is left.
STAGE_LIMIT_S = {"tests": 80, "kernels": 110, "models": 180, "transformers": 150, "compile": 120}
KERNEL_TESTS = (
    "tests/test_ms_deform_attn.py",
    "tests/test_mask_losses.py",
    "tests/test_neighborhood_attention.py",
)
PRESETS_AT_640 = ("swin_l", "convnext_l", "convnext_xl", "dinat_l")
PRESET_RUNS = (("train", "ours"), ("infer", "ours"), ("train", "ours_ac"))
MODEL_BATCH, MODEL_SIZE = 2, 640


class RowWriter:
    """Appends rows as JSON lines as soon as they exist, so a stage stopped at its time limit keeps them."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = path, stage

    def __call__(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"stage": self.stage, **row}, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Stages (each runs in a child process).


def stage_tests(write: RowWriter, limit_s: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "junit.xml")
        command = [sys.executable, "-m", "pytest", *KERNEL_TESTS, "-q", "-p", "no:cacheprovider",
                   f"--junitxml={report}", f"--timeout={int(limit_s)}"]  # fmt: skip
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        print(completed.stdout[-3000:])
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = "failed" if child.tag != "skipped" else "skipped"
                    message = (child.get("message") or "")[:300]
                    break
            else:
                message = ""
            write({"op": "test", "case": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                   "time_s": float(case.get("time", 0)), "message": message})  # fmt: skip


def stage_kernels(write: RowWriter, limit_s: float) -> None:
    from kernels.benchmarks import bench_mask_losses, bench_ms_deform_attn, harness

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    print(f"measured device copy bandwidth: {harness.copy_bandwidth_gbps():.0f} GB/s")
    work = [
        lambda: bench_ms_deform_attn.bench_case("ade20k_640", 2, "bf16", quick=True, with_compile=False),
        lambda: bench_ms_deform_attn.bench_case("ade20k_640", 2, "fp32", quick=True, with_compile=False),
        lambda: bench_ms_deform_attn.bench_case("coco_1024", 2, "bf16", quick=True, with_compile=False),
        lambda: bench_mask_losses.bench_case("main", "bf16", quick=True),
        lambda: bench_mask_losses.bench_case("main", "bf16", quick=True, crop="coco_1024"),
        lambda: neighborhood_rows("s1_d1_160"),
        lambda: neighborhood_rows("s1_d20_220"),
        lambda: neighborhood_rows("coco1024_s1_d1_256"),
    ]
    for job in work:
        rows = job()
        harness.add_speedups(rows, baselines=("reference", "reference_per_image"))
        for row in rows:
            write(row)
    bench_ms_deform_attn.print_compiled_kernels(("bf16",))


def neighborhood_rows(case: str) -> list[dict[str, Any]]:
    """FlexAttention against the eager reference, bf16, forward and forward+backward (the compiled
    reference of the full benchmark is left out: its compilations alone would take minutes)."""
    from kernels.benchmarks import bench_neighborhood_attention as bench

    side, heads, dilation = bench.SHAPES[case]
    tokens = bench.BATCH * heads * side * side
    flops = 4 * tokens * bench.KERNEL_SIZE**2 * bench.HEAD_DIM
    input_sets = [bench.make_inputs(side, heads, torch.bfloat16, seed) for seed in range(3)]
    exact = [t[:1].double() for t in input_sets[0][:3]]
    expected = bench.neighborhood_attention_reference(
        *exact, bench.KERNEL_SIZE, dilation, input_sets[0][4].double()
    )
    rows = []
    for impl, forward in bench.implementations(dilation).items():
        if impl == "reference_compiled":
            continue
        for pass_name in ("fwd", "fwd+bwd"):
            rows.append(bench.measure(case, "bf16", pass_name, impl, forward, input_sets, expected, tokens, flops,
                                      torch.bfloat16))  # fmt: skip
    torch.cuda.empty_cache()
    return rows


def stage_models(write: RowWriter, limit_s: float) -> None:
    for preset in PRESETS_AT_640:
        try:
            for row in preset_rows(preset):
                write(row)
        except Exception as err:  # one preset failing must not hide the others' numbers
            traceback.print_exc()
            write({"op": "model_step", "case": f"{preset} {MODEL_SIZE}", "impl": "ours", "dtype": "bf16",
                   "error": f"{type(err).__name__}: {err}"[:500]})  # fmt: skip
        torch.cuda.empty_cache()


def preset_rows(preset: str, runs: tuple[tuple[str, str], ...] = PRESET_RUNS) -> list[dict[str, Any]]:
    """Per (pass, variant) of `runs`, in order: one warm-up and one timed bf16 step of the preset at 640
    (variants: ours, ours_ac = activation checkpointing of every repeated block, ours_compile = compiled blocks;
    a variant stays switched on for the runs after it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_model_vs_transformers import synthetic_batch

    from model.block_execution import BLOCK_KINDS, compile_blocks, set_activation_checkpointing
    from model.checkpoint import build_from_config
    from model.criterion import LossConfig, training_loss
    from model.presets import make_config

    config = make_config(preset, dataset="ade20k", training=True)
    model = build_from_config(config).cuda().to(torch.bfloat16)
    losses = LossConfig()
    criterion = losses.build_criterion(config.num_classes)
    data = synthetic_batch(
        MODEL_BATCH, MODEL_SIZE, config.num_queries, config.num_classes, config.text_num_context
    )
    images = data["images"].cuda()
    targets = [{key: value.cuda() for key, value in target.items()} for target in data["targets"]]
    text_tokens = data["text_tokens"].cuda()

    def train_step():
        loss, _ = training_loss(model, criterion, losses, images, data["tasks"], text_tokens, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def inference_step():
        with torch.no_grad():
            model(images, data["tasks"])

    rows = []
    for mode, impl in runs:
        if impl == "ours_ac":
            set_activation_checkpointing(model, BLOCK_KINDS)
        elif impl == "ours_compile":
            compile_blocks(model)
        step = train_step if mode == "train" else inference_step
        model.train(mode == "train")
        warmup_started = time.perf_counter()
        step()  # warm-up: compilation, autotuning, allocator growth
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - warmup_started
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rows.append({"op": "model_step", "case": f"{preset} {MODEL_SIZE}", "pass": mode, "impl": impl,
                     "dtype": "bf16", "batch": MODEL_BATCH, "time_ms": 1000 * seconds,
                     "images_per_s": MODEL_BATCH / seconds, "warmup_s": warmup_s,
                     "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20})  # fmt: skip
    return rows


def stage_transformers(write: RowWriter, limit_s: float) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_model_vs_transformers as versus

    args = argparse.Namespace(steps=2, batch=MODEL_BATCH, device="cuda", threads=1, variants=["ac"])
    for mode in ("train", "infer"):
        result = versus.measure("swin_l_640", mode, args)
        for impl, seconds in result["seconds"].items():
            write({"op": "model_vs_transformers", "case": "swin_l 640", "pass": mode, "impl": impl, "dtype": "fp32",
                   "batch": MODEL_BATCH, "time_ms": 1000 * seconds, "images_per_s": MODEL_BATCH / seconds,
                   "peak_mem_mb": result["peak_mib"][impl]})  # fmt: skip


def stage_compile(write: RowWriter, limit_s: float) -> None:
    """Swin-L's bf16 training step eager, then with every repeated block compiled (the warm-up row's
    warmup_s is the compilation time). Last, so that it only uses what the other stages left."""
    for row in preset_rows("swin_l", runs=(("train", "ours"), ("train", "ours_compile"))):
        write(row)


STAGES = {
    "tests": stage_tests,
    "kernels": stage_kernels,
    "models": stage_models,
    "transformers": stage_transformers,
    "compile": stage_compile,
}


# ----------------------------------------------------------------------------------------------------------
# Parent process.


def run_stage(name: str, limit_s: float, rows_path: Path) -> tuple[str, float]:
    """Run one stage in a child process; returns its status ("ok", "failed (exit N)", "timed out") and time."""
    started = time.perf_counter()
    command = [sys.executable, __file__, "--child", name, "--rows", str(rows_path), "--limit", str(limit_s)]
    # The project need not be installed (a GPU machine may only have a checkout): its root goes on the path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # Its own session, so that a stage out of time is stopped with everything it started (pytest, children).
    child = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        returncode = child.wait(timeout=limit_s)
        status = "ok" if returncode == 0 else f"failed (exit {returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        status = f"timed out after {limit_s:.0f} s"
    return status, time.perf_counter() - started


def summary_line(row: dict[str, Any]) -> str:
    if row["op"] == "test":
        return ""
    cells = [row.get("op"), row.get("case"), row.get("dtype"), row.get("pass"), row.get("impl")]
    text = " | ".join(str(c) for c in cells if c is not None)
    if row.get("error") or row.get("note"):
        return f"{text} | {row.get('error') or row.get('note')}"
    numbers = []
    if row.get("time_ms") is not None:
        numbers.append(f"{row['time_ms']:.3f} ms")
    if row.get("images_per_s") is not None:
        numbers.append(f"{row['images_per_s']:.1f} img/s")
    if row.get("peak_mem_mb") is not None:
        numbers.append(f"peak {row['peak_mem_mb']:.0f} MB")
    if row.get("rel_err") is not None:
        numbers.append(f"err {row['rel_err']:.1e}")
    speedups = [
        f"{k.removeprefix('speedup_vs_')} {v:.2f}x" for k, v in row.items() if k.startswith("speedup_vs_")
    ]
    return f"{text} | {', '.join(numbers + speedups)}"


def print_summary(stage_status: dict[str, tuple[str, float]], rows: list[dict[str, Any]]) -> None:
    print("\n== gpu-check summary ==")
    for name, (status, seconds) in stage_status.items():
        print(f"stage {name:<13} {status:<24} {seconds:6.0f} s")
    tests = [row for row in rows if row["op"] == "test"]
    if tests:
        counts = {
            outcome: sum(row["outcome"] == outcome for row in tests)
            for outcome in ("passed", "failed", "skipped")
        }
        print(
            f"kernel tests on CUDA: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
        )
        for row in tests:
            if row["outcome"] == "failed":
                print(f"  FAILED {row['case']}: {row['message']}")
    for row in rows:
        line = summary_line(row)
        if line:
            print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--results", type=Path, default=ROOT / "kernels" / "benchmarks" / "results.jsonl")
    parser.add_argument("--child", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False); run it on a GPU",
              file=sys.stderr)  # fmt: skip
        return NO_GPU_EXIT_CODE
    if args.child:
        STAGES[args.child](RowWriter(args.rows, args.child), args.limit)
        return 0

    sys.path.insert(0, str(ROOT))
    deadline = time.perf_counter() + TOTAL_BUDGET_S
    stage_status = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp, "rows.jsonl")
        rows_path.touch()
        for name in args.stages:
            limit = min(STAGE_LIMIT_S[name], deadline - time.perf_counter())
            if limit < 10:
                stage_status[name] = ("skipped: out of time", 0.0)
                continue
            stage_status[name] = run_stage(name, limit, rows_path)
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    rows += [{"op": "stage", "case": name, "status": status, "time_s": seconds}
             for name, (status, seconds) in stage_status.items()]  # fmt: skip

    from kernels.benchmarks import harness

    harness.append_results(rows, args.results)
    print_summary(stage_status, rows)
    print(f"{len(rows)} rows appended to {args.results}")
    failed = any(status != "ok" for status, _ in stage_status.values()) or any(
        row.get("outcome") == "failed" or row.get("error") for row in rows
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
