"""Pretraining heads and the losses FLAVA computes from them."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.layers import LayerNorm, upcast


class MaskedPredictionHead(nn.Module):
    """BERT-style transform (dense, GELU, LayerNorm) then a decoder over the vocabulary (MIM/MLM/MMM).

    The decoder has its own weight, as in transformers' FLAVA (not tied to the word embeddings); the
    reference's separate ``bias`` parameter is tied to ``decoder.bias``, so one bias exists here.
    """

    def __init__(self, hidden_size: int, vocab_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = LayerNorm(hidden_size, eps=eps)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class ITMHead(nn.Module):
    """Pooler (dense + tanh on the multimodal CLS) then a 2-way classifier (1 = matching pair)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, 2)

    def forward(self, mm_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(mm_states[:, 0])))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def data_parallel_mean(total: torch.Tensor, count: int) -> torch.Tensor:
    """``total`` (a sum over this rank's ``count`` items) scaled so that the average over ranks, which is
    what data parallelism does to gradients and what the loop logs, is the mean over every rank's items.

    So a loss is the loss of the global batch whatever the number of ranks and however the items (masked
    tokens, contrastive queries) fall between them: a run resized to fewer, larger per-rank batches takes
    the same step. Without a process group (or with one rank) it is the plain mean. With no item anywhere
    the loss is an exact zero that keeps the graph, so nothing is poisoned with NaN.
    """
    counts = torch.tensor(float(count), dtype=torch.float64, device=total.device)
    scale = 1.0
    if _distributed():
        dist.all_reduce(counts)
        scale = dist.get_world_size()
    return total * scale / counts.clamp(min=1).to(total.dtype)


def masked_prediction(
    head: MaskedPredictionHead, states: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the head on the `selected` positions only (the head never sees the others), the
    mean over every rank's selected positions (``data_parallel_mean``). Returns (loss, logits)."""
    logits = head(states[selected])
    targets = labels[selected]
    loss = data_parallel_mean(F.cross_entropy(upcast(logits), targets, reduction="sum"), targets.numel())
    return loss, logits


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Each rank's contrastive loss depends on the embeddings of all ranks; summing the slices' gradients
    makes the data-parallel average of the gradients equal the gradient of the global-batch loss.
    (gloo has no reduce_scatter, so the backward is an all_reduce plus a slice.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(all ranks' rows concatenated in rank order, offset of this rank's rows); identity off-distributed."""
    if not _distributed():
        return x, 0
    return _AllGatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def global_contrastive(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of the local `rows` against the embeddings of every rank (CLIP/FLAVA global).

    As the reference, rows that are ITM negatives are dropped as queries but their embeddings stay in the
    gathered columns as extra distractors. Per-rank batches must be equally sized (all_gather). The loss
    is the mean over every rank's queries (``data_parallel_mean``): the global batch's InfoNCE.
    Returns (loss, logits_per_image, logits_per_text) with the logits restricted to `rows`.
    """
    all_images, offset = gather_with_grad(image_emb)
    all_texts, _ = gather_with_grad(text_emb)
    scale = upcast(logit_scale).exp()
    logits_per_image = (upcast(image_emb) @ upcast(all_texts).T * scale)[rows]
    logits_per_text = (upcast(text_emb) @ upcast(all_images).T * scale)[rows]
    labels = (offset + torch.arange(image_emb.shape[0], device=image_emb.device))[rows]
    total = F.cross_entropy(logits_per_image, labels, reduction="sum") + F.cross_entropy(
        logits_per_text, labels, reduction="sum"
    )
    return data_parallel_mean(total / 2, labels.numel()), logits_per_image, logits_per_text
