"""Recipe smoke runs at real size: every paper job file (jobs/train_*.yaml) run as the real job, through
`python -m pipeline.job FILE overrides...`, for 2 optimizer steps on this machine's CPU with the real model and
the real crop size. Per recipe it records the time per step and the worker's peak RSS (from the job's MLflow
metrics), the process tree's peak RSS (sampled here), and the backbone-weights count the trainer logged, which
must be every backbone tensor except the documented output norms that keep their initialisation.

    .venv/bin/python benchmarks/recipe_smoke.py [--recipes swin_l_ade20k,dinat_l] [--steps 2] [--out FILE]

(`python -m benchmarks.recipe_smoke` from the repository root is the same.) A recipe is a job file's name
without `train_`. The overrides change only what a CPU and a few files need: one worker on 2 CPUs with one
image per step, no loader processes, a generated dataset of 6 images of 512-700 px (COCO-panoptic layout,
preprocessed in-process), a local SQLite MLflow store, no intermediate validation, one validation image,
storage in the work folder, no automatic restarts (an out-of-memory worker fails once), logging every step
(so step 2 has its own time), and, for the step-schedule (COCO) recipes, a milestone at step 1 (milestones must
lie below max_steps). Model, crop, augmentation, optimizer and precision stay as the file says (bf16 runs on
this CPU's DeepSpeed accelerator). The backbone weights are a local file written in the layout of the file the
job's URL names (official Swin, official ConvNeXt, official DiNAT, each with its ImageNet classifier and
without the dense output norms), so loading takes the same conversion path as the downloaded file.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
RECIPES = {path.stem.removeprefix("train_"): path for path in sorted(JOBS.glob("train_*.yaml"))}
DEFAULT_WORK = REPO / ".cache" / "recipe_smoke"
NUM_IMAGES, MIN_SIDE, MAX_SIDE = 6, 512, 700
IMAGENET_CLASSES = 1000
# Stand-in weights are the fresh initialisation plus this much Gaussian noise: no tensor element is exactly
# zero, so a vanishing update (learning rate 1e-30) leaves every element bit-identical (see the test).
WEIGHT_NOISE = 0.02


@dataclasses.dataclass
class RecipeResult:
    recipe: str
    job_file: str
    backbone: str
    crop_size: list[int]
    precision: str
    exit_code: int
    wall_s: float
    seconds_per_step: list[float]
    """Per logged step: global batch / images_per_second of that step's window (step 1 holds start-up)."""
    worker_peak_rss_gb: float | None
    process_tree_peak_rss_gb: float
    backbone_tensors_loaded: str | None
    expected_tensors_loaded: str
    weights_count_ok: bool
    exported_model: str
    weights_file: str
    log: str
    command: str


# ------------------------------------------------------------------------------------------ inputs
def write_dataset(work: Path) -> Path:
    """The generated dataset, written once and shared by every recipe."""
    from pipeline.synthetic import GeneratorSettings, generate_dataset

    root = work / "data"
    if not (root / "annotations" / "panoptic_val.json").exists():
        generate_dataset(root, NUM_IMAGES, seed=0, val_fraction=0.2,
                         settings=GeneratorSettings(min_size=MIN_SIDE, max_size=MAX_SIDE))
    return root


def read_job(job_file: Path):
    """The job file validated as is (its inputs need not exist here)."""
    from pipeline.config import parse_job

    return parse_job(yaml.safe_load(job_file.read_text()), str(job_file))


def official_swin_layout(state: dict[str, torch.Tensor], backbone) -> dict[str, torch.Tensor]:
    """The Swin release's layout (our names), plus the buffers it saves: relative_position_index in every
    block and, in shifted blocks, the attention mask for its 384 px pre-training size (values irrelevant,
    the loader drops both by name)."""
    saved = dict(state)
    resolution = 384 // 4
    for stage_index, stage in enumerate(backbone.layers):
        for block_index, block in enumerate(stage.blocks):
            prefix = f"layers.{stage_index}.blocks.{block_index}.attn."
            saved[prefix + "relative_position_index"] = block.attn.relative_position_index.clone()
            window = block.window_size if isinstance(block.window_size, int) else block.window_size[0]
            if block_index % 2 == 1 and resolution > window:
                windows = (resolution // window) ** 2
                saved[f"layers.{stage_index}.blocks.{block_index}.attn_mask"] = torch.zeros(windows, window**2, window**2)
        resolution //= 2
    return saved


def official_convnext_layout(state: dict[str, torch.Tensor], backbone) -> dict[str, torch.Tensor]:
    """The FB ConvNeXt release's names (downsample_layers.i, stages.i.j.dwconv/pwconv1/pwconv2/gamma), the
    inverse of the timm filter the loader applies."""
    renames = ((r"^stem\.", "downsample_layers.0."), (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
               (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."), (r"\.conv_dw\.", ".dwconv."),
               (r"\.mlp\.fc(\d)\.", r".pwconv\1."))
    saved = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        saved[key] = value
    return saved


def official_dinat_layout(state: dict[str, torch.Tensor], backbone) -> dict[str, torch.Tensor]:
    """Our DiNAT names are the official ones."""
    return dict(state)


LAYOUTS = {"SwinTransformer": official_swin_layout, "ConvNeXtBackbone": official_convnext_layout,
           "DiNAT": official_dinat_layout}


def write_weights_file(config, work: Path) -> Path:
    """A local ImageNet-style weights file for the backbone of `config` (OneFormerConfig): its tensors minus
    the dense output norms (ImageNet files lack them), plus the classifier's final norm and head, under
    "model", in the layout of the official release. One file per backbone architecture, written once."""
    from model.backbones import build_backbone

    identity = json.dumps([config.backbone, config.backbone_kwargs, "noise, no zeros"], sort_keys=True)
    path = work / "weights" / f"{config.backbone}_{hashlib.sha256(identity.encode()).hexdigest()[:10]}.pth"
    if path.exists():
        return path
    torch.manual_seed(0)
    backbone = build_backbone(config.backbone, **config.backbone_kwargs)
    state = {key: noisy(value) if value.is_floating_point() else value
             for key, value in backbone.state_dict().items() if not re.match(r"norm[0-3]\.", key)}
    width = backbone.out_channels[-1]
    state |= {"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width),
              "head.weight": torch.zeros(IMAGENET_CLASSES, width), "head.bias": torch.zeros(IMAGENET_CLASSES)}
    saved = LAYOUTS[type(backbone).__name__](state, backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"model": saved}, partial)
    os.replace(partial, path)
    return path


def noisy(value: torch.Tensor) -> torch.Tensor:
    """`value` plus noise, with no element exactly zero: a noise draw that cancels its value exactly happens
    a few times in 200M elements, and a zero weight moves by the whole (tiny) AdamW step."""
    result = value + WEIGHT_NOISE * torch.randn_like(value)
    return torch.where(result == 0, WEIGHT_NOISE, result)


def expected_tensors_loaded(config) -> str:
    """What `init.backbone_tensors_loaded` must say: every backbone tensor but the output norms."""
    from model.backbones import build_backbone
    from model.backbones.weights import OPTIONAL_MISSING_PATTERN

    with torch.device("meta"):
        keys = list(build_backbone(config.backbone, **config.backbone_kwargs).state_dict())
    kept = [key for key in keys if re.match(OPTIONAL_MISSING_PATTERN, key)]
    return f"{len(keys) - len(kept)}/{len(keys)}"


# ------------------------------------------------------------------------------------------ the run
def job_overrides(job, work: Path, recipe_dir: Path, weights: Path, steps: int,
                  learning_rate: float | None, precision: str | None) -> list[str]:
    overrides = [
        "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.cpus_per_worker=2", "scaling.ray_address=null",
        f"scaling.storage_path={recipe_dir / 'runs'}", "scaling.max_failures=0",
        "stream.batch_size=1", "stream.loader_workers=0", "training.global_batch_size=1",
        f"training.max_steps={steps}", "training.log_every=1", "training.eval_every=null",
        "data.format=custom_coco_panoptic", f"data.root={work / 'data'}",
        f"preprocess.output={work / 'shards'}", "preprocess.executor=local", "preprocess.ray_address=null",
        f"tracking.tracking_uri=sqlite:///{recipe_dir / 'mlflow.db'}",
        "evaluation.max_images=1", f"model.backbone_weights={weights}",
    ]
    if job.training.schedule == "step":  # milestones must lie below max_steps (a 1-step run of it is refused)
        overrides.append(f"training.step_milestones=[{max(steps - 1, 1)}]")
    if learning_rate is not None:
        overrides.append(f"training.learning_rate={learning_rate}")
    if precision is not None:
        overrides.append(f"deepspeed.precision={precision}")
    return overrides


class TreeMemoryPeak:
    """The largest summed RSS of a process and its descendants (Ray's raylet, GCS and workers), sampled."""

    def __init__(self, pid: int, interval_s: float = 1.0):
        self.peak_bytes = 0
        self._root, self._interval = psutil.Process(pid), interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                for process in [self._root, *self._root.children(recursive=True)]:
                    try:
                        total += process.memory_info().rss
                    except psutil.Error:
                        pass  # exited between listing and reading
            except psutil.Error:
                return
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self._interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes / 2**30


def run_recipe(recipe: str, work: Path, steps: int, learning_rate: float | None,
               precision: str | None = None) -> RecipeResult:
    job_file = RECIPES[recipe]
    job = read_job(job_file)
    config = job.model.oneformer_config()
    recipe_dir = work / recipe
    shutil.rmtree(recipe_dir, ignore_errors=True)  # a finished run in the same storage would only be resumed
    recipe_dir.mkdir(parents=True)
    # In a child process: the freed backbone would otherwise stay in this process's heap (~2 GB) while the
    # job runs, and the large recipes need all the memory there is.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        weights = child.submit(write_weights_file, config, work).result()
    overrides = job_overrides(job, work, recipe_dir, weights, steps, learning_rate, precision)
    command = [sys.executable, "-m", "pipeline.job", str(job_file.relative_to(REPO)), *overrides]
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    environment["ONEFORMER_WORKDIR"] = str(recipe_dir)
    log = recipe_dir / "job.log"
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=output, stderr=subprocess.STDOUT)
        memory = TreeMemoryPeak(process.pid)
        exit_code = process.wait()
        tree_peak = memory.stop()
    wall = time.perf_counter() - started
    logged = read_mlflow(recipe_dir / "mlflow.db", job.tracking.experiment)
    expected = expected_tensors_loaded(config)
    remove_training_checkpoints(recipe_dir / "runs" / job.name)
    return RecipeResult(
        recipe=recipe, job_file=str(job_file.relative_to(REPO)), backbone=config.backbone,
        crop_size=list(job.stream.crop_size), precision=precision or job.deepspeed.precision, exit_code=exit_code, wall_s=wall,
        seconds_per_step=logged["seconds_per_step"], worker_peak_rss_gb=logged["max_rss_gb"],
        process_tree_peak_rss_gb=tree_peak, backbone_tensors_loaded=logged["tensors_loaded"],
        expected_tensors_loaded=expected, weights_count_ok=logged["tensors_loaded"] == expected,
        exported_model=str(recipe_dir / "runs" / job.name / "model" / "model.pt"), weights_file=str(weights),
        log=str(log), command=" ".join([".venv/bin/python", *command[1:]]))


def read_mlflow(database: Path, experiment: str) -> dict:
    """Time per logged step, the worker's peak RSS and the loaded-tensor count from the job's one run."""
    import mlflow

    empty = {"seconds_per_step": [], "max_rss_gb": None, "tensors_loaded": None}
    if not database.exists():
        return empty
    client = mlflow.MlflowClient(f"sqlite:///{database}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found is not None else []
    if not runs:
        return empty
    run = runs[0]
    throughput = sorted(client.get_metric_history(run.info.run_id, "images_per_second"), key=lambda m: m.step)
    batch = int(run.data.params.get("training.global_batch_size", 1))
    rss = [m.value for m in client.get_metric_history(run.info.run_id, "max_rss_gb")]
    return {"seconds_per_step": [batch / m.value for m in throughput], "max_rss_gb": max(rss, default=None),
            "tensors_loaded": run.data.params.get("init.backbone_tensors_loaded")}


def remove_training_checkpoints(job_storage: Path) -> None:
    """The DeepSpeed checkpoints (model and optimizer states, gigabytes per recipe) are not needed here; the
    exported model file stays."""
    for folder in job_storage.glob("checkpoint_*"):
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------ report
def markdown_table(results: list[RecipeResult]) -> str:
    lines = ["| recipe | backbone | crop | precision | s/step (step 2) | s/step (step 1, with start-up) | "
             "worker peak RSS GB | process tree peak RSS GB | backbone tensors loaded | exit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        steps = r.seconds_per_step
        later = f"{steps[-1]:.1f}" if len(steps) > 1 else "-"
        first = f"{steps[0]:.1f}" if steps else "-"
        rss = f"{r.worker_peak_rss_gb:.1f}" if r.worker_peak_rss_gb is not None else "-"
        loaded = f"{r.backbone_tensors_loaded}" + ("" if r.weights_count_ok else f" (expected {r.expected_tensors_loaded})")
        lines.append(f"| {r.recipe} | {r.backbone} | {'x'.join(map(str, r.crop_size))} | {r.precision} | {later} | "
                     f"{first} | {rss} | {r.process_tree_peak_rss_gb:.1f} | {loaded} | {r.exit_code} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated recipes (default: all): {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per recipe")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="override training.learning_rate (default: the file's)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="override deepspeed.precision (default: the file's)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (data, weights, runs)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (a .md table is written beside it)")
    args = parser.parse_args(argv)
    recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
    unknown = [name for name in recipes if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    work = args.work.resolve()
    write_dataset(work)
    results = []
    for recipe in recipes:
        result = run_recipe(recipe, work, args.steps, args.learning_rate, args.precision)
        results.append(result)
        print(f"{recipe}: exit {result.exit_code}, {result.wall_s:.0f} s, s/step {result.seconds_per_step}, "
              f"worker peak RSS {result.worker_peak_rss_gb} GB, tensors {result.backbone_tensors_loaded} "
              f"(expected {result.expected_tensors_loaded}); log {result.log}", flush=True)
        write_report(results, args.out)
    print(markdown_table(results))
    return 0 if all(r.exit_code == 0 and r.weights_count_ok for r in results) else 1


def write_report(results: list[RecipeResult], out: Path | None) -> None:
    """Rewritten after every recipe, so a long run that is stopped keeps what it measured."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    out.with_suffix(".md").write_text(markdown_table(results) + "\n")


if __name__ == "__main__":
    sys.exit(main())
