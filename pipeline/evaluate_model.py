"""Evaluate a model file on a split's shards, on one process or across Ray workers.

    evaluate_model("model.pt", "data/synthetic_shards/val", num_workers=4, out="eval/")

The model file is what `model.convert.load_checkpoint` reads (the trainer exports one); its config gives
the inference thresholds and the padding multiple. With num_workers > 1, Ray (local, or the cluster in
RAY_ADDRESS) runs one task per part of the split (`build_eval_loader(rank=i, world_size=N)`: every N-th
shard, or every N-th sample when there are fewer shards than parts); each returns its Validator and the
driver merges them, which gives exactly the numbers of a single worker. A progress bar counts images.
With `out`, workers write predictions there (standard formats, see pipeline/validate.py; on a multi-node
cluster it must be a folder every node sees), and the driver writes the JSON files, pictures and
metrics.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.data.readers import ClassInfo
from pipeline.validate import DEFAULT_MULTISCALE_SCALES, TASK_OF_METRIC, Validator, summarize

log = logging.getLogger("pipeline.evaluate_model")
PROGRESS_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class EvaluationRequest:
    """Everything one worker needs, picklable (it travels to Ray workers)."""

    checkpoint: str
    shards: str
    classes: ClassInfo
    metrics: tuple[str, ...]
    max_images: int | None = None
    batch_size: int = 1
    multiscale: bool = False
    multiscale_scales: tuple[float, ...] = DEFAULT_MULTISCALE_SCALES
    pictures: int = 0
    predictions_folder: str | None = None
    device: str = "cpu"
    threads: int = 1


def read_model_config(checkpoint: str | os.PathLike):
    """The OneFormerConfig saved in a load_checkpoint-format file (memory-mapped: no weights are read)."""
    from model.presets import OneFormerConfig

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a model file written by "
                                "model.convert.save_checkpoint or exported by training)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(f"checkpoint {path} is not a readable torch file: {error}") from error
    if not isinstance(saved, dict) or set(saved) != {"config", "model"}:
        raise ValueError(f"checkpoint {path} is not a model file written by save_checkpoint (keys 'config', 'model')")
    return OneFormerConfig(**saved["config"])


def read_classes(shards: str, classes_file: str | os.PathLike | None = None) -> ClassInfo:
    """Class metadata from classes.json (ClassInfo.to_json, exported beside model.pt) or the shard manifest.
    The manifest is required either way: without it there is nothing to evaluate."""
    import fsspec

    from pipeline.data.shards import MANIFEST_NAME, manifest_classes, read_manifest

    fs, root = fsspec.core.url_to_fs(shards)
    if not fs.exists(f"{root.rstrip('/')}/{MANIFEST_NAME}"):
        splits = [p.rsplit("/", 2)[-2] for p in fs.glob(f"{root.rstrip('/')}/*/{MANIFEST_NAME}")]
        hint = f"; it has split folders {sorted(splits)}: pass one of them" if splits else ""
        raise FileNotFoundError(f"shards folder {shards} has no {MANIFEST_NAME} (run preprocessing first){hint}")
    manifest = read_manifest(fs, root)
    if classes_file is None:
        return manifest_classes(manifest)
    path = Path(classes_file)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist")
    return ClassInfo.from_json(json.loads(path.read_text()))


def split_quota(max_images: int | None, part: int, num_parts: int) -> int | None:
    """Images part `part` evaluates when the whole split is capped at max_images."""
    if max_images is None:
        return None
    return max_images // num_parts + (part < max_images % num_parts)


def evaluate_part(request: EvaluationRequest, part: int, num_parts: int,
                  report: Callable[[int], None] | None = None) -> Validator:
    """One worker's Validator over its part of the split; `report(n)` after every n images."""
    from model.convert import load_checkpoint
    from model.inference import thresholds_from_config
    from pipeline.data.settings import StreamSettings
    from pipeline.data.stream import build_eval_loader

    torch.set_num_threads(request.threads)
    config = read_model_config(request.checkpoint)
    device = torch.device(request.device)
    model = load_checkpoint(request.checkpoint, training=False).to(device)
    validator = Validator(
        request.classes, thresholds_from_config(config), list(request.metrics), pictures=request.pictures,
        semantic_multiscale=request.multiscale, multiscale_scales=request.multiscale_scales,
        size_divisibility=config.size_divisibility, predictions_folder=request.predictions_folder,
    )
    # Only the evaluation fields matter: no augmentation, the model's padding multiple, no loader processes.
    settings = StreamSettings(augmentation="none", crop_size=config.size_divisibility, loader_workers=0,
                              size_divisibility=config.size_divisibility)
    loader = build_eval_loader(settings, request.shards, rank=part, world_size=num_parts, batch_size=request.batch_size)
    quota = split_quota(request.max_images, part, num_parts)
    for batch in loader:
        if quota is not None:
            batch = _first_images(batch, quota - validator.num_images)
            if not batch["image_ids"]:
                break
        validator.add_batch(model, batch, device, torch.float32)
        if report is not None:
            report(len(batch["image_ids"]))
    return validator


def _first_images(batch: dict, count: int) -> dict:
    count = max(count, 0)
    return {key: value[:count] if key != "position" else value for key, value in batch.items()}


class ImageCounter:
    """Images done so far over every worker (a Ray actor in distributed runs)."""

    def __init__(self):
        self.count = 0

    def add(self, count: int) -> None:
        self.count += count

    def value(self) -> int:
        return self.count


def _expected_images(shards: str, max_images: int | None) -> int:
    import fsspec

    from pipeline.data.shards import read_manifest

    fs, root = fsspec.core.url_to_fs(shards)
    total = int(read_manifest(fs, root)["num_samples"])
    return total if max_images is None else min(total, max_images)


def _run_on_ray(request: EvaluationRequest, num_workers: int, bar: tqdm) -> Validator:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))  # None: start a local Ray
    counter = ray.remote(num_cpus=0)(ImageCounter).remote()
    task = ray.remote(evaluate_part).options(
        num_cpus=request.threads, num_gpus=1 if request.device.startswith("cuda") else 0)

    def report(count: int) -> None:
        counter.add.remote(count)

    pending = [task.remote(request, part, num_workers, report) for part in range(num_workers)]
    order = {ref: part for part, ref in enumerate(pending)}
    finished: dict[int, Validator] = {}
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=PROGRESS_POLL_SECONDS)
        for ref in done:
            finished[order[ref]] = ray.get(ref)
        bar.update(ray.get(counter.value.remote()) - bar.n)
    ray.kill(counter)
    merged = finished[0]
    for part in range(1, num_workers):
        merged.merge(finished[part])
    return merged


def evaluate_model(
    checkpoint: str | os.PathLike,
    shards: str | os.PathLike,
    *,
    classes: str | os.PathLike | None = None,
    metrics: Sequence[str] = ("pq", "ap", "miou"),
    num_workers: int = 1,
    max_images: int | None = None,
    batch_size: int = 1,
    multiscale: bool = False,
    multiscale_scales: Sequence[float] = DEFAULT_MULTISCALE_SCALES,
    out: str | os.PathLike | None = None,
    pictures: int = 4,
    device: str | None = None,
    threads_per_worker: int = 1,
    progress: bool = True,
) -> dict:
    """Evaluate `checkpoint` on the split folder `shards` (the one holding manifest.json).

    Returns {"summary": flat headline numbers in percent, "details": per-task results (Validator.
    compute_details), "num_images", "seconds", "classes": names by contiguous id, "files": what was written
    under `out`}. Bad input (missing file, shards without manifest, class count not matching the model)
    raises FileNotFoundError or ValueError naming it, before any worker starts."""
    request = _build_request(checkpoint, shards, classes, metrics, num_workers, max_images, batch_size, multiscale,
                             multiscale_scales, out, pictures, device, threads_per_worker)
    started = time.perf_counter()
    with tqdm(total=_expected_images(request.shards, max_images), unit="img", desc="evaluating",
              disable=not progress) as bar:
        if num_workers == 1:
            validator = evaluate_part(request, 0, 1, report=bar.update)
        else:
            validator = _run_on_ray(request, num_workers, bar)
    details = validator.compute_details()
    result = {"summary": summarize(details), "details": details, "num_images": validator.num_images,
              "seconds": round(time.perf_counter() - started, 3), "classes": list(request.classes.names),
              "files": {}}
    if out is not None:
        result["files"] = _write_outputs(validator, details, Path(out), result)
    return result


def _build_request(checkpoint, shards, classes, metrics, num_workers, max_images, batch_size, multiscale,
                   multiscale_scales, out, pictures, device, threads) -> EvaluationRequest:
    for name, value, low in (("num_workers", num_workers, 1), ("batch_size", batch_size, 1),
                             ("pictures", pictures, 0), ("threads_per_worker", threads, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    unknown = sorted(set(metrics) - set(TASK_OF_METRIC))
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {sorted(TASK_OF_METRIC)}, got {list(metrics)}")
    config = read_model_config(checkpoint)
    class_info = read_classes(str(shards), classes)
    if class_info.num_classes != config.num_classes:
        raise ValueError(f"the model predicts {config.num_classes} classes but the class list "
                         f"({classes or 'shard manifest'}) has {class_info.num_classes}")
    return EvaluationRequest(
        checkpoint=str(Path(checkpoint).resolve()), shards=_absolute(str(shards)), classes=class_info,
        metrics=tuple(metrics), max_images=max_images, batch_size=batch_size, multiscale=multiscale,
        multiscale_scales=tuple(multiscale_scales), pictures=pictures if out is not None else 0,
        predictions_folder=str(Path(out, "predictions").resolve()) if out is not None else None,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"), threads=threads,
    )


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def _write_outputs(validator: Validator, details: dict, out: Path, result: dict) -> dict[str, str]:
    files = {name: str(path) for name, path in validator.write_predictions().items()}
    for path in validator.save_pictures(out / "pictures", details):
        files[f"pictures/{path.name}"] = str(path)
    metrics_file = out / "metrics.json"
    metrics_file.write_text(json.dumps({key: result[key] for key in ("summary", "details", "num_images", "classes")},
                                       indent=1))
    files["metrics"] = str(metrics_file)
    return files
