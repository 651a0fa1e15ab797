"""Our OneFormer against transformers' OneFormerForUniversalSegmentation at the same configuration, on CPU:
seconds per training step (forward + loss + backward) and per inference step, and the peak memory each step
adds on top of the built model (resident set size sampled every millisecond, minus the size before the
first step).

Timing: one process per (configuration, mode) builds both models and alternates their steps (ours, HF,
ours, HF, ...), so load from other processes on a shared machine hits both alike; medians are reported.
Memory: one fresh process per (implementation, configuration, mode) runs one step, so that another
measurement's freed-but-cached memory cannot hide its peak. Both implementations get the same HF config dict
(ours is derived from it by model.convert), images, tasks, text lists and targets; the weights are each
side's own random init (timing does not depend on their values).

Configurations:
- tiny: our "tiny" preset's heads (hidden 64, 24 queries, 2 pixel-decoder layers, 9 decoder layers, ...) on
  a Swin of the tiny DiNAT's sizes (32..256 channels, depths 1,1,2,1; transformers has no NATTEN-free DiNAT),
  128 x 128 images.
- small: the full-width heads (256, 6 pixel-decoder layers, 9 decoder layers, 150 queries, 133 classes as
  COCO) on Swin-T (96..768, depths 2,2,6,2, window 7), 256 x 256 images.
- swin_l_640 (for a GPU: `--device cuda`): the ADE20K 640 recipe's model, Swin-L (192..1536, depths 2,2,18,2,
  window 12), full-width heads, 250 queries, 150 classes, 640 x 640 images, fp32 as the official configs.
  This is the GPU comparison because transformers' DiNAT needs NATTEN's natten2dqkrpb, which NATTEN removed
  in 0.20 (no relative positional bias since), so its OneFormer cannot run DiNAT-L with a current NATTEN.

On a GPU, times are taken after torch.cuda.synchronize() and memory is the peak of torch's allocator during
one step minus what was allocated before it.

Our model runs plain and in each requested variant (`--variants ac compile`: activation checkpointing of every
repeated block, torch.compile per block), each timed beside the port in the same alternation; the last column
is a variant's time over our plain step. `--real-size swin_l dinat_l` adds one training step of those presets at
640 x 640, batch 1, ours only (plain and each variant), a fresh process each: step time and peak RSS.

    .venv/bin/python benchmarks/bench_model_vs_transformers.py [--configs tiny small] [--variants ac] [--steps 3] [--batch 2] [--threads 1]
    .venv/bin/python benchmarks/bench_model_vs_transformers.py --configs --real-size swin_l dinat_l
    .venv/bin/python benchmarks/bench_model_vs_transformers.py --device cuda --configs swin_l_640 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
TASKS = ("semantic", "instance", "panoptic")
STAGES = ["stage1", "stage2", "stage3", "stage4"]

CONFIGS = {
    "tiny": {
        "image_size": 128,
        "backbone": dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4, mlp_ratio=2.0),
        "heads": dict(
            num_queries=24, hidden_dim=64, conv_dim=64, mask_dim=64, encoder_layers=2, encoder_feedforward_dim=128,
            num_attention_heads=4, dim_feedforward=128, decoder_layers=10, query_dec_layers=1,
            text_encoder_width=64, text_encoder_num_layers=2, num_labels=150,
        ),
    },
    "small": {
        "image_size": 256,
        "backbone": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0),
        "heads": dict(
            num_queries=150, hidden_dim=256, conv_dim=256, mask_dim=256, encoder_layers=6,
            encoder_feedforward_dim=1024, num_attention_heads=8, dim_feedforward=2048, decoder_layers=10,
            query_dec_layers=2, text_encoder_width=256, text_encoder_num_layers=6, num_labels=133,
        ),
    },
    "swin_l_640": {
        "image_size": 640,
        "backbone": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12, mlp_ratio=4.0),
        "heads": dict(
            num_queries=250, hidden_dim=256, conv_dim=256, mask_dim=256, encoder_layers=6,
            encoder_feedforward_dim=1024, num_attention_heads=8, dim_feedforward=2048, decoder_layers=10,
            query_dec_layers=2, text_encoder_width=256, text_encoder_num_layers=6, num_labels=150,
        ),
    },
}  # fmt: skip


def hf_config_dict(name: str, training: bool) -> dict:
    """The transformers OneFormerConfig of a benchmark configuration, as its config.json dict."""
    from transformers import OneFormerConfig, SwinConfig

    spec = CONFIGS[name]
    backbone = SwinConfig(**spec["backbone"], drop_path_rate=0.0, out_features=STAGES, image_size=spec["image_size"])
    heads = dict(spec["heads"])
    num_labels = heads.pop("num_labels")
    config = OneFormerConfig(
        backbone_config=backbone, is_training=training, id2label={i: f"class{i}" for i in range(num_labels)}, **heads
    )
    return config.to_dict()


# ----------------------------------------------------------------------------------------------------------
# Child process: one implementation, one configuration, one mode.


class PeakRss:
    """Highest resident set size seen by a 1 ms sampling thread while the context is open."""

    def __init__(self):
        import psutil

        self._process = psutil.Process()
        self.peak = self.baseline = self._process.memory_info().rss
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def synthetic_batch(batch: int, size: int, num_queries: int, num_classes: int, n_ctx: int) -> dict:
    from model.tokenizer import tokenize

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator) * 255
    tasks = [TASKS[i % 3] for i in range(batch)]
    targets = []
    for _ in range(batch):
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        for index in range(3):
            top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            masks[index, top : top + size // 2, left : left + size // 2] = True
        labels = torch.randint(0, num_classes, (3,), generator=generator)
        targets.append({"labels": labels, "masks": masks})
    texts = [f"a photo with a class{int(label)}" for target in targets for label in target["labels"]]
    num_texts = num_queries - n_ctx
    text_tokens = tokenize(["a panoptic photo"] * num_texts).repeat(batch, 1, 1)
    text_tokens[:, :3] = tokenize(texts).view(batch, 3, -1)
    task_inputs = torch.cat([tokenize(f"the task is {task}") for task in tasks]).float()
    return {"images": images, "tasks": tasks, "targets": targets, "text_tokens": text_tokens, "task_inputs": task_inputs}


def ours_steps(hf_config: dict, data: dict, training: bool, variant: str = "ours"):
    from model.convert import config_from_transformers

    config = config_from_transformers(hf_config, dataset="coco", training=training)
    return preset_steps(config, data, training, variant)


def preset_steps(config, data: dict, training: bool, variant: str):
    """Our model of `config` in one of VARIANTS, as a training or an inference step on `data`."""
    from model.block_execution import BLOCK_KINDS, compile_blocks, set_activation_checkpointing
    from model.checkpoint import build_from_config
    from model.criterion import LossConfig, weighted_total

    model = build_from_config(config).to(data["images"].device)
    if variant == "ours_ac":
        set_activation_checkpointing(model, BLOCK_KINDS)
    elif variant == "ours_compile":
        compile_blocks(model)
    losses = LossConfig()
    criterion = losses.build_criterion(config.num_classes)

    def train_step():
        outputs = model(data["images"], data["tasks"], data["text_tokens"])
        weighted_total(criterion(outputs, data["targets"]), losses).backward()
        model.zero_grad(set_to_none=True)

    def inference_step():
        with torch.no_grad():
            model(data["images"], data["tasks"])

    model.train(training)
    return train_step if training else inference_step


def hf_steps(hf_config: dict, data: dict, training: bool):
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

    device = data["images"].device
    model = OneFormerForUniversalSegmentation(OneFormerConfig.from_dict(hf_config)).to(device)
    pixel_values = (data["images"] - PIXEL_MEAN.to(device)) / PIXEL_STD.to(device)
    mask_labels = [target["masks"].float() for target in data["targets"]]
    class_labels = [target["labels"] for target in data["targets"]]

    def train_step():
        outputs = model(
            pixel_values=pixel_values, task_inputs=data["task_inputs"], text_inputs=data["text_tokens"],
            mask_labels=mask_labels, class_labels=class_labels,
        )  # fmt: skip
        outputs.loss.backward()
        model.zero_grad(set_to_none=True)

    def inference_step():
        with torch.no_grad():
            model(pixel_values=pixel_values, task_inputs=data["task_inputs"])

    model.train(training)
    return train_step if training else inference_step


def _build_step(impl: str, spec: dict, data: dict):
    training = spec["mode"] == "train"
    if impl == "hf":
        return hf_steps(spec["hf_config"], data, training)
    if "preset" in spec:
        from model.presets import make_config

        config = make_config(spec["preset"], dataset="ade20k", training=training)
        return preset_steps(config, data, training, impl)
    return ours_steps(spec["hf_config"], data, training, impl)


def _spec_data(spec: dict) -> dict:
    shape = spec["shape"]
    data = synthetic_batch(spec["batch"], spec["image_size"], shape["num_queries"], shape["num_classes"], shape["n_ctx"])
    device = torch.device(spec["device"])
    moved = {key: value.to(device) if torch.is_tensor(value) else value for key, value in data.items()}
    moved["targets"] = [{key: value.to(device) for key, value in target.items()} for target in data["targets"]]
    return moved


class PeakCudaMemory:
    """Peak of torch's CUDA allocator while the context is open, above what was allocated when it opened."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_child(spec: dict) -> dict:
    torch.manual_seed(0)
    data = _spec_data(spec)
    if spec["measure"] == "memory":
        step = _build_step(spec["impl"], spec, data)
        with PeakCudaMemory() if spec["device"].startswith("cuda") else PeakRss() as memory:
            started = time.perf_counter()
            step()
            _synchronize(spec["device"])
            seconds = time.perf_counter() - started
        return {"peak_mib": (memory.peak - memory.baseline) / 2**20, "first_step_s": seconds}
    steps = {impl: _build_step(impl, spec, data) for impl in spec["impls"]}
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for repeat in range(spec["steps"] + 1):  # the first round is warm-up
        for impl, step in steps.items():
            _synchronize(spec["device"])
            started = time.perf_counter()
            step()
            _synchronize(spec["device"])
            if repeat:
                times[impl].append(time.perf_counter() - started)
    return {impl: statistics.median(values) for impl, values in times.items()}


# ----------------------------------------------------------------------------------------------------------
# Parent process.


def run_in_child(spec: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    completed = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{spec['measure']} {spec.get('impl', '')} {spec['mode']} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def variants_of(mode: str, args) -> list[str]:
    """Our implementations measured in a mode: plain, then each requested switch (checkpointing only trains)."""
    switches = [v for v in args.variants if mode == "train" or v != "ac"]
    return ["ours"] + [f"ours_{switch}" for switch in switches]


def measure(name: str, mode: str, args) -> dict:
    """Side-by-side times (one process, alternating steps) and per-implementation peak memory (one fresh
    process each) of a configuration of CONFIGS, ours in every variant and transformers'."""
    hf_config = hf_config_dict(name, training=mode == "train")
    impls = [*variants_of(mode, args), "hf"]
    base = {
        "mode": mode, "steps": args.steps, "batch": args.batch, "image_size": CONFIGS[name]["image_size"],
        "device": args.device, "hf_config": hf_config, "impls": impls,
        "shape": {"num_queries": hf_config["num_queries"], "num_classes": len(hf_config["id2label"]),
                  "n_ctx": hf_config["text_encoder_n_ctx"]},
    }  # fmt: skip
    seconds = run_in_child({**base, "measure": "time"}, args.threads)
    memory = {impl: run_in_child({**base, "measure": "memory", "impl": impl}, args.threads)["peak_mib"]
              for impl in impls}  # fmt: skip
    return {"seconds": seconds, "peak_mib": memory}


def measure_real_size(preset: str, args) -> dict[str, dict]:
    """One training step of a real preset at 640 x 640, batch 1, ours only (plain and with checkpointing),
    each in a fresh process: the memory a recipe needs per worker, and the time of that first step."""
    from model.presets import make_config

    config = make_config(preset, dataset="ade20k", training=True)
    base = {
        "mode": "train", "batch": 1, "image_size": 640, "device": args.device, "preset": preset,
        "shape": {"num_queries": config.num_queries, "num_classes": config.num_classes,
                  "n_ctx": config.text_num_context},
    }  # fmt: skip
    return {impl: run_in_child({**base, "measure": "memory", "impl": impl}, args.threads)
            for impl in variants_of("train", args)}  # fmt: skip


def print_side_by_side(name: str, mode: str, result: dict) -> None:
    hf_s, hf_mib = result["seconds"]["hf"], result["peak_mib"]["hf"]
    ours_s = result["seconds"]["ours"]
    for impl, seconds in result["seconds"].items():
        if impl == "hf":
            continue
        mib = result["peak_mib"][impl]
        print(f"{name:<7}{mode:<7}{impl:<14}{seconds:>9.3f}{hf_s:>9.3f}{hf_s / seconds:>9.2f}"
              f"{mib:>10.1f}{hf_mib:>9.1f}{mib / max(hf_mib, 1e-9):>9.2f}{seconds / ours_s:>10.2f}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=["tiny", "small"])
    parser.add_argument("--variants", nargs="*", choices=["ac", "compile"], default=["ac"],
                        help="our switches measured beside the plain model: ac = activation checkpointing of all "
                             "repeated blocks, compile = torch.compile per block")  # fmt: skip
    parser.add_argument("--real-size", nargs="*", choices=["swin_l", "convnext_l", "convnext_xl", "dinat_l"],
                        default=[], help="presets for the one-step 640 x 640 batch-1 rows (ours only)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process; more than the free cores makes OpenMP spin and the "
                             "timings swing by 10x or more on a shared machine")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        print(json.dumps(run_child(json.loads(args.child))))
        return

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch}, median of {args.steps} alternating steps")
    if args.configs:
        print(f"{'config':<7}{'mode':<7}{'impl':<14}{'s':>9}{'HF s':>9}{'HF/impl':>9}"
              f"{'MiB':>10}{'HF MiB':>9}{'MiB/HF':>9}{'s/ours s':>10}")  # fmt: skip
    for name in args.configs:
        for mode in ("train", "infer"):
            print_side_by_side(name, mode, measure(name, mode, args))
    if args.real_size:
        print(f"\none training step at 640 x 640, batch 1, ours only, a fresh process each\n"
              f"{'preset':<12}{'impl':<14}{'step s':>9}{'peak MiB':>10}")  # fmt: skip
    for preset in args.real_size:
        for impl, row in measure_real_size(preset, args).items():
            print(f"{preset:<12}{impl:<14}{row['first_step_s']:>9.1f}{row['peak_mib']:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
