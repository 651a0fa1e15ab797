"""COCO panoptic format: PNG encoding of segment ids, reading and writing annotation files.

A panoptic PNG stores a segment id per pixel as id = R + 256 G + 256^2 B, id 0 meaning void. The JSON lists,
per image, `segments_info` entries (id, category_id, iscrowd, area, ...) for the ids in its PNG.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# The PNG encoding lives in model/formats.py (prediction writes it too, and model/ cannot import the
# pipeline); imported here so that existing imports from this module keep working.
from model.formats import MAX_SEGMENT_ID, ids_to_rgb, write_panoptic_png  # noqa: E402, F401


class EvaluationInputError(ValueError):
    """Bad evaluation input: the message names the image and the problem."""


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> int64 segment ids [H, W]."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"rgb must be [H, W, 3], got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def read_panoptic_png(path: str | Path, out: np.ndarray | None = None) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG as uint32 [H, W], written into `out` when it is a C-contiguous
    uint32 array of that shape (a reused buffer spares the page faults of a fresh 4-byte-per-pixel array).

    Pillow keeps RGB pixels as 4 bytes in memory, so read as little-endian uint32 each pixel is
    R + 256 G + 256^2 B plus a padding byte, which one mask clears: no per-channel arithmetic."""
    with open_image(path) as image:
        if image.mode not in ("RGB", "RGBA"):
            raise EvaluationInputError(f"{path}: panoptic PNG must be RGB, got mode {image.mode}")
        try:
            if image.mode == "RGBA":
                image = image.convert("RGB")
            image.load()
        except OSError as error:  # truncated or damaged pixel data
            raise EvaluationInputError(f"{path} is not a readable image: {error}") from error
        shape = (image.height, image.width)
        if out is None or out.shape != shape or out.dtype != np.uint32 or not out.flags.c_contiguous:
            out = np.empty(shape, dtype=np.uint32)
        _mask_pixels_into(image, out)
    return out


def _mask_pixels_into(image: Image.Image, out: np.ndarray) -> None:
    pixels, export = _pixel_words(image)
    np.bitwise_and(pixels, np.uint32(MAX_SEGMENT_ID), out=out)
    del pixels, export  # the view must not outlive the export that keeps Pillow's memory alive


def _pixel_words(image: Image.Image) -> tuple[np.ndarray, object]:
    """(uint32 [H, W] view of an RGB image's pixel memory, the object keeping that memory alive).

    Pillow >= 11.2 exports its pixel memory through the Arrow C data interface without copying; older
    Pillow, or an image spread over several memory blocks, takes the copying tobytes path instead."""
    height, width = image.height, image.width
    try:
        capsule = image.im.__arrow_c_array__()
        pointer = _capsule_pointer(capsule, b"arrow_array")
    except (AttributeError, ValueError):
        capsule = pointer = None
    if pointer:
        exported = _ArrowArray.from_address(pointer)
        if exported.n_children == 1 and exported.offset == 0 and exported.length == height * width:
            bytes_array = exported.children[0].contents  # fixed-size list of 4 uint8 per pixel
            size_ok = bytes_array.length == 4 * height * width
            if bytes_array.n_buffers == 2 and bytes_array.offset == 0 and size_ok:
                words = ctypes.cast(bytes_array.buffers[1], ctypes.POINTER(ctypes.c_uint32))
                return np.ctypeslib.as_array(words, shape=(height, width)), capsule
    raw = image.tobytes("raw", "RGBX")
    return np.frombuffer(raw, dtype="<u4").reshape(height, width), raw


class _ArrowArray(ctypes.Structure):
    """struct ArrowArray of the Arrow C data interface (a stable ABI)."""


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.POINTER(_ArrowArray)),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]
# A private prototype: setting restype/argtypes on ctypes.pythonapi's shared function would leak to others.
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def load_json(path: str | Path, expected: type | tuple[type, ...] = dict, keys: Sequence[str] = ()) -> dict | list:
    """A JSON file holding an `expected` (object and/or list) with the top-level `keys`; anything else is an
    EvaluationInputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"JSON file {path} does not exist")
    try:
        with open(path, "rb") as f:
            document = json.load(f)
    except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
        raise EvaluationInputError(f"{path} is not a JSON file: {error}") from error
    if not isinstance(document, expected):
        names = {dict: "object", list: "list"}
        wanted = " or ".join(names.get(kind, kind.__name__) for kind in (expected if isinstance(expected, tuple) else (expected,)))
        raise EvaluationInputError(f"{path} must hold a JSON {wanted}, not a {names.get(type(document), type(document).__name__)}")
    missing = [key for key in keys if key not in document] if isinstance(document, dict) else []
    if missing:
        raise EvaluationInputError(f"{path} lacks the keys {missing}")
    return document


def open_image(path: str | Path) -> Image.Image:
    """Image.open that names the file when it is not an image (PIL raises OSError subclasses)."""
    try:
        return Image.open(path)
    except OSError as error:
        raise EvaluationInputError(f"{path} is not a readable image: {error}") from error


def default_folder(json_file: str | Path) -> Path:
    """panopticapi's convention: the PNGs of X.json lie in folder X."""
    return Path(str(json_file).replace(".json", ""))


def write_panoptic_predictions(
    predictions: Iterable[Mapping],
    pred_json_file: str | Path,
    pred_folder: str | Path | None = None,
    categories: Sequence[Mapping] | None = None,
) -> Path:
    """Write predictions in COCO panoptic format: one PNG per image plus one JSON.

    Each prediction maps "image_id", "ids" (int [H, W] segment ids, 0 = void) and "segments_info" (list of
    {"id", "category_id", ...}); "file_name" defaults to "<image_id>.png" (zero-padded to 12 digits when the
    id is an int, as in COCO). Returns the folder holding the PNGs (pred_json_file without .json by default).
    """
    pred_folder = default_folder(pred_json_file) if pred_folder is None else Path(pred_folder)
    pred_folder.mkdir(parents=True, exist_ok=True)
    annotations = []
    for prediction in predictions:
        image_id = prediction["image_id"]
        file_name = prediction.get("file_name") or _default_png_name(image_id)
        write_panoptic_png(pred_folder / file_name, np.asarray(prediction["ids"]))
        segments = [_jsonable_segment(segment) for segment in prediction["segments_info"]]
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
    document: dict = {"annotations": annotations}
    if categories is not None:
        document["categories"] = [dict(c) for c in categories]
    Path(pred_json_file).parent.mkdir(parents=True, exist_ok=True)
    Path(pred_json_file).write_text(json.dumps(document))
    return pred_folder


def _default_png_name(image_id) -> str:
    return f"{image_id:012d}.png" if isinstance(image_id, int) else f"{image_id}.png"


def _jsonable_segment(segment: Mapping) -> dict:
    """numpy scalars (from model post-processing) -> plain Python numbers for json."""
    return {key: value.item() if isinstance(value, np.generic) else value for key, value in segment.items()}
