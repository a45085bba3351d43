"""Preset builders (flat keyword arguments, TorchMultimodal style) and the registry behind build_flava."""

from __future__ import annotations

from collections.abc import Callable

from model.config import FlavaSpec
from model.dino import DinoSpec
from model.flava import FlavaForPretraining


def flava_pretraining(
    *,
    image_size: int = 224,
    patch_size: int = 16,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    mlp_dim: int = 3072,
    mm_num_layers: int = 6,
    text_vocab_size: int = 30522,
    max_position_embeddings: int = 512,
    mim_vocab_size: int = 8192,
    projection_dim: int | None = None,
    dropout: float = 0.0,
    layer_norm_eps: float = 1e-12,
    init_std: float = 0.02,
    loss_weights: dict[str, float] | None = None,
    phase: str = "joint",
    image_objective: str = "mim",
    dino: DinoSpec | None = None,
) -> FlavaForPretraining:
    """Any FLAVA; the defaults are the released facebook/flava-full (ViT-B/16 encoders, 6 x 768 fusion).
    ``phase`` text or image builds only that encoder and its head (MLM; MIM, or DINO's student, teacher
    and heads with ``image_objective='dino'``)."""
    spec = FlavaSpec(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        mm_num_layers=mm_num_layers,
        text_vocab_size=text_vocab_size,
        max_position_embeddings=max_position_embeddings,
        mim_vocab_size=mim_vocab_size,
        projection_dim=projection_dim or hidden_size,
        dropout=dropout,
        layer_norm_eps=layer_norm_eps,
        init_std=init_std,
        loss_weights=dict(loss_weights or {}),
        phase=phase,
        image_objective=image_objective,
        dino=dino,
    )
    return FlavaForPretraining(spec)


def flava_tiny(**overrides) -> FlavaForPretraining:
    """For tests: seconds per step on a CPU core."""
    dims = dict(image_size=64, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=256, mm_num_layers=1)
    return flava_pretraining(**{**dims, "max_position_embeddings": 128, **overrides})


def flava_small(**overrides) -> FlavaForPretraining:
    """The CPU demo: small enough to train visibly on 2 cores."""
    dims = dict(image_size=64, hidden_size=128, num_layers=3, num_heads=4, mlp_dim=512, mm_num_layers=2)
    return flava_pretraining(**{**dims, "max_position_embeddings": 128, **overrides})


def flava_base(**overrides) -> FlavaForPretraining:
    """facebook/flava-full dimensions."""
    return flava_pretraining(**overrides)


def flava_large(**overrides) -> FlavaForPretraining:
    """ViT-L/16-sized encoders (24 x 1024, 16 heads) with an 8-layer 1024-wide fusion encoder."""
    dims = dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096, mm_num_layers=8)
    return flava_pretraining(**{**dims, **overrides})


PRESETS: dict[str, Callable[..., FlavaForPretraining]] = {
    "tiny": flava_tiny,
    "small": flava_small,
    "base": flava_base,
    "large": flava_large,
}


def build_flava(preset: str, **overrides) -> FlavaForPretraining:
    if preset not in PRESETS:
        raise ValueError(f"unknown FLAVA preset {preset!r}; known: {sorted(PRESETS)}")
    return PRESETS[preset](**overrides)
