"""The text mapper's savings are exact: encoding each distinct text once, cut after the batch's last end
token, gives the queries, the contrastive loss and the parameter gradients of encoding every text at full
length (the computation before the savings, kept here as the reference), in float64."""

from __future__ import annotations

import pytest
import torch

from model.criterion import contrastive_loss
from model.text_mapper import TextMapper
from model.tokenizer import CONTEXT_LENGTH, tokenize

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_TEXTS = 20  # per image; the real N - 16 (134 or 234) only adds more copies of the padding sentence
PADDING = {"semantic": "a semantic photo", "instance": "an instance photo", "panoptic": "a panoptic photo"}
# Varied lengths, and "a photo with a person" in two images.
REAL_TEXTS = {
    "semantic": ["a photo with a sky", "a photo with a person", "a photo with a potted plant"],
    "instance": ["a photo with a person", "a photo with a traffic light"],
    "panoptic": ["a photo with a wall-other-merged", "a photo with a dog"],
}
TOO_LONG = "a photo with a " + "very " * 80 + "long thing"  # truncated by the tokenizer, end token at 76


def text_tokens(real_texts: dict[str, list[str]]) -> torch.Tensor:
    """One image per task: real texts first, then the task's padding sentence -> int64 [3, NUM_TEXTS, 77]."""
    per_image = [texts + [PADDING[task]] * (NUM_TEXTS - len(texts)) for task, texts in real_texts.items()]
    return tokenize([text for texts in per_image for text in texts]).view(len(per_image), NUM_TEXTS, -1)


def full_length_queries(mapper: TextMapper, tokens: torch.Tensor) -> torch.Tensor:
    """The text queries as computed before the savings: every text encoded on its own, at full length."""
    batch, num_texts, length = tokens.shape
    encoded = mapper.text_encoder(tokens.reshape(batch * num_texts, length))
    queries = mapper.text_projector(encoded).view(batch, num_texts, -1)
    return torch.cat([queries, mapper.prompt_ctx.weight.unsqueeze(0).expand(batch, -1, -1)], dim=1)


def gradients(mapper: TextMapper, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    parameters = dict(mapper.named_parameters())
    grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(parameters.items(), grads)}


@pytest.fixture(scope="module")
def mapper():
    torch.manual_seed(0)
    return TextMapper(hidden_dim=64, width=64, num_layers=2, num_heads=2).double()


@pytest.mark.parametrize(
    "real_texts",
    [REAL_TEXTS, {**REAL_TEXTS, "panoptic": [TOO_LONG, "a photo with a dog"]}],
    ids=["short-texts", "a-text-of-full-length"],
)
def test_queries_and_gradients_equal_the_full_computation(mapper, real_texts):
    tokens = text_tokens(real_texts)
    weights = torch.randn(3, NUM_TEXTS + mapper.num_context, 64, dtype=torch.float64)
    queries, _ = mapper(tokens)
    expected = full_length_queries(mapper, tokens)
    torch.testing.assert_close(queries, expected, rtol=0, atol=1e-12)
    actual_grads = gradients(mapper, (queries * weights).sum())
    expected_grads = gradients(mapper, (expected * weights).sum())
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert expected_grads["text_encoder.resblocks.0.attn.in_proj_weight"].abs().max() > 1e-3


def test_contrastive_loss_and_gradients_are_unchanged(mapper):
    tokens = text_tokens(REAL_TEXTS)
    object_queries = torch.randn(3, NUM_TEXTS + mapper.num_context, 64, dtype=torch.float64)
    queries, logit_scale = mapper(tokens)
    loss = contrastive_loss(object_queries, queries, logit_scale)
    expected_loss = contrastive_loss(object_queries, full_length_queries(mapper, tokens), mapper.logit_scale)
    torch.testing.assert_close(loss, expected_loss)
    actual_grads, expected_grads = gradients(mapper, loss), gradients(mapper, expected_loss)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, msg=name)


def test_the_encoder_sees_each_distinct_text_once_up_to_the_last_end_token(mapper):
    tokens = text_tokens(REAL_TEXTS)
    seen = []
    hook = mapper.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            mapper(tokens)
    finally:
        hook.remove()
    distinct = {text for texts in REAL_TEXTS.values() for text in texts} | set(PADDING.values())
    longest = int(tokens.argmax(dim=-1).max()) + 1  # the end token has the largest id
    assert longest < CONTEXT_LENGTH
    assert list(seen[0].shape) == [len(distinct), longest]
