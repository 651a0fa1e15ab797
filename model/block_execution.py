"""How the repeated blocks of a OneFormer run: activation checkpointing and per-block compilation.

The repeated blocks are the backbone's transformer (or ConvNeXt) blocks, the pixel decoder's deformable
encoder layers, the transformer decoder's cross-attention / self-attention / FFN layers and the text
mapper's transformer blocks. Each component lists them in `repeated_blocks()` and calls them through
`run_block`, so that both switches act on the same units, whatever the component:

- activation checkpointing keeps only a block's inputs in the forward pass and recomputes the block in the
  backward pass (`torch.utils.checkpoint`, non-reentrant: it composes with DeepSpeed ZeRO 1-3 and with
  parameters that are gathered in forward hooks). The RNG state is replayed, so dropout and drop-path draw
  the same masks in the recomputation: losses and gradients equal those without checkpointing.
- compilation compiles each repeated block on its own (`nn.Module.compile`), as torchtitan does: one
  compiled graph per distinct block shape instead of one whole-model graph, parameter names unchanged.

Both are run-time settings, not part of the architecture: a model file never records them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCK_KINDS = ("backbone", "pixel_decoder", "transformer_decoder", "text_mapper")
"""The components whose repeated blocks the switches reach, in the order of the forward pass."""


def run_block(block: nn.Module, *inputs: torch.Tensor):
    """`block(*inputs)`, recomputed in the backward pass when the block is marked for checkpointing."""
    if getattr(block, "checkpoint_activations", False) and torch.is_grad_enabled():
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


def blocks_of(model: nn.Module, kind: str) -> list[nn.Module]:
    """The repeated blocks of one component of `model` (a OneFormer); none for a component it lacks
    (an inference model has no text mapper)."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"block kind must be one of {BLOCK_KINDS}, got {kind!r}")
    component = getattr(model, kind, None)
    if component is None:
        return []
    return list(component.repeated_blocks())


def set_activation_checkpointing(model: nn.Module, kinds: Iterable[str]) -> int:
    """Checkpoint the repeated blocks of the named components (and only those); returns how many are."""
    kinds = set(kinds)
    for kind in kinds - set(BLOCK_KINDS):
        raise ValueError(f"activation checkpointing: unknown block kind {kind!r}; known: {BLOCK_KINDS}")
    marked = 0
    for kind in BLOCK_KINDS:
        for block in blocks_of(model, kind):
            block.checkpoint_activations = kind in kinds
            marked += kind in kinds
    return marked


def compile_blocks(model: nn.Module, kinds: Iterable[str] = BLOCK_KINDS, **compile_options) -> int:
    """Compile each repeated block of the named components in place; returns how many were compiled."""
    compiled = 0
    for kind in kinds:
        for block in blocks_of(model, kind):
            block.compile(**compile_options)
            compiled += 1
    return compiled
