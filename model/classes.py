"""The classes a trained model predicts: names, thing flags and dataset category ids, in the model's
contiguous order 0..K-1.

One format, the JSON entries form: a list of {"contiguous_id", "category_id", "name", "isthing"}, what
pipeline.data.readers.ClassInfo.to_json writes and `ModelClasses.to_json` writes too. It travels
- inside the model file (model/checkpoint.py, key "classes"), when the classes are known;
- beside it as `classes.json` (training exports it there too, for older readers);
- inside exported files (model/export.py).
This module reads the format without importing the pipeline; `classes_for_model` says which source a model
file's classes come from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLASSES_FILE_NAME = "classes.json"


class ClassesFileError(ValueError):
    """Class metadata that is missing, unreadable or does not fit the model; the message names its source."""


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

    def to_json(self) -> list[dict]:
        """The JSON entries form (the same list as ClassInfo.to_json)."""
        return [
            {"contiguous_id": index, "category_id": cid, "name": name, "isthing": thing}
            for index, (cid, name, thing) in enumerate(zip(self.category_ids, self.names, self.is_thing))
        ]

    @classmethod
    def from_json(cls, entries: Sequence[dict], source: str) -> ModelClasses:
        """ModelClasses from the JSON entries form; raises ClassesFileError naming `source`."""
        try:
            if not isinstance(entries, list) or not entries:
                raise ValueError("expected a non-empty list")
            entries = sorted(entries, key=lambda entry: int(entry["contiguous_id"]))
            classes = cls(
                names=tuple(str(entry["name"]) for entry in entries),
                is_thing=tuple(bool(entry["isthing"]) for entry in entries),
                category_ids=tuple(int(entry["category_id"]) for entry in entries),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ClassesFileError(
                f"{source}: not class metadata (a JSON list of contiguous_id, category_id, name, isthing): "
                f"{error!r}"
            ) from None
        if [int(entry["contiguous_id"]) for entry in entries] != list(range(len(entries))):
            raise ClassesFileError(f"{source}: contiguous ids must be 0..K-1 without gaps")
        return classes


def read_classes_file(path: str | os.PathLike) -> ModelClasses:
    """ModelClasses from a classes.json; raises ClassesFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ClassesFileError(f"{path}: classes file not found")
    try:
        entries = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ClassesFileError(f"{path}: not a JSON file ({error})") from None
    return ModelClasses.from_json(entries, str(path))


def known_classes(checkpoint: str | os.PathLike) -> tuple[ModelClasses, str] | None:
    """(classes, where they come from) of a model file when it says: the classes inside it, else the
    classes.json beside it; None when neither is there."""
    from model.checkpoint import read_classes

    inside = read_classes(checkpoint)
    if inside is not None:
        return inside, str(checkpoint)
    beside = Path(checkpoint).parent / CLASSES_FILE_NAME
    if beside.is_file():
        return read_classes_file(beside), str(beside)
    return None


def classes_for_model(
    checkpoint: str | os.PathLike, num_classes: int, classes_file: str | os.PathLike | None = None
) -> ModelClasses:
    """The classes of a model file: `classes_file`, else the model file's own, else the classes.json
    training wrote beside it; their count must be the model's."""
    if classes_file is not None:
        classes, source = read_classes_file(classes_file), str(classes_file)
    else:
        known = known_classes(checkpoint)
        if known is None:
            raise ClassesFileError(
                f"{checkpoint}: the model file names no classes and has no {CLASSES_FILE_NAME} beside it; "
                f"pass --classes FILE (a {CLASSES_FILE_NAME}: contiguous_id, category_id, name, isthing)"
            )
        classes, source = known
    if classes.num_classes != num_classes:
        raise ClassesFileError(
            f"{source}: {classes.num_classes} classes, but the model predicts {num_classes}"
        )
    return classes
