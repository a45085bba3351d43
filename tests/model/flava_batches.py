"""Synthetic batches in the data->model contract, with controllable masking (shared by the model tests)."""

from __future__ import annotations

import torch
from transformers import FlavaConfig, FlavaForPreTraining

from model.config import FlavaSpec
from model.flava import KIND_KEYS


def make_batch(
    kind: str,
    spec: FlavaSpec,
    batch_size: int = 4,
    text_length: int = 12,
    seed: int = 0,
    masked_patches: int = 3,
    masked_tokens: int = 2,
    negatives: tuple[int, ...] = (1,),
) -> dict:
    """Every row has exactly `masked_patches` masked patches and `masked_tokens` MLM targets, so per-rank
    means average to the global mean; rows get different amounts of padding (row 0 none)."""
    g = torch.Generator().manual_seed(seed)
    n = spec.num_patches
    batch: dict = {"kind": kind}
    if kind in ("image", "image_text"):
        batch["pixel_values"] = torch.randn(batch_size, 3, spec.image_size, spec.image_size, generator=g)
        order = torch.rand(batch_size, n, generator=g).argsort(dim=1)
        batch["bool_masked_pos"] = order < masked_patches
        batch["mim_labels"] = torch.randint(0, spec.mim_vocab_size, (batch_size, n), generator=g)
    if kind in ("text", "image_text"):
        lengths = [text_length - (row % 3) * 3 for row in range(batch_size)]
        ids = torch.randint(5, spec.text_vocab_size, (batch_size, text_length), generator=g)
        mask = torch.zeros(batch_size, text_length, dtype=torch.long)
        masked = ids.clone()
        labels = torch.full_like(ids, -100)
        for row, length in enumerate(lengths):
            ids[row, 0], ids[row, length - 1], ids[row, length:] = 2, 3, 0  # [CLS] ... [SEP] [PAD]...
            mask[row, :length] = 1
            positions = 1 + torch.randperm(length - 2, generator=g)[:masked_tokens]
            masked[row] = ids[row]
            masked[row, positions] = 4  # [MASK]
            labels[row, positions] = ids[row, positions]
        batch.update(input_ids=ids, input_ids_masked=masked, attention_mask=mask, mlm_labels=labels)
    if kind == "image_text":
        itm = torch.ones(batch_size, dtype=torch.long)
        itm[list(negatives)] = 0
        batch["itm_labels"] = itm
    return batch


def slice_batch(batch: dict, rows: slice) -> dict:
    return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def small_hf_config(**top) -> FlavaConfig:
    """A reference config with every width different from its default (and projection != hidden)."""
    stack = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return FlavaConfig(
        image_config=dict(stack, image_size=48, vocab_size=50),
        text_config=dict(stack, vocab_size=60, max_position_embeddings=16),
        multimodal_config=dict(stack, num_hidden_layers=1),
        **{"hidden_size": 32, "projection_dim": 24, "init_codebook": False, **top},
    )


def perturbed_reference() -> FlavaForPreTraining:
    """The reference with deliberately non-trivial weights (transformers zero-inits tokens and LNs)."""
    torch.manual_seed(0)
    hf = FlavaForPreTraining(small_hf_config()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.ndim > 1 else 0.1))
        hf.flava.logit_scale.fill_(2.0)
    return hf


def reference_call(hf: FlavaForPreTraining, batch: dict):
    """transformers decides its losses from which inputs are present: pass exactly those of the kind."""
    keys = KIND_KEYS[batch["kind"]]
    return hf(**{k: batch[k].clone() for k in keys}, return_dict=True)  # the reference edits labels in place
