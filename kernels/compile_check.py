"""Compile every Triton kernel of the project for real GPUs, on a machine that need not have one, and report
what the compiler made of it: registers, spill bytes and shared memory per kernel and architecture.

    python -m kernels.compile_check [--arch sm_80,sm_90a] [--json report.json]

Each kernel is built by the same `*_launch` function its wrapper calls (same argument order, constexprs and
launch configuration), here with meta tensors of the real shapes, then specialised exactly as Triton's JIT
would at launch, lowered with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and
assembled by the `ptxas` inside the triton wheel with `-v`, using the flags Triton itself passes. Launches that
compile to the same binary (the real shapes differ mostly in sizes the kernels take at run time) are compiled
once and listed with every shape set they serve.

Exit status: 0 when every kernel compiles without spilling, 1 otherwise. Run it without TRITON_INTERPRET
(the interpreter replaces the kernels with Python functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kernels.launch import KernelLaunch
from kernels.mask_losses import triton_kernels as mask_kernels
from kernels.ms_deform_attn import triton_kernels as deform_kernels

DEFAULT_ARCHS = ("sm_80", "sm_90a")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Shared memory one block may use (bytes): A100 and H100 opt-in limits.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# The real configurations (ADE20K 512/640/1280, COCO 1024, Cityscapes 512x1024 crops). Pixel decoder:
# multi-scale deformable attention over the stride-8/16/32 maps, H=8 heads of D=32, P=4 points, B=2.
DEFORMABLE_ATTENTION = dict(heads=8, head_dim=32, points=4, batch=2)
CROPS = {
    "ade20k_512": (512, 512),
    "ade20k_640": (640, 640),
    "ade20k_1280": (1280, 1280),
    "coco_1024": (1024, 1024),
    "cityscapes_512x1024": (512, 1024),
}
# Losses and matcher: mask logits at stride 4, bool targets at the crop, 12,544 points (x3 candidates for
# importance sampling), Q queries per image, T targets per image, B=2.
LOSSES = dict(points=12544, oversample=3, queries=250, targets=40, batch=2)


@dataclass
class KernelReport:
    kernel: str
    use: str
    arch: str
    dtype: str
    config: str
    shape_sets: list[str] = field(default_factory=list)
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_stores == 0 and self.spill_loads == 0


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def deformable_attention_launches(
    crop: tuple[int, int], dtype: torch.dtype
) -> Iterator[tuple[str, KernelLaunch]]:
    """Forward and backward of the pixel decoder's deformable attention at this crop."""
    heads, head_dim, points, batch = (
        DEFORMABLE_ATTENTION[k] for k in ("heads", "head_dim", "points", "batch")
    )
    levels = [(crop[0] // stride, crop[1] // stride) for stride in (8, 16, 32)]
    num_values = sum(h * w for h, w in levels)
    value = meta(batch, num_values, heads, head_dim, dtype=dtype)
    shapes = meta(len(levels), 2, dtype=torch.int64)
    starts = meta(len(levels), dtype=torch.int64)
    locations = meta(batch, num_values, heads, len(levels), points, 2, dtype=dtype)
    weights = meta(batch, num_values, heads, len(levels), points, dtype=dtype)
    output = meta(batch, num_values, heads * head_dim, dtype=dtype)
    yield "decoder forward", deform_kernels.forward_launch(value, shapes, starts, locations, weights, output)
    grad_value = meta(*value.shape, dtype=torch.float32)  # the fp32 accumulation buffer
    yield (
        "decoder backward",
        deform_kernels.backward_launch(
            value, shapes, starts, locations, weights, output, grad_value, locations, weights
        ),
    )


def mask_loss_launches(crop: tuple[int, int], dtype: torch.dtype) -> Iterator[tuple[str, KernelLaunch]]:
    """Every launch of the matcher and the point losses at this crop, mask logits in `dtype`."""
    points, oversample, queries, targets, batch = (
        LOSSES[k] for k in ("points", "oversample", "queries", "targets", "batch")
    )
    logits_hw = (crop[0] // 4, crop[1] // 4)
    target_bytes = meta(batch * targets, *crop, dtype=torch.uint8)
    # importance sampling: every matched mask's logits at its own candidate points
    matched = meta(batch * targets, *logits_hw, dtype=dtype)
    candidates = meta(batch * targets, oversample * points, 2)
    yield (
        "importance sampling",
        mask_kernels.sample_points_launch(matched, None, candidates, meta(*candidates.shape[:2]), 1),
    )
    # matcher: all queries' logits, then the padded targets, at points shared by each image's rows
    image_points = meta(batch, points, 2)
    all_logits = meta(batch * queries, *logits_hw, dtype=dtype)
    yield (
        "matcher logits",
        mask_kernels.sample_points_launch(
            all_logits, None, image_points, meta(batch * queries, points), queries
        ),
    )
    target_rows = meta(batch * targets, dtype=torch.int64)
    yield (
        "matcher targets",
        mask_kernels.sample_points_launch(
            target_bytes, target_rows, image_points, meta(batch * targets, points), targets
        ),
    )
    # losses: fused forward and backward over the matched masks
    mask_points = meta(batch * targets, points, 2)
    partial = meta(batch * targets, -(-points // mask_kernels._BLOCK_POINTS), 4)
    yield (
        "loss forward",
        mask_kernels.point_loss_forward_launch(matched, target_bytes, target_rows, mask_points, partial),
    )
    per_mask = meta(batch * targets)
    yield "loss backward", mask_kernels.point_loss_backward_launch(
        matched, target_bytes, target_rows, mask_points, meta(batch * targets, 4), per_mask, per_mask,
        meta(batch * targets, *logits_hw),
    )  # fmt: skip


def all_launches() -> Iterator[tuple[str, str, str, KernelLaunch]]:
    """(shape set, dtype name, use, launch) for every kernel launch at every real shape set and dtype."""
    for crop_name, crop in CROPS.items():
        for dtype_name, dtype in DTYPES.items():
            for use, launch in (
                *deformable_attention_launches(crop, dtype),
                *mask_loss_launches(crop, dtype),
            ):
                yield crop_name, dtype_name, use, launch


def parse_arch(name: str) -> int:
    match = re.fullmatch(r"sm_(\d+)a?", name)
    if not match:
        raise argparse.ArgumentTypeError(f"architecture must look like sm_80 or sm_90a, got {name!r}")
    return int(match.group(1))


def specialise(launch: KernelLaunch, target):
    """What Triton's JIT derives from these arguments at launch: signature, constexprs, attributes, options."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    return kernel._pack_args(backend, launch.kwargs, bound_args, specialization, options)


def compile_key(launch: KernelLaunch, arch: int) -> tuple[str, object]:
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    options, signature, constexprs, attrs = specialise(launch, target)
    key = repr((launch.name, arch, sorted(signature.items()), sorted(constexprs.items(), key=str),
                sorted(attrs.items(), key=str), sorted(options.__dict__.items(), key=str)))  # fmt: skip
    return key, (target, options, signature, constexprs, attrs)


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill bytes and static shared memory from `ptxas -v`, run with Triton's own flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "kernel.ptx")
        source.write_text(ptx)
        result = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", str(source), "-o", str(Path(tmp, "kernel.cubin"))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    log = result.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "static_shared": number(r"(\d+) bytes smem"),
    }


def compile_one(launch: KernelLaunch, arch: int, specialised) -> dict[str, int]:
    import triton
    from triton.compiler import ASTSource

    target, options, signature, constexprs, attrs = specialised
    compiled = triton.compile(
        ASTSource(launch.kernel, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    report = ptxas_report(compiled.asm["ptx"], arch)
    report["shared_bytes"] = compiled.metadata.shared + report.pop("static_shared")
    return report


def describe_config(launch: KernelLaunch) -> str:
    tunables = {
        k: v for k, v in launch.kwargs.items() if k.startswith(("BLOCK", "SAMPLE", "num_", "maxnreg"))
    }
    return " ".join(f"{k}={v}" for k, v in tunables.items())


def check(arch_names: list[str]) -> list[KernelReport]:
    reports: dict[str, KernelReport] = {}
    pending: dict[str, tuple[KernelLaunch, int, object]] = {}
    for arch_name in arch_names:
        arch = parse_arch(arch_name)
        for shape_set, dtype_name, use, launch in all_launches():
            key, specialised = compile_key(launch, arch)
            if key not in reports:
                reports[key] = KernelReport(launch.name, use, arch_name, dtype_name, describe_config(launch))
                pending[key] = (launch, arch, specialised)
            report = reports[key]
            if use not in report.use.split(" / "):
                report.use += f" / {use}"
            if dtype_name not in report.dtype.split("/"):
                report.dtype += f"/{dtype_name}"
            if shape_set not in report.shape_sets:
                report.shape_sets.append(shape_set)
    for key, (launch, arch, specialised) in pending.items():
        report = reports[key]
        try:
            for name, value in compile_one(launch, arch, specialised).items():
                setattr(report, name, value)
        except Exception as err:  # a compile error is a finding to report, not a reason to stop
            report.error = (
                f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            )
        if report.shared_bytes is not None and report.shared_bytes > SHARED_MEMORY_LIMIT.get(arch, 1 << 30):
            report.error = f"{report.shared_bytes} B of shared memory exceeds the {arch_name} limit"
    return list(reports.values())


def print_reports(reports: list[KernelReport]) -> None:
    header = (
        "kernel",
        "use",
        "arch",
        "dtype",
        "launch config",
        "regs",
        "spill st/ld B",
        "smem B",
        "shape sets",
    )
    rows = [header]
    for r in reports:
        spills = "" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        shared = "" if r.shared_bytes is None else str(r.shared_bytes)
        served = ", ".join(r.shape_sets) if len(r.shape_sets) <= 2 else f"all {len(r.shape_sets)}"
        rows.append((r.kernel.lstrip("_"), r.use, r.arch, r.dtype, r.config, str(r.registers or ""), spills, shared,
                     f"ERROR {r.error}" if r.error else served))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.compile_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--arch", default=",".join(DEFAULT_ARCHS), help="comma-separated, e.g. sm_80,sm_90a")
    parser.add_argument("--json", type=Path, help="also write the reports to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print(
            "kernels.compile_check: unset TRITON_INTERPRET; interpreted kernels cannot be compiled",
            file=sys.stderr,
        )
        return 2
    arch_names = [name.strip() for name in args.arch.split(",") if name.strip()]
    for name in arch_names:
        try:
            parse_arch(name)
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    reports = check(arch_names)
    print_reports(reports)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=1))
    failed = [r for r in reports if not r.ok]
    print(f"{len(reports)} compiled kernels, {len(failed)} with a compile error or spills")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
