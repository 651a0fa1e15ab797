"""GPU readiness checked without a GPU. `python -m kernels.compile_check`: every Triton kernel compiles for
sm_80 and sm_90a at the launch configuration its wrapper picks, for every real shape set and dtype, without
spilling registers; and the check does see spills when there are some. `make gpu-check`: without a GPU it
says so in one line and exits 2.

The check compiles for real GPUs, so it runs in a fresh process without TRITON_INTERPRET (the test suite
sets it on machines without a GPU, and it replaces the kernels with Python functions). The full matrix is
38 distinct binaries (about 40 s on two busy cores; Triton's cache makes later runs faster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNELS = (
    "_ms_deform_attn_fwd_kernel",
    "_ms_deform_attn_bwd_kernel",
    "_sample_points_kernel",
    "_point_loss_forward_kernel",
    "_point_loss_backward_kernel",
)
CROPS = ("ade20k_512", "ade20k_640", "ade20k_1280", "coco_1024", "cityscapes_512x1024")


def run_without_interpreter(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_every_kernel_compiles_without_spills_on_sm80_and_sm90a(tmp_path):
    report_path = tmp_path / "report.json"
    result = run_without_interpreter(["-m", "kernels.compile_check", "--json", str(report_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    reports = json.loads(report_path.read_text())
    for report in reports:
        assert report["error"] is None, report
        assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report
        assert 0 < report["registers"] <= 255, report
    for arch in ("sm_80", "sm_90a"):
        for kernel in KERNELS:
            mine = [r for r in reports if r["arch"] == arch and r["kernel"] == kernel]
            dtypes = {d for r in mine for d in r["dtype"].split("/")}
            crops = {c for r in mine for c in r["shape_sets"]}
            assert dtypes == {"fp32", "bf16", "fp16"}, (arch, kernel, dtypes)
            assert crops == set(CROPS), (arch, kernel, crops)
    assert "0 with a compile error or spills" in result.stdout


def test_check_reports_the_spills_of_a_register_starved_launch():
    """The same forward launch capped at 32 registers must spill, and the report must say so."""
    script = textwrap.dedent(
        """
        import dataclasses, torch
        from kernels import compile_check as check
        _, launch = next(check.deformable_attention_launches((640, 640), torch.bfloat16))
        starved = dataclasses.replace(launch, kwargs={**launch.kwargs, "maxnreg": 32})
        _, specialised = check.compile_key(starved, 80)
        report = check.compile_one(starved, 80, specialised)
        print(report["registers"], report["spill_stores"], report["spill_loads"])
        """
    )
    result = run_without_interpreter(["-c", script], timeout=300)
    assert result.returncode == 0, result.stderr
    registers, spill_stores, spill_loads = map(int, result.stdout.split())
    assert registers <= 32 and spill_stores > 0 and spill_loads > 0


def test_check_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unset TRITON_INTERPRET" in result.stderr and "Traceback" not in result.stderr


def test_gpu_check_without_a_gpu_exits_2_with_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], result.stderr


def test_make_gpu_check_runs_the_gpu_check_script():
    result = subprocess.run(
        ["make", "-n", "gpu-check"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # Run from inside make (make test), the nested make also prints its directory changes.
    assert any(line.endswith("python benchmarks/gpu_check.py") for line in result.stdout.strip().splitlines())
