"""The classes a trained model predicts: names, thing flags and dataset category ids, in the model's
contiguous order 0..K-1.

Training writes them beside the model file as `classes.json` (a list of {"contiguous_id", "category_id",
"name", "isthing"}: pipeline.data.readers.ClassInfo.to_json); exports carry them inside the exported file
(model/export.py). This module reads that file format without importing the pipeline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

CLASSES_FILE_NAME = "classes.json"


class ClassesFileError(ValueError):
    """A classes file that is missing, unreadable or does not fit the model; the message names it."""


@dataclass(frozen=True)
class ModelClasses:
    names: tuple[str, ...]
    is_thing: tuple[bool, ...]
    category_ids: tuple[int, ...]
    """The dataset's category id of each contiguous class (what COCO files record)."""

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def coco_categories(self) -> list[dict]:
        return [
            {"id": cid, "name": name, "isthing": int(thing)}
            for cid, name, thing in zip(self.category_ids, self.names, self.is_thing)
        ]


def read_classes_file(path: str | os.PathLike) -> ModelClasses:
    """ModelClasses from a classes.json; raises ClassesFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ClassesFileError(f"{path}: classes file not found")
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, list) or not entries:
            raise ValueError("expected a non-empty list")
        entries = sorted(entries, key=lambda entry: int(entry["contiguous_id"]))
        classes = ModelClasses(
            names=tuple(str(entry["name"]) for entry in entries),
            is_thing=tuple(bool(entry["isthing"]) for entry in entries),
            category_ids=tuple(int(entry["category_id"]) for entry in entries),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ClassesFileError(
            f"{path}: not a classes file (a JSON list of contiguous_id, category_id, name, isthing): {error!r}"
        ) from None
    if [int(entry["contiguous_id"]) for entry in entries] != list(range(len(entries))):
        raise ClassesFileError(f"{path}: contiguous ids must be 0..K-1 without gaps")
    return classes


def classes_for_model(
    checkpoint: str | os.PathLike, num_classes: int, classes_file: str | os.PathLike | None = None
) -> ModelClasses:
    """The classes of a model file: `classes_file`, or the classes.json training wrote beside it; their
    count must be the model's."""
    path = Path(classes_file) if classes_file is not None else Path(checkpoint).parent / CLASSES_FILE_NAME
    if classes_file is None and not path.is_file():
        raise ClassesFileError(
            f"{checkpoint}: no {CLASSES_FILE_NAME} beside the model file; pass --classes FILE (the "
            f"{CLASSES_FILE_NAME} that training exports with the model)"
        )
    classes = read_classes_file(path)
    if classes.num_classes != num_classes:
        raise ClassesFileError(f"{path}: {classes.num_classes} classes, but the model predicts {num_classes}")
    return classes
