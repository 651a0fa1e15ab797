"""Training and evaluation streams over the shards.

Per worker process the training stream is: the epoch's shard order (seeded) -> this node's and this worker's
part (explicit splitters: by shard when there are enough shards, else by sample) -> WebDataset tar reading ->
seeded shuffle buffer -> decode -> augmentation, task sampling, target plan and text tokens -> batch (images
become float and masks are rendered there, straight at the padded size). Everything
random about a sample (augmentation and task) is drawn from a generator seeded by (seed, epoch, sample key),
so it does not depend on the worker layout; the order depends on seed, epoch and layout only.

Resuming: each batch carries the position (epoch, raw-sample index) of its worker's stream after the batch.
`ResumableLoader` records the position of every batch it hands to the trainer; its state_dict goes in the
checkpoint, and after load_state_dict each worker replays its stream up to that position without decoding,
so no sample is repeated or skipped.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
import webdataset as wds

from model.presets import OneFormerConfig
from model.texts import TASKS, TextTokenTable
from pipeline.data.augment import PIXEL_MEAN, AugmentParams, augment
from pipeline.data.settings import CROP_CANVAS_PRESETS, StreamSettings
from pipeline.data.shards import (
    DecodedSample,
    SchemaVersionError,
    decode_sample,
    manifest_classes,
    read_manifest,
)
from pipeline.data.targets import plan_targets, render_masks

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class ModelInputs:
    """What the stream needs from the model, derived from its config (never declared twice): the length of
    each image's text list, the input size multiple, and the pixel mean (evaluation pads with it, which is 0
    after the model normalises, as the official evaluation pads)."""

    num_text_slots: int
    size_divisibility: int
    pixel_mean: tuple[float, float, float]

    @classmethod
    def from_config(cls, config: OneFormerConfig) -> ModelInputs:
        return cls(config.num_queries - config.text_num_context, config.size_divisibility, tuple(config.pixel_mean))


def worker_id_and_count() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def split_shards(shards: list[str], part: int, num_parts: int) -> list[str]:
    """The explicit node+worker splitter in shard mode: every num_parts-th shard from `part`."""
    return shards[part::num_parts]


# ---------------------------------------------------------------------------------------------- raw samples
def _open_tar(url: str):
    """An fsspec stream for a shard (local path or any fsspec URL)."""
    return fsspec.open(url, "rb").open()


def _raw_samples(urls: list[str]) -> Iterator[dict]:
    """Tar members grouped into samples by WebDataset's own expander and grouper."""
    streams = ({"url": url, "stream": _open_tar(url)} for url in urls)
    yield from wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(streams))


def _shuffled(samples: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """A seeded shuffle buffer: emit a random held item each time a new one arrives, then drain."""
    buffer: list = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = int(rng.integers(len(buffer)))
        buffer[index], sample = sample, buffer[index]
        yield sample
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def sample_seed(seed: int, epoch: int, key: str) -> list[int]:
    return [seed, epoch, zlib.crc32(key.encode())]


def pick_task(u: float, thresholds: tuple[float, float]) -> str:
    """Uniform task sampling with the configs' cumulative thresholds (semantic, instance, panoptic)."""
    return TASKS[0] if u < thresholds[0] else TASKS[1] if u < thresholds[1] else TASKS[2]


# ---------------------------------------------------------------------------------------------- collation
def pad_images(images: list[torch.Tensor], pad_value: tuple[float, float, float], divisibility: int,
               canvas: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """[3, h, w] images (uint8 or float, any strides) -> float32 [B, 3, H, W], H and W the batch maxima (at
    least `canvas`) rounded up to `divisibility`; the float conversion happens in the one copy into the batch."""
    height = -(-max(canvas[0], *(image.shape[1] for image in images)) // divisibility) * divisibility
    width = -(-max(canvas[1], *(image.shape[2] for image in images)) // divisibility) * divisibility
    batch = torch.empty((len(images), 3, height, width), dtype=torch.float32)
    fill = torch.tensor(pad_value, dtype=torch.float32).view(3, 1, 1)
    for index, image in enumerate(images):
        rows, cols = image.shape[1:]
        batch[index, :, :rows, :cols] = image
        batch[index, :, rows:, :] = fill  # only the padding is filled
        batch[index, :, :rows, cols:] = fill
    return batch


@dataclass
class StreamPosition:
    """Where one worker's stream stands: the next raw sample to read is `index` of `epoch`'s order."""

    epoch: int = 0
    index: int = 0


@dataclass
class _WorkerCursor:
    epoch: int
    index: int
    skipped: int = 0
    pending: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- dataset
class PanopticShardStream(torch.utils.data.IterableDataset):
    """Batches of training (or evaluation) samples from a split's shards; see the module docstring.

    Training batches: images float32 [B, 3, H, W] (0-255, padded), tasks list[str], targets list of
    {"labels" int64 [T], "masks" bool [T, H, W]}, text_tokens int64 [B, num_text_slots, 77], image_ids,
    image_sizes (valid h, w after augmentation) and position (worker, epoch, index, skipped).
    Evaluation batches (`training=False`): no augmentation, original sizes, no task targets; instead
    index_maps (int64 [h, w], 0 = void) and segment tables for scoring.
    """

    def __init__(
        self,
        shard_folder: str,
        *,
        training: bool,
        augment_params: AugmentParams | None,
        batch_size: int,
        num_text_slots: int,
        task_thresholds: tuple[float, float] = (0.33, 0.66),
        shuffle_buffer: int = 256,
        shuffle_shards: bool = True,
        seed: int = 0,
        image_pad_value: tuple[float, float, float] = PIXEL_MEAN,
        size_divisibility: int = 32,
        canvas: tuple[int, int] = (0, 0),
        rank: int = 0,
        world_size: int = 1,
        repeat: bool | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if training and augment_params is None:
            raise ValueError("augment_params is required when training=True (use preset 'none' for none)")
        fs, root = fsspec.core.url_to_fs(shard_folder)
        self.manifest = read_manifest(fs, shard_folder)
        self.classes = manifest_classes(self.manifest)
        self.shard_urls = [f"{shard_folder.rstrip('/')}/{shard['name']}" for shard in self.manifest["shards"]]
        self.training, self.augment_params, self.batch_size = training, augment_params, batch_size
        self.num_text_slots, self.task_thresholds = num_text_slots, task_thresholds
        self.shuffle_buffer = shuffle_buffer if training else 1
        self.shuffle_shards = shuffle_shards and training
        self.seed, self.image_pad_value, self.size_divisibility = seed, image_pad_value, size_divisibility
        self.canvas = canvas
        self.rank, self.world_size = rank, world_size
        self.repeat = training if repeat is None else repeat
        self.resume_positions: dict[int, StreamPosition] = {}
        self._tokens: TextTokenTable | None = None

    # ---- the per-worker raw stream
    def _epoch_urls(self, epoch: int) -> list[str]:
        urls = list(self.shard_urls)
        if self.shuffle_shards:
            np.random.default_rng([self.seed, epoch, 1]).shuffle(urls)
        return urls

    def _epoch_raw(self, epoch: int, part: int, num_parts: int) -> Iterator[dict]:
        urls = self._epoch_urls(epoch)
        if len(urls) >= num_parts:
            samples = _raw_samples(split_shards(urls, part, num_parts))
        else:  # fewer shards than workers: every worker reads all, keeps every num_parts-th sample
            samples = (s for i, s in enumerate(_raw_samples(urls)) if i % num_parts == part)
        return _shuffled(samples, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, part, 2]))

    def layout(self) -> tuple[int, int, int]:
        worker, num_workers = worker_id_and_count()
        return self.rank * num_workers + worker, self.world_size * num_workers, num_workers

    # ---- one sample
    def _prepare(self, decoded: DecodedSample, epoch: int) -> dict:
        """Everything per sample but the masks, which are rendered at collation straight at the padded size."""
        sample = {"image_id": decoded.image_id}
        if not self.training:
            sample["index_map"] = torch.from_numpy(decoded.index_map.astype(np.int64))
            sample["segments"] = decoded.table
            image = np.require(decoded.image, requirements=["C", "W"])
            sample["image"] = torch.from_numpy(image).permute(2, 0, 1)
            return sample
        rng = np.random.default_rng(sample_seed(self.seed, epoch, decoded.key))
        task = pick_task(rng.uniform(), self.task_thresholds)
        classes_of_value = np.concatenate([[-1], np.where(decoded.table.iscrowd, -1, decoded.table.classes)])
        planes, index_map = augment(decoded.image, decoded.index_map, classes_of_value, self.augment_params, rng)
        plan = plan_targets(index_map, decoded.table, task)
        if self._tokens is None:
            self._tokens = TextTokenTable(self.classes.names, self.num_text_slots)
        sample.update(task=task, index_map=index_map, plan=plan, image=torch.from_numpy(planes),
                      text_tokens=self._tokens.tokens(plan.labels, task))
        return sample

    def _collate(self, samples: list[dict], position: dict) -> dict:
        images = pad_images([s["image"] for s in samples], self.image_pad_value, self.size_divisibility, self.canvas)
        batch = {
            "images": images,
            "image_ids": [s["image_id"] for s in samples],
            "image_sizes": [tuple(s["image"].shape[1:]) for s in samples],
            "position": position,
        }
        if self.training:
            padded = tuple(images.shape[2:])
            batch["tasks"] = [s["task"] for s in samples]
            batch["targets"] = [{"labels": s["plan"].labels, "masks": render_masks(s["index_map"], s["plan"], padded)}
                                for s in samples]
            batch["text_tokens"] = torch.stack([s["text_tokens"] for s in samples])
        else:
            batch["index_maps"] = [s["index_map"] for s in samples]
            batch["segments"] = [s["segments"] for s in samples]
        return batch

    # ---- iteration
    def __iter__(self) -> Iterator[dict]:
        part, num_parts, _ = self.layout()
        start = self.resume_positions.get(part, StreamPosition())
        cursor = _WorkerCursor(start.epoch, start.index)
        while True:
            for index, raw in enumerate(self._epoch_raw(cursor.epoch, part, num_parts)):
                if index < cursor.index:
                    continue  # replaying up to the resume position: no decoding
                cursor.index = index + 1
                sample = self._decode_or_skip(raw, cursor)
                if sample is not None:
                    cursor.pending.append(sample)
                if len(cursor.pending) == self.batch_size:
                    yield self._emit(cursor, part)
            cursor.epoch, cursor.index = cursor.epoch + 1, 0
            if not self.repeat:
                break
        if cursor.pending:
            yield self._emit(cursor, part, end_of_epoch=True)

    def _decode_or_skip(self, raw: dict, cursor: _WorkerCursor) -> dict | None:
        try:
            return self._prepare(decode_sample(raw, keep_pil_image=self.training), cursor.epoch)
        except SchemaVersionError:
            raise
        except Exception as error:  # a corrupt member raises from PIL, zlib or json; count it and go on
            cursor.skipped += 1
            log.warning("skipping unreadable sample %r of %s (%s skipped so far): %s",
                        raw.get("__key__"), raw.get("__url__"), cursor.skipped, error)
            return None

    def _emit(self, cursor: _WorkerCursor, part: int, end_of_epoch: bool = False) -> dict:
        epoch, index = (cursor.epoch, 0) if end_of_epoch else (cursor.epoch, cursor.index)
        position = {"worker": part, "epoch": epoch, "index": index, "skipped": cursor.skipped}
        batch, cursor.pending = self._collate(cursor.pending, position), []
        return batch


class ResumableLoader:
    """A DataLoader over a PanopticShardStream that knows, per worker, how far the trainer has consumed;
    `state_dict()` belongs in the trainer's checkpoint."""

    def __init__(self, stream: PanopticShardStream, num_workers: int):
        self.stream, self.num_workers = stream, num_workers
        self.positions: dict[int, StreamPosition] = {}
        self.skipped: dict[int, int] = {}

    def _layout(self) -> dict:
        return {"world_size": self.stream.world_size, "num_workers": self.num_workers, "seed": self.stream.seed}

    def __iter__(self) -> Iterator[dict]:
        self.stream.resume_positions = dict(self.positions)
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers,
            persistent_workers=False, multiprocessing_context="fork" if self.num_workers else None,
        )
        for batch in loader:
            position = batch["position"]
            self.positions[position["worker"]] = StreamPosition(position["epoch"], position["index"])
            self.skipped[position["worker"]] = position["skipped"]
            yield batch

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def state_dict(self) -> dict:
        positions = {str(w): [p.epoch, p.index] for w, p in self.positions.items()}
        return {"layout": self._layout(), "positions": positions, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if state["layout"] != self._layout():
            raise ValueError(
                f"the stream state was saved with layout {state['layout']} but this loader has "
                f"{self._layout()}; resume with the same world size, loader workers and seed"
            )
        self.positions = {int(w): StreamPosition(*p) for w, p in state["positions"].items()}
        self.skipped = {int(w): n for w, n in state.get("skipped", {}).items()}


# ---------------------------------------------------------------------------------------------- builders
def augment_params_from_settings(settings: StreamSettings) -> AugmentParams:
    """Preset defaults filled in: the one place StreamSettings maps to AugmentParams."""
    preset = settings.augmentation
    lsj = preset == "coco_lsj"
    return AugmentParams(
        preset=preset,
        crop_size=settings.crop_size,
        resize_base=settings.resize_base or max(settings.crop_size),
        scale_range=settings.scale_range or ((0.1, 2.0) if lsj else (0.5, 2.0)),
        scale_choices=settings.scale_choices and not lsj,
        max_size_factor=settings.max_size_factor,
        category_max_area=settings.category_max_area,
        color_jitter=settings.color_jitter if settings.color_jitter is not None else preset in ("ade20k", "cityscapes"),
        horizontal_flip=settings.horizontal_flip if settings.horizontal_flip is not None else preset != "none",
    )


def training_pad_value(settings: StreamSettings) -> tuple[float, float, float]:
    """The official training canvas: ADE20K and COCO pad with raw 128, the others with the mean (0 after the
    model normalises)."""
    if settings.image_pad_value is not None:
        return settings.image_pad_value
    return (128.0, 128.0, 128.0) if settings.augmentation in CROP_CANVAS_PRESETS else PIXEL_MEAN


def training_canvas(settings: StreamSettings) -> tuple[int, int]:
    """Every training image is padded to the crop size where the official mapper does (ADE20K, COCO)."""
    return tuple(settings.crop_size) if settings.pads_to_crop else (0, 0)


def build_train_loader(settings: StreamSettings, inputs: ModelInputs, shard_folder: str, rank: int,
                       world_size: int) -> ResumableLoader:
    """The training loader of this rank."""
    _check_rank(rank, world_size)
    stream = PanopticShardStream(
        shard_folder, training=True, augment_params=augment_params_from_settings(settings),
        batch_size=settings.batch_size, num_text_slots=inputs.num_text_slots,
        task_thresholds=settings.task_thresholds, shuffle_buffer=settings.shuffle_buffer,
        shuffle_shards=settings.shuffle_shards, seed=settings.seed, image_pad_value=training_pad_value(settings),
        size_divisibility=inputs.size_divisibility, canvas=training_canvas(settings), rank=rank, world_size=world_size,
    )
    return ResumableLoader(stream, settings.loader_workers)


def build_eval_loader(shard_folder: str, inputs: ModelInputs, rank: int, world_size: int, batch_size: int = 1,
                      loader_workers: int = 0) -> ResumableLoader:
    """One pass over a split without augmentation at original sizes, split across ranks; images are padded
    with the pixel mean (0 after the model normalises)."""
    _check_rank(rank, world_size)
    stream = PanopticShardStream(
        shard_folder, training=False, augment_params=None, batch_size=batch_size,
        num_text_slots=inputs.num_text_slots, image_pad_value=inputs.pixel_mean,
        size_divisibility=inputs.size_divisibility, rank=rank, world_size=world_size,
    )
    return ResumableLoader(stream, loader_workers)


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
