"""Our Swin, loaded through model/convert/swin.py, equals transformers' SwinBackbone on non-square inputs
whose stages are not window multiples (padding, shifted-window masks for the padded size, odd merges)."""

import pytest
import torch
from transformers import SwinBackbone, SwinConfig

from model.backbones import build_backbone
from model.convert.swin import convert_swin_state_dict

SIZES = {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": 3}
PREFIX = "model.pixel_level_module.encoder."


def random_hugging_face_swin():
    config = SwinConfig(embed_dim=SIZES["embed_dim"], depths=SIZES["depths"], num_heads=SIZES["num_heads"],
                        window_size=SIZES["window_size"], out_features=["stage1", "stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    model = SwinBackbone(config).eval()
    with torch.no_grad():  # default init leaves biases and norms trivial; make every parameter matter
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("height,width", [(100, 76), (61, 130)])
def test_converted_hugging_face_swin_gives_the_same_four_maps(height, width):
    theirs = random_hugging_face_swin()
    ours = build_backbone("swin", **SIZES).eval()
    state = {PREFIX + k: v for k, v in theirs.state_dict().items() if not k.startswith("swin.layernorm.")}
    ours.load_state_dict(convert_swin_state_dict(state, prefix=PREFIX), strict=True)
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        expected, actual = theirs(images).feature_maps, ours(images)
    assert len(actual) == 4
    for level, (want, got) in enumerate(zip(expected, actual)):
        assert got.shape == want.shape
        relative = ((got - want).norm() / want.norm()).item()
        assert relative < 1e-4, f"res{level + 2}: relative error {relative:.2e}"


def test_old_hugging_face_names_convert_like_the_new_ones():
    """Before transformers 5: attention.self.{query,key,value}, attention.output.dense, intermediate/output."""
    new = {k: v for k, v in random_hugging_face_swin().state_dict().items() if "layernorm." not in k}
    old = {}
    for key, value in new.items():
        key = key.replace("attention.q_proj", "attention.self.query").replace("attention.k_proj", "attention.self.key")
        key = key.replace("attention.v_proj", "attention.self.value").replace("attention.o_proj", "attention.output.dense")
        key = key.replace("attention.relative_position_bias.", "attention.self.")
        key = key.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        old[key.replace("swin.", "", 1)] = value
    converted_new, converted_old = convert_swin_state_dict(new), convert_swin_state_dict(old)
    assert converted_new.keys() == converted_old.keys()
    for key in converted_new:
        torch.testing.assert_close(converted_old[key], converted_new[key], rtol=0, atol=0)
