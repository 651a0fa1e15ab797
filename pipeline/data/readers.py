"""Readers for raw datasets: COCO panoptic layout (COCO 2017, the detectron2 ADE20K-150 panoptic conversion,
the cityscapesscripts gtFine panoptic export, any custom COCO-panoptic dataset), COCO instance JSON and
semantic label PNGs.

A reader yields one `RawRecord` per image (paths and the segments table from the JSON) plus the dataset's
`ClassInfo`, read from the data (the JSON's categories, or the class-list file of semantic PNGs): contiguous
ids follow the sorted category ids. No image is opened here; preprocessing turns every source into the same
segment map (pipeline/data/preprocess.py). Annotations of a COCO instance JSON that cannot be drawn are not
records' segments: they are returned as `RawSplit.bad_annotations`, each with its reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from numbers import Real

from pipeline.data import raw_files
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


    @classmethod
    def from_class_list(cls, path: str, ignore_label: int) -> ClassInfo:
        """From a text file naming one class per line: line i (from 0) is label value i; the line of
        `ignore_label`, if the file has one, names no class. Every class is stuff (a label PNG has no
        instances)."""
        if not raw_files.is_file(path):
            raise FileNotFoundError(f"class list {path} not found (set data.class_list)")
        lines = [line.strip() for line in raw_files.read_text(path).rstrip().splitlines()]
        blank = [number for number, line in enumerate(lines, 1) if not line]
        if blank:
            raise ValueError(f"{path}: line {blank[0]} is blank (line i names label value i - 1; no gaps)")
        values = [value for value in range(len(lines)) if value != ignore_label]
        if not values:
            raise ValueError(f"{path}: names no class besides the ignore label {ignore_label}")
        return cls(category_ids=tuple(values), names=tuple(lines[v] for v in values),
                   isthing=(False,) * len(values))


SOURCE_PANOPTIC, SOURCE_INSTANCES, SOURCE_SEMANTIC = "panoptic", "instances", "semantic"
"""What a record's pixels come from: a panoptic PNG, instance annotations of the JSON, a label PNG."""


@dataclass(frozen=True)
class RawRecord:
    """One image of a raw split: where its files are and its segments table as the annotation gives it."""

    image_id: str
    image_path: str
    panoptic_path: str  # the panoptic PNG; "" for the other sources
    height: int
    width: int
    segments: tuple[dict, ...]  # each {"id", "category_id", "iscrowd"}; instances also "segmentation"
    label_path: str = ""  # semantic_png: the label PNG
    source: str = SOURCE_PANOPTIC
    ignore_label: int | None = None  # semantic_png: the label value of void pixels

    @property
    def annotation_path(self) -> str:
        """The file holding the record's pixel annotation, "" when the annotation JSON itself does."""
        return self.panoptic_path or self.label_path


@dataclass(frozen=True)
class RawSplit:
    name: str
    annotation_json: str  # the file the split's annotations come from (semantic_png: the class list)
    classes: ClassInfo
    records: tuple[RawRecord, ...]
    bad_annotations: tuple[dict, ...] = ()
    """coco_instances: {"image_id", "annotation_id", "file", "reason"} of each annotation left out."""
    unannotated: tuple[dict, ...] = ()
    """coco_instances: {"image_id", "file", "reason"} of images with no usable annotation (all void)."""


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
    if dataset_format == "coco_instances":  # split "train2017" gives COCO 2017's own layout
        return SplitPaths(image_dir=split, annotation_json=f"annotations/instances_{split}.json")
    if dataset_format == "semantic_png":
        return SplitPaths(image_dir=f"images/{split}", label_dir=f"labels/{split}")
    raise ValueError(f"unknown dataset format {dataset_format!r}")


def resolve_split_paths(settings: DatasetSettings, split: str) -> SplitPaths:
    """Absolute paths of a split: the format's layout, overridden by settings.splits[split]."""
    default = default_split_paths(settings.format, split)
    override = settings.splits.get(split, SplitPaths())
    merged = {
        field: getattr(override, field) or getattr(default, field) for field in SplitPaths.model_fields
    }
    return SplitPaths(**{field: path and os.path.join(settings.root, path) for field, path in merged.items()})


def _image_path(dataset_format: str, image_dir: str, file_name: str) -> str:
    if dataset_format == "cityscapes_panoptic" and os.sep not in file_name:
        # gtFine export names images "{city}_{seq}_{frame}_leftImg8bit.png"; they live in a folder per city.
        return os.path.join(image_dir, file_name.split("_")[0], file_name)
    return os.path.join(image_dir, file_name)


def read_split(settings: DatasetSettings, split: str) -> RawSplit:
    """Read a split's annotations into records and class metadata (no image is opened here)."""
    paths = resolve_split_paths(settings, split)
    if settings.format == "semantic_png":
        return _read_semantic_split(settings, split, paths)
    if not raw_files.is_file(paths.annotation_json):
        raise FileNotFoundError(
            f"annotation JSON of split {split!r} not found at {paths.annotation_json} "
            f"(format {settings.format}; override with data.splits.{split}.annotation_json)"
        )
    document = json.loads(raw_files.read_text(paths.annotation_json))
    if settings.format == "coco_instances":
        classes = ClassInfo.from_categories([{**c, "isthing": 1} for c in document.get("categories", [])])
    else:
        classes = ClassInfo.from_categories(document.get("categories", []))
    _check_class_count(settings, classes, paths.annotation_json)
    if settings.format == "coco_instances":
        return _read_instance_split(document, split, paths, classes)
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


def _check_class_count(settings: DatasetSettings, classes: ClassInfo, source: str) -> None:
    if settings.expected_num_classes is not None and classes.num_classes != settings.expected_num_classes:
        raise ValueError(
            f"{source} has {classes.num_classes} categories but data.expected_num_classes "
            f"is {settings.expected_num_classes}"
        )


# --------------------------------------------------------------------------------------------- COCO instances
BOX_TOLERANCE = 1.0
"""Pixels a box may reach past the image border (annotation tools round outward) before it is bad."""


def _instance_problem(annotation: dict, image: dict | None, category_ids: set[int],
                      seen_ids: set) -> str | None:
    """Why an instance annotation cannot be drawn, or None when it can."""
    annotation_id = annotation.get("id")
    if not isinstance(annotation_id, int) or isinstance(annotation_id, bool) or annotation_id < 1:
        return f"annotation id {annotation_id!r} is not a positive integer"
    if annotation_id in seen_ids:
        return f"annotation id {annotation_id} is used twice"
    if image is None:
        return f"unknown image id {annotation.get('image_id')!r}"
    if annotation.get("category_id") not in category_ids:
        return f"unknown category id {annotation.get('category_id')!r}"
    height, width = int(image.get("height", 0)), int(image.get("width", 0))
    if height < 1 or width < 1:
        return f"image {image['id']!r} has no height and width in the JSON"
    return _box_problem(annotation.get("bbox"), height, width) or _segmentation_problem(
        annotation.get("segmentation"), height, width)


def _box_problem(box, height: int, width: int) -> str | None:
    if box is None:
        return None
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, Real) for v in box):
        return f"bbox {box!r} is not [x, y, width, height]"
    x, y, w, h = box
    inside = (x >= -BOX_TOLERANCE and y >= -BOX_TOLERANCE and x + w <= width + BOX_TOLERANCE
              and y + h <= height + BOX_TOLERANCE)
    if w <= 0 or h <= 0 or not inside:
        return f"bbox {box} is outside the {width}x{height} image"
    return None


def _segmentation_problem(segmentation, height: int, width: int) -> str | None:
    if isinstance(segmentation, list):
        if not segmentation:
            return "segmentation has no polygon"
        for index, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or not all(isinstance(v, Real) for v in polygon):
                return f"polygon {index} is not a list of coordinates"
            if len(polygon) < 6 or len(polygon) % 2:
                return (f"polygon {index} has {len(polygon) / 2:g} points (fewer than 3, or an odd "
                        "coordinate count)")
        return None
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, list)):
        if list(segmentation.get("size", [])) != [height, width]:
            return f"RLE size {segmentation.get('size')} is not the image's [{height}, {width}]"
        return None
    return f"segmentation is neither polygons nor RLE ({type(segmentation).__name__})"


def _read_instance_split(document: dict, split: str, paths: SplitPaths, classes: ClassInfo) -> RawSplit:
    """One record per image with at least one usable annotation; bad annotations and images with none are
    returned with their reasons."""
    images = {str(image["id"]): image for image in document.get("images", [])}
    category_ids, seen_ids = set(classes.category_ids), set()
    per_image: dict[str, list[dict]] = {image_id: [] for image_id in images}
    bad = []
    for annotation in document.get("annotations", []):
        image_id = str(annotation.get("image_id"))
        problem = _instance_problem(annotation, images.get(image_id), category_ids, seen_ids)
        if problem:
            bad.append({"image_id": image_id, "annotation_id": annotation.get("id"),
                        "file": paths.annotation_json, "reason": problem})
            continue
        seen_ids.add(annotation["id"])
        per_image[image_id].append({"id": annotation["id"], "category_id": annotation["category_id"],
                                    "iscrowd": int(annotation.get("iscrowd", 0)),
                                    "segmentation": annotation["segmentation"]})
    records, unannotated = [], []
    for image_id, image in images.items():
        image_path = os.path.join(paths.image_dir, image["file_name"])
        if not per_image[image_id]:
            unannotated.append({"image_id": image_id, "file": image_path, "reason": "no usable annotation"})
            continue
        records.append(RawRecord(image_id=image_id, image_path=image_path, panoptic_path="",
                                 height=int(image.get("height", 0)), width=int(image.get("width", 0)),
                                 segments=tuple(per_image[image_id]), source=SOURCE_INSTANCES))
    return RawSplit(name=split, annotation_json=paths.annotation_json, classes=classes,
                    records=tuple(records),
                    bad_annotations=tuple(bad), unannotated=tuple(unannotated))


# ---------------------------------------------------------------------------------------------- semantic PNGs
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _read_semantic_split(settings: DatasetSettings, split: str, paths: SplitPaths) -> RawSplit:
    """One record per image file; its label PNG has the same stem in the label folder. Segments (one per
    class) come from the PNG's pixels at preprocessing."""
    class_list = os.path.join(settings.root, settings.class_list)
    classes = ClassInfo.from_class_list(class_list, settings.ignore_label)
    _check_class_count(settings, classes, class_list)
    for key, folder in (("image_dir", paths.image_dir), ("label_dir", paths.label_dir)):
        if not raw_files.is_dir(folder):
            raise FileNotFoundError(f"{key} of split {split!r} not found at {folder} (format semantic_png; "
                                    f"override with data.splits.{split}.{key})")
    names = sorted(name for name in raw_files.list_names(paths.image_dir) if name.lower().endswith(IMAGE_SUFFIXES))
    records = tuple(
        RawRecord(image_id=os.path.splitext(name)[0], image_path=os.path.join(paths.image_dir, name),
                  panoptic_path="", height=0, width=0, segments=(),
                  label_path=os.path.join(paths.label_dir, os.path.splitext(name)[0] + ".png"),
                  source=SOURCE_SEMANTIC, ignore_label=settings.ignore_label)
        for name in names
    )
    return RawSplit(name=split, annotation_json=class_list, classes=classes, records=records)
