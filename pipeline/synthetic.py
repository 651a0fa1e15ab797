"""A synthetic panoptic dataset in the real COCO panoptic format: the embedded default dataset and the
real-format fixture for tests.

Each image is a few textured stuff regions (a Voronoi partition, several cells may share a class) with thing
instances of several shape classes painted on top: touching, overlapping (later ones occlude earlier ones),
sometimes a crowd group sharing one segment, sometimes void blobs. Classes are recognisable by colour and
shape, so a small model can learn them. Output, deterministic from the seed (byte-identical for the same
seed and library versions):

    OUT/{train,val}/<image id:012d>.jpg                  RGB images
    OUT/annotations/panoptic_{train,val}.json             images, annotations with segments_info, categories
    OUT/annotations/panoptic_{train,val}/<id:012d>.png    segment ids as id = R + 256 G + 256^2 B, 0 = void

Category ids are deliberately non-contiguous, as in COCO, so that every consumer maps them from the data.

The same images can be written as the other formats users bring (`--format`, pipeline/data/readers.py):

    coco_instances: OUT/{train,val}/<id>.jpg, OUT/annotations/instances_{train,val}.json
        the thing instances only, each with its whole (unoccluded) shape, so instances overlap: polygons (one
        per shape; vertices clipped to the image), compressed RLE (rings, which have a hole, and every other
        instance) and, for a crowd cluster, one uncompressed RLE with iscrowd 1
    semantic_png:   OUT/images/{train,val}/<id>.jpg, OUT/labels/{train,val}/<id>.png, OUT/classes.txt
        one label per pixel, the class's line in classes.txt (all ten classes), 255 where void
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from model.formats import mask_to_rle, write_label_png

MAX_SEGMENT_ID = 256**3 - 1
FORMATS = ("coco_panoptic", "coco_instances", "semantic_png")
SEMANTIC_IGNORE_LABEL = 255


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int]


THING_CATEGORIES = (
    Category(1, "disc", True, (220, 40, 40)),
    Category(2, "square", True, (40, 90, 230)),
    Category(4, "triangle", True, (250, 210, 30)),
    Category(5, "ring", True, (200, 60, 210)),
    Category(7, "cross", True, (20, 20, 20)),
    Category(9, "diamond", True, (250, 130, 20)),
)
STUFF_CATEGORIES = (
    Category(101, "sky", False, (140, 190, 245)),
    Category(102, "grass", False, (70, 150, 60)),
    Category(105, "water", False, (30, 110, 140)),
    Category(110, "sand", False, (215, 190, 140)),
)
CATEGORIES = THING_CATEGORIES + STUFF_CATEGORIES


@dataclass(frozen=True)
class GeneratorSettings:
    min_size: int = 160
    max_size: int = 320
    max_things: int = 6
    crowd_probability: float = 0.3
    void_probability: float = 0.5


# ---------------------------------------------------------------------------------------------- shapes
def _shape_mask(name: str, ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, radius: float, angle: float):
    """Boolean mask of a thing shape centred at (cy, cx); `ys`, `xs` are pixel-centre grids."""
    dy, dx = ys - cy, xs - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # coordinates in the shape's rotated frame
    if name == "disc":
        return dx**2 + dy**2 <= radius**2
    if name == "square":
        return (np.abs(u) <= radius * 0.8) & (np.abs(v) <= radius * 0.8)
    if name == "triangle":
        # Equilateral triangle pointing up in its own frame: three half-planes.
        return (v <= radius * 0.5) & (np.sqrt(3) * u - v <= radius) & (-np.sqrt(3) * u - v <= radius)
    if name == "ring":
        distance2 = dx**2 + dy**2
        return (distance2 <= radius**2) & (distance2 >= (radius * 0.55) ** 2)
    if name == "cross":
        arm = radius * 0.3
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    if name == "diamond":
        return np.abs(u) + np.abs(v) * 1.3 <= radius
    raise ValueError(f"unknown shape {name!r}")


# ---------------------------------------------------------------------------------------------- textures
def _stuff_texture(name: str, base: np.ndarray, ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator):
    """Float RGB [H, W, 3] texture for a stuff class: each class has its own pattern besides its colour."""
    height = ys.shape[0]
    if name == "sky":
        shade = 25 * (1 - ys / max(height - 1, 1))
    elif name == "grass":
        shade = 18 * np.sin(xs * 0.9 + 3 * np.sin(ys * 0.15))
    elif name == "water":
        shade = 20 * np.sin(ys * 0.5 + 2 * np.sin(xs * 0.08))
    elif name == "sand":
        shade = rng.normal(0, 14, ys.shape)
    else:
        raise ValueError(f"unknown stuff class {name!r}")
    return base[None, None, :] + shade[..., None]


# ---------------------------------------------------------------------------------------------- one image
@dataclass(frozen=True)
class Shape:
    """One painted thing shape, whole (before later shapes covered parts of it)."""

    name: str
    cy: float
    cx: float
    radius: float
    angle: float
    mask: np.ndarray = field(repr=False)

    def polygon(self, height: int, width: int) -> list[float] | None:
        """COCO polygon [x0, y0, x1, y1, ...] of the shape (pixel-edge coordinates, clipped to the image);
        None for a ring, which has a hole."""
        vertices = _SHAPE_VERTICES.get(self.name)
        if vertices is None:
            return None
        u, v = (np.asarray(c, np.float64) * self.radius for c in zip(*vertices()))
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        xs = np.clip(self.cx + cos * u - sin * v, 0, width)  # the inverse of _shape_mask's rotation
        ys = np.clip(self.cy + sin * u + cos * v, 0, height)
        return [round(float(c), 2) for point in zip(xs, ys) for c in point]


def _disc_vertices(count: int = 24):
    angles = np.arange(count) * 2 * np.pi / count
    return list(zip(np.cos(angles), np.sin(angles)))


def _cross_vertices():
    a = 0.3
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
            (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


_SHAPE_VERTICES = {  # (u, v) of each shape's corners in its own frame, in units of the radius
    "disc": _disc_vertices,
    "square": lambda: [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": lambda: [(0.0, -1.0), (np.sqrt(3) / 2, 0.5), (-np.sqrt(3) / 2, 0.5)],
    "cross": _cross_vertices,
    "diamond": lambda: [(1.0, 0.0), (0.0, 1 / 1.3), (-1.0, 0.0), (0.0, -1 / 1.3)],
}


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    ids: np.ndarray  # int64 [H, W] segment ids, 0 = void
    segments_info: list[dict]
    thing_shapes: dict[int, list[Shape]]  # visible thing segment id -> its whole shapes


class _ImagePainter:
    """Paints one image and its segment-id map; keeps the segments in painting order."""

    def __init__(self, height: int, width: int, rng: np.random.Generator):
        self.rng = rng
        self.ys, self.xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
        self.pixels = np.zeros((height, width, 3), np.float64)
        self.ids = np.zeros((height, width), np.int64)
        self.segments: list[dict] = []
        self._used_ids: set[int] = {0}
        self.shapes: dict[int, list[Shape]] = {}  # thing segment id -> its painted shapes, whole

    def new_segment(self, category: Category, iscrowd: bool) -> int:
        segment_id = 0
        while segment_id in self._used_ids:
            segment_id = int(self.rng.integers(1, MAX_SEGMENT_ID + 1))
        self._used_ids.add(segment_id)
        self.segments.append({"id": segment_id, "category_id": category.id, "iscrowd": int(iscrowd)})
        return segment_id

    def paint_stuff(self, settings: GeneratorSettings) -> None:
        height, width = self.ids.shape
        num_classes = int(self.rng.integers(2, 4))
        classes = self.rng.choice(len(STUFF_CATEGORIES), size=num_classes, replace=False)
        num_cells = int(self.rng.integers(num_classes, num_classes + 3))
        seeds = self.rng.uniform((0, 0), (height, width), size=(num_cells, 2))
        # Every class owns at least one cell; extra cells reuse a class, so one stuff segment can be disjoint.
        cell_class = np.concatenate([classes, self.rng.choice(classes, size=num_cells - num_classes)])
        distance = (self.ys[None] - seeds[:, 0, None, None]) ** 2 + (self.xs[None] - seeds[:, 1, None, None]) ** 2
        owner = cell_class[np.argmin(distance, axis=0)]
        for class_index in classes:
            category = STUFF_CATEGORIES[class_index]
            region = owner == class_index
            if not region.any():
                continue
            base = np.array(category.color, np.float64) + self.rng.normal(0, 8, 3)
            texture = _stuff_texture(category.name, base, self.ys, self.xs, self.rng)
            self.pixels[region] = texture[region]
            self.ids[region] = self.new_segment(category, iscrowd=False)

    def paint_thing(self, category: Category, cy: float, cx: float, radius: float, segment_id: int) -> None:
        angle = float(self.rng.uniform(0, np.pi))
        mask = _shape_mask(category.name, self.ys, self.xs, cy, cx, radius, angle)
        self.shapes.setdefault(segment_id, []).append(Shape(category.name, cy, cx, radius, angle, mask))
        color = np.array(category.color, np.float64) + self.rng.normal(0, 10, 3)
        shading = 1 + 0.15 * ((self.ys[mask] - cy) / max(radius, 1.0))  # a little light from above
        self.pixels[mask] = color[None, :] * shading[:, None]
        self.ids[mask] = segment_id

    def paint_things(self, settings: GeneratorSettings) -> None:
        height, width = self.ids.shape
        short_side = min(height, width)
        previous: tuple[float, float, float] | None = None
        for _ in range(int(self.rng.integers(2, settings.max_things + 1))):
            category = THING_CATEGORIES[int(self.rng.integers(len(THING_CATEGORIES)))]
            radius = float(self.rng.uniform(0.08, 0.2) * short_side)
            if previous is not None and self.rng.random() < 0.5:
                # Next to the previous instance, at a distance that makes them touch or overlap.
                py, px, pr = previous
                direction = self.rng.uniform(0, 2 * np.pi)
                gap = (pr + radius) * self.rng.uniform(0.6, 1.0)
                cy, cx = py + gap * np.sin(direction), px + gap * np.cos(direction)
            else:
                cy, cx = self.rng.uniform(radius, height - radius), self.rng.uniform(radius, width - radius)
            self.paint_thing(category, cy, cx, radius, self.new_segment(category, iscrowd=False))
            previous = (cy, cx, radius)

    def paint_crowd(self) -> None:
        """A tight cluster of small instances of one class, annotated as one crowd segment (as COCO does)."""
        height, width = self.ids.shape
        category = THING_CATEGORIES[int(self.rng.integers(len(THING_CATEGORIES)))]
        segment_id = self.new_segment(category, iscrowd=True)
        radius = 0.05 * min(height, width)
        cy, cx = self.rng.uniform(3 * radius, height - 3 * radius), self.rng.uniform(3 * radius, width - 3 * radius)
        for _ in range(int(self.rng.integers(3, 6))):
            oy, ox = self.rng.normal(0, 1.5 * radius, 2)
            self.paint_thing(category, cy + oy, cx + ox, radius, segment_id)

    def paint_void(self) -> None:
        height, width = self.ids.shape
        for _ in range(int(self.rng.integers(1, 4))):
            box_h, box_w = self.rng.integers(3, max(4, height // 10)), self.rng.integers(3, max(4, width // 10))
            top, left = self.rng.integers(0, height - box_h), self.rng.integers(0, width - box_w)
            self.ids[top : top + box_h, left : left + box_w] = 0
            self.pixels[top : top + box_h, left : left + box_w] = self.rng.uniform(0, 255, 3)

    def finish(self) -> Scene:
        """uint8 image, segment-id map, segments_info with area and bbox of what stayed visible, and the
        whole shapes of the visible thing segments."""
        noisy = self.pixels + self.rng.normal(0, 4, self.pixels.shape)
        image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        segments = [info for info in map(self._with_geometry, self.segments) if info["area"] > 0]
        shapes = {s["id"]: self.shapes[s["id"]] for s in segments if s["id"] in self.shapes}
        return Scene(image, self.ids, segments, shapes)

    def _with_geometry(self, segment: dict) -> dict:
        rows, cols = np.nonzero(self.ids == segment["id"])
        if rows.size == 0:  # fully occluded: absent from the PNG, so absent from the JSON
            return {**segment, "area": 0}
        x0, y0 = int(cols.min()), int(rows.min())
        bbox = [x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1]
        return {"id": segment["id"], "category_id": segment["category_id"], "area": int(rows.size),
                "bbox": bbox, "iscrowd": segment["iscrowd"]}


def render_image(seed: int, index: int, settings: GeneratorSettings = GeneratorSettings()):
    """Image `index` of the dataset with `seed`: (uint8 [H, W, 3], int64 ids [H, W], segments_info)."""
    scene = render_scene(seed, index, settings)
    return scene.image, scene.ids, scene.segments_info


def render_scene(seed: int, index: int, settings: GeneratorSettings = GeneratorSettings()) -> Scene:
    """Image `index` of the dataset with `seed`, with its panoptic annotation and its things' whole shapes.

    Each image has its own generator seeded by (seed, index), so an image does not depend on how many others
    are made."""
    rng = np.random.default_rng([seed, index])
    height, width = (int(v) for v in rng.integers(settings.min_size, settings.max_size + 1, size=2))
    painter = _ImagePainter(height, width, rng)
    painter.paint_stuff(settings)
    painter.paint_things(settings)
    if rng.random() < settings.crowd_probability:
        painter.paint_crowd()
    if rng.random() < settings.void_probability:
        painter.paint_void()
    return painter.finish()


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG encoding: id = R + 256 G + 256^2 B."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def categories_json() -> list[dict]:
    return [
        {"id": c.id, "name": c.name, "supercategory": "thing" if c.isthing else "stuff",
         "isthing": int(c.isthing), "color": list(c.color)}
        for c in CATEGORIES
    ]


def split_assignment(num_images: int, seed: int, val_fraction: float) -> list[str]:
    """'train' or 'val' per image index: a seeded permutation puts round(N * val_fraction) images in val."""
    num_val = round(num_images * val_fraction)
    if num_images >= 2 and val_fraction > 0:
        num_val = min(max(num_val, 1), num_images - 1)  # both splits non-empty whenever possible
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(num_images)
    splits = ["train"] * num_images
    for index in order[:num_val]:
        splits[int(index)] = "val"
    return splits


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95, subsampling=0)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (what COCO uses for crowd regions): run lengths in column-major order, starting
    with a run of zeros."""
    flat = np.asarray(mask, np.uint8).ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts}


def instance_annotations(scene: Scene, image_id: int, first_id: int) -> list[dict]:
    """COCO instance annotations of a scene's visible things, ids from first_id (see the module docstring for
    which encoding each gets)."""
    from pycocotools import mask as mask_util

    height, width = scene.ids.shape
    annotations = []
    for info in scene.segments_info:
        shapes = scene.thing_shapes.get(info["id"])
        if shapes is None:
            continue
        annotation_id = first_id + len(annotations)
        whole = np.logical_or.reduce([shape.mask for shape in shapes])
        if info["iscrowd"]:
            segmentation = uncompressed_rle(whole)
            rle = mask_util.frPyObjects(segmentation, height, width)
        elif shapes[0].name == "ring" or annotation_id % 2 == 0:
            segmentation = rle = mask_to_rle(whole)
        else:
            segmentation = [shapes[0].polygon(height, width)]
            rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
        annotations.append({"id": annotation_id, "image_id": image_id, "category_id": info["category_id"],
                            "segmentation": segmentation, "area": float(mask_util.area(rle)),
                            "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": info["iscrowd"]})
    return annotations


def semantic_labels(scene: Scene) -> np.ndarray:
    """uint8 [H, W]: each pixel's class as its line in classes.txt (CATEGORIES order), SEMANTIC_IGNORE_LABEL
    where void."""
    line_of = {category.id: line for line, category in enumerate(CATEGORIES)}
    labels = np.full(scene.ids.shape, SEMANTIC_IGNORE_LABEL, np.uint8)
    for info in scene.segments_info:
        labels[scene.ids == info["id"]] = line_of[info["category_id"]]
    return labels


class _DatasetWriter:
    """Writes the scenes of one dataset in one format; `finish` returns the annotation file per split."""

    def __init__(self, out: Path, seed: int):
        self.out, self.seed = out, seed
        self.records: dict[str, dict[str, list]] = {
            split: {"images": [], "annotations": []} for split in ("train", "val")
        }

    def image_entry(self, split: str, image_id: int, scene: Scene) -> str:
        stem = f"{image_id:012d}"
        self.records[split]["images"].append(
            {"id": image_id, "file_name": f"{stem}.jpg", "height": scene.image.shape[0],
             "width": scene.image.shape[1]}
        )
        return stem

    def write_json(self, kind: str, description: str, categories: list[dict]) -> dict[str, Path]:
        json_paths = {}
        for split, record in self.records.items():
            if not record["images"]:
                continue
            document = {
                "info": {"description": f"OneFormer synthetic {description} dataset, seed {self.seed}",
                         "version": "1.0"},
                "licenses": [],
                "images": record["images"],
                "annotations": record["annotations"],
                "categories": categories,
            }
            json_paths[split] = self.out / "annotations" / f"{kind}_{split}.json"
            json_paths[split].write_text(json.dumps(document))
        return json_paths


class _PanopticWriter(_DatasetWriter):
    def add(self, split: str, image_id: int, scene: Scene) -> None:
        stem = self.image_entry(split, image_id, scene)
        (self.out / "annotations" / f"panoptic_{split}").mkdir(parents=True, exist_ok=True)
        _save_jpeg(scene.image, self.out / split / f"{stem}.jpg")
        png_folder = self.out / "annotations" / f"panoptic_{split}"
        Image.fromarray(ids_to_rgb(scene.ids)).save(png_folder / f"{stem}.png")
        self.records[split]["annotations"].append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": scene.segments_info}
        )

    def finish(self) -> dict[str, Path]:
        return self.write_json("panoptic", "panoptic", categories_json())


class _InstanceWriter(_DatasetWriter):
    def add(self, split: str, image_id: int, scene: Scene) -> None:
        stem = self.image_entry(split, image_id, scene)
        _save_jpeg(scene.image, self.out / split / f"{stem}.jpg")
        annotations = self.records[split]["annotations"]
        annotations += instance_annotations(scene, image_id, first_id=len(annotations) + 1)

    def finish(self) -> dict[str, Path]:
        (self.out / "annotations").mkdir(parents=True, exist_ok=True)
        things = [{"id": c.id, "name": c.name, "supercategory": "thing"} for c in THING_CATEGORIES]
        return self.write_json("instances", "COCO instance", things)


class _SemanticWriter(_DatasetWriter):
    def add(self, split: str, image_id: int, scene: Scene) -> None:
        stem = self.image_entry(split, image_id, scene)
        _save_jpeg(scene.image, self.out / "images" / split / f"{stem}.jpg")
        write_label_png(self.out / "labels" / split / f"{stem}.png", semantic_labels(scene))

    def finish(self) -> dict[str, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "classes.txt").write_text("".join(f"{c.name}\n" for c in CATEGORIES))
        return {split: self.out / "labels" / split
                for split, record in self.records.items() if record["images"]}


_WRITERS = {
    "coco_panoptic": _PanopticWriter, "coco_instances": _InstanceWriter, "semantic_png": _SemanticWriter,
}


def generate_dataset(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    settings: GeneratorSettings = GeneratorSettings(),
    dataset_format: str = "coco_panoptic",
) -> dict[str, Path]:
    """Write the dataset under `out_dir` in `dataset_format` (FORMATS); returns the annotation JSON per split
    (semantic_png: the label folder)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 16 <= settings.min_size <= settings.max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got {settings.min_size}, {settings.max_size}")
    if dataset_format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {dataset_format!r}")
    writer = _WRITERS[dataset_format](Path(out_dir), seed)
    for index, split in enumerate(split_assignment(num_images, seed, val_fraction)):
        writer.add(split, index + 1, render_scene(seed, index, settings))
    return writer.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--min-size", type=int, default=GeneratorSettings.min_size)
    parser.add_argument("--max-size", type=int, default=GeneratorSettings.max_size)
    parser.add_argument("--format", choices=FORMATS, default="coco_panoptic",
                        help="COCO panoptic (default), COCO instance JSON, or semantic label PNGs + "
                        "classes.txt")
    args = parser.parse_args(argv)
    settings = GeneratorSettings(min_size=args.min_size, max_size=args.max_size)
    try:
        paths = generate_dataset(args.out, args.num_images, args.seed, args.val_fraction, settings,
                                 args.format)
    except ValueError as err:
        parser.error(str(err))
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
