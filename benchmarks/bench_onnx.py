"""ONNX Runtime vs eager PyTorch inference time on this CPU, side by side in one run, per preset.

    python benchmarks/bench_onnx.py                                   # tiny and Swin-L at 512x512
    python benchmarks/bench_onnx.py --presets tiny --size 256 256 --threads 2 --repeats 5

Each preset is built with random weights (timing does not depend on them), exported once through
model/export.py (torch.export, then ONNX opset 18) and run on the same batch of one image with the panoptic
task: eager `model(images, tasks)` under no_grad, and the ONNX Runtime session (CPU provider), with the same
thread count. Reported: the median of --repeats timed runs after one warm-up each, the ratio, and the
largest relative difference of the outputs. Rows are appended to benchmarks/bench_onnx_results.jsonl with the
machine (CPU model, cores, load average at the start) and versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import build_from_config  # noqa: E402
from model.classes import ModelClasses  # noqa: E402
from model.export import ExportInfo, OnnxRuntimeModel, export_program, save_onnx  # noqa: E402
from model.presets import make_config  # noqa: E402

RESULTS = Path(__file__).with_name("bench_onnx_results.jsonl")
DEFAULT_SIZES = {"tiny": (512, 512), "swin_l": (512, 512)}


def machine() -> dict:
    import onnx
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())  # fmt: skip
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "commit": commit.stdout.strip() or "unknown"}  # fmt: skip


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations and ONNX Runtime's lazy initialisation stay out of the timing
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def classes_of(num_classes: int) -> ModelClasses:
    return ModelClasses(
        tuple(f"class{k}" for k in range(num_classes)), (True,) * num_classes, tuple(range(num_classes))
    )


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((expected - actual).abs().max() / expected.abs().max())


def bench_preset(preset: str, size: tuple[int, int], threads: int, repeats: int, folder: Path) -> dict:
    torch.manual_seed(0)
    config = make_config(preset)
    model = build_from_config(config).eval()
    started = time.perf_counter()
    exported = copy.deepcopy(model)  # the export swaps some blocks in place: keep `model` eager
    info = ExportInfo.of(config, classes_of(config.num_classes), exported)
    program = export_program(exported)
    save_onnx(program, info, folder / f"{preset}.onnx")
    export_seconds = time.perf_counter() - started
    del program
    session = OnnxRuntimeModel(folder / f"{preset}.onnx", threads=threads)
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
    tasks = ["panoptic"]
    torch.set_num_threads(threads)

    def eager():
        with torch.no_grad():
            return model(images, tasks)

    eager_s = median_seconds(eager, repeats)
    onnx_s = median_seconds(lambda: session(images, tasks), repeats)
    expected, got = eager(), session(images, tasks)
    error = max(relative_error(expected[key], got[key]) for key in ("pred_logits", "pred_masks"))
    return {"preset": preset, "input": list(size), "batch": 1, "task": "panoptic", "threads": threads,
            "repeats": repeats, "eager_s": round(eager_s, 4), "onnxruntime_s": round(onnx_s, 4),
            "eager_over_onnxruntime": round(eager_s / onnx_s, 3), "max_relative_error": error,
            "export_s": round(export_seconds, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_SIZES), choices=sorted(DEFAULT_SIZES))
    parser.add_argument(
        "--size",
        nargs=2,
        type=int,
        default=None,
        metavar=("H", "W"),
        help="input size for every preset (multiples of 32); default: per preset",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    environment = machine()
    print(
        f"{environment['cpu']}, {environment['cores']} cores (load {environment['load_average_1min']:.1f}), "
        f"torch {environment['torch']}, onnxruntime {environment['onnxruntime']}, {args.threads} threads"
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for preset in args.presets:
            size = tuple(args.size) if args.size else DEFAULT_SIZES[preset]
            row = {**bench_preset(preset, size, args.threads, args.repeats, Path(folder)), **environment,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
            rows.append(row)
            with args.results.open("a") as results:
                results.write(json.dumps(row) + "\n")
    print(f"{'preset':<8} {'input':>9} {'eager s':>9} {'ORT s':>9} {'eager/ORT':>10} {'rel. err':>9}")
    for row in rows:
        print(
            f"{row['preset']:<8} {'x'.join(map(str, row['input'])):>9} {row['eager_s']:>9.3f} "
            f"{row['onnxruntime_s']:>9.3f} {row['eager_over_onnxruntime']:>10.2f} {row['max_relative_error']:>9.1e}"
        )
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
