"""Task conditioning: the task token and the task-conditioned initial object queries.

`TaskEncoder` tokenizes "the task is {task}" with CLIP's BPE (77 ids) and maps the raw ids, cast to float,
through a 2-layer MLP. There is no embedding table: that is what the released checkpoints were trained
with, so we keep it for parity. The ids stay exact whatever the model's dtype: they enter the MLP as fp32
(exact below 2**24) and its first layer computes in fp32 with its weights upcast (`ExactInputLinear`); in
bf16 the ids would be rounded to 8 significant bits (29119 -> 29056), and neighbouring words would share
one input. The official code casts the ids to the autocast dtype instead (a deviation kept on purpose).

`QueryInitializer` is the official `class_transformer` (a 2-layer DETR decoder with no encoder layers): it
starts N-1 queries from copies of the task token and refines them against the stride-4 mask features. Quirk
kept for parity: the memory's values are the sine position encoding of the mask features, and its keys are
that encoding plus a 1x1-conv projection of the features (the official code passes the encoding as `src` and
the projected features as `pos_embed`). The query position is the first N-1 rows of the decoder's learned
query embedding; the caller appends the task token to make N queries.

Differences between the public implementations: none in the computation. Hugging Face names the module
`query_transformer` / `query_input_projection`; the official code `class_transformer` / `class_input_proj`.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from model.block_execution import run_block
from model.layers import MLP, ExactInputLinear, sine_position_encoding
from model.texts import TASKS, task_prompt
from model.tokenizer import CONTEXT_LENGTH, tokenize


@lru_cache(maxsize=len(TASKS))
def _task_token_ids(task: str) -> torch.Tensor:
    return tokenize(task_prompt(task))[0]


def task_token_ids(tasks: list[str]) -> torch.Tensor:
    """CLIP token ids of "the task is {task}" per task -> int64 [len(tasks), 77]."""
    unknown = sorted({task for task in tasks if task not in TASKS})
    if unknown:
        raise ValueError(f"tasks must be drawn from {TASKS}, got {unknown}")
    return torch.stack([_task_token_ids(task) for task in tasks])


class TaskEncoder(nn.Module):
    """Task strings -> task tokens [B, hidden_dim] via MLP(77 -> hidden -> hidden) over the raw token ids."""

    def __init__(self, hidden_dim: int, context_length: int = CONTEXT_LENGTH):
        super().__init__()
        self.context_length = context_length
        self.task_mlp = MLP(
            context_length, hidden_dim, hidden_dim, num_layers=2, first_layer=ExactInputLinear
        )

    def forward(self, tasks: list[str]) -> torch.Tensor:
        ids = task_token_ids(tasks)
        if ids.shape[1] != self.context_length:
            raise ValueError(
                f"task ids have length {ids.shape[1]}, the task MLP expects {self.context_length}"
            )
        weight = self.task_mlp.layers[0].weight
        exact_dtype = torch.promote_types(weight.dtype, torch.float32)
        return self.task_mlp(ids.to(device=weight.device, dtype=exact_dtype))


class QueryTransformerLayer(nn.Module):
    """DETR's post-norm decoder layer: self-attention, cross-attention to the memory, ReLU FFN."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, queries, memory, memory_pos, query_pos) -> torch.Tensor:
        q = k = queries + query_pos
        attended = self.self_attn(q, k, value=queries, need_weights=False)[0]
        queries = self.norm1(queries + self.dropout1(attended))
        attended = self.multihead_attn(
            queries + query_pos, memory + memory_pos, value=memory, need_weights=False
        )[0]
        queries = self.norm2(queries + self.dropout2(attended))
        hidden = self.linear2(self.dropout(torch.relu(self.linear1(queries))))
        return self.norm3(queries + self.dropout3(hidden))


class QueryInitializer(nn.Module):
    """Task token + mask features -> N-1 refined object queries [B, N-1, hidden_dim]."""

    def __init__(
        self,
        hidden_dim: int,
        mask_dim: int,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        num_layers: int = 2,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.layers = nn.ModuleList(
            QueryTransformerLayer(hidden_dim, num_heads, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        for parameter in self.layers.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        self.input_proj = nn.Conv2d(mask_dim, hidden_dim, kernel_size=1)
        nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
        nn.init.zeros_(self.input_proj.bias)

    def forward(
        self, mask_features: torch.Tensor, task_token: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        """mask_features [B, mask_dim, h, w], task_token [B, D] (already normalised by the caller),
        query_pos [N-1, D]."""
        batch, _, height, width = mask_features.shape
        encoding = sine_position_encoding(
            batch, height, width, self.hidden_dim // 2, mask_features.device, mask_features.dtype
        )
        memory = encoding.flatten(2).transpose(1, 2)
        memory_pos = self.input_proj(mask_features).flatten(2).transpose(1, 2)
        query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
        queries = task_token.unsqueeze(1).expand(-1, query_pos.shape[1], -1)
        for layer in self.layers:
            queries = run_block(layer, queries, memory, memory_pos, query_pos)
        return self.norm(queries)
