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

Resizing: a checkpoint of another layout (world size, loader workers, per-worker batch) resumes by global
sample position. The old layout and every part's position become a `Generation` of the stream's history; for
each epoch the old layout had begun, the new parts read what the old parts had not handed out (replayed up to
their positions, not decoded): with fewer parts, each takes whole old parts, dealt round robin in the old
batches; with more, the new parts sharing an old part take its remainder in turns of a batch. Without loader
workers a step's global batch is then the one the old layout would have made. Later epochs are the new layout's
own. A second resize stacks another generation, so the accounting stays exact through any chain of resizes.

Nothing is left out uncounted: a shard whose size or checksum differs from the manifest is skipped whole, a
tar that breaks off (damaged header, truncated file) costs the samples the manifest says it holds beyond those
read, and a sample that does not decode completely or whose segment map points outside its segment table is
skipped; each is logged with the file and counted by reason in the batch positions (`ResumableLoader.skipped`,
`skip_reasons`). With on_error "fail" the first such problem raises ShardError instead. A split with no sample
fails when the stream is made (EmptySplitError); a training stream whose worker reads no sample in a whole
epoch fails rather than waiting forever.
"""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
import webdataset as wds

from model.presets import OneFormerConfig
from model.texts import TASKS, TextTokenTable
from pipeline.data.augment import PIXEL_MEAN, AugmentParams, augment
from pipeline.data.raw_files import is_remote, read_errors
from pipeline.data.settings import CROP_CANVAS_PRESETS, StreamSettings
from pipeline.data.shards import (
    DecodedSample,
    EmptySplitError,
    SchemaVersionError,
    SegmentMapError,
    ShardError,
    check_not_empty,
    decode_sample,
    manifest_classes,
    printable,
    read_manifest,
    verify_shard,
    verify_shard_bytes,
)
from pipeline.data.targets import describe_tasks, plan_targets, render_masks, task_thresholds_for_data

log = logging.getLogger(__name__)

SKIP_DAMAGED_SHARD = "damaged shard"
SKIP_BROKEN_TAR = "tar breaks off"
SKIP_BAD_SEGMENT_MAP = "segment map outside its table"
SKIP_UNDECODABLE = "undecodable sample"
READ_ATTEMPTS = 3
"""Reads of a shard that breaks off after passing its manifest check (object storage drops long reads)."""
READ_RETRY_WAIT_S = 1.0


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
def _tar_samples(handle, url: str) -> Iterator[dict]:
    """One shard's members grouped into samples by WebDataset's own expander and grouper; any read error
    propagates (the caller counts what it cost)."""
    with handle:
        yield from wds.tariterators.group_by_keys(
            wds.tariterators.tar_file_expander([{"url": url, "stream": handle}]))


def _checked_shard(fs, path: str, entry: dict, remote: bool):
    """An open, checked shard: a remote one is read once into memory, checked and streamed from there (not
    read twice, once for its checksum); a local one is checked on disk, then opened."""
    if remote:
        try:
            data = fs.cat_file(path)
        except FileNotFoundError as error:
            raise ShardError(f"shard {printable(path)} cannot be opened: {error}") from error
        verify_shard_bytes(data, path, entry)
        return io.BytesIO(data)
    verify_shard(fs, path, entry)
    return fs.open(path, "rb")


@dataclass
class SkipTally:
    """What one worker's stream left out so far, counted by reason; each event is logged with its file.
    `counting` is off while a resumed stream replays up to its checkpoint, whose counts it starts from."""

    reasons: dict[str, int] = field(default_factory=dict)
    on_error: str = "skip"
    counting: bool = True
    parent: SkipTally | None = None

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def gate(self) -> SkipTally:
        """A tally that adds to this one while its own `counting` is on (an inherited remainder's replay)."""
        return SkipTally(on_error=self.on_error, parent=self)

    def add(self, reason: str, count: int, detail: str) -> None:
        if self.on_error == "fail":
            raise ShardError(f"{detail} (stream.on_error is 'fail'; 'skip' leaves such samples out, counted)")
        if count <= 0 or not self.counting:
            return
        if self.parent is not None:
            self.parent.add(reason, count, detail)
            return
        self.reasons[reason] = self.reasons.get(reason, 0) + count
        log.warning("skipping %d sample(s), %s: %s (%d skipped so far)", count, reason, detail, self.total)


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


@dataclass(frozen=True)
class Generation:
    """An earlier layout of the training stream (its number of parts and per-part batch size) and where each of
    its parts stopped. A stream whose layout changed (a resized worker group) first reads what the earlier
    layouts left of the epochs they had begun, so no sample of an epoch is read twice or left out."""

    num_parts: int
    batch_size: int
    positions: dict[int, StreamPosition]
    """Every part's position: the parts that never handed out a batch stand where their generation began."""

    def consumed(self, part: int, epoch: int) -> int | None:
        """Raw samples of `epoch` that `part` handed out: None for all of them."""
        position = self.positions[part]
        if position.epoch > epoch:
            return None
        return position.index if position.epoch == epoch else 0

    @property
    def last_begun_epoch(self) -> int:
        return max(p.epoch if p.index else p.epoch - 1 for p in self.positions.values())

    @property
    def first_open_epoch(self) -> int:
        return min(p.epoch for p in self.positions.values())

    def to_json(self) -> dict:
        return {"num_parts": self.num_parts, "batch_size": self.batch_size,
                "positions": {str(part): [p.epoch, p.index] for part, p in sorted(self.positions.items())}}

    @classmethod
    def from_json(cls, data: dict) -> Generation:
        return cls(data["num_parts"], data["batch_size"],
                   {int(part): StreamPosition(*p) for part, p in data["positions"].items()})


def _dealt(sources: list[Iterator], chunk: int) -> Iterator:
    """The sources' items dealt round robin, `chunk` at a time, until every source is empty."""
    active = list(sources)
    while active:
        for source in list(active):
            taken = list(itertools.islice(source, chunk))
            yield from taken
            if len(taken) < chunk:
                active.remove(source)


def _every_nth_chunk(source: Iterator, chunk: int, count: int, index: int) -> Iterator:
    """Chunk number index, index + count, ... of the source (chunks of `chunk` items)."""
    for position, item in enumerate(source):
        if (position // chunk) % count == index:
            yield item


@dataclass
class _WorkerCursor:
    epoch: int
    index: int
    tally: SkipTally
    pending: list = field(default_factory=list)
    reported: int = 0  # the skip count the last emitted position carried


# ---------------------------------------------------------------------------------------------- dataset
class PanopticShardStream(torch.utils.data.IterableDataset):
    """Batches of training (or evaluation) samples from a split's shards; see the module docstring.

    Training batches: images float32 [B, 3, H, W] (0-255, padded), tasks list[str], targets list of
    {"labels" int64 [T], "masks" bool [T, H, W]}, text_tokens int64 [B, num_text_slots, 77], image_ids, epochs
    (each sample's), image_sizes (valid h, w after augmentation) and position (worker, epoch, index, skipped, skip_reasons).
    Evaluation batches (`training=False`): no augmentation, original sizes, no task targets; instead
    index_maps (int64 [h, w], 0 = void) and segment tables for scoring. A pass that ends with skips no batch
    has reported yet yields a last `{"position": ..., "status_only": True}` (ResumableLoader keeps it to itself).
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
        on_error: str = "skip",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if training and augment_params is None:
            raise ValueError("augment_params is required when training=True (use preset 'none' for none)")
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
        fs, root = fsspec.core.url_to_fs(shard_folder)
        self.manifest = read_manifest(fs, root)
        check_not_empty(self.manifest, shard_folder)
        self.classes = manifest_classes(self.manifest)
        self.shard_urls = [f"{shard_folder.rstrip('/')}/{shard['name']}" for shard in self.manifest["shards"]]
        self.on_error = on_error
        self.training, self.augment_params, self.batch_size = training, augment_params, batch_size
        # A task the data has no targets for (instance without a thing class) is never drawn.
        self.num_text_slots = num_text_slots
        self.task_thresholds = task_thresholds_for_data(task_thresholds, self.classes)
        self.shuffle_buffer = shuffle_buffer if training else 1
        self.shuffle_shards = shuffle_shards and training
        self.seed, self.image_pad_value, self.size_divisibility = seed, image_pad_value, size_divisibility
        self.canvas = canvas
        self.rank, self.world_size = rank, world_size
        self.repeat = training if repeat is None else repeat
        self.resume_positions: dict[int, StreamPosition] = {}
        self.resume_skips: dict[int, dict[str, int]] = {}
        self.history: list[Generation] = []
        """The earlier layouts of this stream, oldest first (ResumableLoader.resume after a resize)."""
        self._tokens: TextTokenTable | None = None

    # ---- the per-worker raw stream
    def _epoch_shards(self, epoch: int) -> list[tuple[str, dict]]:
        shards = list(zip(self.shard_urls, self.manifest["shards"]))
        if self.shuffle_shards:
            np.random.default_rng([self.seed, epoch, 1]).shuffle(shards)
        return shards

    def _epoch_raw(self, epoch: int, part: int, num_parts: int, tally: SkipTally | None = None) -> Iterator[dict]:
        tally = tally or SkipTally(on_error=self.on_error)
        shards = self._epoch_shards(epoch)
        if len(shards) >= num_parts:
            samples = self._read_shards(split_shards(shards, part, num_parts), tally, lambda position: True)
        else:  # fewer shards than workers: every worker reads all, keeps every num_parts-th sample
            samples = self._read_shards(shards, tally, lambda position: position % num_parts == part)
        return _shuffled(samples, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, part, 2]))

    def _part_raw(self, generation: int, epoch: int, part: int, num_parts: int, batch_size: int,
                  tally: SkipTally) -> Iterator[dict]:
        """One part's raw samples of an epoch in layout `generation` (len(history): the current one): its own
        share of the epoch, or for an epoch an earlier layout had begun, its share of what that layout left."""
        if epoch > self._last_inherited_epoch(generation):
            return self._epoch_raw(epoch, part, num_parts, tally)
        previous = self.history[generation - 1]
        if num_parts <= previous.num_parts:  # fewer parts: each takes whole parts, dealt in their batches
            sources = [self._remainder(generation - 1, epoch, old, tally, counts=True)
                       for old in range(part, previous.num_parts, num_parts)]
            return _dealt(sources, previous.batch_size)
        sharing = range(part % previous.num_parts, num_parts, previous.num_parts)  # more parts: they share one
        remainder = self._remainder(generation - 1, epoch, sharing[0], tally, counts=part == sharing[0])
        return _every_nth_chunk(remainder, batch_size, len(sharing), sharing.index(part))

    def _remainder(self, generation: int, epoch: int, part: int, tally: SkipTally, counts: bool) -> Iterator[dict]:
        """What `part` of an earlier layout had not handed out of `epoch`; losses beyond its position are counted
        once (`counts`: by the one new part that reads them first)."""
        layout = self.history[generation]
        consumed = layout.consumed(part, epoch)
        if consumed is None:
            return
        gate = tally.gate()
        gate.counting = counts and consumed == 0
        for index, sample in enumerate(self._part_raw(generation, epoch, part, layout.num_parts, layout.batch_size,
                                                      gate)):
            gate.counting = counts and index + 1 >= consumed
            if index >= consumed:
                yield sample

    def first_epoch(self) -> int:
        """Where the parts of the current layout begin: the earliest epoch an earlier layout left open."""
        return self.history[-1].first_open_epoch if self.history else 0

    def _last_inherited_epoch(self, generation: int) -> int:
        """The last epoch a layout before `generation` had begun (-1: none)."""
        return max((g.last_begun_epoch for g in self.history[:generation]), default=-1)

    def _read_shards(self, shards: list[tuple[str, dict]], tally: SkipTally,
                     keep: Callable[[int], bool]) -> Iterator[dict]:
        """The kept samples of the shards in order. A sample's position is its place by the manifest's counts,
        so a lost shard moves no other sample to another worker, and each lost sample is counted by the one
        worker that would have read it."""
        offset = 0
        for url, entry in shards:
            yield from self._shard_samples(url, entry, offset, tally, keep)
            offset += entry["num_samples"]

    def _shard_samples(self, url: str, entry: dict, offset: int, tally: SkipTally,
                       keep: Callable[[int], bool]) -> Iterator[dict]:
        """The kept samples of one shard. A remote shard whose read breaks off (a connection to object storage
        reset mid-file) is read again, up to READ_ATTEMPTS times, and streamed on after the samples already
        handed out; a shard that does not match its manifest, or is still missing samples then, is counted."""
        expected, read = entry["num_samples"], 0
        reason = SKIP_BROKEN_TAR
        fs, path = fsspec.core.url_to_fs(url)
        remote = is_remote(url)
        attempts = READ_ATTEMPTS if remote else 1  # a local file that breaks off stays broken
        for attempt in range(1, attempts + 1):
            try:
                for index, sample in enumerate(_tar_samples(_checked_shard(fs, path, entry, remote), url)):
                    if index < read:  # handed out before an earlier attempt broke off
                        continue
                    if keep(offset + read):
                        yield sample
                    read += 1
                problem = f"{printable(url)} ends after {read} of the {expected} samples of its manifest"
                break
            except ShardError as error:
                reason, problem = SKIP_DAMAGED_SHARD, str(error)
                break
            except (tarfile.TarError, ValueError, *read_errors()) as error:  # what tarfile and fsspec raise
                problem = f"{printable(url)} breaks off after {read} of its {expected} samples ({error})"
                if attempt < attempts and read < expected:
                    log.warning("%s; reading it again (attempt %d of %d)", problem, attempt + 1, attempts)
                    time.sleep(READ_RETRY_WAIT_S * attempt)
        if read < expected:
            tally.add(reason, sum(map(keep, range(offset + read, offset + expected))), problem)

    def layout(self) -> tuple[int, int, int]:
        worker, num_workers = worker_id_and_count()
        return self.rank * num_workers + worker, self.world_size * num_workers, num_workers

    # ---- one sample
    def _prepare(self, decoded: DecodedSample, epoch: int) -> dict:
        """Everything per sample but the masks, which are rendered at collation straight at the padded size."""
        sample = {"image_id": decoded.image_id, "epoch": epoch}
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
            "epochs": [s["epoch"] for s in samples],
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
        start = self.resume_positions.get(part, StreamPosition(self.first_epoch(), 0))
        tally = SkipTally(dict(self.resume_skips.get(part, {})), self.on_error)
        cursor = _WorkerCursor(start.epoch, start.index, tally, reported=tally.total)
        while True:
            used, resumed = 0, cursor.index > 0 or cursor.epoch <= self._last_inherited_epoch(len(self.history))
            tally.counting = cursor.index == 0  # a shard lost before the resume position was counted then
            raw_samples = self._part_raw(len(self.history), cursor.epoch, part, num_parts, self.batch_size, tally)
            for index, raw in enumerate(raw_samples):
                tally.counting = index + 1 >= cursor.index
                if index < cursor.index:
                    continue  # replaying up to the resume position: no decoding
                cursor.index = index + 1
                sample = self._decode_or_skip(raw, cursor)
                if sample is not None:
                    cursor.pending.append(sample)
                    used += 1
                if len(cursor.pending) == self.batch_size:
                    yield self._emit(cursor, part)
            self._check_epoch_not_empty(used, resumed, cursor, part)
            cursor.epoch, cursor.index = cursor.epoch + 1, 0
            if not self.repeat:
                break
        if cursor.pending:
            yield self._emit(cursor, part, end_of_epoch=True)
        elif tally.total != cursor.reported:
            yield {"position": self._position(cursor, part, end_of_epoch=True), "status_only": True}

    def _check_epoch_not_empty(self, used: int, resumed: bool, cursor: _WorkerCursor, part: int) -> None:
        """A repeating stream that read nothing in a whole epoch would read nothing forever."""
        if not self.repeat or used or resumed:
            return
        raise EmptySplitError(
            f"training stream part {part} of split {self.manifest.get('split')!r} read no sample in epoch "
            f"{cursor.epoch} ({cursor.tally.total} skipped: {cursor.tally.reasons or 'none'}; the split has "
            f"{self.manifest['num_samples']} samples in {len(self.shard_urls)} shards)")

    def _decode_or_skip(self, raw: dict, cursor: _WorkerCursor) -> dict | None:
        try:
            return self._prepare(decode_sample(raw, keep_pil_image=self.training), cursor.epoch)
        except SchemaVersionError:
            raise
        except SegmentMapError as error:
            cursor.tally.add(SKIP_BAD_SEGMENT_MAP, 1, f"{printable(raw.get('__url__', '?'))}: {error}")
        except Exception as error:  # a corrupt member raises from PIL, zlib or json; count it and go on
            cursor.tally.add(SKIP_UNDECODABLE, 1, f"skipping unreadable sample {raw.get('__key__')!r} of "
                                                  f"{printable(raw.get('__url__', '?'))}: {error}")
        return None

    def _position(self, cursor: _WorkerCursor, part: int, end_of_epoch: bool = False) -> dict:
        epoch, index = (cursor.epoch, 0) if end_of_epoch else (cursor.epoch, cursor.index)
        cursor.reported = cursor.tally.total
        return {"worker": part, "epoch": epoch, "index": index, "skipped": cursor.tally.total,
                "skip_reasons": dict(cursor.tally.reasons)}

    def _emit(self, cursor: _WorkerCursor, part: int, end_of_epoch: bool = False) -> dict:
        position = self._position(cursor, part, end_of_epoch)
        batch, cursor.pending = self._collate(cursor.pending, position), []
        return batch


class ResumableLoader:
    """A DataLoader over a PanopticShardStream that knows, per worker, how far the trainer has consumed and
    what was skipped so far; `state_dict()` belongs in the trainer's checkpoint, `resume` reads the states of
    every rank of a checkpoint, written by this layout or another (a resized worker group)."""

    def __init__(self, stream: PanopticShardStream, num_workers: int):
        self.stream, self.num_workers = stream, num_workers
        self.positions: dict[int, StreamPosition] = {}
        self.worker_skips: dict[int, dict[str, int]] = {}
        self.carried_skips: dict[str, int] = {}
        """What the parts of earlier layouts skipped (kept by rank 0 after a resize)."""

    def _layout(self) -> dict:
        return {"world_size": self.stream.world_size, "num_workers": self.num_workers, "seed": self.stream.seed,
                "batch_size": self.stream.batch_size}

    def __iter__(self) -> Iterator[dict]:
        self.stream.resume_positions = dict(self.positions)
        self.stream.resume_skips = {worker: dict(reasons) for worker, reasons in self.worker_skips.items()}
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers,
            persistent_workers=False, multiprocessing_context="fork" if self.num_workers else None,
        )
        for batch in loader:
            position = batch["position"]
            self.positions[position["worker"]] = StreamPosition(position["epoch"], position["index"])
            self.worker_skips[position["worker"]] = dict(position["skip_reasons"])
            if not batch.get("status_only"):
                yield batch

    @property
    def num_skipped(self) -> int:
        """Samples left out so far over every worker of this rank."""
        return sum(self.skip_reasons.values())

    @property
    def skip_reasons(self) -> dict[str, int]:
        """Samples left out so far over every worker of this rank (and, on rank 0, earlier layouts), by reason."""
        return _summed([*self.worker_skips.values(), self.carried_skips])

    def state_dict(self) -> dict:
        positions = {str(w): [p.epoch, p.index] for w, p in self.positions.items()}
        return {"layout": self._layout(), "positions": positions,
                "skip_reasons": {str(w): dict(r) for w, r in self.worker_skips.items()},
                "history": [generation.to_json() for generation in self.stream.history],
                "carried_skip_reasons": dict(self.carried_skips)}

    def load_state_dict(self, state: dict) -> None:
        """This rank's state from a checkpoint of the same layout."""
        if not self._same_layout(state):
            raise ValueError(
                f"the stream state was saved with layout {state['layout']} but this loader has "
                f"{self._layout()}; resume with the same world size, loader workers and seed, or through "
                "ResumableLoader.resume with the states of every rank"
            )
        self.positions = {int(w): StreamPosition(*p) for w, p in state["positions"].items()}
        if "skip_reasons" in state:
            self.worker_skips = {int(w): dict(r) for w, r in state["skip_reasons"].items()}
        else:  # a checkpoint from before skips had reasons: one count per worker
            self.worker_skips = {int(w): {SKIP_UNDECODABLE: n} for w, n in state.get("skipped", {}).items() if n}
        self.stream.history = [Generation.from_json(g) for g in state.get("history", [])]
        self.carried_skips = dict(state.get("carried_skip_reasons", {}))

    def _same_layout(self, state: dict) -> bool:
        # batch_size joined the layout with resizing; older checkpoints lack it
        return all(self._layout()[key] == value for key, value in state["layout"].items())

    def resume(self, states: list[dict]) -> bool:
        """Resume from the stream states of every rank of a checkpoint (rank order). Returns whether the layout
        changed: then this layout's parts first read, split among them, what the old parts had not handed out
        of the epochs they had begun (PanopticShardStream._part_raw)."""
        layout = states[0]["layout"]
        if len(states) == self.stream.world_size and self._same_layout(states[0]):
            self.load_state_dict(states[self.stream.rank])
            return False
        if layout["seed"] != self.stream.seed:
            raise ValueError(f"the stream state was saved with stream.seed {layout['seed']} but this job has "
                             f"{self.stream.seed}: resuming with another seed would repeat and skip samples")
        if len(states) != layout["world_size"]:
            raise ValueError(f"the checkpoint holds the stream states of {len(states)} ranks but was written by "
                             f"{layout['world_size']}: resuming on another world size needs every rank's")
        history = [Generation.from_json(g) for g in states[0].get("history", [])]
        start = StreamPosition(history[-1].first_open_epoch if history else 0, 0)
        num_parts = layout["world_size"] * max(layout["num_workers"], 1)
        positions = dict.fromkeys(range(num_parts), start)
        for state in states:
            positions.update({int(w): StreamPosition(*p) for w, p in state["positions"].items()})
        self.stream.history = [*history, Generation(num_parts, layout.get("batch_size", self.stream.batch_size),
                                                    positions)]
        self.positions, self.worker_skips = {}, {}
        earlier = [dict(state.get("carried_skip_reasons", {})) for state in states]
        earlier += [reasons for state in states for reasons in state.get("skip_reasons", {}).values()]
        self.carried_skips = _summed(earlier) if self.stream.rank == 0 else {}
        return True


def _summed(tallies: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for reasons in tallies:
        for reason, count in reasons.items():
            total[reason] = total.get(reason, 0) + count
    return dict(sorted(total.items()))


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
        on_error=settings.on_error,
    )
    if rank == 0:
        log.info("training tasks of %s: %s", printable(shard_folder), describe_tasks(settings.task_thresholds,
                                                                                    stream.classes))
    return ResumableLoader(stream, settings.loader_workers)


def build_eval_loader(shard_folder: str, inputs: ModelInputs, rank: int, world_size: int, batch_size: int = 1,
                      loader_workers: int = 0, on_error: str = "skip") -> ResumableLoader:
    """One pass over a split without augmentation at original sizes, split across ranks; images are padded
    with the pixel mean (0 after the model normalises). What it skips: `ResumableLoader.skip_reasons`."""
    _check_rank(rank, world_size)
    stream = PanopticShardStream(
        shard_folder, training=False, augment_params=None, batch_size=batch_size,
        num_text_slots=inputs.num_text_slots, image_pad_value=inputs.pixel_mean,
        size_divisibility=inputs.size_divisibility, rank=rank, world_size=world_size, on_error=on_error,
    )
    return ResumableLoader(stream, loader_workers)


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
