"""Scoring a model on a split: one loop (`evaluate`) used by the trainer's validation and by model evaluation,
and the Ray fan-out of model evaluation (`evaluate_model`).

    results = evaluate(model, loader, options)        # PartialResults of what the loader yields
    results.merge(other_part)                         # exact: the numbers of one pass over both parts
    summary = results.compute()                       # PQ, AP, mIoU ... in percent

Each metric is computed with the task token it belongs to (PQ with panoptic, AP with instance, mIoU with
semantic). Every image is predicted the official way (model.inference.predict): resized to the test size
(`options.size`; None scores each image at its own size), padded with the pixel mean, and post-processed
back at its original size, where it is scored. PartialResults is plain picklable state, so ranks or Ray
workers each evaluate a part of the split and send their PartialResults (Ray return value, torch.distributed
gather_object) to one place to merge, in any order, with results equal to one pass over every image.

    evaluate_model("model.pt", "data/synthetic_shards/val", num_workers=4, out="eval/")

reads a model file (model/checkpoint.py), whose config gives the thresholds, the test size (its `dataset`)
and the padding multiple. With num_workers > 1, Ray (local, or the cluster in RAY_ADDRESS) runs one task per
part of the split (`build_eval_loader(rank=i, world_size=N)`: every N-th shard, or every N-th sample when
there are fewer shards than parts), and the driver merges the parts. With `out`, workers write predictions
there (pipeline/evaluation/report.py; on a multi-node cluster a folder every node sees) and the driver writes
the JSON files, pictures and metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.inference import (
    TTA_FACTORS,
    InferenceSize,
    InferenceThresholds,
    SemanticResult,
    predict,
    resolve_inference_size,
    semantic_multiscale_flip,
)
from pipeline.data.readers import ClassInfo
from pipeline.evaluation import report
from pipeline.evaluation.instance import InstanceEvaluator
from pipeline.evaluation.panoptic import PanopticEvaluator
from pipeline.evaluation.semantic import SemanticEvaluator

TASK_OF_METRIC = {"pq": "panoptic", "ap": "instance", "miou": "semantic"}
IGNORE_LABEL = 255
PROGRESS_POLL_SECONDS = 0.5


# ---------------------------------------------------------------------------------------------- ground truth
def categories_of(classes: ClassInfo) -> list[dict]:
    """COCO-style categories keyed by the contiguous id, which is what inference returns."""
    return [{"id": index, "name": name, "isthing": int(thing)}
            for index, (name, thing) in enumerate(zip(classes.names, classes.isthing))]


def ground_truth_segments(index_map: np.ndarray, table) -> list[dict]:
    """segments_info of one evaluation sample: value v > 0 of the index map is row v - 1 of its table."""
    present = [int(v) for v in np.unique(index_map) if v > 0]
    return [{"id": v, "category_id": int(table.classes[v - 1]), "iscrowd": int(table.iscrowd[v - 1]),
             "isthing": int(table.isthing[v - 1])} for v in present]


def semantic_ground_truth(index_map: np.ndarray, table) -> np.ndarray:
    """Class per pixel (crowd regions keep their class), void -> IGNORE_LABEL."""
    lookup = np.concatenate([[IGNORE_LABEL], np.asarray(table.classes, np.int64)])
    return lookup[index_map]


class _Sample:
    """One evaluation image of a batch, at its original size, with what every task needs from it."""

    def __init__(self, image_id: str, index_map: np.ndarray, table, image: torch.Tensor):
        self.image_id, self.index_map, self.table, self.image = image_id, index_map, table, image
        self.gt_segments = ground_truth_segments(index_map, table)

    def picture(self) -> np.ndarray:
        """uint8 RGB [h, w, 3]: the unpadded image as read (the stream keeps the 0-255 values)."""
        return self.image.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _samples(batch: dict) -> list[_Sample]:
    sizes = [(int(size[0]), int(size[1])) for size in batch["image_sizes"]]
    return [_Sample(str(image_id), index_map.numpy(), table, batch["images"][i, :, : size[0], : size[1]])
            for i, (image_id, index_map, table, size) in enumerate(
                zip(batch["image_ids"], batch["index_maps"], batch["segments"], sizes))]


# ---------------------------------------------------------------------------------------------- the results
@dataclass(frozen=True)
class EvaluationOptions:
    """What to compute and how to predict; the same in every part that is merged.

    size: the test-time resize (model.inference.InferenceSize); None scores each image at its own size.
    semantic_multiscale: semantic scores from model.inference.semantic_multiscale_flip over
        `multiscale_scales` (factors of the test short side, or of the image when size is None; default: the
        size's official factors, else TTA_FACTORS), with horizontal flips when `multiscale_flip`.
    pictures: keep this many images per task (image, ground truth, prediction) for report.save_pictures.
    predictions_folder: write every prediction (and the ground truth) there in the standard formats
        (report.PredictionFiles); report.write_predictions writes the JSON files once, after merging.
    """

    classes: ClassInfo
    thresholds: InferenceThresholds
    metrics: tuple[str, ...]
    size: InferenceSize | None = None
    semantic_multiscale: bool = False
    multiscale_scales: tuple[float, ...] | None = None
    multiscale_flip: bool = True
    size_divisibility: int = 32
    pictures: int = 0
    predictions_folder: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(TASK_OF_METRIC))
        if unknown or not self.metrics:
            raise ValueError(f"metrics must be a non-empty subset of {sorted(TASK_OF_METRIC)}, got {list(self.metrics)}")
        if self.pictures < 0:
            raise ValueError(f"pictures must be >= 0, got {self.pictures}")
        scales = self.multiscale_scales
        if scales is None:
            scales = TTA_FACTORS if self.size is None else self.size.tta_factors
        if self.semantic_multiscale and (not scales or min(scales) <= 0):
            raise ValueError(f"multiscale_scales must be positive factors, got {tuple(scales)}")
        # Metrics the data supports: AP needs thing classes (semantic label PNGs have none), so without any it
        # is left out rather than failing; PQ and mIoU are defined on any data.
        metrics = tuple(m for m in self.metrics if m != "ap" or any(self.classes.isthing))
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "multiscale_scales", tuple(float(s) for s in scales))


class PartialResults:
    """The metrics' statistics, kept pictures and prediction records of the images evaluated so far;
    picklable and mergeable (`merge`), so parts evaluated anywhere combine into the whole split's results."""

    def __init__(self, options: EvaluationOptions):
        self.options = options
        categories, classes, metrics = categories_of(options.classes), options.classes, options.metrics
        self.evaluators = {
            "pq": PanopticEvaluator(categories) if "pq" in metrics else None,
            "ap": InstanceEvaluator(categories) if "ap" in metrics else None,
            "miou": SemanticEvaluator(classes.num_classes, IGNORE_LABEL, list(classes.names)) if "miou" in metrics else None,
        }
        self.examples: dict[str, list[dict]] = {TASK_OF_METRIC[m]: [] for m in metrics}
        self.files = None if options.predictions_folder is None else report.PredictionFiles(options.predictions_folder, classes)
        self.num_images = 0
        self.skipped: dict[str, int] = {}  # samples the stream left out, by reason (pipeline.data.stream)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    # ------------------------------------------------------------------------------------------ batches
    def add_batch(self, model: torch.nn.Module, batch: dict) -> None:
        """Predict and score one evaluation batch (pipeline.data.stream.build_eval_loader's format)."""
        samples = _samples(batch)
        if self.files is not None:
            for sample in samples:
                self._write_ground_truth(sample)
        for metric in self.options.metrics:
            for sample, result in zip(samples, self._predict(model, batch, samples, TASK_OF_METRIC[metric])):
                self._add(metric, sample, result)
        self.num_images += len(samples)

    def _predict(self, model, batch: dict, samples: list[_Sample], task: str) -> list:
        options = self.options
        if task == "semantic" and options.semantic_multiscale:
            probabilities = semantic_multiscale_flip(
                model, batch["images"], [tuple(s.index_map.shape) for s in samples], scales=options.multiscale_scales,
                flip=options.multiscale_flip, size_divisibility=options.size_divisibility, size=options.size)
            return [SemanticResult(scores=p, labels=p.argmax(0)) for p in probabilities]
        return predict(model, [s.image for s in samples], [task] * len(samples), list(options.classes.isthing),
                       options.thresholds, options.size, options.size_divisibility)

    def _add(self, metric: str, sample: _Sample, result) -> None:
        {"pq": self._add_panoptic, "ap": self._add_instance, "miou": self._add_semantic}[metric](sample, result)

    def _add_panoptic(self, sample: _Sample, result) -> None:
        predicted = [{"id": s.id, "category_id": s.category_id, "isthing": int(s.isthing)} for s in result.segments_info]
        segment_ids = result.segment_ids.cpu().numpy()
        self.evaluators["pq"].update(sample.index_map, sample.gt_segments, segment_ids, predicted, image_id=sample.image_id)
        self._keep_example("panoptic", sample, sample.index_map, segment_ids)
        if self.files is not None:
            self.files.add_panoptic(sample.image_id, segment_ids, result.segments_info)

    def _add_instance(self, sample: _Sample, result) -> None:
        masks, scores = result.masks.cpu().numpy(), result.scores.cpu().numpy()
        self.evaluators["ap"].update(sample.image_id, sample.index_map, sample.gt_segments, masks, scores,
                                     result.labels.cpu().numpy())
        if self._wants_example("instance"):
            thing = np.concatenate([[False], sample.table.isthing & ~sample.table.iscrowd])[sample.index_map]
            self._keep_example("instance", sample, np.where(thing, sample.index_map, 0), report.instance_map(masks, scores))

    def _add_semantic(self, sample: _Sample, result) -> None:
        labels = result.labels.cpu().numpy()
        ground_truth = semantic_ground_truth(sample.index_map, sample.table)
        self.evaluators["miou"].update(labels, ground_truth, image_id=sample.image_id)
        # Shifted by one so that class 0 gets a colour and void (0) none.
        self._keep_example("semantic", sample, np.where(ground_truth == IGNORE_LABEL, 0, ground_truth + 1), labels + 1)
        if self.files is not None:
            self.files.add_semantic(sample.image_id, labels)

    def _wants_example(self, task: str) -> bool:
        return len(self.examples[task]) < self.options.pictures

    def _keep_example(self, task: str, sample: _Sample, gt: np.ndarray, pred: np.ndarray) -> None:
        if self._wants_example(task):
            self.examples[task].append({"name": sample.image_id, "image": sample.picture(),
                                        "gt": np.asarray(gt), "pred": np.asarray(pred)})

    def _write_ground_truth(self, sample: _Sample) -> None:
        metrics = self.options.metrics
        semantic_gt = semantic_ground_truth(sample.index_map, sample.table) if "miou" in metrics else None
        self.files.add_ground_truth(sample.image_id, sample.index_map, sample.table, sample.gt_segments,
                                    semantic_gt, panoptic="pq" in metrics or "ap" in metrics)

    # ------------------------------------------------------------------------------------------ combining
    def merge(self, other: PartialResults) -> PartialResults:
        """Add another part's images (a disjoint part of the split, same options) into this one; returns
        self. Pictures keep this one's first, then the other's, up to `pictures` per task."""
        # Only one rank keeps pictures in training, so the picture count may differ between parts.
        if dataclasses.replace(other.options, pictures=0) != dataclasses.replace(self.options, pictures=0):
            raise ValueError("cannot merge evaluation results with different classes, thresholds, metrics, "
                             "test size or multi-scale settings")
        for metric, evaluator in self.evaluators.items():
            if evaluator is not None:
                evaluator.merge(other.evaluators[metric])
        for task, examples in self.examples.items():
            examples += other.examples[task][: max(self.options.pictures - len(examples), 0)]
        if self.files is not None:
            self.files.merge(other.files)
        self.num_images += other.num_images
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.skipped = dict(sorted(self.skipped.items()))
        return self

    # ------------------------------------------------------------------------------------------ results
    def compute_details(self) -> dict[str, dict]:
        """Full results per task: "panoptic" (panopticapi's structure, per class by contiguous id),
        "instance" (COCO segm stats, per-class AP by contiguous id), "semantic" (mIoU, per-class IoU, ...)."""
        details: dict[str, dict] = {}
        for metric, task in TASK_OF_METRIC.items():
            if self.evaluators[metric] is not None:
                details[task] = self.evaluators[metric].compute()
        return details

    def compute(self, details: dict[str, dict] | None = None) -> dict[str, float]:
        """Flat headline numbers: PQ/SQ/RQ (all, things, stuff), AP, mIoU and pixel accuracy, in percent;
        the things or stuff figures only when the data has such classes (they would read 0, measured on
        nothing)."""
        summary = report.summarize(self.compute_details() if details is None else details)
        classes = self.options.classes
        groups = (("_th", any(classes.isthing)), ("_st", not all(classes.isthing)))
        absent = [suffix for suffix, present in groups if not present]
        return {name: value for name, value in summary.items() if not name.endswith(tuple(absent))}


def merge_parts(parts: Sequence[PartialResults]) -> PartialResults:
    """The parts of a split merged, in the order given (pictures keep the first parts' images first)."""
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    return merged


# ---------------------------------------------------------------------------------------------- the loop
def evaluate(model: torch.nn.Module, loader: Iterable[dict], options: EvaluationOptions, *,
             max_images: int | None = None, report_progress: Callable[[int], None] | None = None) -> PartialResults:
    """PartialResults of `model` (eval mode, on its device) over the batches of `loader`, stopping after
    `max_images` images; `report_progress(n)` after every n images. What the loader skipped (its
    `skip_reasons`, pipeline.data.stream.ResumableLoader) is carried in `results.skipped`."""
    results = PartialResults(options)
    for batch in loader:
        if batch.get("status_only"):  # a bare stream's last word on what it skipped (ResumableLoader keeps it)
            continue
        if max_images is not None:
            batch = _first_images(batch, max_images - results.num_images)
            if not batch["image_ids"]:
                break
        results.add_batch(model, batch)
        if report_progress is not None:
            report_progress(len(batch["image_ids"]))
    results.skipped = dict(getattr(loader, "skip_reasons", {}))
    return results


def _first_images(batch: dict, count: int) -> dict:
    count = max(count, 0)
    return {key: value[:count] if key != "position" else value for key, value in batch.items()}


def split_quota(max_images: int | None, part: int, num_parts: int) -> int | None:
    """Images part `part` evaluates when the whole split is capped at max_images."""
    if max_images is None:
        return None
    return max_images // num_parts + (part < max_images % num_parts)


# ---------------------------------------------------------------------------------------------- model files
@dataclass(frozen=True)
class EvaluationRequest:
    """Everything one worker needs to score its part of a split with a model file, picklable (it travels to
    Ray workers)."""

    checkpoint: str
    shards: str
    options: EvaluationOptions
    max_images: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    threads: int = 1
    on_error: str = "skip"


def read_classes(shards: str, classes_file: str | os.PathLike | None = None) -> ClassInfo:
    """Class metadata from a classes.json (ClassInfo.to_json) or the shard manifest. The manifest is required
    either way: without it there is nothing to evaluate. (evaluate_model prefers, to the manifest, the classes
    the model file names: model.classes.known_classes.)"""
    import fsspec

    from pipeline.data.shards import MANIFEST_NAME, check_not_empty, manifest_classes, read_manifest

    fs, root = fsspec.core.url_to_fs(shards)
    if not fs.exists(f"{root.rstrip('/')}/{MANIFEST_NAME}"):
        splits = [p.rsplit("/", 2)[-2] for p in fs.glob(f"{root.rstrip('/')}/*/{MANIFEST_NAME}")]
        hint = f"; it has split folders {sorted(splits)}: pass one of them" if splits else ""
        raise FileNotFoundError(f"shards folder {shards} has no {MANIFEST_NAME} (run preprocessing first){hint}")
    manifest = read_manifest(fs, root)
    check_not_empty(manifest, str(shards))
    if classes_file is None:
        return manifest_classes(manifest)
    path = Path(classes_file)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist")
    return ClassInfo.from_json(json.loads(path.read_text()))


def evaluate_part(request: EvaluationRequest, part: int, num_parts: int,
                  report_progress: Callable[[int], None] | None = None) -> PartialResults:
    """One worker's PartialResults over its part of the split."""
    from model.checkpoint import load_model, read_config
    from pipeline.data.stream import ModelInputs, build_eval_loader

    torch.set_num_threads(request.threads)
    model = load_model(request.checkpoint, training=False).to(torch.device(request.device))
    inputs = ModelInputs.from_config(read_config(request.checkpoint))
    loader = build_eval_loader(request.shards, inputs, rank=part, world_size=num_parts, batch_size=request.batch_size,
                               on_error=request.on_error)
    return evaluate(model, loader, request.options, max_images=split_quota(request.max_images, part, num_parts),
                    report_progress=report_progress)


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


def _run_on_ray(request: EvaluationRequest, num_workers: int, bar: tqdm) -> PartialResults:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))  # None: start a local Ray
    counter = ray.remote(num_cpus=0)(ImageCounter).remote()
    task = ray.remote(evaluate_part).options(
        num_cpus=request.threads, num_gpus=1 if request.device.startswith("cuda") else 0)

    def report_progress(count: int) -> None:
        counter.add.remote(count)

    pending = [task.remote(request, part, num_workers, report_progress) for part in range(num_workers)]
    order = {ref: part for part, ref in enumerate(pending)}
    finished: dict[int, PartialResults] = {}
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=PROGRESS_POLL_SECONDS)
        for ref in done:
            finished[order[ref]] = ray.get(ref)
        bar.update(ray.get(counter.value.remote()) - bar.n)
    ray.kill(counter)
    return merge_parts([finished[part] for part in range(num_workers)])


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
    multiscale_scales: Sequence[float] | None = None,
    test_size: tuple[int, int] | str | None = None,
    out: str | os.PathLike | None = None,
    pictures: int = 4,
    device: str | None = None,
    threads_per_worker: int = 1,
    progress: bool = True,
    on_error: str = "skip",
) -> dict:
    """Evaluate `checkpoint` on the split folder `shards` (the one holding manifest.json).

    test_size: None scores at the official test size of the model config's dataset, "none" at each image's
    own size, (short, max) at that ResizeShortestEdge (model.inference.resolve_inference_size).
    on_error: "skip" leaves out (and counts by reason) damaged shards and samples, "fail" stops at the first.
    Returns {"summary": flat headline numbers in percent, "details": per-task results (PartialResults.
    compute_details), "num_images", "num_skipped", "skipped" (count by reason), "seconds", "classes": names by
    contiguous id, "test_size": [short, max] or None, "files": what was written under `out`}. Bad input
    (missing file, shards without manifest, an empty split, class count not matching the model, bad test size)
    raises FileNotFoundError, ValueError or ShardError naming it, before any worker starts; a split of which
    no image could be read raises ShardError."""
    request = _build_request(checkpoint, shards, classes, metrics, num_workers, max_images, batch_size, multiscale,
                             multiscale_scales, test_size, out, pictures, device, threads_per_worker, on_error)
    started = time.perf_counter()
    with tqdm(total=_expected_images(request.shards, max_images), unit="img", desc="evaluating",
              disable=not progress) as bar:
        if num_workers == 1:
            results = evaluate_part(request, 0, 1, report_progress=bar.update)
        else:
            results = _run_on_ray(request, num_workers, bar)
    _check_images_read(results, request.shards)
    details = results.compute_details()
    size = request.options.size
    result = {"summary": results.compute(details), "details": details, "num_images": results.num_images,
              "num_skipped": results.num_skipped, "skipped": results.skipped,
              "seconds": round(time.perf_counter() - started, 3), "classes": list(request.options.classes.names),
              "test_size": None if size is None else [size.short_side, size.max_size], "files": {}}
    if out is not None:
        result["files"] = report.write_outputs(results, result, out)
    return result


def _check_images_read(results: PartialResults, shards: str) -> None:
    """Scores over no image would read as PQ 0: say why instead."""
    if results.num_images == 0:
        from pipeline.data.shards import ShardError

        raise ShardError(f"no image of {shards} could be read: {results.num_skipped} skipped "
                         f"({results.skipped}; the log names each file)")


def _build_request(checkpoint, shards, classes, metrics, num_workers, max_images, batch_size, multiscale,
                   multiscale_scales, test_size, out, pictures, device, threads, on_error) -> EvaluationRequest:
    from model.checkpoint import read_config
    from model.inference import thresholds_from_config

    for name, value, low in (("num_workers", num_workers, 1), ("batch_size", batch_size, 1),
                             ("pictures", pictures, 0), ("threads_per_worker", threads, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    unknown = sorted(set(metrics) - set(TASK_OF_METRIC))
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {sorted(TASK_OF_METRIC)}, got {list(metrics)}")
    if not Path(checkpoint).is_file():  # a missing input is a FileNotFoundError here, like missing shards
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist (expected a model file written by "
                                "model.checkpoint.save_model or exported by training)")
    config = read_config(checkpoint)
    class_info, source = read_classes(str(shards), classes), classes or "shard manifest"
    if classes is None:  # the model's own classes (inside the file, else its classes.json) before the data's
        from model.classes import known_classes

        known = known_classes(checkpoint)
        if known is not None:
            class_info, source = ClassInfo.from_json(known[0].to_json()), known[1]
    if class_info.num_classes != config.num_classes:
        raise ValueError(f"the model predicts {config.num_classes} classes but the class list "
                         f"({source}) has {class_info.num_classes}")
    options = EvaluationOptions(
        classes=class_info, thresholds=thresholds_from_config(config), metrics=tuple(metrics),
        size=resolve_inference_size(config, test_size), semantic_multiscale=multiscale,
        multiscale_scales=None if multiscale_scales is None else tuple(multiscale_scales), size_divisibility=config.size_divisibility,
        pictures=pictures if out is not None else 0,
        predictions_folder=str(Path(out, "predictions").resolve()) if out is not None else None,
    )
    return EvaluationRequest(
        checkpoint=str(Path(checkpoint).resolve()), shards=_absolute(str(shards)), options=options,
        max_images=max_images, batch_size=batch_size,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"), threads=threads, on_error=on_error,
    )


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())
