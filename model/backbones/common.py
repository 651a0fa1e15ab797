"""Small blocks shared by the transformer backbones."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability `drop_prob`, rescale the rest."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (the official names, so checkpoints load as they are)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path_rates(max_rate: float, depths: list[int]) -> list[list[float]]:
    """Stochastic-depth rate per block, rising linearly from 0 to `max_rate` over all blocks, split by stage.
    Plain Python so that models can be built on the meta device."""
    total = sum(depths)
    rates = [max_rate * i / max(total - 1, 1) for i in range(total)]
    return [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]


def init_transformer_weights(module: nn.Module) -> None:
    """timm's transformer initialisation (truncated-normal linears, unit LayerNorms), for `Module.apply`."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
