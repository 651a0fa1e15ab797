"""Readers for raw panoptic datasets in COCO panoptic layout (COCO 2017, the detectron2 ADE20K-150 panoptic
conversion, the cityscapesscripts gtFine panoptic export, any custom COCO-panoptic dataset).

A reader yields one `RawRecord` per image (paths and the segments table from the JSON) plus the dataset's
`ClassInfo`, read from the JSON's categories: contiguous ids follow the sorted category ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pipeline.data.settings import DatasetSettings, SplitPaths


@dataclass(frozen=True)
class ClassInfo:
    """Class metadata in contiguous order 0..K-1 (sorted by the dataset's category id)."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    isthing: tuple[bool, ...]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def contiguous_id(self, category_id: int) -> int:
        lookup = {cid: index for index, cid in enumerate(self.category_ids)}
        if category_id not in lookup:
            raise KeyError(category_id)
        return lookup[category_id]

    def to_json(self) -> list[dict]:
        return [
            {"contiguous_id": index, "category_id": cid, "name": name, "isthing": thing}
            for index, (cid, name, thing) in enumerate(zip(self.category_ids, self.names, self.isthing))
        ]

    @classmethod
    def from_json(cls, entries: list[dict]) -> ClassInfo:
        ordered = sorted(entries, key=lambda entry: entry["contiguous_id"])
        return cls(
            category_ids=tuple(int(e["category_id"]) for e in ordered),
            names=tuple(str(e["name"]) for e in ordered),
            isthing=tuple(bool(e["isthing"]) for e in ordered),
        )

    @classmethod
    def from_categories(cls, categories: list[dict]) -> ClassInfo:
        """From a COCO-panoptic `categories` list (any order; ids need not be contiguous)."""
        if not categories:
            raise ValueError("the annotation JSON has no categories")
        ordered = sorted(categories, key=lambda category: int(category["id"]))
        ids = [int(category["id"]) for category in ordered]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate category ids in the annotation JSON: {ids}")
        return cls(
            category_ids=tuple(ids),
            names=tuple(str(category["name"]) for category in ordered),
            isthing=tuple(bool(category.get("isthing", 0)) for category in ordered),
        )


@dataclass(frozen=True)
class RawRecord:
    """One image of a raw split: where its files are and its segments table as the JSON gives it."""

    image_id: str
    image_path: str
    panoptic_path: str
    height: int
    width: int
    segments: tuple[dict, ...]  # each {"id", "category_id", "iscrowd"}


@dataclass(frozen=True)
class RawSplit:
    name: str
    annotation_json: str
    classes: ClassInfo
    records: tuple[RawRecord, ...]


def _coco_split_name(split: str) -> str:
    return split if split[-1:].isdigit() else f"{split}2017"


def default_split_paths(dataset_format: str, split: str) -> SplitPaths:
    """The standard layout of each format, relative to the dataset root."""
    if dataset_format == "coco_panoptic":
        name = _coco_split_name(split)
        return SplitPaths(
            image_dir=name,
            annotation_json=f"annotations/panoptic_{name}.json",
            panoptic_dir=f"annotations/panoptic_{name}",
        )
    if dataset_format == "ade20k_panoptic":
        image_folder = {"train": "training", "val": "validation"}.get(split, split)
        return SplitPaths(
            image_dir=f"images/{image_folder}",
            annotation_json=f"ade20k_panoptic_{split}.json",
            panoptic_dir=f"ade20k_panoptic_{split}",
        )
    if dataset_format == "cityscapes_panoptic":
        return SplitPaths(
            image_dir=f"leftImg8bit/{split}",
            annotation_json=f"gtFine/cityscapes_panoptic_{split}.json",
            panoptic_dir=f"gtFine/cityscapes_panoptic_{split}",
        )
    if dataset_format == "custom_coco_panoptic":
        return SplitPaths(
            image_dir=split,
            annotation_json=f"annotations/panoptic_{split}.json",
            panoptic_dir=f"annotations/panoptic_{split}",
        )
    raise ValueError(f"unknown dataset format {dataset_format!r}")


def resolve_split_paths(settings: DatasetSettings, split: str) -> SplitPaths:
    """Absolute paths of a split: the format's layout, overridden by settings.splits[split]."""
    default = default_split_paths(settings.format, split)
    override = settings.splits.get(split, SplitPaths())
    merged = {
        field: getattr(override, field) or getattr(default, field) for field in SplitPaths.model_fields
    }
    return SplitPaths(**{field: os.path.join(settings.root, path) for field, path in merged.items()})


def _image_path(dataset_format: str, image_dir: str, file_name: str) -> str:
    if dataset_format == "cityscapes_panoptic" and os.sep not in file_name:
        # gtFine export names images "{city}_{seq}_{frame}_leftImg8bit.png"; they live in a folder per city.
        return os.path.join(image_dir, file_name.split("_")[0], file_name)
    return os.path.join(image_dir, file_name)


def read_split(settings: DatasetSettings, split: str) -> RawSplit:
    """Read a split's annotation JSON into records and class metadata (no image is opened here)."""
    paths = resolve_split_paths(settings, split)
    if not os.path.isfile(paths.annotation_json):
        raise FileNotFoundError(
            f"annotation JSON of split {split!r} not found at {paths.annotation_json} "
            f"(format {settings.format}; override with data.splits.{split}.annotation_json)"
        )
    with open(paths.annotation_json) as handle:
        document = json.load(handle)
    classes = ClassInfo.from_categories(document.get("categories", []))
    if settings.expected_num_classes is not None and classes.num_classes != settings.expected_num_classes:
        raise ValueError(
            f"{paths.annotation_json} has {classes.num_classes} categories but data.expected_num_classes "
            f"is {settings.expected_num_classes}"
        )
    images = {str(image["id"]): image for image in document.get("images", [])}
    records = []
    for annotation in document.get("annotations", []):
        image_id = str(annotation["image_id"])
        image = images.get(image_id)
        if image is None:
            raise ValueError(f"{paths.annotation_json}: annotation for unknown image id {image_id!r}")
        records.append(
            RawRecord(
                image_id=image_id,
                image_path=_image_path(settings.format, paths.image_dir, image["file_name"]),
                panoptic_path=os.path.join(paths.panoptic_dir, annotation["file_name"]),
                height=int(image.get("height", 0)),
                width=int(image.get("width", 0)),
                segments=tuple(
                    {"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": int(s.get("iscrowd", 0))}
                    for s in annotation.get("segments_info", [])
                ),
            )
        )
    return RawSplit(name=split, annotation_json=paths.annotation_json, classes=classes, records=tuple(records))
