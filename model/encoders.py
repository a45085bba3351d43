"""Image (ViT), text (BERT embeddings + pre-LN transformer) and multimodal encoders of FLAVA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from model.config import FlavaSpec
from model.layers import CarriedPooler, LayerNorm, TransformerStack, padding_mask


def _stack(spec: FlavaSpec, num_layers: int) -> TransformerStack:
    return TransformerStack(
        num_layers, spec.hidden_size, spec.num_heads, spec.mlp_dim, spec.dropout, spec.layer_norm_eps
    )


class ImageEncoder(nn.Module):
    def __init__(self, spec: FlavaSpec):
        super().__init__()
        self.patch_size = spec.patch_size
        self.grid = spec.image_size // spec.patch_size
        self.patch_embed = nn.Conv2d(3, spec.hidden_size, kernel_size=spec.patch_size, stride=spec.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, spec.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, spec.hidden_size))
        self.drop = nn.Dropout(spec.dropout)
        self.encoder = _stack(spec, spec.num_layers)
        self.pooler = CarriedPooler(spec.hidden_size)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pre-norm, normed) hidden states (B, 1 + N, D); masked patches become the mask token.
        ``interpolate_pos``: square images of any multiple of the patch size (DINO's crops), the patch
        position table resized bicubically to their grid."""
        h, w = pixel_values.shape[-2:]
        fits = h == w and not h % self.patch_size and (interpolate_pos or h // self.patch_size == self.grid)
        if not fits:
            raise ValueError(
                f"pixel_values are {h}x{w} px but the model was built for "
                f"image_size={self.grid * self.patch_size}"
            )
        x = rearrange(self.patch_embed(pixel_values), "b d gh gw -> b (gh gw) d")
        if bool_masked_pos is not None:
            x = torch.where(rearrange(bool_masked_pos.bool(), "b n -> b n 1"), self.mask_token.to(x.dtype), x)
        x = torch.cat([repeat(self.cls_token, "1 1 d -> b 1 d", b=x.shape[0]).to(x.dtype), x], dim=1)
        return self.encoder(self.drop(x + self._positions(h // self.patch_size)))

    def _positions(self, grid: int) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        square = rearrange(patches, "1 (gh gw) d -> 1 d gh gw", gh=self.grid)
        resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
        return torch.cat([cls, rearrange(resized, "1 d gh gw -> 1 (gh gw) d")], dim=1)


class TextEncoder(nn.Module):
    def __init__(self, spec: FlavaSpec):
        super().__init__()
        d = spec.hidden_size
        self.word_embed = nn.Embedding(spec.text_vocab_size, d, padding_idx=spec.pad_token_id)
        self.pos_embed = nn.Embedding(spec.max_position_embeddings, d)
        # Segment embeddings of BERT: FLAVA only ever uses segment 0, kept for checkpoint compatibility.
        self.type_embed = nn.Embedding(spec.type_vocab_size, d)
        self.embed_norm = LayerNorm(d, eps=spec.layer_norm_eps)
        self.drop = nn.Dropout(spec.dropout)
        self.encoder = _stack(spec, spec.num_layers)
        self.pooler = CarriedPooler(d)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pre-norm, normed) hidden states (B, L, D); padding is never attended to."""
        length = input_ids.shape[1]
        if length > self.pos_embed.num_embeddings:
            raise ValueError(
                f"input_ids have length {length} > max_position_embeddings={self.pos_embed.num_embeddings}"
            )
        x = self.word_embed(input_ids) + self.type_embed.weight[0] + self.pos_embed.weight[:length]
        x = self.drop(self.embed_norm(x))
        return self.encoder(x, padding_mask(attention_mask))


class MultimodalEncoder(nn.Module):
    """Own CLS over [image CLS, patches, text tokens], each unimodal state linearly projected first."""

    def __init__(self, spec: FlavaSpec):
        super().__init__()
        d = spec.hidden_size
        self.image_to_mm = nn.Linear(d, d)
        self.text_to_mm = nn.Linear(d, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder = _stack(spec, spec.mm_num_layers)
        self.pooler = CarriedPooler(d)

    def forward(
        self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Normed hidden states (B, 2 + N + L, D): [mm CLS, image CLS, N patches, L text tokens]."""
        image = self.image_to_mm(image_states)
        text = self.text_to_mm(text_states)
        cls = repeat(self.cls_token, "1 1 d -> b 1 d", b=image.shape[0]).to(image.dtype)
        x = torch.cat([cls, image, text], dim=1)
        visible = torch.cat(
            [attention_mask.new_ones(image.shape[0], 1 + image.shape[1]), attention_mask], dim=1
        )
        return self.encoder(x, padding_mask(visible))[1]
