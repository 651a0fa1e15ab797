"""Raw panoptic files -> versioned WebDataset shards, fanned out over Ray tasks.

Per split: `OUTPUT/{split}/{split}-000000.tar ...`, a `.done.json` beside each finished tar, and
`OUTPUT/{split}/manifest.json`. The shard assignment depends only on the annotation JSON and the input file
sizes, so a re-run recomputes the same plan and skips shards whose tar and done-marker exist. Every file is
written under a temporary name and renamed, so a shard is complete or absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image

from pipeline.data.readers import ClassInfo, RawRecord, RawSplit, read_split
from pipeline.data.settings import DatasetSettings, PreprocessSettings
from pipeline.data.shards import MANIFEST_NAME, SCHEMA_VERSION, encode_sample
from pipeline.data.targets import BadSampleError, encode_panoptic, rgb_to_ids

log = logging.getLogger(__name__)
DONE_SUFFIX = ".done.json"


class PreprocessError(RuntimeError):
    """Bad input met with on_error: fail; the message names the file and the reason."""


@dataclass(frozen=True)
class ShardPlan:
    name: str
    records: tuple[RawRecord, ...]

    @property
    def fingerprint(self) -> str:
        """Identifies the shard's inputs, so a resumed run never reuses a shard planned differently."""
        joined = "\n".join(f"{r.image_id}|{r.image_path}|{r.panoptic_path}" for r in self.records)
        return hashlib.sha256(joined.encode()).hexdigest()


def _input_bytes(record: RawRecord) -> int:
    return sum(os.path.getsize(p) if os.path.exists(p) else 0 for p in (record.image_path, record.panoptic_path))


def plan_shards(split: RawSplit, target_shard_mb: float, max_images: int | None = None) -> list[ShardPlan]:
    """Consecutive records grouped until their input bytes reach the target size (deterministic)."""
    records = split.records[:max_images] if max_images else split.records
    target = target_shard_mb * 1e6
    plans: list[ShardPlan] = []
    current: list[RawRecord] = []
    current_bytes = 0
    for record in records:
        current.append(record)
        current_bytes += _input_bytes(record)
        if current_bytes >= target:
            plans.append(ShardPlan(f"{split.name}-{len(plans):06d}.tar", tuple(current)))
            current, current_bytes = [], 0
    if current:
        plans.append(ShardPlan(f"{split.name}-{len(plans):06d}.tar", tuple(current)))
    return plans


# ---------------------------------------------------------------------------------------------- one sample
def _encode_record(record: RawRecord, classes: ClassInfo, hasher) -> dict[str, bytes]:
    """Read, validate and encode one image; raises BadSampleError with the reason."""
    try:
        with open(record.image_path, "rb") as handle:
            image_bytes = handle.read()
        with open(record.panoptic_path, "rb") as handle:
            png_bytes = handle.read()
    except OSError as error:
        raise BadSampleError(f"cannot read: {error}") from error
    hasher.update(image_bytes)
    hasher.update(png_bytes)
    try:
        with Image.open(io.BytesIO(image_bytes)) as picture:
            picture.load()
            image_format, (width, height) = picture.format, picture.size
    except Exception as error:  # PIL raises several types for truncated or foreign data
        raise BadSampleError(f"corrupt image {record.image_path}: {error}") from error
    if width == 0 or height == 0:
        raise BadSampleError(f"empty image {record.image_path}")
    try:
        with Image.open(io.BytesIO(png_bytes)) as png:
            ids = rgb_to_ids(np.asarray(png.convert("RGB")))
    except Exception as error:
        raise BadSampleError(f"corrupt panoptic PNG {record.panoptic_path}: {error}") from error
    if ids.shape != (height, width):
        raise BadSampleError(f"image is {height}x{width} but its panoptic PNG is {ids.shape[0]}x{ids.shape[1]}")
    try:
        index_map, table = encode_panoptic(ids, record.segments, classes)
    except BadSampleError as error:
        raise BadSampleError(f"{record.panoptic_path}: {error}") from error
    image_ext = "png" if image_format == "PNG" else "jpg"
    if image_format not in ("PNG", "JPEG"):
        # Keep the member's extension truthful: other formats are re-encoded losslessly as PNG.
        buffer = io.BytesIO()
        Image.open(io.BytesIO(image_bytes)).convert("RGB").save(buffer, format="PNG")
        image_bytes = buffer.getvalue()
    return encode_sample(record.image_id, image_bytes, image_ext, height, width, index_map, table)


def _write_tar(fs, path: str, samples: list[dict[str, bytes]]) -> int:
    """Write a tar atomically (temporary name, then rename); returns its size in bytes."""
    temporary = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{uuid.uuid4().hex}"
    with fs.open(temporary, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for extension in sorted(k for k in sample if k != "__key__"):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(sample[extension]), 0, 0o644
                tar.addfile(info, io.BytesIO(sample[extension]))
    fs.mv(temporary, path)
    return fs.size(path)


def _write_json(fs, path: str, document: dict) -> None:
    temporary = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{uuid.uuid4().hex}"
    with fs.open(temporary, "w") as handle:
        json.dump(document, handle, indent=1)
    fs.mv(temporary, path)


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
            problem = {"image_id": record.image_id, "file": record.image_path, "reason": str(error)}
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
    done["bytes"] = _write_tar(fs, f"{root}/{plan.name}", samples)
    _write_json(fs, f"{root}/{plan.name}{DONE_SUFFIX}", done)
    return done


def _finished(fs, root: str, plan: ShardPlan) -> dict | None:
    marker = f"{root}/{plan.name}{DONE_SUFFIX}"
    if not (fs.exists(marker) and fs.exists(f"{root}/{plan.name}")):
        return None
    with fs.open(marker, "r") as handle:
        done = json.load(handle)
    return done if done.get("fingerprint") == plan.fingerprint else None


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
            f"bad input {problem['file']} (image {problem['image_id']}): {problem['reason']} "
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
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocess_split(dataset: DatasetSettings, settings: PreprocessSettings, split_name: str) -> dict:
    """Write (or finish writing) one split's shards and manifest; returns the split's summary."""
    started = time.perf_counter()
    split = read_split(dataset, split_name)
    folder = f"{settings.output.rstrip('/')}/{split_name}"
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    plans = plan_shards(split, settings.target_shard_mb, settings.max_images)
    reused = {} if settings.overwrite else {p.name: d for p in plans if (d := _finished(fs, root, p))}
    todo = [plan for plan in plans if plan.name not in reused]
    written = {d["name"]: d for d in _write_shards(todo, split.classes, folder, settings)} if todo else {}
    shards = [reused.get(plan.name) or written[plan.name] for plan in plans]
    skipped = [problem for shard in shards for problem in shard["skipped"]]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset_format": dataset.format,
        "split": split_name,
        "num_samples": sum(shard["num_samples"] for shard in shards),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "classes": split.classes.to_json(),
        "source": {"annotation_json": split.annotation_json, "sha256": _sha256_file(split.annotation_json)},
        "shards": [
            {key: shard[key] for key in ("name", "num_samples", "bytes", "source_sha256")} for shard in shards
        ],
    }
    _write_json(fs, f"{root}/{MANIFEST_NAME}", manifest)
    return {
        "split": split_name,
        "num_samples": manifest["num_samples"],
        "num_skipped": len(skipped),
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
            "%(split)s: %(num_samples)d samples (%(num_skipped)d skipped) in %(num_shards)d shards "
            "(%(shards_written)d written, %(shards_reused)d reused) in %(seconds).1fs -> %(output)s",
            summary,
        )
    return summaries
