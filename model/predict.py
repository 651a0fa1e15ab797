"""Predict on your own images with a trained model, eager or exported to ONNX.

    python -m model.predict --checkpoint model.pt --task panoptic photos/ extra.jpg --out pred/
    python -m model.predict --checkpoint runs/demo_cpu/model/model.pt --all-tasks data/synthetic/val --out /tmp/p
    python -m model.predict --onnx model.onnx --task semantic --multiscale photos/ --out pred/

    from model.predict import Predictor, predict_images
    predictor = Predictor.from_checkpoint("model.pt")            # or Predictor.from_onnx("model.onnx")
    summary = predict_images(predictor, ["photos/"], ["panoptic"], out="pred/")

Each image (any size; a folder means the images directly in it) goes the evaluation's way
(model.inference.predict): resized to the test size of the model's dataset (or --test-size), padded with the
pixel mean, run with its task, post-processed back at its own size; --multiscale averages the semantic
scores over the official multi-scale views and their flips. Images are read as RGB after their EXIF
orientation (what a viewer shows); images are batched (--batch-size) on the CPU or CUDA (--device).

Written under --out, in the formats evaluation writes (model/formats.py) and `python -m pipeline.evaluate
panoptic|instance|semantic` scores:
    panoptic.json + panoptic/<name>.png    COCO panoptic: one PNG per image, one JSON for all images
    instances.json                         COCO results: RLE mask, dataset category id and score per instance
    semantic/<name>.png                    class labels (contiguous ids 0..K-1), 8-bit (16-bit past 255 classes)
    overlays/<name>_<task>.png             the image with the prediction and a legend of class names
<name> is the image's file name without its suffix; COCO image ids are that name, as an int when it is
all digits (000000000139 -> 139, as COCO names its images). Class names come with the model: --classes, else
the classes inside model.pt (training and model.convert put them there), else the classes.json beside it;
an exported file carries its own copy.

An image that cannot be read is reported by name on stderr and skipped; the others go on. Bad arguments (a
missing model file or path, no images at all, a classes file that does not fit) exit with status 2 and one
line naming the file and the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from model.checkpoint import ModelFileError, load_model, read_config
from model.classes import ClassesFileError, ModelClasses, classes_for_model
from model.formats import mask_to_rle, write_label_png, write_panoptic_png
from model.inference import (
    InferenceSize,
    InferenceThresholds,
    InstanceResult,
    PanopticResult,
    SemanticResult,
    predict,
    resolve_inference_size,
    semantic_multiscale_flip,
    thresholds_from_config,
)
from model.texts import TASKS
from model.visualize import LegendEntry, by_area, class_color, instance_color, overlay_picture

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
OVERLAY_INSTANCE_MIN_SCORE = 0.5
"""Instance masks overlap and are not thresholded; overlays draw only those scoring at least this (as the
evaluation's pictures do)."""


class PredictInputError(ValueError):
    """Bad input to prediction (a missing path, no images, a device that is not there); names it."""


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class Predictor:
    """A network that maps a padded batch and its tasks to class and mask logits (a OneFormer, or an
    exported file's runtime wrapper from model/export.py), with what post-processing needs."""

    network: torch.nn.Module
    classes: ModelClasses
    thresholds: InferenceThresholds
    size: InferenceSize | None
    size_divisibility: int = 32

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        classes_file: str | os.PathLike | None = None,
        device: str = "cpu",
        test_size: tuple[int, int] | str | None = None,
    ) -> Predictor:
        """The eager model of a model file (model/checkpoint.py) on `device`; classes from `classes_file`,
        else the model file's own, else the classes.json beside it (model.classes.classes_for_model)."""
        config = read_config(checkpoint)
        classes = classes_for_model(checkpoint, config.num_classes, classes_file)
        network = load_model(checkpoint, training=False).to(_device(device))
        return cls._for_config(network, classes, config, test_size)

    @classmethod
    def _for_config(cls, network, classes: ModelClasses, config, test_size) -> Predictor:
        """A predictor with the thresholds, test size and size multiple of the network's config."""
        return cls(network, classes, thresholds_from_config(config), resolve_inference_size(config, test_size),
                   config.size_divisibility)  # fmt: skip

    @classmethod
    def from_onnx(
        cls,
        path: str | os.PathLike,
        test_size: tuple[int, int] | str | None = None,
        threads: int | None = None,
    ) -> Predictor:
        """An ONNX file from `python -m model.export --format onnx`, run by ONNX Runtime on the CPU; config and
        classes from the file itself."""
        from model.export import OnnxRuntimeModel

        network = OnnxRuntimeModel(path, threads=threads)
        config, info = network.config, network.info
        classes = ModelClasses(info.class_names, info.is_thing, info.category_ids)
        return cls._for_config(network, classes, config, test_size)

    def predict(self, images: Sequence[torch.Tensor], task: str, multiscale: bool = False) -> list:
        """Results (model.inference) of [3, H, W] RGB 0-255 images, one per image, at each image's size."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if multiscale and task == "semantic":
            return self._semantic_multiscale(images)
        return predict(
            self.network,
            images,
            [task] * len(images),
            list(self.classes.is_thing),
            self.thresholds,
            self.size,
            self.size_divisibility,
        )

    def _semantic_multiscale(self, images: Sequence[torch.Tensor]) -> list[SemanticResult]:
        sizes = [tuple(image.shape[-2:]) for image in images]
        batch = torch.zeros(len(images), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
        for index, image in enumerate(images):
            batch[index, :, : image.shape[-2], : image.shape[-1]] = image
        scores = semantic_multiscale_flip(
            self.network, batch, sizes, size_divisibility=self.size_divisibility, size=self.size
        )
        return [SemanticResult(scores=s, labels=s.argmax(0)) for s in scores]


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictInputError(f"device {name}: CUDA is not available on this machine")
    return device


# ---------------------------------------------------------------------------------------------- images
def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named, and those directly inside the folders named (sorted), in the order given."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise PredictInputError(f"{path}: no such file or folder")
    if not files:
        raise PredictInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return files


def read_image(path: Path) -> torch.Tensor:
    """float32 [3, H, W] RGB 0-255, after the EXIF orientation; raises OSError naming the problem."""
    with Image.open(path) as picture:
        picture.load()  # decodes every pixel: truncated data raises here
        picture = ImageOps.exif_transpose(picture)
        if picture.mode != "RGB":
            picture = picture.convert("RGB")
        return torch.from_numpy(np.array(picture)).permute(2, 0, 1).float()


@dataclass
class _Image:
    path: Path
    name: str
    tensor: torch.Tensor

    @property
    def image_id(self) -> int | str:
        return int(self.name) if self.name.isdigit() else self.name

    def pixels(self) -> np.ndarray:
        return self.tensor.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _readable_batches(
    files: Sequence[Path], batch_size: int, skipped: list[tuple[str, str]], bar: tqdm
) -> Iterator[list[_Image]]:
    """Batches of the readable images; an unreadable one is reported on stderr, recorded and skipped."""
    names = _unique_names(files)
    batch: list[_Image] = []
    for path, name in zip(files, names):
        try:
            batch.append(_Image(path, name, read_image(path)))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            bar.write(f"skipped {path}: cannot read the image ({reason})", file=sys.stderr)
            skipped.append((str(path), reason))
            bar.update(1)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _unique_names(files: Sequence[Path]) -> list[str]:
    """Output names: the file stem, with _2, _3 ... for a stem seen before (images from different folders)."""
    seen: dict[str, int] = {}
    names = []
    for path in files:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        names.append(path.stem if count == 1 else f"{path.stem}_{count}")
    return names


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class PredictionSummary:
    out: Path
    images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every image that could not be read."""
    files: dict[str, Path] = field(default_factory=dict)
    """What was written, by kind: panoptic.json, panoptic/, instances.json, semantic/, overlays/."""


class _Writer:
    """Writes each result as it comes and the JSON files once at the end."""

    def __init__(self, out: Path, classes: ModelClasses, tasks: Sequence[str], overlays: bool):
        self.out, self.classes, self.overlays = out, classes, overlays
        self.panoptic_records: list[dict] = []
        self.instance_records: list[dict] = []
        self.tasks = tasks

    def add(self, image: _Image, task: str, result) -> None:
        {"panoptic": self._panoptic, "instance": self._instance, "semantic": self._semantic}[task](
            image, result
        )

    def _panoptic(self, image: _Image, result: PanopticResult) -> None:
        ids = result.segment_ids.cpu().numpy()
        file_name = f"{image.name}.png"
        write_panoptic_png(self.out / "panoptic" / file_name, ids)
        segments = [
            {"id": s.id, "category_id": self.classes.category_ids[s.category_id], "score": s.score}
            for s in result.segments_info
        ]
        self.panoptic_records.append(
            {"image_id": image.image_id, "file_name": file_name, "segments_info": segments}
        )
        if self.overlays:
            legend: list[LegendEntry] = []
            things = 0
            for segment in result.segments_info:
                name = self.classes.names[segment.category_id]
                if segment.isthing:
                    legend.append(
                        LegendEntry(segment.id, instance_color(things), f"{name} {segment.score:.2f}")
                    )
                    things += 1
                else:
                    legend.append(LegendEntry(segment.id, class_color(segment.category_id), name))
            self._overlay(image, "panoptic", ids, legend)

    def _instance(self, image: _Image, result: InstanceResult) -> None:
        masks, scores, labels = (t.cpu().numpy() for t in (result.masks, result.scores, result.labels))
        for mask, score, label in zip(masks, scores, labels):
            self.instance_records.append(
                {
                    "image_id": image.image_id,
                    "category_id": self.classes.category_ids[int(label)],
                    "segmentation": mask_to_rle(mask),
                    "score": float(score),
                }
            )
        if self.overlays:
            painted, legend = np.zeros(masks.shape[1:], np.int64), []
            shown = [i for i in np.argsort(scores, kind="stable") if scores[i] >= OVERLAY_INSTANCE_MIN_SCORE]
            for rank, index in enumerate(shown):  # lowest score first: higher scores are painted over it
                value = len(shown) - rank
                painted[masks[index]] = value
                label = f"{self.classes.names[int(labels[index])]} {scores[index]:.2f}"
                legend.append(LegendEntry(value, instance_color(value - 1), label))
            self._overlay(image, "instance", painted, legend)

    def _semantic(self, image: _Image, result: SemanticResult) -> None:
        labels = result.labels.cpu().numpy()
        write_label_png(self.out / "semantic" / f"{image.name}.png", labels)
        if self.overlays:
            legend = [LegendEntry(k + 1, class_color(k), name) for k, name in enumerate(self.classes.names)]
            self._overlay(image, "semantic", labels + 1, legend)

    def _overlay(self, image: _Image, task: str, segments: np.ndarray, legend: list[LegendEntry]) -> None:
        picture = overlay_picture(
            image.pixels(), segments, by_area(segments, legend), f"{image.name}: {task}"
        )
        path = self.out / "overlays" / f"{image.name}_{task}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)

    def finish(self, summary: PredictionSummary) -> None:
        """The JSON files, and the list of what was written."""
        self.out.mkdir(parents=True, exist_ok=True)
        if "panoptic" in self.tasks:
            document = {"annotations": self.panoptic_records, "categories": self.classes.coco_categories()}
            summary.files["panoptic.json"] = _write_json(self.out / "panoptic.json", document)
            summary.files["panoptic/"] = self.out / "panoptic"
        if "instance" in self.tasks:
            summary.files["instances.json"] = _write_json(self.out / "instances.json", self.instance_records)
        if "semantic" in self.tasks:
            summary.files["semantic/"] = self.out / "semantic"
        if self.overlays:
            summary.files["overlays/"] = self.out / "overlays"


def _write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path


def predict_images(
    predictor: Predictor,
    paths: Sequence[str | os.PathLike],
    tasks: Sequence[str],
    out: str | os.PathLike,
    batch_size: int = 1,
    multiscale: bool = False,
    overlays: bool = True,
    progress: bool = True,
) -> PredictionSummary:
    """Predict every image of `paths` (files, or folders of images) for each of `tasks` and write the results
    under `out` (see the module docstring). Unreadable images are skipped and listed in the summary."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise PredictInputError(f"tasks must be a non-empty list drawn from {TASKS}, got {list(tasks)}")
    if batch_size < 1:
        raise PredictInputError(f"batch size must be >= 1, got {batch_size}")
    files = image_files(paths)
    summary = PredictionSummary(out=Path(out))
    writer = _Writer(Path(out), predictor.classes, tasks, overlays)
    with tqdm(total=len(files), unit="img", desc="predicting", disable=not progress) as bar:
        for batch in _readable_batches(files, batch_size, summary.skipped, bar):
            for task in tasks:
                results = predictor.predict([image.tensor for image in batch], task, multiscale)
                for image, result in zip(batch, results):
                    writer.add(image, task, result)
            summary.images += len(batch)
            bar.update(len(batch))
    writer.finish(summary)
    return summary


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.predict", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="model file (model.pt from training or python -m model.convert)")
    source.add_argument("--onnx", help="ONNX file from python -m model.export --format onnx")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", choices=TASKS, help="the task token the model runs with")
    which.add_argument("--all-tasks", action="store_true", help="all three tasks, each image once per task")
    parser.add_argument("images", nargs="+", help="image files and folders of images")
    parser.add_argument("--out", required=True, help="folder for the predictions and overlays")
    parser.add_argument(
        "--classes",
        default=None,
        help="classes.json of the model (default: the classes inside --checkpoint, else the classes.json "
        "beside it)",
    )
    parser.add_argument(
        "--multiscale", action="store_true", help="semantic: multi-scale + flip test-time augmentation"
    )
    parser.add_argument(
        "--test-size",
        nargs="+",
        default=None,
        metavar="SHORT MAX | none",
        help="ResizeShortestEdge before the model; default: the official size of the model's "
        "dataset; none: each image at its own size",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda when available); --checkpoint only"
    )
    parser.add_argument("--no-overlays", action="store_true", help="write the prediction files only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _test_size(values: list[str] | None) -> tuple[int, int] | str | None:
    if values is None:
        return None
    if values == ["none"]:
        return "none"
    if len(values) != 2 or not all(value.isdigit() for value in values):
        raise PredictInputError(f"--test-size takes SHORT MAX (two integers) or none, got {' '.join(values)}")
    return int(values[0]), int(values[1])


def _predictor(args) -> Predictor:
    test_size = _test_size(args.test_size)
    if args.onnx is not None:
        if args.classes is not None or args.device not in (None, "cpu"):
            raise PredictInputError(
                "--onnx runs on the CPU with the classes inside the file: drop --classes/--device"
            )
        return Predictor.from_onnx(args.onnx, test_size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Predictor.from_checkpoint(args.checkpoint, args.classes, device, test_size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = list(TASKS) if args.all_tasks else [args.task]
    try:
        predictor = _predictor(args)
        summary = predict_images(
            predictor,
            args.images,
            tasks,
            args.out,
            args.batch_size,
            args.multiscale,
            overlays=not args.no_overlays,
            progress=not args.quiet,
        )
    except (PredictInputError, ModelFileError, ClassesFileError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"predicted {summary.images} images ({', '.join(tasks)}) into {summary.out}:")
    for kind, path in summary.files.items():
        print(f"  {kind:<15} {path}")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} unreadable images (named above)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
