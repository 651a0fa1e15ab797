"""Export the inference network with the task as a tensor input: torch.export or ONNX.

    python -m model.export --checkpoint model.pt --format torch --out model.pt2
    python -m model.export --checkpoint model.pt --format onnx --out model.onnx

The exported graph is `InferenceNetwork`: images float32 [B, 3, H, W] RGB 0-255, H and W multiples of 32
(the caller resizes and pads with the pixel mean, as model.inference.predict does), and task_index int64 [B]
(the position of each image's task in model.texts.TASKS: 0 semantic, 1 instance, 2 panoptic) -> class logits
[B, Q, K+1] and stride-4 mask logits [B, Q, H/4, W/4]. Height and width are dynamic; the batch is too (ONNX)
or fixed at export (torch.export specialises a batch of one, the way the model is run by model.predict).
Post-processing stays in Python (model.inference); `python -m model.predict --onnx FILE` runs it on the
ONNX Runtime outputs. Both files carry `ExportInfo` (the model config, class names and the task order):
ONNX in its metadata_props, torch.export as the extra file "oneformer.json".

Deformable attention and neighborhood attention go into the graph through their plain-PyTorch references;
the Triton and FlexAttention kernels are a runtime choice of the eager model, not part of the graph.

The pixel decoder and DiNAT are exported as they run eagerly (the pixel decoder keeps its level layout as
Python ints for the reference kernel; DiNAT pads to its dilated window by `sym_max` without a branch). Why
`InferenceNetwork` re-expresses the Swin block instead: its eager window partition (see WindowCountSwinBlock)
makes the tracer's symbolic size algebra take tens of minutes. WindowCountSwinBlock uses the eager block's own
parameters and submodules; the parity tests compare the exported outputs with the eager model's for every
task at several sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch import nn

from model.backbones.dinat import NeighborhoodAttention2D, crop_map
from model.backbones.swin import SwinBlock, WindowAttention, shifted_window_mask
from model.checkpoint import ModelFileError, load_model, read_config
from model.classes import ClassesFileError, ModelClasses, classes_for_model
from model.oneformer import OneFormer
from model.presets import OneFormerConfig
from model.task_conditioning import task_token_ids
from model.texts import TASKS

FORMATS = ("torch", "onnx")
ONNX_OPSET = 18
INPUT_NAMES = ("images", "task_index")
OUTPUT_NAMES = ("pred_logits", "pred_masks")
METADATA_KEY = "oneformer"
"""Key of the ExportInfo JSON: an ONNX metadata_props entry, and (with .json) the torch.export extra file."""
SIZE_MULTIPLE = 32
MAX_SIDE = 10240
"""Largest height or width the dynamic dimensions allow (the official multi-scale views stay below: ADE20K-1280
at most 8960)."""
MAX_BATCH = 1024


@dataclass(frozen=True)
class ExportInfo:
    """What a user of an exported file needs besides the graph: the model config (thresholds, test size,
    pixel mean, size multiple), the classes in contiguous order and the task order of `task_index`."""

    config: dict
    class_names: tuple[str, ...]
    is_thing: tuple[bool, ...]
    category_ids: tuple[int, ...]
    min_side: int = 2 * SIZE_MULTIPLE
    """Smallest height and width the graph takes (see min_side_for)."""
    tasks: tuple[str, ...] = TASKS

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExportInfo:
        fields = json.loads(text)
        return cls(
            config=fields["config"],
            class_names=tuple(fields["class_names"]),
            is_thing=tuple(bool(flag) for flag in fields["is_thing"]),
            category_ids=tuple(int(cid) for cid in fields["category_ids"]),
            tasks=tuple(fields["tasks"]),
        )

    @classmethod
    def of(cls, config: OneFormerConfig, classes: ModelClasses, model: OneFormer) -> ExportInfo:
        return cls(
            dataclasses.asdict(config),
            classes.names,
            classes.is_thing,
            classes.category_ids,
            min_side_for(model),
        )

    def model_config(self) -> OneFormerConfig:
        # JSON turned the config's tuples into lists.
        return OneFormerConfig(
            **{
                **self.config,
                "pixel_mean": tuple(self.config["pixel_mean"]),
                "pixel_std": tuple(self.config["pixel_std"]),
            }
        )


# ---------------------------------------------------------------------------------------------- the network
class WindowCountSwinBlock(nn.Module):
    """Swin's SwinBlock (same parameters, shared) with the window grid counted once as (size + w - 1) // w
    and the shift mask broadcast over the images instead of repeated per window: the same numbers, but the
    traced sizes stay simple expressions. (The eager block pads by -size % w and repeats the mask
    num_windows // windows_per_image times; across 24 blocks those nested size expressions cost the tracer's
    symbolic algebra tens of minutes.)"""

    def __init__(self, block: SwinBlock):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block, window, shift = self.block, self.block.window_size, self.block.shift_size
        batch, height, width, channels = x.shape
        rows, columns = (height + window - 1) // window, (width + window - 1) // window
        shifted = F.pad(block.norm1(x), (0, 0, 0, columns * window - width, 0, rows * window - height))
        mask = None
        if shift > 0:
            shifted = torch.roll(shifted, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(rows * window, columns * window, window, shift, x.device)
        to_windows, from_windows = _window_order(rows, columns, window, x.device)
        pixels = shifted.reshape(batch, -1, channels)  # row-major pixels of the padded map
        windows = pixels.index_select(1, to_windows).view(batch, rows * columns, window * window, channels)
        attended = _window_attention(block.attn, windows, mask).reshape(batch, -1, channels)
        attended = attended.index_select(1, from_windows).view(
            batch, rows * window, columns * window, channels
        )
        if shift > 0:
            attended = torch.roll(attended, shifts=(shift, shift), dims=(1, 2))
        x = x + crop_map(attended, height, width)  # drop-path is the identity in eval mode
        return x + block.mlp(block.norm2(x))


def _window_order(rows, columns, window: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index vectors between the row-major pixels of a (rows x window) x (columns x window) map and the
    window-major order (window by window, row-major inside each): gathers instead of Swin's view-permute-
    reshape, whose copy-or-view choice depends on whether there is one window column and would be fixed by
    the trace."""
    width = columns * window
    row, column = torch.arange(rows, device=device), torch.arange(columns, device=device)
    inside = torch.arange(window, device=device)
    to_windows = ((row[:, None, None, None] * window + inside[None, None, :, None]) * width
                  + column[None, :, None, None] * window + inside[None, None, None, :])  # fmt: skip
    y, x = torch.arange(rows * window, device=device), torch.arange(width, device=device)
    from_windows = ((((y[:, None] // window) * columns + x[None, :] // window) * window + y[:, None] % window)
                    * window + x[None, :] % window)  # fmt: skip
    return to_windows.reshape(-1), from_windows.reshape(-1)


def _window_attention(
    attention: WindowAttention, windows: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """WindowAttention.forward on windows [B, nW, area, C] with the mask [nW, area, area] broadcast over B
    (attention on 4-D tensors: ONNX's attention takes no more)."""
    batch, num_windows, area, channels = windows.shape
    heads = attention.num_heads
    qkv = attention.qkv(windows).reshape(batch * num_windows, area, 3, heads, channels // heads)
    query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [B * nW, heads, area, d]
    bias = attention.relative_position_bias()[None, None]
    if mask is not None:
        bias = bias + mask[None, :, None]
    bias = bias.expand(batch, num_windows, heads, area, area).reshape(batch * num_windows, heads, area, area)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias.to(query.dtype), scale=attention.scale
    )
    return attention.proj(out.transpose(1, 2).reshape(batch, num_windows, area, channels))


def _with_export_blocks(module: nn.Module) -> None:
    """Replace, in place, every SwinBlock below `module` by its export form, and set every DiNAT attention to
    the plain-PyTorch reference (the kernel that goes into the graph)."""
    for name, child in module.named_children():
        if isinstance(child, NeighborhoodAttention2D):
            child.attn_backend = "reference"
        elif isinstance(child, SwinBlock):
            setattr(module, name, WindowCountSwinBlock(child))
        else:
            _with_export_blocks(child)


class InferenceNetwork(nn.Module):
    """OneFormer up to the class and mask logits, with the task as an index into TASKS (the graph that is
    exported). Shares the parameters of `model`, whose Swin blocks it replaces in place (and whose DiNAT
    attention it sets to the reference kernel)."""

    def __init__(self, model: OneFormer):
        super().__init__()
        self.model = model
        _with_export_blocks(model.backbone)
        # The task MLP reads the raw token ids as floats (see model.task_conditioning): one row per task.
        self.register_buffer("task_token_ids", task_token_ids(list(TASKS)).float(), persistent=False)

    def forward(self, images: torch.Tensor, task_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        features = model.backbone(model.normalise(images))
        mask_features, multi_scale_features = model.pixel_decoder(features)
        task_token = model.task_encoder.task_mlp(self.task_token_ids[task_index])
        outputs = model.transformer_decoder(multi_scale_features, mask_features, task_token)
        return outputs["pred_logits"], outputs["pred_masks"]


# ---------------------------------------------------------------------------------------------- exporting
def min_side_for(model: OneFormer) -> int:
    """Smallest height and width one exported graph serves: 64 (two stride-32 rows), and for Swin enough for
    two windows on the stride-32 map. The trace fixes, per stage, whether the map holds one window or more
    (reshapes take other paths for one), so every size of a graph must be on the same side of that line."""
    windows = [module.window_size for module in model.modules() if isinstance(module, SwinBlock)]
    if windows:
        return SIZE_MULTIPLE * (max(windows) + 1)
    return 2 * SIZE_MULTIPLE


def _dynamic_shapes(min_side: int, max_side: int = MAX_SIDE) -> dict:
    """Height and width as multiples of 32, from min_side to max_side; the batch is one image (see
    export_program)."""
    height = torch.export.Dim("height_32", min=min_side // SIZE_MULTIPLE, max=max_side // SIZE_MULTIPLE)
    width = torch.export.Dim("width_32", min=min_side // SIZE_MULTIPLE, max=max_side // SIZE_MULTIPLE)
    return {"images": {2: SIZE_MULTIPLE * height, 3: SIZE_MULTIPLE * width}, "task_index": None}


def example_inputs(min_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs to trace with: one image of the smallest size plus 64, not square (so that the two dynamic
    dimensions are not taken to be equal), with the panoptic task."""
    height, width = min_side + 2 * SIZE_MULTIPLE, min_side + 3 * SIZE_MULTIPLE
    images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255
    return images, torch.tensor([TASKS.index("panoptic")])


def export_program(model: OneFormer) -> torch.export.ExportedProgram:
    """torch.export of InferenceNetwork(model) (on the CPU, in eval mode, references for the kernels) with
    dynamic height and width (from min_side_for(model)) and a batch of one image: the size-oblivious
    tracing below asserts that a dynamic batch is not 1, so the runtime wrappers run a batch image by image
    (on a CPU batching gains little)."""
    min_side = min_side_for(model)
    network = InferenceNetwork(model.cpu().eval()).requires_grad_(False)
    # Size-oblivious reasoning: layout decisions that would differ for a size of 1 are made as for a general
    # size instead of being guarded on the traced example's sizes.
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(
            network, example_inputs(min_side), dynamic_shapes=_dynamic_shapes(min_side)
        )


def save_torch(program: torch.export.ExportedProgram, info: ExportInfo, path: str | os.PathLike) -> None:
    torch.export.save(program, path, extra_files={METADATA_KEY + ".json": info.to_json()})


def save_onnx(program: torch.export.ExportedProgram, info: ExportInfo, path: str | os.PathLike) -> None:
    """The exported program through torch's ONNX exporter (opset ONNX_OPSET), ExportInfo as metadata."""
    onnx_program = torch.onnx.export(
        program,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        opset_version=ONNX_OPSET,
        dynamo=True,
        optimize=True,
        verbose=False,
    )
    onnx_program.model.metadata_props[METADATA_KEY] = info.to_json()
    onnx_program.save(str(path))


def export_model(
    checkpoint: str | os.PathLike,
    export_format: str,
    out: str | os.PathLike,
    classes_file: str | os.PathLike | None = None,
) -> Path:
    """Export a model file to `out` in `export_format` ("torch": torch.export's .pt2, "onnx")."""
    if export_format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {export_format!r}")
    config = read_config(checkpoint)
    classes = classes_for_model(checkpoint, config.num_classes, classes_file)
    model = load_model(checkpoint, training=False)
    info = ExportInfo.of(config, classes, model)
    program = export_program(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (save_torch if export_format == "torch" else save_onnx)(program, info, out)
    return out


# ---------------------------------------------------------------------------------------------- running
class ExportedModel(nn.Module):
    """An exported network behind OneFormer's calling convention, so model.inference (predict, multi-scale)
    runs on it unchanged: forward(images, tasks) -> {"pred_logits", "pred_masks"}; `pixel_mean` as OneFormer
    has it (predict pads with it). Subclasses run the graph."""

    def __init__(self, info: ExportInfo, source: str):
        super().__init__()
        self.info, self.source = info, source
        self.config = info.model_config()
        self.register_buffer("pixel_mean", torch.tensor(self.config.pixel_mean).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        height, width = images.shape[-2:]
        low, high = self.info.min_side, MAX_SIDE
        if (
            height % SIZE_MULTIPLE
            or width % SIZE_MULTIPLE
            or not (low <= min(height, width) and max(height, width) <= high)
        ):
            raise ValueError(
                f"{self.source}: images must be padded to multiples of {SIZE_MULTIPLE} between {low} and "
                f"{high} pixels, got {height}x{width}"
            )
        unknown = sorted(set(tasks) - set(self.info.tasks))
        if unknown:
            raise ValueError(f"tasks must be drawn from {self.info.tasks}, got {unknown}")
        task_index = torch.tensor([self.info.tasks.index(task) for task in tasks], dtype=torch.long)
        images = images.float().cpu()
        per_image = [self.run(images[i : i + 1], task_index[i : i + 1]) for i in range(images.shape[0])]
        return {
            "pred_logits": torch.cat([logits for logits, _ in per_image]),
            "pred_masks": torch.cat([masks for _, masks in per_image]),
        }

    def run(self, images: torch.Tensor, task_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class OnnxRuntimeModel(ExportedModel):
    """An ONNX file from `save_onnx`, run by ONNX Runtime on the CPU."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnx
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: ONNX file not found")
        try:
            metadata = {
                entry.key: entry.value
                for entry in onnx.load(str(path), load_external_data=False).metadata_props
            }
        except Exception as error:  # onnx raises DecodeError, ValueError ... for bytes that are not a model
            raise ModelFileError(
                f"{path}: not a readable ONNX file ({type(error).__name__}: {error})"
            ) from None
        if METADATA_KEY not in metadata:
            raise ModelFileError(
                f"{path}: not exported by python -m model.export (no {METADATA_KEY!r} metadata)"
            )
        super().__init__(ExportInfo.from_json(metadata[METADATA_KEY]), str(path))
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, images, task_index):
        logits, masks = self.session.run(
            list(OUTPUT_NAMES), {"images": images.numpy(), "task_index": task_index.numpy()}
        )
        return torch.from_numpy(logits), torch.from_numpy(masks)


class ExportedProgramModel(ExportedModel):
    """A .pt2 file from `save_torch`, loaded with torch.export.load."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: exported program not found")
        extra_files = {METADATA_KEY + ".json": ""}
        self.program = torch.export.load(path, extra_files=extra_files)
        super().__init__(ExportInfo.from_json(extra_files[METADATA_KEY + ".json"]), str(path))
        self.graph_module = self.program.module()

    def run(self, images, task_index):
        with torch.no_grad():
            return self.graph_module(images, task_index)


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="model file (model.pt from training or model.convert)"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, dest="export_format")
    parser.add_argument("--out", required=True, help="the file to write (.pt2 for torch, .onnx for onnx)")
    parser.add_argument(
        "--classes",
        default=None,
        help="classes.json of the model (default: the classes inside the model file, else the classes.json "
        "beside it)",
    )
    args = parser.parse_args(argv)
    try:
        out = export_model(args.checkpoint, args.export_format, args.out, args.classes)
    except (ModelFileError, ClassesFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {out} ({args.export_format}): images [1, 3, H, W] float32 RGB 0-255, H and W multiples of "
        f"{SIZE_MULTIPLE} padded with the pixel mean; task_index [1] int64 into {list(TASKS)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
