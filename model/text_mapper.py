"""The text mapper (training only): GT texts -> N text queries for the query-text contrastive loss.

A CLIP-style text encoder (pre-LN, QuickGELU, causal self-attention, output at the end-of-text token, which
has the largest id in CLIP's vocabulary) encodes each of the N-16 texts; a 2-layer MLP projects them to the
decoder width; 16 learned context embeddings are appended, giving N text queries per image. The learnable
contrastive temperature lives here too, as `logit_scale` = log(1/0.07) at init (the loss takes exp and
clamps at 100).

Exact savings (ours alone): of the N-16 texts per image most are the task's padding sentence, so the mapper
encodes each distinct text of the batch once and gathers the results (duplicates get the same feature, and
the gather's backward sums their gradients). It also cuts every text after the position of the batch's last
end token: under the causal mask a token's feature depends only on the tokens before it, so the end-token
features are the same as at full length; the positional embedding is sliced to the kept length and the
end-token index is unchanged. Outputs and gradients equal the full computation up to summation order. On a
GPU this costs one host sync per step (`torch.unique` and the cut length are data-dependent shapes).

Where the public implementations differ (and what we follow):
- Hugging Face builds the causal mask but never passes it to the attention, so every token sees the padding
  after it; the official code applies it; we apply it.
- The official code keeps `logit_scale` in its criterion and Hugging Face in its loss module; the converted
  checkpoints carry neither. We keep it here so that the optimizer sees one parameter set (the model's).
- The official `prompt_ctx` has the text encoder's width; it is concatenated with the projected texts, so
  that only works when the width equals the decoder width. We size it by the decoder width and require the
  two to match when loading official weights (they do: both 256).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from model.block_execution import run_block
from model.layers import MLP, QuickGELU


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-LN block: x + attn(ln_1(x)) with the causal mask, then x + mlp(ln_2(x))."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, attn_mask=causal_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """Token ids [M, L] (L <= context_length, position i gets positional embedding i) -> features at the
    end-of-text token [M, width]. Encodes exactly what it is given: the savings are the mapper's."""

    def __init__(self, context_length: int, width: int, num_layers: int, num_heads: int, vocab_size: int):
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, num_heads) for _ in range(num_layers))
        self.ln_final = nn.LayerNorm(width)
        causal = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("causal_mask", causal, persistent=False)
        self._init_weights(width, num_layers)

    def _init_weights(self, width: int, num_layers: int) -> None:
        """CLIP's init: small embeddings, attention/MLP scaled by width and depth."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        projection_std = width**-0.5 * (2 * num_layers) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=projection_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=projection_std)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.ndim != 2 or not 1 <= token_ids.shape[1] <= self.context_length:
            raise ValueError(
                f"token_ids must be [M, L] with 1 <= L <= {self.context_length}, got {list(token_ids.shape)}"
            )
        length = token_ids.shape[1]
        x = self.token_embedding(token_ids) + self.positional_embedding[:length]
        mask = self.causal_mask[:length, :length].to(x.dtype)
        for block in self.resblocks:
            x = run_block(block, x, mask)
        x = self.ln_final(x)
        end_of_text = token_ids.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), end_of_text]


def distinct_texts(token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [M, L] -> (each distinct text once, cut after the last end token among them [U, L'],
    the row of every input text among those [M]). The end token has the largest id, hence argmax."""
    texts, index = torch.unique(token_ids, dim=0, return_inverse=True)
    length = int(texts.argmax(dim=-1).max()) + 1
    return texts[:, :length], index


class TextMapper(nn.Module):
    """Per-image GT texts [B, T, context_length] -> text queries [B, T + num_context, hidden_dim]."""

    def __init__(
        self,
        hidden_dim: int,
        width: int = 256,
        num_layers: int = 6,
        num_heads: int = 4,
        context_length: int = 77,
        vocab_size: int = 49408,
        projection_layers: int = 2,
        num_context: int = 16,
        temperature: float = 0.07,
    ):
        super().__init__()
        self.text_encoder = TextEncoder(context_length, width, num_layers, num_heads, vocab_size)
        self.text_projector = MLP(width, hidden_dim, hidden_dim, projection_layers)
        self.prompt_ctx = nn.Embedding(num_context, hidden_dim) if num_context > 0 else None
        # Shape [1], not a scalar: DeepSpeed broadcasts parameters as byte views, which 0-dim tensors cannot give.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / temperature)))
        self.num_context = num_context

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.text_encoder.resblocks)

    def forward(self, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text queries [B, T (+ prompt contexts), D] and the contrastive logit scale. The scale leaves through
        forward (as a copy) because ZeRO-3 holds a parameter's values only inside its module's forward."""
        if text_tokens.ndim != 3:
            raise ValueError(f"text_tokens must be [B, T, context_length], got {list(text_tokens.shape)}")
        batch, num_texts, length = text_tokens.shape
        texts, index = distinct_texts(text_tokens.reshape(batch * num_texts, length))
        # The projector works row by row too: project the distinct texts, then gather.
        projected = self.text_projector(self.text_encoder(texts))
        queries = projected[index].view(batch, num_texts, -1)
        if self.prompt_ctx is not None:
            context = self.prompt_ctx.weight.unsqueeze(0).expand(batch, -1, -1)
            queries = torch.cat([queries, context], dim=1)
        return queries, self.logit_scale.clone()
