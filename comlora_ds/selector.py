"""The LoRA selector (ComLoRA paper, section 3.3).

A one-layer transformer encoder over the *frozen base token embeddings* of the input, mean-pooled
over the non-pad tokens, scored against K learnable component embeddings by dot product:
``sim_k = h_avg . e_k``.

The encoder runs in the dtype of its parameters (bf16 under DeepSpeed bf16, like the rest of the
network, with fp32 master weights in the optimizer); pooling and the similarity scores are computed
in fp32, since the losses built on them compare small differences of scores.
"""

from __future__ import annotations

import torch
from torch import nn


def default_num_heads(dim: int, model_heads: int) -> int:
    """The model's head count when it divides ``dim``, else the largest divisor of dim below it."""
    for heads in range(min(model_heads, dim), 0, -1):
        if dim % heads == 0:
            return heads
    return 1


class Selector(nn.Module):
    """Scores each input sequence against K components; returns ``sims [B, K]`` in fp32.

    Sizes default to the paper's: one layer at the model's hidden size, the model's head count, and
    an FFN of 1.5 x hidden (which gives the paper's 1.45% of LLaMA-3-8B's parameters).
    """

    def __init__(self, num_components: int, embed_dim: int, hidden_size: int | None = None,
                 num_heads: int | None = None, ffn_size: int | None = None, dropout: float = 0.0,
                 model_num_heads: int = 8):
        super().__init__()
        dim = hidden_size or embed_dim
        heads = num_heads or default_num_heads(dim, model_num_heads)
        self.num_components = num_components
        self.input_proj = nn.Linear(embed_dim, dim) if dim != embed_dim else nn.Identity()
        self.encoder = nn.TransformerEncoderLayer(dim, heads, ffn_size or (3 * dim) // 2, dropout,
                                                  batch_first=True)
        self.component_embeddings = nn.Parameter(torch.randn(num_components, dim) * dim ** -0.5)

    def forward(self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """token_embeddings [B, L, E] (frozen, detached), attention_mask [B, L] (1 = token)."""
        dtype = self.component_embeddings.dtype
        x = self.input_proj(token_embeddings.detach().to(dtype))
        hidden = self.encoder(x, src_key_padding_mask=attention_mask == 0)       # [B, L, d_sel]
        keep = attention_mask.unsqueeze(-1).bool()
        summed = hidden.float().masked_fill(~keep, 0.0).sum(1)
        pooled = summed / keep.sum(1).clamp_min(1).float()                       # masked mean, fp32
        return pooled @ self.component_embeddings.float().t()                    # [B, K]
