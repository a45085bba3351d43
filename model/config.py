"""The dimensions and loss weights of one FLAVA model (what a preset builder fills in)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from model.dino import DinoSpec

LOSS_NAMES = ("mim", "mlm", "global_contrastive", "itm", "mmm_image", "mmm_text")
# the losses a batch of each kind runs (``FlavaForPretraining.forward``), those with a positive weight
LOSSES_BY_KIND = {
    "image": ("mim",),
    "text": ("mlm",),
    "image_text": ("global_contrastive", "itm", "mmm_image", "mmm_text"),
}
# what each phase builds and trains on: a unimodal phase has only its encoder (and that kind's head)
PHASE_KINDS = {"joint": ("image_text", "image", "text"), "text": ("text",), "image": ("image",)}
IMAGE_OBJECTIVES = ("mim", "dino")
# transformers' FlavaConfig defaults: every pretraining loss weighted 1.
DEFAULT_LOSS_WEIGHTS = dict.fromkeys(LOSS_NAMES, 1.0)
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass(frozen=True)
class FlavaSpec:
    """One hidden size for the image, text and multimodal encoders (as in every released FLAVA)."""

    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    mm_num_layers: int = 6
    text_vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    mim_vocab_size: int = 8192
    projection_dim: int = 768
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    phase: str = "joint"  # joint | text | image (PHASE_KINDS)
    image_objective: str = "mim"  # mim | dino (dino: the image phase only)
    dino: DinoSpec | None = None  # set when image_objective is dino

    def __post_init__(self) -> None:
        if self.phase not in PHASE_KINDS:
            raise ValueError(f"phase must be one of {list(PHASE_KINDS)}, got {self.phase!r}")
        if self.image_objective not in IMAGE_OBJECTIVES:
            raise ValueError(
                f"image_objective must be one of {IMAGE_OBJECTIVES}, got {self.image_objective!r}"
            )
        if self.image_objective == "dino" and self.phase != "image":
            raise ValueError(f"image_objective='dino' trains the image phase only, not phase={self.phase!r}")
        if self.image_objective == "dino" and self.dino is None:
            object.__setattr__(self, "dino", DinoSpec())
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        unknown = set(self.loss_weights) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"loss_weights has unknown losses {sorted(unknown)}; known: {list(LOSS_NAMES)}")
        # Partial dicts override the defaults, so `loss_weights={"mim": 0.5}` keeps the others at 1.
        object.__setattr__(self, "loss_weights", {**DEFAULT_LOSS_WEIGHTS, **self.loss_weights})

    def losses_for(self, kind: str) -> frozenset[str]:
        """The losses ``forward`` computes for a batch of ``kind`` under these weights (none for a kind that
        the phase does not train on)."""
        if kind not in PHASE_KINDS[self.phase]:
            return frozenset()
        if kind == "image" and self.image_objective == "dino":
            return frozenset({"dino"})
        return frozenset(name for name in LOSSES_BY_KIND[kind] if self.loss_weights[name] > 0)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)
