"""OneFormer's masked-attention transformer decoder (Mask2Former's, started from task-conditioned queries).

Order of the computation (the official `ContrastiveMultiScaleMaskedTransformerDecoder`):
1. The task token goes through `decoder_norm` (the LayerNorm shared with the prediction heads; the official
   `USE_TASK_NORM`), then `QueryInitializer` turns it into N-1 queries; the normalised task token is
   appended as query N. These N queries are also the "object queries" of the contrastive loss.
2. A prediction (class logits, mask logits, attention mask) from those initial queries.
3. Per layer i (levels round robin 1/32, 1/16, 1/8): masked cross-attention to level i % 3 (keys get the
   sine encoding, the features their learned level embedding), self-attention, FFN, all post-norm; the
   learned query embedding (all N rows) is the query position everywhere; then a prediction whose mask,
   resized to the next level and thresholded at sigmoid 0.5, blocks the next cross-attention (rows that
   would block everything are unblocked; the mask is detached).

Where the public implementations differ (and what we follow):
- Hugging Face's self-attention here uses separate q/k/v projections; the official code (and we) use
  `nn.MultiheadAttention` with one packed `in_proj_weight` [3D, D] in q, k, v order. Same computation.
- Hugging Face keeps the query embedding, level embedding and sine encoding on a wrapper module and the
  input projections there; we keep them on this module, as the official code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.block_execution import run_block
from model.layers import MLP, sine_position_encoding
from model.task_conditioning import QueryInitializer

NUM_DECODER_LEVELS = 3


class CrossAttentionLayer(nn.Module):
    """Post-norm (masked) cross-attention from the queries to one feature level."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, queries, memory, attention_mask, memory_pos, query_pos) -> torch.Tensor:
        attended = self.multihead_attn(
            queries + query_pos,
            memory + memory_pos,
            value=memory,
            attn_mask=attention_mask,
            need_weights=False,
        )[0]
        return self.norm(queries + attended)


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention among the queries."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, queries, query_pos) -> torch.Tensor:
        q = k = queries + query_pos
        return self.norm(queries + self.self_attn(q, k, value=queries, need_weights=False)[0])


class FFNLayer(nn.Module):
    """Post-norm ReLU feed-forward block."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, queries) -> torch.Tensor:
        return self.norm(queries + self.linear2(F.relu(self.linear1(queries))))


class TransformerDecoder(nn.Module):
    """Task-conditioned masked-attention decoder.

    forward(multi_scale_features [3 maps, 1/32, 1/16, 1/8], mask_features [B, mask_dim, H/4, W/4],
    task_token [B, D]) -> {"pred_logits" [B, N, K+1], "pred_masks" [B, N, H/4, W/4], "aux_outputs" (the
    `num_layers` earlier predictions, the first from the initial queries), "object_queries" [B, N, D]}."""

    def __init__(
        self,
        in_channels: int,
        mask_dim: int,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 250,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 9,
        query_init_layers: int = 2,
        query_init_dropout: float = 0.1,
    ):
        super().__init__()
        if num_queries < 2:
            raise ValueError(
                f"num_queries must be >= 2 (N-1 refined queries plus the task token), got {num_queries}"
            )
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.query_initializer = QueryInitializer(
            hidden_dim, mask_dim, num_heads, ffn_dim, query_init_dropout, query_init_layers
        )
        self.cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads) for _ in range(num_layers)
        )
        self.self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads) for _ in range(num_layers)
        )
        self.ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, ffn_dim) for _ in range(num_layers))
        for layers in (self.cross_attention_layers, self.self_attention_layers, self.ffn_layers):
            for parameter in layers.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(NUM_DECODER_LEVELS, hidden_dim)
        self.input_proj = nn.ModuleList(
            self._input_projection(in_channels, hidden_dim) for _ in range(NUM_DECODER_LEVELS)
        )
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, num_layers=3)

    @staticmethod
    def _input_projection(in_channels: int, hidden_dim: int) -> nn.Module:
        if in_channels == hidden_dim:
            return nn.Identity()
        projection = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        nn.init.kaiming_uniform_(projection.weight, a=1)
        nn.init.zeros_(projection.bias)
        return projection

    def repeated_blocks(self) -> list[nn.Module]:
        layers = zip(self.cross_attention_layers, self.self_attention_layers, self.ffn_layers)
        return [*self.query_initializer.layers, *(layer for triple in layers for layer in triple)]

    def forward(
        self, multi_scale_features: list[torch.Tensor], mask_features: torch.Tensor, task_token: torch.Tensor
    ) -> dict:
        if len(multi_scale_features) != NUM_DECODER_LEVELS:
            raise ValueError(f"expected {NUM_DECODER_LEVELS} feature maps, got {len(multi_scale_features)}")
        memories, memory_positions, level_sizes = self._flatten_levels(multi_scale_features)
        batch = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)

        task_token = self.decoder_norm(task_token)
        refined = self.query_initializer(mask_features, task_token, self.query_embed.weight[:-1])
        object_queries = torch.cat([refined, task_token.unsqueeze(1)], dim=1)

        queries = object_queries
        logits, masks, attention_mask = self._predict(queries, mask_features, level_sizes[0])
        predictions = [(logits, masks)]
        for index in range(len(self.cross_attention_layers)):
            level = index % NUM_DECODER_LEVELS
            queries = run_block(
                self.cross_attention_layers[index],
                queries, memories[level], attention_mask, memory_positions[level], query_pos,
            )  # fmt: skip
            queries = run_block(self.self_attention_layers[index], queries, query_pos)
            queries = run_block(self.ffn_layers[index], queries)
            next_size = level_sizes[(index + 1) % NUM_DECODER_LEVELS]
            logits, masks, attention_mask = self._predict(queries, mask_features, next_size)
            predictions.append((logits, masks))
        return {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "aux_outputs": [{"pred_logits": lg, "pred_masks": mk} for lg, mk in predictions[:-1]],
            "object_queries": object_queries,
        }

    def _flatten_levels(self, features: list[torch.Tensor]):
        memories, positions, sizes = [], [], []
        for level, feature in enumerate(features):
            batch, _, height, width = feature.shape
            sizes.append((height, width))
            projected = (
                self.input_proj[level](feature).flatten(2) + self.level_embed.weight[level][None, :, None]
            )
            memories.append(projected.transpose(1, 2))
            encoding = sine_position_encoding(
                batch, height, width, self.hidden_dim // 2, feature.device, projected.dtype
            )
            positions.append(encoding.flatten(2).transpose(1, 2))
        return memories, positions, sizes

    def _predict(self, queries: torch.Tensor, mask_features: torch.Tensor, attention_size: tuple[int, int]):
        """Class logits, mask logits and the boolean cross-attention mask (True = blocked) for the next layer."""
        normed = self.decoder_norm(queries)
        logits = self.class_embed(normed)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(normed), mask_features)
        with torch.no_grad():
            resized = F.interpolate(masks, size=attention_size, mode="bilinear", align_corners=False)
            # sigmoid(x) < 0.5 <=> x < 0, written on the probabilities to match the official rounding.
            blocked = resized.sigmoid().flatten(2) < 0.5
            # A query that would attend nowhere attends everywhere instead (softmax over nothing is NaN).
            blocked = blocked & ~blocked.all(-1, keepdim=True)
            attention_mask = blocked.repeat_interleave(self.num_heads, dim=0)
        return logits, masks, attention_mask
