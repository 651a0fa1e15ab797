"""Exports of the inference network (model/export.py): torch.export and ONNX Runtime outputs equal the eager
model's (relative error < 1e-4 in fp32) for every task at two input sizes, one graph for every size (the tiny
preset's DiNAT pads its maps at the small size and not at the large one), the .pt2 runs without our code,
and `model.predict --onnx` gives the eager model's segments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from model import make_config
from model.checkpoint import build_from_config, load_model, save_model
from model.classes import classes_for_model
from model.export import (
    ExportedProgramModel,
    ExportInfo,
    OnnxRuntimeModel,
    export_program,
    save_onnx,
    save_torch,
)
from model.export import (
    main as export_main,
)
from model.predict import main as predict_main
from model.texts import TASKS

TOLERANCE = 1e-4
SWIN_L_ONNX_RUNTIME_TOLERANCE = 5e-4
"""ONNX Runtime on Swin-L with random weights reaches 2.7e-4: not its kernels but the masked attention's
threshold (sigmoid < 0.5), which fp32 rounding flips for mask logits within ~1e-7 of 0; the eager model itself
moves by 4.3e-4 there when its input is scaled by 1 + 1e-7 noise (docs/use_a_trained_model.md, Checked)."""
CLASSES = [
    {"contiguous_id": k, "category_id": 10 + 3 * k, "name": f"class{k}", "isthing": k < 2} for k in range(4)
]
SIZES = ((64, 96), (224, 256))
"""Small enough that every DiNAT stage of the tiny preset pads its map to the dilated window, and large
enough that none does: one exported graph must hold both."""


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((expected - actual).abs().max() / expected.abs().max())


def eager_outputs(model, images: torch.Tensor, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        outputs = model(images, tasks)
    return outputs["pred_logits"], outputs["pred_masks"]


def random_batch(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(len(TASKS), 3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model file (panoptic threshold 0, so the untrained model predicts segments) that carries its
    classes (no classes.json beside it), and its exports from one trace: m.pt2 and m.onnx."""
    root = tmp_path_factory.mktemp("export")
    config = make_config("tiny", num_classes=len(CLASSES), object_mask_threshold=0.0)
    torch.manual_seed(0)
    save_model(build_from_config(config).eval(), config, root / "model.pt", classes=CLASSES)
    model = load_model(root / "model.pt")
    info = ExportInfo.of(config, classes_for_model(root / "model.pt", config.num_classes), model)
    program = export_program(model)
    save_torch(program, info, root / "m.pt2")
    save_onnx(program, info, root / "m.onnx")
    return {"root": root, "config": config}


@pytest.fixture(scope="module")
def eager(tiny):
    return load_model(tiny["root"] / "model.pt")


@pytest.mark.parametrize("size", SIZES)
def test_torch_export_equals_eager_for_every_task(tiny, eager, size):
    exported = ExportedProgramModel(tiny["root"] / "m.pt2")
    images = random_batch(*size, seed=size[0])
    logits, masks = eager_outputs(eager, images, list(TASKS))
    got = exported(images, list(TASKS))
    assert relative_error(logits, got["pred_logits"]) < TOLERANCE
    assert relative_error(masks, got["pred_masks"]) < TOLERANCE
    for index, task in enumerate(TASKS):  # each task alone too: the task input steers the whole graph
        alone = exported(images[index : index + 1], [task])
        assert relative_error(logits[index], alone["pred_logits"][0]) < TOLERANCE


@pytest.mark.parametrize("size", SIZES)
def test_onnx_runtime_equals_eager_for_every_task(tiny, eager, size):
    session = OnnxRuntimeModel(tiny["root"] / "m.onnx")
    images = random_batch(*size, seed=size[1])
    logits, masks = eager_outputs(eager, images, list(TASKS))
    got = session(images, list(TASKS))
    assert relative_error(logits, got["pred_logits"]) < TOLERANCE
    assert relative_error(masks, got["pred_masks"]) < TOLERANCE


def test_onnx_file_is_opset_17_or_later_and_carries_the_classes(tiny):
    import onnx

    model = onnx.load(str(tiny["root"] / "m.onnx"), load_external_data=False)
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["images", "task_index"]
    info = OnnxRuntimeModel(tiny["root"] / "m.onnx").info
    assert info.class_names == tuple(c["name"] for c in CLASSES)
    assert info.category_ids == tuple(c["category_id"] for c in CLASSES)
    assert info.tasks == TASKS
    assert info.model_config() == tiny["config"]


def test_exported_program_runs_without_our_code(tiny, eager):
    """torch.export.load and the graph need torch only: our packages are made unimportable first."""
    images = random_batch(96, 128, seed=7)[:1]
    torch.save(images, tiny["root"] / "images.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["model"] = sys.modules["kernels"] = sys.modules["pipeline"] = None
        import torch
        program = torch.export.load({str(tiny["root"] / "m.pt2")!r})
        logits, masks = program.module()(torch.load({str(tiny["root"] / "images.pt")!r}), torch.tensor([2]))
        torch.save((logits, masks), {str(tiny["root"] / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tiny["root"])
    logits, masks = torch.load(tiny["root"] / "out.pt")
    expected_logits, expected_masks = eager_outputs(eager, images, ["panoptic"])
    assert relative_error(expected_logits, logits) < TOLERANCE
    assert relative_error(expected_masks, masks) < TOLERANCE


@pytest.mark.slow  # a second export, through the command line: minutes on 2 shared cores
def test_predict_with_onnx_gives_the_eager_segments(tiny, tmp_path):
    """`python -m model.export --format onnx`, then the same images through `model.predict --checkpoint` and
    `--onnx`: identical panoptic and semantic maps and segment lists, the same instances (scores to 1e-5)."""
    root = tiny["root"]
    onnx_file = tmp_path / "cli.onnx"
    assert (
        export_main(["--checkpoint", str(root / "model.pt"), "--format", "onnx", "--out", str(onnx_file)])
        == 0
    )
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate(((70, 90), (120, 64), (100, 100))):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            images / f"{index}.png"
        )
    common = ["--all-tasks", str(images), "--test-size", "64", "128", "--quiet", "--no-overlays"]
    assert (
        predict_main(["--checkpoint", str(root / "model.pt"), "--out", str(tmp_path / "eager"), *common]) == 0
    )
    assert predict_main(["--onnx", str(onnx_file), "--out", str(tmp_path / "onnx"), *common]) == 0
    for folder in ("panoptic", "semantic"):
        for png in sorted((tmp_path / "eager" / folder).glob("*.png")):
            assert np.array_equal(
                np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "onnx" / folder / png.name))
            )
    eager_json = json.loads((tmp_path / "eager" / "panoptic.json").read_text())
    onnx_json = json.loads((tmp_path / "onnx" / "panoptic.json").read_text())
    assert [[(s["id"], s["category_id"]) for s in a["segments_info"]] for a in eager_json["annotations"]] == [
        [(s["id"], s["category_id"]) for s in a["segments_info"]] for a in onnx_json["annotations"]
    ]
    assert sum(len(a["segments_info"]) for a in eager_json["annotations"]) > 0
    eager_instances = json.loads((tmp_path / "eager" / "instances.json").read_text())
    onnx_instances = json.loads((tmp_path / "onnx" / "instances.json").read_text())
    assert [(r["image_id"], r["category_id"], r["segmentation"]["counts"]) for r in eager_instances] == [
        (r["image_id"], r["category_id"], r["segmentation"]["counts"]) for r in onnx_instances
    ]
    assert np.allclose([r["score"] for r in eager_instances], [r["score"] for r in onnx_instances], atol=1e-5)


def test_export_cli_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    assert (
        export_main(
            [
                "--checkpoint",
                str(tmp_path / "missing.pt"),
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "missing.pt" in error


def test_onnx_runtime_refuses_an_unpadded_size_with_a_message(tiny):
    session = OnnxRuntimeModel(tiny["root"] / "m.onnx")
    with pytest.raises(ValueError, match="multiples of 32"):
        session(torch.zeros(1, 3, 70, 96), ["panoptic"])


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ONEFORMER_REAL_SIZE_EXPORT") != "1",
    reason="real-size export parity: about 8 minutes, and it leaves some 4 GB resident in the test process, "
    "which starves the real-size recipe smoke runs of this 23.5 GB machine; run it alone with "
    "ONEFORMER_REAL_SIZE_EXPORT=1 pytest tests/test_export.py -k swin_l",
)
def test_swin_l_exports_equal_eager_at_small_inputs(tmp_path):
    """The real Swin-L preset (ADE20K heads, 218.8M parameters) at two inputs near its smallest (416: two
    windows on the stride-32 map), every task: the torch.export program and ONNX Runtime against the eager
    model, image by image as the exports run (a batch of several changes fp32 rounding in eager, and 24
    random-weight blocks amplify it past 1e-4)."""
    torch.manual_seed(0)
    config = make_config("swin_l")
    model = build_from_config(config).eval()
    images = {size: random_batch(*size, seed=size[1]) for size in ((416, 448), (448, 512))}
    expected = {(size, index): eager_outputs(model, batch[index : index + 1], [task])
                for size, batch in images.items() for index, task in enumerate(TASKS)}  # fmt: skip
    info = ExportInfo.of(config, _classes(config.num_classes), model)
    program = export_program(model)
    save_torch(program, info, tmp_path / "swin.pt2")
    save_onnx(program, info, tmp_path / "swin.onnx")
    del program, model
    # ONNX Runtime: up to 2.7e-4 (448x512, panoptic), where a mask logit within ~1e-7 of 0 at the masked
    # attention's threshold rounds to the other side (see SWIN_L_ONNX_RUNTIME_TOLERANCE); 1e-6 to 1.7e-5 in
    # the other cases. The torch.export program runs the eager kernels and stays below 1e-4.
    runtimes = ((ExportedProgramModel(tmp_path / "swin.pt2"), TOLERANCE),
                (OnnxRuntimeModel(tmp_path / "swin.onnx"), SWIN_L_ONNX_RUNTIME_TOLERANCE))  # fmt: skip
    for runtime, tolerance in runtimes:
        for (size, index), (logits, masks) in expected.items():
            got = runtime(images[size][index : index + 1], [TASKS[index]])
            assert relative_error(logits, got["pred_logits"]) < tolerance, (type(runtime), size, TASKS[index])
            assert relative_error(masks, got["pred_masks"]) < tolerance, (type(runtime), size, TASKS[index])


def _classes(num_classes: int):
    from model.classes import ModelClasses

    return ModelClasses(
        tuple(f"c{k}" for k in range(num_classes)), (True,) * num_classes, tuple(range(num_classes))
    )
