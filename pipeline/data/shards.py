"""The versioned shard schema (see SCHEMA.md): encoding a sample, decoding it, the manifest.

Sample entries in a tar (WebDataset grouping by key):
    <key>.image.jpg | <key>.image.png   the original image bytes, unchanged
    <key>.seg.png                       segment-index map, 8- or 16-bit greyscale PNG (0 = void)
    <key>.meta.json                     schema version, ids, size, and the segment table
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.readers import ClassInfo
from pipeline.data.targets import SegmentTable

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_EXTENSIONS = ("image.jpg", "image.png")


CHECKSUM_KEY = "blake2b"
"""The manifest's per-shard checksum field: hex blake2b (16-byte digest) of the whole tar, beside `bytes`."""


class SchemaVersionError(RuntimeError):
    """Shards written by another schema version than this code reads."""


class ShardError(RuntimeError):
    """Shards that cannot be read as their manifest describes them; the message names the file."""


class EmptySplitError(ShardError):
    """A split with no sample to read."""


class SegmentMapError(ValueError):
    """A sample whose segment-index map does not fit its segment table."""


def printable(name: str | bytes) -> str:
    """A file name as it can be printed and logged: bytes a file system holds that are not UTF-8 (kept in a
    str as surrogate escapes, os.fsdecode) are shown as \\xNN instead of failing to encode."""
    try:
        raw = name if isinstance(name, bytes) else os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate no file system produced: show the code point
        return str(name).encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def new_checksum():
    return hashlib.blake2b(digest_size=16)


class ChecksumWriter:
    """A binary file wrapper that counts and hashes every byte written through it (tarfile writes here)."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, new_checksum(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size

    def checksum(self) -> dict:
        return {"bytes": self.size, CHECKSUM_KEY: self.digest.hexdigest()}


def file_checksum(fs, path: str) -> dict:
    """{"bytes", "blake2b"} of a file, read in 4 MB blocks."""
    digest, size = new_checksum(), 0
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            size += len(block)
    return {"bytes": size, CHECKSUM_KEY: digest.hexdigest()}


def verify_shard_bytes(data: bytes, path: str, entry: dict) -> None:
    """verify_shard for a shard already read into memory (object storage: one read, checked, then streamed)."""
    def digest() -> str:
        checksum = new_checksum()
        checksum.update(data)
        return checksum.hexdigest()

    _check_against_manifest(path, entry, len(data), digest)


def verify_shard(fs, path: str, entry: dict) -> None:
    """Raise ShardError naming the file when it is absent, or its size or checksum is not the manifest's.
    Manifests written before checksums existed have none: only the size is checked then."""
    try:
        size = fs.size(path)
    except (FileNotFoundError, OSError) as error:
        raise ShardError(f"shard {printable(path)} cannot be opened: {error}") from error
    _check_against_manifest(path, entry, size, lambda: file_checksum(fs, path)[CHECKSUM_KEY])


def _check_against_manifest(path: str, entry: dict, size: int, digest: Callable[[], str]) -> None:
    """The size, then (when the manifest has one) the checksum, computed only when the size matches."""
    if size != entry["bytes"]:
        raise ShardError(f"shard {printable(path)} has {size} bytes but the manifest says {entry['bytes']}")
    if CHECKSUM_KEY in entry and digest() != entry[CHECKSUM_KEY]:
        raise ShardError(f"shard {printable(path)} does not match its manifest checksum (damaged since written)")


def check_schema_version(found, where: str) -> None:
    if found != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has shard schema version {found!r}, but this code reads version {SCHEMA_VERSION}; "
            "re-run preprocessing with this version (preprocess.overwrite: true) to rewrite the shards"
        )


def sample_key(image_id: str) -> str:
    """A WebDataset key: no dots (they would split the extension) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", image_id)


def encode_index_map(index_map: np.ndarray) -> bytes:
    if index_map.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"index_map must be uint8 or uint16, got {index_map.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(index_map).save(buffer, format="PNG", compress_level=1)  # L or I;16 by dtype
    return buffer.getvalue()


def decode_index_map(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as png:
        png.load()
        array = np.asarray(png)
    return array if array.dtype in (np.uint8, np.uint16) else array.astype(np.uint16)


def encode_sample(
    image_id: str, image_bytes: bytes, image_ext: str, height: int, width: int,
    index_map: np.ndarray, table: SegmentTable,
) -> dict[str, bytes]:
    """The tar members of one sample (key -> bytes), ready for a tar writer."""
    meta = {
        "schema_version": SCHEMA_VERSION,
        "image_id": image_id,
        "height": height,
        "width": width,
        "segment_ids": table.segment_ids.tolist(),
        "classes": table.classes.tolist(),
        "isthing": table.isthing.astype(int).tolist(),
        "iscrowd": table.iscrowd.astype(int).tolist(),
    }
    return {
        "__key__": sample_key(image_id),
        f"image.{image_ext}": image_bytes,
        "seg.png": encode_index_map(index_map),
        "meta.json": json.dumps(meta, separators=(",", ":")).encode(),
    }


@dataclass
class DecodedSample:
    key: str
    image_id: str
    image: np.ndarray | Image.Image  # uint8 [H, W, 3] RGB (a PIL image with decode_sample(keep_pil_image=True))
    index_map: np.ndarray  # uint8/uint16 [H, W]
    table: SegmentTable


def decode_meta(raw: dict) -> dict:
    meta = json.loads(raw["meta.json"])
    check_schema_version(meta.get("schema_version"), f"sample {raw.get('__key__')!r} of {raw.get('__url__')}")
    return meta


def decode_sample(raw: dict, keep_pil_image: bool = False) -> DecodedSample:
    """A WebDataset raw sample (key -> bytes) -> arrays; raises on a corrupt member or size mismatch. With
    keep_pil_image, DecodedSample.image is the decoded PIL RGB image instead: training augmentation resizes it
    as one, so an array would only be converted straight back (a full-image copy each way)."""
    meta = decode_meta(raw)
    image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_key is None or "seg.png" not in raw:
        raise ValueError(f"sample {raw.get('__key__')!r} lacks an image or seg.png member")
    picture = Image.open(io.BytesIO(raw[image_key]))
    picture.load()  # decodes every pixel: truncated data raises here (PIL refuses truncated images by default)
    if picture.mode != "RGB":
        picture = picture.convert("RGB")
    index_map = decode_index_map(raw["seg.png"])
    if picture.size[::-1] != index_map.shape or index_map.shape != (meta["height"], meta["width"]):
        raise ValueError(
            f"sample {raw.get('__key__')!r}: image {picture.size[::-1]}, seg {index_map.shape} and meta "
            f"({meta['height']}, {meta['width']}) sizes differ"
        )
    table = SegmentTable(
        segment_ids=np.asarray(meta["segment_ids"], np.int64),
        classes=np.asarray(meta["classes"], np.int64),
        isthing=np.asarray(meta["isthing"], bool),
        iscrowd=np.asarray(meta["iscrowd"], bool),
    )
    check_segment_map(index_map, table, f"sample {raw.get('__key__')!r}")
    image = picture if keep_pil_image else np.asarray(picture)
    return DecodedSample(raw["__key__"], str(meta["image_id"]), image, index_map, table)


def check_segment_map(index_map: np.ndarray, table: SegmentTable, where: str) -> None:
    """A map value v > 0 is row v - 1 of the table: a larger value (a damaged seg.png) would index nothing
    (evaluation) or silently drop pixels from every target (training)."""
    rows = {len(table.segment_ids), len(table.classes), len(table.isthing), len(table.iscrowd)}
    if len(rows) != 1:
        raise SegmentMapError(f"{where}: the segment table's lists have different lengths {sorted(rows)}")
    largest = int(index_map.max()) if index_map.size else 0
    if largest > len(table):
        raise SegmentMapError(f"{where}: segment map value {largest} but the segment table has {len(table)} rows")


def read_manifest(fs, folder: str) -> dict:
    """Load and version-check a split's manifest. `fs` is an fsspec filesystem."""
    path = f"{folder.rstrip('/')}/{MANIFEST_NAME}"
    if not fs.exists(path):
        raise FileNotFoundError(f"no shard manifest at {path}: run preprocessing for this split first")
    with fs.open(path, "r") as handle:
        try:
            manifest = json.load(handle)
        except ValueError as error:
            raise ShardError(f"{path} is not valid JSON ({error}): re-run preprocessing for this split") from error
    if not isinstance(manifest, dict):
        raise ShardError(f"{path} is not a shard manifest (a JSON object): re-run preprocessing for this split")
    check_schema_version(manifest.get("schema_version"), path)
    return manifest


def check_not_empty(manifest: dict, folder: str) -> None:
    """Fail fast on a split with nothing to read (a stream over it would wait forever for a first batch)."""
    if not manifest.get("num_samples"):
        skipped = manifest.get("num_skipped", 0)
        why = f"all {skipped} of its images were skipped as bad input" if skipped else "it has no images"
        raise EmptySplitError(f"split {manifest.get('split')!r} at {folder} has no samples ({why}; see its "
                              f"{MANIFEST_NAME})")


def manifest_classes(manifest: dict) -> ClassInfo:
    return ClassInfo.from_json(manifest["classes"])
