"""Transformer building blocks shared by the three FLAVA encoders.

The maths follows transformers' ``FlavaLayer`` (pre-LayerNorm ViT block, exact-erf GELU, dropout after
each projection); attention goes through ``scaled_dot_product_attention`` so fused kernels are used on
every device, and q/k/v are one fused projection (split/joined on checkpoint import/export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 -> fp32; fp32/fp64 unchanged)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least fp32 whatever the parameter dtype (the paper keeps it out of bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(upcast(x), self.normalized_shape, upcast(self.weight), upcast(self.bias), self.eps)
        return out.to(x.dtype)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 1 = token, 0 = padding  ->  (B, 1, 1, L) bool mask for SDPA (True = may be attended)."""
    return rearrange(attention_mask.bool(), "b l -> b 1 1 l")


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class TransformerLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)). The unit FSDP2 shards and checkpointing wraps."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, dropout: float, eps: float):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, eps=eps)
        self.attn = SelfAttention(hidden_size, num_heads, dropout)
        self.norm2 = LayerNorm(hidden_size, eps=eps)
        self.fc1 = nn.Linear(hidden_size, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, hidden_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class TransformerStack(nn.Module):
    """Layers plus final LayerNorm; returns (pre-norm, normed) last hidden states.

    FLAVA feeds the multimodal encoder the *pre*-final-LayerNorm states of the unimodal encoders (as the
    reference does via ``hidden_states[-1]``), while heads and contrastive use the normed ones.
    """

    def __init__(
        self, num_layers: int, hidden_size: int, num_heads: int, mlp_dim: int, dropout: float, eps: float
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(hidden_size, num_heads, mlp_dim, dropout, eps) for _ in range(num_layers)
        )
        self.norm = LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            x = layer(x, mask)
        return x, self.norm(x)


class CarriedPooler(nn.Module):
    """Weights of a transformers encoder pooler that no pretraining loss uses.

    Kept as buffers (not trained, not sharded) so a loaded ``facebook/flava-full`` exports back complete and
    downstream fine-tuning in the transformers ecosystem gets its trained poolers.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(hidden_size, hidden_size))
        self.register_buffer("bias", torch.zeros(hidden_size))
