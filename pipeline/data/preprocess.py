"""Raw panoptic files -> versioned WebDataset shards, fanned out over Ray tasks.

Per split: `OUTPUT/{split}/{split}-000000.tar ...`, a `.done.json` beside each finished tar, and
`OUTPUT/{split}/manifest.json`. The shard assignment depends only on the annotation JSON and the input file
sizes, so a re-run recomputes the same plan and reuses a shard whose done-marker has the plan's fingerprint
(the records and the size and modification time of every input file: a fixed input is re-read) and whose tar
still has the recorded size and checksum. Every file is written under a temporary name and renamed, so a
shard is complete or absent; temporaries a killed run left behind are removed by the next run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import tarfile
import time
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from pipeline.data import raw_files
from pipeline.data.readers import (
    SOURCE_INSTANCES,
    SOURCE_PANOPTIC,
    SOURCE_SEMANTIC,
    ClassInfo,
    RawRecord,
    RawSplit,
    read_split,
)
from pipeline.data.settings import DatasetSettings, PreprocessSettings
from pipeline.data.shards import (
    CHECKSUM_KEY,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ChecksumWriter,
    ShardError,
    encode_sample,
    printable,
    verify_shard,
)
from pipeline.data.targets import BadSampleError, encode_panoptic, rgb_to_ids

log = logging.getLogger(__name__)
DONE_SUFFIX = ".done.json"
TEMPORARY_MARKER = ".tmp-"
ORPHAN_AGE_SECONDS = 3600
"""A temporary file of another machine's writer is taken for an orphan once untouched this long."""


class PreprocessError(RuntimeError):
    """Bad input met with on_error: fail, or a split with nothing to write; the message names the file or
    split and the reason."""


@dataclass(frozen=True)
class ShardPlan:
    name: str
    records: tuple[RawRecord, ...]
    fingerprint: str = ""
    """Identifies what the shard is made of (records, input file sizes and modification times), so a re-run
    reuses a shard only when none of it changed."""


def _record_state(record: RawRecord) -> list:
    """Everything about a record that its shard depends on. JSON with ensure_ascii keeps any name (also the
    surrogate escapes of non-UTF-8 bytes) encodable."""
    state = [record.image_id, record.image_path, record.panoptic_path, record.height, record.width,
             list(record.segments), raw_files.file_state(record.image_path),
             raw_files.file_state(record.panoptic_path)]
    if record.source != SOURCE_PANOPTIC:  # panoptic records keep the fingerprints earlier versions wrote
        state += [record.source, record.label_path, raw_files.file_state(record.label_path), record.ignore_label]
    return state


def _input_bytes(record: RawRecord) -> int:
    files = (raw_files.file_state(path) for path in (record.image_path, record.annotation_path) if path)
    return sum(file[0] for file in files if file is not None)


def _fingerprint(states: list[list]) -> str:
    document = json.dumps([SCHEMA_VERSION, states], ensure_ascii=True, sort_keys=True)
    return hashlib.sha256(document.encode("ascii")).hexdigest()


def plan_shards(split: RawSplit, target_shard_mb: float, max_images: int | None = None) -> list[ShardPlan]:
    """Consecutive records grouped until their input bytes reach the target size (deterministic)."""
    records = split.records[:max_images] if max_images else split.records
    target = target_shard_mb * 1e6
    plans: list[ShardPlan] = []
    current: list[RawRecord] = []
    states: list[list] = []
    current_bytes = 0

    def close_shard() -> None:
        plans.append(ShardPlan(f"{split.name}-{len(plans):06d}.tar", tuple(current), _fingerprint(states)))

    for record in records:
        current.append(record)
        states.append(_record_state(record))
        current_bytes += _input_bytes(record)
        if current_bytes >= target:
            close_shard()
            current, states, current_bytes = [], [], 0
    if current:
        close_shard()
    return plans


# ---------------------------------------------------------------------------------------------- one sample
def _read_inputs(record: RawRecord, hasher) -> tuple[bytes, bytes]:
    """The image's bytes and those of its pixel annotation (b"" when the JSON holds it), both hashed."""
    try:
        image_bytes = raw_files.read_bytes(record.image_path)
        annotation_bytes = raw_files.read_bytes(record.annotation_path) if record.annotation_path else b""
    except raw_files.read_errors() as error:
        raise BadSampleError(f"cannot read: {printable(str(error))}") from error
    hasher.update(image_bytes)
    hasher.update(annotation_bytes)
    if record.source == SOURCE_INSTANCES:
        hasher.update(json.dumps(record.segments, sort_keys=True).encode())
    return image_bytes, annotation_bytes


def _panoptic_ids(record: RawRecord, png_bytes: bytes, classes: ClassInfo):
    try:
        with Image.open(io.BytesIO(png_bytes)) as png:
            return rgb_to_ids(np.asarray(png.convert("RGB"))), record.segments
    except Exception as error:
        raise BadSampleError(f"corrupt panoptic PNG {printable(record.panoptic_path)}: {error}") from error


def _instance_mask(segmentation, height: int, width: int) -> np.ndarray:
    """bool [H, W] of COCO polygons, uncompressed RLE (counts a list) or compressed RLE (counts a string)."""
    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_util.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return mask_util.decode(rle).astype(bool)


def instance_ids(segments: tuple[dict, ...], height: int, width: int) -> np.ndarray:
    """The id map of instance annotations: where they overlap, the smaller (fewer pixels) lies on top, and of
    two equal ones the later annotation id; pixels of no instance are void (0). Crowd regions are segments
    like any other (iscrowd stays in the table)."""
    masks = [_instance_mask(segment["segmentation"], height, width) for segment in segments]
    areas = [int(mask.sum()) for mask in masks]
    ids = np.zeros((height, width), np.int64)
    for index in sorted(range(len(segments)), key=lambda i: (-areas[i], segments[i]["id"])):
        ids[masks[index]] = segments[index]["id"]
    return ids


def _instances_ids(record: RawRecord, _: bytes, classes: ClassInfo):
    try:
        return instance_ids(record.segments, record.height, record.width), record.segments
    except Exception as error:  # pycocotools raises plain exceptions for malformed counts
        raise BadSampleError(f"instance annotations do not decode: {error}") from error


LABEL_PNG_MODES = ("L", "P", "I", "I;16")
"""Single-channel PNG modes: the pixel value (for palette PNGs the index) is the label."""


def _semantic_ids(record: RawRecord, png_bytes: bytes, classes: ClassInfo):
    """Label PNG -> ids (label value + 1, ignore_label -> 0 void) and one stuff segment per class present."""
    try:
        with Image.open(io.BytesIO(png_bytes)) as png:
            png.load()
            mode, labels = png.mode, np.asarray(png).astype(np.int64)
    except Exception as error:
        raise BadSampleError(f"corrupt label PNG {printable(record.label_path)}: {error}") from error
    if mode not in LABEL_PNG_MODES:
        raise BadSampleError(f"label PNG {printable(record.label_path)} has mode {mode}; a label PNG has one "
                             f"channel ({', '.join(LABEL_PNG_MODES)})")
    ignore_label = record.ignore_label
    present = [int(v) for v in np.unique(labels) if v != ignore_label]
    unknown = sorted(set(present) - set(classes.category_ids))
    if unknown:
        raise BadSampleError(f"{printable(record.label_path)}: label values {unknown[:5]} are not in the "
                             "class list (nor the ignore label)")
    ids = np.where(labels == ignore_label, 0, labels + 1)
    return ids, tuple({"id": value + 1, "category_id": value, "iscrowd": 0} for value in present)


ANNOTATION_DECODERS = {
    SOURCE_PANOPTIC: _panoptic_ids, SOURCE_INSTANCES: _instances_ids, SOURCE_SEMANTIC: _semantic_ids,
}
"""Each source's pixels -> (raw id map [H, W], segments {"id", "category_id", "iscrowd"}), the one form
encode_panoptic takes, so every format becomes the same shard schema."""


def _encode_record(record: RawRecord, classes: ClassInfo, hasher) -> dict[str, bytes]:
    """Read, validate and encode one image; raises BadSampleError with the reason."""
    image_bytes, annotation_bytes = _read_inputs(record, hasher)
    try:
        with Image.open(io.BytesIO(image_bytes)) as picture:
            picture.load()
            image_format, (width, height) = picture.format, picture.size
    except Exception as error:  # PIL raises several types for truncated or foreign data
        raise BadSampleError(f"corrupt image {printable(record.image_path)}: {error}") from error
    if width == 0 or height == 0:
        raise BadSampleError(f"empty image {printable(record.image_path)}")
    if record.source == SOURCE_INSTANCES and (record.height, record.width) != (height, width):
        raise BadSampleError(f"image is {height}x{width} but the annotation JSON says "
                             f"{record.height}x{record.width}")
    ids, segments = ANNOTATION_DECODERS[record.source](record, annotation_bytes, classes)
    if ids.shape != (height, width):
        raise BadSampleError(f"image is {height}x{width} but its {record.source} annotation is "
                             f"{ids.shape[0]}x{ids.shape[1]}")
    try:
        index_map, table = encode_panoptic(ids, segments, classes)
    except BadSampleError as error:
        raise BadSampleError(f"{printable(record.annotation_path or record.image_path)}: {error}") from error
    image_ext = "png" if image_format == "PNG" else "jpg"
    if image_format not in ("PNG", "JPEG"):
        # Keep the member's extension truthful: other formats are re-encoded losslessly as PNG.
        buffer = io.BytesIO()
        Image.open(io.BytesIO(image_bytes)).convert("RGB").save(buffer, format="PNG")
        image_bytes = buffer.getvalue()
    return encode_sample(record.image_id, image_bytes, image_ext, height, width, index_map, table)


def _temporary_name(path: str) -> str:
    """A hidden name beside `path` saying who writes it (host, pid), so the next run can tell an orphan."""
    writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    return f"{os.path.dirname(path)}/.{os.path.basename(path)}{TEMPORARY_MARKER}{writer}"


def _write_tar(fs, path: str, samples: list[dict[str, bytes]]) -> dict:
    """Write a tar atomically (temporary name, then rename); returns its {"bytes", "blake2b"}."""
    temporary = _temporary_name(path)
    with fs.open(temporary, "wb") as handle:
        counted = ChecksumWriter(handle)
        with tarfile.open(fileobj=counted, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for extension in sorted(k for k in sample if k != "__key__"):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size, info.mtime, info.mode = len(sample[extension]), 0, 0o644
                    tar.addfile(info, io.BytesIO(sample[extension]))
    fs.mv(temporary, path)
    return counted.checksum()


def _write_json(fs, path: str, document: dict) -> None:
    temporary = _temporary_name(path)
    with fs.open(temporary, "w") as handle:
        json.dump(document, handle, indent=1)
    fs.mv(temporary, path)


def _is_orphan(fs, path: str) -> bool:
    """A temporary file whose writer is gone: a process of this host that no longer runs, or (another host's,
    or an older naming) untouched for ORPHAN_AGE_SECONDS."""
    writer = os.path.basename(path).rsplit(TEMPORARY_MARKER, 1)[-1].rsplit("-", 2)
    if len(writer) == 3 and writer[0] == socket.gethostname() and writer[1].isdigit():
        return not _process_exists(int(writer[1]))
    try:
        return time.time() - fs.modified(path).timestamp() > ORPHAN_AGE_SECONDS
    except (NotImplementedError, OSError, AttributeError):  # a store without modification times: keep it
        return False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_orphan_temporaries(fs, root: str) -> list[str]:
    """Delete the temporary files killed runs left in a split folder; returns their paths."""
    removed = []
    for path in fs.glob(f"{root}/.*{TEMPORARY_MARKER}*"):
        if _is_orphan(fs, path):
            fs.rm(path)
            removed.append(path)
    if removed:
        log.info("removed %d temporary files of an interrupted run in %s", len(removed), printable(root))
    return removed


def write_shard(plan: ShardPlan, classes: ClassInfo, folder: str, on_error: str) -> dict:
    """Encode and write one shard; the body of a Ray task. Returns its done-record, or one with `error`
    set (and nothing written) when on_error is 'fail' and a sample is bad."""
    fs, root = fsspec.core.url_to_fs(folder)
    hasher = hashlib.sha256()
    samples, skipped = [], []
    for record in plan.records:
        try:
            samples.append(_encode_record(record, classes, hasher))
        except BadSampleError as error:
            problem = {"image_id": printable(record.image_id), "file": printable(record.image_path),
                       "reason": str(error)}
            if on_error == "fail":
                return {"name": plan.name, "error": problem}
            skipped.append(problem)
    done = {
        "name": plan.name,
        "fingerprint": plan.fingerprint,
        "num_samples": len(samples),
        "skipped": skipped,
        "source_sha256": hasher.hexdigest(),
        "image_ids": [sample["__key__"] for sample in samples],
    }
    done.update(_write_tar(fs, f"{root}/{plan.name}", samples))
    _write_json(fs, f"{root}/{plan.name}{DONE_SUFFIX}", done)
    return done


def _finished(fs, root: str, plan: ShardPlan) -> dict | None:
    """The done-record of a shard an earlier run wrote from exactly these inputs, if its tar is intact."""
    marker = f"{root}/{plan.name}{DONE_SUFFIX}"
    if not (fs.exists(marker) and fs.exists(f"{root}/{plan.name}")):
        return None
    try:
        with fs.open(marker, "r") as handle:
            done = json.load(handle)
    except ValueError:  # a damaged marker: write the shard again
        return None
    if done.get("fingerprint") != plan.fingerprint or CHECKSUM_KEY not in done:
        return None
    try:
        verify_shard(fs, f"{root}/{plan.name}", done)
    except ShardError as error:
        log.warning("rewriting %s: %s", plan.name, error)
        return None
    return done


# ---------------------------------------------------------------------------------------------- driver
def _ensure_ray(address: str | None) -> bool:
    """Connect to Ray; returns True when this call started it (and so should shut it down)."""
    from pipeline.cluster import connect_ray

    return connect_ray(address, log_to_driver=False)


def _run_shard_tasks(plans: list[ShardPlan], classes: ClassInfo, folder: str, settings: PreprocessSettings):
    import ray
    from tqdm import tqdm

    remote_write = ray.remote(num_cpus=1)(write_shard)
    classes_ref = ray.put(classes)
    limit = settings.max_parallel_tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending, results, queue = {}, [], list(plans)
    progress = tqdm(total=len(plans), desc=f"shards {os.path.basename(folder)}", disable=not settings.show_progress)
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                plan = queue.pop(0)
                pending[remote_write.remote(plan, classes_ref, folder, settings.on_error)] = plan
            ready, _ = ray.wait(list(pending), num_returns=1)
            for reference in ready:
                pending.pop(reference)
                result = ray.get(reference)
                _raise_bad_input(result)
                results.append(result)
                progress.update(1)
    finally:
        for reference in pending:
            ray.cancel(reference)
        progress.close()
    return results


def _raise_bad_input(result: dict) -> None:
    if "error" in result:
        problem = result["error"]
        raise PreprocessError(
            f"bad input {printable(problem['file'])} (image {printable(problem['image_id'])}): {problem['reason']} "
            "(set preprocess.on_error: skip to leave such samples out)"
        )


def _write_shards(plans: list[ShardPlan], classes: ClassInfo, folder: str, settings: PreprocessSettings):
    if settings.executor == "ray":
        return _run_shard_tasks(plans, classes, folder, settings)
    results = []
    for plan in plans:
        results.append(write_shard(plan, classes, folder, settings.on_error))
        _raise_bad_input(results[-1])
    return results


def _sha256_file(path: str) -> str:
    return hashlib.sha256(raw_files.read_bytes(path)).hexdigest()


def _printable_problems(problems: tuple[dict, ...]) -> list[dict]:
    return [{key: printable(value) if isinstance(value, str) else value for key, value in problem.items()}
            for problem in problems]


def _check_annotations(split: RawSplit, on_error: str) -> None:
    """Annotations that cannot be drawn (coco_instances): the first one ends the run under on_error 'fail';
    under 'skip' they are left out, logged here and listed in the manifest."""
    bad = split.bad_annotations
    if not bad:
        return
    first = bad[0]
    where = (f"annotation {first['annotation_id']!r} of image {printable(first['image_id'])} in "
             f"{printable(first['file'])}: {first['reason']}")
    if on_error == "fail":
        raise PreprocessError(f"bad annotation {where} ({len(bad)} bad annotations in split {split.name!r}; "
                              "set preprocess.on_error: skip to leave them out, counted in the manifest)")
    log.warning("%s: leaving out %d bad annotations (listed in the manifest); the first, %s", split.name,
                len(bad), where)


def _unannotated_note(split: RawSplit) -> str:
    if not split.unannotated:
        return ""
    return (f" ({len(split.unannotated)} images, none with a usable annotation; "
            f"{len(split.bad_annotations)} annotations were bad)")


def preprocess_split(dataset: DatasetSettings, settings: PreprocessSettings, split_name: str) -> dict:
    """Write (or finish writing) one split's shards and manifest; returns the split's summary."""
    started = time.perf_counter()
    raw_files.forget_listings()
    split = read_split(dataset, split_name)
    _check_annotations(split, settings.on_error)
    if not split.records:
        raise PreprocessError(f"split {split_name!r} has no images: {printable(split.annotation_json)} lists no "
                              "annotations" + _unannotated_note(split))
    folder = f"{settings.output.rstrip('/')}/{split_name}"
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    remove_orphan_temporaries(fs, root)
    plans = plan_shards(split, settings.target_shard_mb, settings.max_images)
    reused = {} if settings.overwrite else {p.name: d for p in plans if (d := _finished(fs, root, p))}
    todo = [plan for plan in plans if plan.name not in reused]
    written = {d["name"]: d for d in _write_shards(todo, split.classes, folder, settings)} if todo else {}
    shards = [reused.get(plan.name) or written[plan.name] for plan in plans]
    skipped = [problem for shard in shards for problem in shard["skipped"]]
    skipped += _printable_problems(split.unannotated)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset_format": dataset.format,
        "split": split_name,
        "num_samples": sum(shard["num_samples"] for shard in shards),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_skipped_annotations": len(split.bad_annotations),
        "skipped_annotations": _printable_problems(split.bad_annotations),
        "classes": split.classes.to_json(),
        "source": {"annotation_json": split.annotation_json, "sha256": _sha256_file(split.annotation_json)},
        "shards": [
            {key: shard[key] for key in ("name", "num_samples", "bytes", CHECKSUM_KEY, "source_sha256")}
            for shard in shards
        ],
    }
    _write_json(fs, f"{root}/{MANIFEST_NAME}", manifest)
    if not manifest["num_samples"]:
        first = skipped[0]
        raise PreprocessError(
            f"split {split_name!r}: all {len(skipped)} images are bad input (reasons in "
            f"{printable(root)}/{MANIFEST_NAME}); the first, {first['file']}: {first['reason']}")
    return {
        "split": split_name,
        "num_samples": manifest["num_samples"],
        "num_skipped": len(skipped),
        "num_skipped_annotations": len(split.bad_annotations),
        "num_shards": len(plans),
        "shards_written": len(todo),
        "shards_reused": len(reused),
        "seconds": round(time.perf_counter() - started, 2),
        "output": folder,
    }


def run_preprocess(dataset: DatasetSettings, settings: PreprocessSettings) -> list[dict]:
    """Preprocess every configured split over Ray tasks; returns one summary dict per split."""
    started_ray = settings.executor == "ray" and _ensure_ray(settings.ray_address)
    try:
        summaries = [
            preprocess_split(dataset, settings, name)
            for name in (settings.splits or [dataset.train_split, dataset.val_split])
        ]
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    for summary in summaries:
        log.info(
            "%(split)s: %(num_samples)d samples (%(num_skipped)d skipped, %(num_skipped_annotations)d bad "
            "annotations left out) in %(num_shards)d shards "
            "(%(shards_written)d written, %(shards_reused)d reused) in %(seconds).1fs -> %(output)s",
            summary,
        )
    return summaries
