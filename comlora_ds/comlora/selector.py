"""The LoRA selector (ComLoRA paper, section 3.3).

A one-layer transformer encoder over the *frozen base token embeddings* of the input, mean-pooled
over the non-pad tokens, scored against K learnable component embeddings by dot product:
``sim_k = h_avg . e_k``.

All of the selector's math is fp32, whatever the dtype its parameters are stored in: under DeepSpeed bf16 they are
stored in bf16 (DeepSpeed casts the whole module; fp32 master copies live in the optimizer), and each forward computes
with fp32 activations and fp32 copies of those stored weights. The winner is an argmax of summed scores and the losses
compare small differences of them, so a close race must not be decided by bf16 rounding (in bf16 the scores were off
by 1e-3 at init, about 1% of the median gap between components). The cost is one encoder layer in fp32. The encoder
is torch's ``nn.TransformerEncoderLayer`` (its parameters, its layout), applied by :func:`_encoder_layer_fp32`, which
reads each weight through its module attribute (so ZeRO-3 gathers it) and upcasts it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        x = token_embeddings.detach().float()
        if isinstance(self.input_proj, nn.Linear):
            x = F.linear(x, self.input_proj.weight.float(), self.input_proj.bias.float())
        hidden = _encoder_layer_fp32(self.encoder, x, attention_mask == 0)       # [B, L, d_sel]
        keep = attention_mask.unsqueeze(-1).bool()
        summed = hidden.masked_fill(~keep, 0.0).sum(1)
        pooled = summed / keep.sum(1).clamp_min(1).float()                       # masked mean
        return pooled @ self.component_embeddings.float().t()                    # [B, K]


def _encoder_layer_fp32(layer: nn.TransformerEncoderLayer, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``layer(x, src_key_padding_mask=pad)`` (batch first, post-norm, ReLU: how :class:`Selector` builds it)
    computed in fp32 from fp32 copies of the layer's weights, whatever their stored dtype; gradients reach the stored
    weights through the casts."""
    attn = layer.self_attn
    q = x.transpose(0, 1)                                                        # [L, B, d]
    attended, _ = F.multi_head_attention_forward(
        q, q, q, attn.embed_dim, attn.num_heads, attn.in_proj_weight.float(), attn.in_proj_bias.float(), None, None,
        False, attn.dropout, attn.out_proj.weight.float(), attn.out_proj.bias.float(), training=layer.training,
        key_padding_mask=pad, need_weights=False)
    x = _layer_norm(layer.norm1, x + layer.dropout1(attended.transpose(0, 1)))
    ffn = F.linear(layer.dropout(F.relu(F.linear(x, layer.linear1.weight.float(), layer.linear1.bias.float()))),
                   layer.linear2.weight.float(), layer.linear2.bias.float())
    return _layer_norm(layer.norm2, x + layer.dropout2(ffn))


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
