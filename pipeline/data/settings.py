"""Typed settings of the data pipeline: the `data:`, `preprocess:` and `stream:` sections of the job YAML.

Every model forbids unknown keys, so a misspelt key names itself in the validation error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DatasetFormat = Literal[
    "coco_panoptic", "ade20k_panoptic", "cityscapes_panoptic", "custom_coco_panoptic", "coco_instances",
    "semantic_png",
]
UNREAD_SPLIT_PATHS = {
    "coco_instances": ("panoptic_dir", "label_dir"),
    "semantic_png": ("annotation_json", "panoptic_dir"),
}
"""Split paths a format has no use for (the panoptic formats: label_dir): setting one is a mistake."""
AugmentationPreset = Literal["ade20k", "cityscapes", "coco_lsj", "none"]
CROP_CANVAS_PRESETS = ("ade20k", "coco_lsj")
"""Presets whose official mapper pads every training crop to the crop size with raw value 128."""


class SplitPaths(BaseModel):
    """Where one split's files live, relative to the dataset root (or absolute). Unset fields take the
    format's standard layout."""

    model_config = ConfigDict(extra="forbid")

    image_dir: str | None = Field(None, description="Folder holding the split's images.")
    annotation_json: str | None = Field(
        None, description="COCO-panoptic JSON (panoptic formats) or COCO instance JSON (coco_instances) of "
        "the split: images, annotations, categories."
    )
    panoptic_dir: str | None = Field(
        None, description="Folder of the split's panoptic PNGs (id = R + 256 G + 256^2 B, 0 = void)."
    )
    label_dir: str | None = Field(
        None, description="semantic_png: folder of the split's label PNGs (one per image, same file stem, "
        "single channel: the pixel value is the class's line in data.class_list)."
    )


class DatasetSettings(BaseModel):
    """The raw panoptic dataset to read. Category metadata (names, thing/stuff, contiguous ids) is read
    from the annotation JSON, never from code."""

    model_config = ConfigDict(extra="forbid")

    format: DatasetFormat = Field(
        description="Layout of the raw data: COCO 2017 panoptic, the detectron2 ADE20K-150 panoptic "
        "conversion, the cityscapesscripts gtFine panoptic export, any COCO-panoptic dataset, COCO instance "
        "JSON (polygons or RLE, iscrowd; every category a thing), or semantic label PNGs with a class list "
        "(every class stuff). All become the same shards (pipeline/data/SCHEMA.md)."
    )
    root: str = Field(description="Dataset root folder; relative split paths are resolved against it.")
    train_split: str = Field("train", description="Name of the training split ('train' or 'val' style).")
    val_split: str = Field("val", description="Name of the evaluation split.")
    splits: dict[str, SplitPaths] = Field(
        default_factory=dict,
        description="Per-split path overrides keyed by split name; unset paths follow the format's layout.",
    )
    expected_num_classes: int | None = Field(
        None, ge=1, description="If set, reading fails unless the annotation JSON has this many categories."
    )
    class_list: str = Field(
        "classes.txt", description="semantic_png: text file (relative to root, or absolute) naming one class "
        "per line; line i (from 0) is label value i. The line of ignore_label, if any, names no class."
    )
    ignore_label: int = Field(
        255, ge=0, le=65535,
        description="semantic_png: label value of unlabelled pixels (void in the shards)."
    )

    @model_validator(mode="after")
    def _distinct_splits(self) -> DatasetSettings:
        if self.train_split == self.val_split:
            raise ValueError(f"train_split and val_split are both {self.train_split!r}; they must differ")
        unknown = set(self.splits) - {self.train_split, self.val_split}
        if unknown:
            raise ValueError(
                f"splits has entries {sorted(unknown)} that are neither train_split "
                f"{self.train_split!r} nor val_split {self.val_split!r}"
            )
        unread = UNREAD_SPLIT_PATHS.get(self.format, ("label_dir",))
        for name, paths in self.splits.items():
            for field in unread:
                if getattr(paths, field) is not None:
                    raise ValueError(f"splits.{name}.{field} is not read by format {self.format!r}")
        return self


class PreprocessSettings(BaseModel):
    """The Ray job that turns raw files into versioned WebDataset shards."""

    model_config = ConfigDict(extra="forbid")

    output: str = Field(description="Output folder, local path or fsspec URL (e.g. s3://bucket/ade20k).")
    splits: list[str] | None = Field(
        None, description="Splits to write; default: the dataset's train_split and val_split."
    )
    target_shard_mb: float = Field(
        256.0, gt=0, description="Target shard size in MB (raw input bytes); shards close once past it."
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="Bad input (corrupt image or PNG, unknown segment or category, empty image; an instance "
        "annotation that cannot be drawn): 'fail' stops with the file and reason; 'skip' leaves the sample "
        "(the annotation) out and counts it in the manifest.",
    )
    max_parallel_tasks: int | None = Field(
        None, ge=1, description="Ray shard tasks in flight at once; default: the cluster's CPU count."
    )
    executor: Literal["ray", "local"] = Field(
        "ray", description="'ray' fans shards out over Ray tasks; 'local' writes them one by one in-process."
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster address: None starts or joins a local Ray; 'auto' joins the cluster a "
        "submitted job runs in.",
    )
    max_images: int | None = Field(
        None, ge=1, description="Use only the first N images of each split (debugging and tests)."
    )
    overwrite: bool = Field(
        False, description="Rewrite every shard; default: keep shards a previous run finished (resume)."
    )
    show_progress: bool = Field(True, description="Show a tqdm progress bar over shards.")


class StreamSettings(BaseModel):
    """Training and evaluation streams over the shards: augmentation, task sampling, batching."""

    model_config = ConfigDict(extra="forbid")

    shards: str | None = Field(
        None, description="Folder (or fsspec URL) of the shards; default: the preprocess output."
    )
    augmentation: AugmentationPreset = Field(
        description="The paper's augmentation per dataset: ade20k and cityscapes (short-side resize, random "
        "crop, colour jitter, flip), coco_lsj (large-scale jitter, fixed crop, flip), or none."
    )
    crop_size: tuple[int, int] = Field(
        description="Training crop (height, width): 640x640 ADE20K, 512x1024 Cityscapes, 1024x1024 COCO."
    )
    resize_base: int | None = Field(
        None,
        ge=1,
        description="Short-side base the scale range multiplies (ADE20K: crop 640, Cityscapes 1024); "
        "coco_lsj: the LSJ target size. Default: the larger crop side.",
    )
    scale_range: tuple[float, float] | None = Field(
        None, description="Min and max scale of resize_base; default 0.5-2.0 (coco_lsj: 0.1-2.0)."
    )
    scale_choices: bool = Field(
        True,
        description="Draw the short side from the discrete scales 0.5, 0.6, ... 2.0 as the official "
        "configs do ('choice'); False draws uniformly from the range.",
    )
    max_size_factor: float = Field(
        4.0, gt=0, description="The long side is capped at max_size_factor x resize_base (ADE20K/Cityscapes)."
    )
    category_max_area: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Crop retry rule: a crop is redrawn (up to 10 times) when one class covers more than "
        "this fraction of the labelled pixels; 1.0 (the official configs) disables it.",
    )
    color_jitter: bool | None = Field(
        None, description="SSD-style photometric jitter; default on for ade20k and cityscapes, off otherwise."
    )
    horizontal_flip: bool | None = Field(None, description="Random h-flip p=0.5; default on unless 'none'.")
    image_pad_value: tuple[float, float, float] | None = Field(
        None,
        description="RGB value (0-255) of padded training pixels. Default, as the official mappers: 128 for "
        "ade20k and coco_lsj; the pixel mean (0 after the model normalises) for cityscapes and none.",
    )
    pad_to_crop: bool | None = Field(
        None,
        description="Pad every training image to crop_size (void in the targets), as the official ADE20K and "
        "COCO mappers do; default on for ade20k and coco_lsj. Otherwise batches pad to their largest image.",
    )
    task_thresholds: tuple[float, float] = Field(
        (0.33, 0.66),
        description="Cumulative task probabilities: u < t0 semantic, u < t1 instance, else panoptic.",
    )
    batch_size: int = Field(2, ge=1, description="Images per batch per worker process (per rank).")
    shuffle_buffer: int = Field(256, ge=1, description="Samples held by the shuffle buffer (1 = no shuffle).")
    shuffle_shards: bool = Field(True, description="Shuffle shard order each epoch (seeded).")
    loader_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank.")
    seed: int = Field(0, description="Seeds shard order, shuffle, augmentation and task sampling.")
    on_error: Literal["fail", "skip"] = Field(
        "skip",
        description="A damaged shard (size or checksum not the manifest's, a tar that breaks off) or sample (does "
        "not decode, segment map outside its table): 'skip' leaves it out, logged and counted by reason; "
        "'fail' stops with the file and the problem.",
    )

    @field_validator("crop_size", mode="before")
    @classmethod
    def _square_crop(cls, value):
        return (value, value) if isinstance(value, int) else value

    @field_validator("crop_size")
    @classmethod
    def _positive_crop(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"crop_size must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StreamSettings:
        low, high = self.task_thresholds
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"task_thresholds must satisfy 0 <= t0 <= t1 <= 1, got {self.task_thresholds}")
        if self.scale_range is not None and not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {self.scale_range}")
        if self.augmentation == "none" and self.scale_range is not None:
            raise ValueError("scale_range is set but augmentation is 'none', which never resizes")
        return self

    @property
    def pads_to_crop(self) -> bool:
        """Whether training images are padded to crop_size (the official ADE20K and COCO canvas)."""
        return self.pad_to_crop if self.pad_to_crop is not None else self.augmentation in CROP_CANVAS_PRESETS
