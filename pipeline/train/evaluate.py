"""Validation on held-out batches of each kind, and the one scalar that Ray Tune optimises.

``val/objective`` (lower is better, Tune mode ``min``) is the mean of the terms whose held-out data exists:

  mlm term        val/text/mlm / ln(text vocab)     1.0 = a uniform guess over the vocabulary, 0 = perfect
  mim term        val/image/mim / ln(MIM vocab)     the same scale over the 8192 dVAE codes
  retrieval term  1 - mean(R@1 image->text, R@1 text->image) over the held-out pairs
  dino term       val/image/dino / ln(DINO out_dim)  (a DINO image phase: its loss on held-out views;
                  1.0 is the cross-entropy to a uniform teacher, where a collapsed teacher ends up)

Dividing a cross-entropy by ln(vocab) puts both masked-modelling losses on the same 0..1 scale as the
retrieval miss rate, so no kind dominates by the size of its vocabulary.

Retrieval counts a hit when the retrieved item carries the query's caption (identical token ids): the
demo corpus, like real ones, repeats captions, and an image whose caption appears k times cannot be told
apart from its k-1 twins. The chance level is reported alongside (``val/retrieval/chance_r1``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

RETRIEVAL_KS = (1, 5)


def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_ids: torch.Tensor
) -> dict[str, float]:
    """R@k both ways for row-aligned pairs; rows with identical ``text_ids`` are interchangeable."""
    n = image_emb.shape[0]
    sim = image_emb.float() @ text_emb.float().T  # (images, texts)
    same = (text_ids[:, None, :] == text_ids[None, :, :]).all(-1)  # same[i, j]: caption i == caption j
    metrics = {"val/retrieval/pool": float(n), "val/retrieval/chance_r1": same.float().mean().item()}
    for k in RETRIEVAL_KS:
        kk = min(k, n)
        top_texts = sim.topk(kk, dim=1).indices  # per image
        top_images = sim.topk(kk, dim=0).indices.T  # per text
        i2t = same.gather(1, top_texts).any(1).float().mean().item()
        t2i = same.gather(1, top_images).any(1).float().mean().item()
        metrics[f"val/retrieval/i2t_r{k}"] = i2t
        metrics[f"val/retrieval/t2i_r{k}"] = t2i
    return metrics


def chance_losses(
    text_vocab_size: int, mim_vocab_size: int, pairs: int, dino_out_dim: int = 0
) -> dict[str, float]:
    """Each loss at a uniform guess: the cross-entropy of a guess among its classes (``pairs``: the
    candidates of the contrastive loss, the global batch of pairs; ``dino_out_dim``: DINO's prototypes)."""
    text, image = math.log(text_vocab_size), math.log(mim_vocab_size)
    return {
        **({"dino": math.log(dino_out_dim)} if dino_out_dim > 1 else {}),
        "mlm": text,
        "mmm_text": text,
        "mim": image,
        "mmm_image": image,
        "itm": math.log(2),
        "global_contrastive": math.log(max(pairs, 2)),
    }


def normalized_loss(losses: dict[str, float], chance: dict[str, float]) -> float:
    """The mean over a batch's losses of each divided by its value at a uniform guess: one scale for batches
    of every kind (1 = guessing, 0 = perfect), which online mixing compares across sources."""
    terms = [value / chance[name] for name, value in losses.items() if name in chance]
    return sum(terms) / len(terms)


def objective_terms(
    metrics: dict[str, float], text_vocab_size: int, mim_vocab_size: int, dino_out_dim: int = 0
) -> dict[str, float]:
    """The terms of ``val/objective`` whose held-out data exists, as ``val/term/<name>`` (logged too)."""
    terms = {}
    if "val/text/mlm" in metrics:
        terms["val/term/mlm"] = metrics["val/text/mlm"] / math.log(text_vocab_size)
    if "val/image/mim" in metrics:
        terms["val/term/mim"] = metrics["val/image/mim"] / math.log(mim_vocab_size)
    if "val/image/dino" in metrics:
        terms["val/term/dino"] = metrics["val/image/dino"] / math.log(dino_out_dim)
    if "val/retrieval/i2t_r1" in metrics:
        r1 = 0.5 * (metrics["val/retrieval/i2t_r1"] + metrics["val/retrieval/t2i_r1"])
        terms["val/term/retrieval"] = 1.0 - r1
    return terms


def objective(
    metrics: dict[str, float], text_vocab_size: int, mim_vocab_size: int, dino_out_dim: int = 0
) -> float:
    terms = objective_terms(metrics, text_vocab_size, mim_vocab_size, dino_out_dim)
    return sum(terms.values()) / len(terms) if terms else float("nan")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val_batches: dict[str, Iterable[dict]],
    text_vocab_size: int,
    mim_vocab_size: int,
    dino_out_dim: int = 0,
) -> dict[str, float]:
    """Mean held-out losses per kind, retrieval on the image-text pairs, and ``val/objective``.

    ``val_batches`` are torch batches on the model's device by source (``WorkerData.val_batches``). A
    kind's losses are the row-weighted means over the held-out batches of all its sources (its validation
    set pools their val splits), and retrieval ranks the pairs of every image-text source together; a
    source not named after its kind also gets its own ``val/source/<name>/<loss>``. Collective under FSDP:
    every rank must pass the same batches (the held-out sets are small and read identically by all ranks),
    so all ranks run the same forwards and compute the same metrics.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # prefix -> loss -> sum
    rows: dict[str, int] = defaultdict(int)
    images, texts, ids = [], [], []
    for source, batches in val_batches.items():
        for batch in batches:
            kind = batch["kind"]
            size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
            out = model(batch)
            if kind == "image_text":  # ITM negatives carry another sample's caption: true pairs only
                keep = batch["itm_labels"] == 1 if "itm_labels" in batch else slice(None)
                images.append(model.encode_image(batch["pixel_values"])[keep])
                texts.append(model.encode_text(batch["input_ids"], batch["attention_mask"])[keep])
                ids.append(batch["input_ids"][keep])
            prefixes = {f"val/{kind}", f"val/source/{source}"} if source != kind else {f"val/{kind}"}
            for prefix in prefixes:
                for name, value in out.losses.items():
                    sums[prefix][name] += value.item() * size
                sums[prefix]["total"] += out.loss.item() * size
                rows[prefix] += size
    metrics = {
        f"{prefix}/{name}": total / rows[prefix]
        for prefix, losses in sums.items()
        for name, total in losses.items()
    }
    if images:
        metrics.update(retrieval_metrics(torch.cat(images), torch.cat(texts), torch.cat(ids)))
    metrics.update(objective_terms(metrics, text_vocab_size, mim_vocab_size, dino_out_dim))
    metrics["val/objective"] = objective(metrics, text_vocab_size, mim_vocab_size, dino_out_dim)
    model.train(was_training)
    return metrics
