"""FLAVA for pretraining: encoders, heads and the per-kind loss computation.

Numerically this is transformers' ``FlavaForPreTraining`` (the parity tests are the oracle). Where the
reference makes choices the paper does not spell out, or differs from it, we follow the reference:
- the multimodal encoder consumes the unimodal states *before* their final LayerNorm, and the contrastive
  embeddings are projections of the final-LayerNormed CLS states (the unimodal poolers are unused);
- ITM negatives are dropped as contrastive queries but stay as distractor columns, and are excluded
  from MMM; if a batch has no ITM positive at all, contrastive and MMM use every row;
- the MIM/MLM/MMM decoders are not tied to any embedding; the heads' ``bias`` is the decoder bias;
- all six loss weights default to 1; the logit scale starts at ln(1/0.07) and is clamped to [0, ln 100].
Deliberate differences that leave a step's maths unchanged: the logit scale is clamped functionally in
forward (transformers clamps the parameter in place, which would not reach an FSDP2 shard; call
``clamp_logit_scale_`` after the optimizer step to also keep the stored value in range); which losses run
is decided by ``batch["kind"]``, and unimodal batches run only the masked pass (transformers also runs an
unused unmasked image pass); a loss with weight 0 is not computed, but ITM negatives stay excluded from
contrastive and MMM even when the ITM weight is 0 (transformers then forgets them); ``losses`` holds
unweighted values and ``loss`` their weighted sum; under data parallelism every loss is normalised by the
count of its items over all ranks (``heads.data_parallel_mean``), so the rank-averaged loss and gradient
are those of the global batch whatever the world size, and a rank with no target contributes 0, not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.config import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, PHASE_KINDS, FlavaSpec
from model.dino import DinoObjective, teacher_momentum, teacher_temperature
from model.encoders import ImageEncoder, MultimodalEncoder, TextEncoder
from model.heads import (
    ITMHead,
    MaskedPredictionHead,
    data_parallel_mean,
    global_contrastive,
    masked_prediction,
)
from model.layers import CarriedPooler, TransformerLayer, upcast

KIND_KEYS = {
    "image": ("pixel_values", "bool_masked_pos", "mim_labels"),
    "text": ("input_ids_masked", "attention_mask", "mlm_labels"),
    "image_text": (
        "pixel_values",
        "bool_masked_pos",
        "mim_labels",
        "input_ids",
        "input_ids_masked",
        "attention_mask",
        "mlm_labels",
        "itm_labels",
    ),
}
DINO_KEYS = ("global_crops",)  # and optionally local_crops (pipeline.data.transforms.multi_crop)
IGNORE_INDEX = -100


@dataclass
class FlavaOutput:
    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    # Final-LayerNormed last hidden states: image/text (unmasked pass), *_masked, multimodal_masked.
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    # L2-normalised projected CLS embeddings used by the contrastive loss.
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


class FlavaForPretraining(nn.Module):
    def __init__(self, spec: FlavaSpec):
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        kinds = PHASE_KINDS[spec.phase]
        if "image" in kinds:
            self.image_encoder = ImageEncoder(spec)
        if "text" in kinds:
            self.text_encoder = TextEncoder(spec)
        if "image_text" in kinds:
            self.mm_encoder = MultimodalEncoder(spec)
            self.image_projection = nn.Linear(d, spec.projection_dim)
            self.text_projection = nn.Linear(d, spec.projection_dim)
            # Shape (1,), not a scalar as in transformers: FSDP2 cannot shard 0-dim parameters.
            self.logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
        if "image" in kinds and spec.image_objective == "mim":
            self.mim_head = MaskedPredictionHead(d, spec.mim_vocab_size, spec.layer_norm_eps)
        if "text" in kinds:
            self.mlm_head = MaskedPredictionHead(d, spec.text_vocab_size, spec.layer_norm_eps)
        if "image_text" in kinds:
            self.mmm_image_head = MaskedPredictionHead(d, spec.mim_vocab_size, spec.layer_norm_eps)
            self.mmm_text_head = MaskedPredictionHead(d, spec.text_vocab_size, spec.layer_norm_eps)
            self.itm_head = ITMHead(d)
        if spec.image_objective == "dino":
            self.dino = DinoObjective(d, spec.dino, self.image_encoder)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated normal(0, std) at +-2 std for matrices and embeddings, zeros for biases, CLS, mask and
        position tokens (transformers draws an untruncated normal; the truncation only trims outliers);
        a DINO teacher starts as a copy of the student."""
        std = self.spec.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding | CarriedPooler):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        if hasattr(self, "text_encoder"):
            self.text_encoder.word_embed.weight[self.spec.pad_token_id].zero_()
        if hasattr(self, "image_encoder"):
            for token in (
                self.image_encoder.cls_token,
                self.image_encoder.mask_token,
                self.image_encoder.pos_embed,
            ):
                token.zero_()
        if hasattr(self, "mm_encoder"):
            self.mm_encoder.cls_token.zero_()
            self.logit_scale.fill_(LOGIT_SCALE_INIT)
        if hasattr(self, "dino"):
            self.dino.copy_student_(self.image_encoder)

    def encoders(self) -> list[nn.Module]:
        """The transformer stacks this phase has: image, text, multimodal, a DINO teacher."""
        names = ("image_encoder", "text_encoder", "mm_encoder")
        stacks = [getattr(self, name) for name in names if hasattr(self, name)]
        return stacks + ([self.dino.teacher_encoder] if hasattr(self, "dino") else [])

    def transformer_layers(self) -> list[TransformerLayer]:
        """The units to shard and checkpoint one at a time (image, text, multimodal, DINO teacher layers:
        those the phase has), so that a teacher is sharded exactly like its student."""
        return [layer for enc in self.encoders() for layer in enc.encoder.layers]

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        if hasattr(self, "logit_scale"):
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Where the run is (the step about to be taken): DINO's schedules follow it."""
        if hasattr(self, "dino"):
            self.dino.temperature = teacher_temperature(self.spec.dino, step)
            self.dino.momentum = teacher_momentum(self.spec.dino, step, total_steps)

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        """What follows every optimizer step: the logit scale clamped into range, the DINO teacher's EMA."""
        self.clamp_logit_scale_()
        if hasattr(self, "dino"):
            self.dino.ema_update_(self.image_encoder, self.dino.momentum)

    def export_state(self) -> dict[str, torch.Tensor]:
        """The weights an export carries, in FLAVA's names: the state dict, except that a DINO phase
        exports its teacher as the image encoder (the better of the two, as in the reference) and no
        DINO head (transformers' FLAVA has none)."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("dino.")}
        if hasattr(self, "dino"):
            teacher = self.dino.teacher_encoder.state_dict()
            state.update({f"image_encoder.{k}": v for k, v in teacher.items()})
        return state

    def _temperature_log(self) -> torch.Tensor:
        return self.logit_scale.clamp(0.0, LOGIT_SCALE_MAX)

    def _project(self, projection: nn.Linear, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(projection(states[:, 0]), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding (B, projection_dim), the one the contrastive loss uses."""
        return self._project(self.image_projection, self.image_encoder(pixel_values)[1])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embedding (B, projection_dim), the one the contrastive loss uses."""
        return self._project(self.text_projection, self.text_encoder(input_ids, attention_mask)[1])

    def forward(self, batch: dict) -> FlavaOutput:
        kind = batch.get("kind")
        if kind not in KIND_KEYS:
            raise ValueError(f'batch["kind"] must be one of {sorted(KIND_KEYS)}, got {kind!r}')
        if kind not in PHASE_KINDS[self.spec.phase]:
            raise ValueError(
                f"a {self.spec.phase}-phase model trains on {PHASE_KINDS[self.spec.phase]}, not {kind!r}"
            )
        dino = kind == "image" and self.spec.image_objective == "dino"
        missing = [k for k in (DINO_KEYS if dino else KIND_KEYS[kind]) if k not in batch]
        if missing:
            raise ValueError(f"batch of kind {kind!r} lacks {missing}")
        out = FlavaOutput(loss=torch.zeros(()), losses={})
        run = self.spec.losses_for(kind)
        if kind == "image" and "dino" in run:
            out.losses["dino"] = self.dino(
                self.image_encoder, batch["global_crops"], batch.get("local_crops")
            )
        elif kind == "image":
            self._image_losses(batch, out, run)
        elif kind == "text":
            self._text_losses(batch, out, run)
        else:
            self._image_text_losses(batch, out, run)
        if out.losses:
            weights = self.spec.loss_weights
            out.loss = sum(weights.get(name, 1.0) * value for name, value in out.losses.items())
        return out

    def _image_losses(self, batch: dict, out: FlavaOutput, run: frozenset[str]) -> None:
        states = self.image_encoder(batch["pixel_values"], batch["bool_masked_pos"])[1]
        out.hidden["image_masked"] = states
        if "mim" in run:
            masked = batch["bool_masked_pos"].bool()
            out.losses["mim"], out.logits["mim"] = masked_prediction(
                self.mim_head, states[:, 1:], batch["mim_labels"], masked
            )

    def _text_losses(self, batch: dict, out: FlavaOutput, run: frozenset[str]) -> None:
        states = self.text_encoder(batch["input_ids_masked"], batch["attention_mask"])[1]
        out.hidden["text_masked"] = states
        if "mlm" in run:
            labels = batch["mlm_labels"]
            out.losses["mlm"], out.logits["mlm"] = masked_prediction(
                self.mlm_head, states, labels, labels != IGNORE_INDEX
            )

    def _encode_pairs(
        self, batch: dict, bool_masked_pos: torch.Tensor, plain: bool, masked: bool
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
        """(pre-norm, normed) image and text states of the unmasked pass (if ``plain``) then the masked
        pass (if ``masked``). When both run, each encoder runs once over both passes' rows stacked: the
        same per-row maths, with twice the rows per matmul and half the kernel launches, which is what
        small-batch matmuls are short of (a row's states do not depend on the other rows)."""
        pixel_values, attention_mask = batch["pixel_values"], batch["attention_mask"]
        passes = [name for name, on in (("plain", plain), ("masked", masked)) if on]
        if not passes:
            return [], []
        image_mask = None
        if masked:
            image_mask = torch.cat(
                [bool_masked_pos if p == "masked" else torch.zeros_like(bool_masked_pos) for p in passes]
            )
        ids = torch.cat([batch["input_ids" if p == "plain" else "input_ids_masked"] for p in passes])
        rows = pixel_values.shape[0]
        image = self.image_encoder(torch.cat([pixel_values] * len(passes)), image_mask)
        text = self.text_encoder(ids, torch.cat([attention_mask] * len(passes)))
        image_passes = zip(*(states.split(rows) for states in image), strict=True)
        text_passes = zip(*(states.split(rows) for states in text), strict=True)
        return list(image_passes), list(text_passes)

    def _image_text_losses(self, batch: dict, out: FlavaOutput, run: frozenset[str]) -> None:
        attention_mask = batch["attention_mask"]
        positive = batch["itm_labels"].reshape(-1) != 0
        rows = positive | ~positive.any()  # the reference falls back to every row without any positive

        contrastive = "global_contrastive" in run
        masked_pass = bool(run & {"itm", "mmm_image", "mmm_text"})
        bool_masked_pos = batch["bool_masked_pos"].bool()
        image_passes, text_passes = self._encode_pairs(batch, bool_masked_pos, contrastive, masked_pass)

        if contrastive:
            (_, image), (_, text) = image_passes[0], text_passes[0]
            image_emb = self._project(self.image_projection, image)
            text_emb = self._project(self.text_projection, text)
            loss, per_image, per_text = global_contrastive(image_emb, text_emb, self._temperature_log(), rows)
            out.losses["global_contrastive"] = loss
            out.logits.update(contrastive_per_image=per_image, contrastive_per_text=per_text)
            out.hidden.update(image=image, text=text)
            out.embeddings.update(image=image_emb, text=text_emb)

        if not masked_pass:
            return
        (image_pre, image_masked), (text_pre, text_masked) = image_passes[-1], text_passes[-1]
        mm = self.mm_encoder(image_pre, text_pre, attention_mask)
        out.hidden.update(image_masked=image_masked, text_masked=text_masked, multimodal_masked=mm)

        if "itm" in run:
            out.logits["itm"] = self.itm_head(mm)
            itm_labels = batch["itm_labels"].reshape(-1)
            out.losses["itm"] = data_parallel_mean(
                F.cross_entropy(upcast(out.logits["itm"]), itm_labels, reduction="sum"), itm_labels.numel()
            )
        num_patches = image_pre.shape[1] - 1
        if "mmm_image" in run:
            out.losses["mmm_image"], out.logits["mmm_image"] = masked_prediction(
                self.mmm_image_head,
                mm[rows, 2 : 2 + num_patches],
                batch["mim_labels"][rows],
                bool_masked_pos[rows],
            )
        if "mmm_text" in run:
            labels = batch["mlm_labels"][rows]
            out.losses["mmm_text"], out.logits["mmm_text"] = masked_prediction(
                self.mmm_text_head, mm[rows, 2 + num_patches :], labels, labels != IGNORE_INDEX
            )
