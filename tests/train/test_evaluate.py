"""Retrieval metrics and `evaluate` against hand-computed cases, and the documented objective formula."""

from __future__ import annotations

import math

import pytest
import torch

from model.flava import FlavaOutput
from pipeline.train.evaluate import evaluate, objective, retrieval_metrics


def test_perfect_and_reversed_retrieval():
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    ids = torch.arange(8)[:, None].repeat(1, 3)
    perfect = retrieval_metrics(emb, emb, ids)
    assert perfect["val/retrieval/i2t_r1"] == perfect["val/retrieval/t2i_r1"] == 1.0
    assert perfect["val/retrieval/chance_r1"] == pytest.approx(1 / 8)
    # texts rolled by one: image i's best text is caption i+1 -> R@1 zero, but R@5 may still hit
    shuffled = retrieval_metrics(emb, emb.roll(1, dims=0), ids)
    assert shuffled["val/retrieval/i2t_r1"] == 0.0 and shuffled["val/retrieval/t2i_r1"] == 0.0


def test_duplicate_captions_count_as_hits():
    """Images 0 and 1 share a caption: retrieving either one's text is right; chance reflects it."""
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])  # caption rows swapped for 0 and 1
    ids = torch.tensor([[5, 6], [5, 6], [7, 8]])
    m = retrieval_metrics(image, text, ids)
    assert m["val/retrieval/i2t_r1"] == 1.0 and m["val/retrieval/t2i_r1"] == 1.0
    assert m["val/retrieval/chance_r1"] == pytest.approx((2 + 2 + 1) / 9)


def test_recall_at_k_counts_top_k():
    image = torch.eye(4)
    text = torch.tensor([[0.5, 0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    m = retrieval_metrics(image, text, torch.arange(4)[:, None])
    assert m["val/retrieval/i2t_r1"] == 0.75  # image 0 prefers text 1
    assert m["val/retrieval/i2t_r5"] == 1.0


def test_objective_formula():
    metrics = {
        "val/text/mlm": math.log(100) / 2,
        "val/image/mim": math.log(8192),
        "val/retrieval/i2t_r1": 0.5,
        "val/retrieval/t2i_r1": 0.3,
    }
    assert objective(metrics, 100, 8192) == pytest.approx((0.5 + 1.0 + 0.6) / 3)
    assert objective({"val/image/mim": 0.0}, 100, 8192) == 0.0  # only the terms whose data exists
    assert math.isnan(objective({}, 100, 8192))


def test_recall_differs_by_direction_and_r5_misses_a_caption_ranked_eighth():
    """8 pairs with hand-set similarities S[image, text]: image 0 ranks its own caption last; image 2
    prefers caption 3, which also prefers image 2 over image 3."""
    sim = torch.eye(8)
    sim[0, 0] = 0.05
    sim[0, 1:] = 0.4 + 0.01 * torch.arange(1, 8)
    sim[2, 3] = 2.0
    m = retrieval_metrics(torch.eye(8), sim.T.contiguous(), torch.arange(8)[:, None])  # image_i . text_j
    assert m["val/retrieval/i2t_r1"] == 6 / 8  # images 0 and 2 miss
    assert m["val/retrieval/i2t_r5"] == 7 / 8  # image 0's caption is 8th of 8
    assert m["val/retrieval/t2i_r1"] == 7 / 8  # text 3 finds image 2 first
    assert m["val/retrieval/t2i_r5"] == 1.0


class ScriptedModel(torch.nn.Module):
    """Losses and embeddings read straight off the batch, so every number ``evaluate`` reports can be
    worked out by hand: the batch's ``loss_rows`` are per-row losses, ``pixel_values`` are the image
    embeddings, and a text's embedding is the one-hot of its first token id."""

    def forward(self, batch: dict) -> FlavaOutput:
        rows = batch["loss_rows"]
        losses = {name: rows.mean() * scale for name, scale in LOSS_SCALES[batch["kind"]].items()}
        return FlavaOutput(loss=sum(losses.values()), losses=losses)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(input_ids[:, 0], 4).float()


LOSS_SCALES = {"text": {"mlm": 1.0}, "image_text": {"itm": 1.0, "global_contrastive": 2.0}}


def test_evaluate_weights_losses_by_rows_and_drops_itm_negatives_from_retrieval():
    """Batches of 3 rows and 1 row: a loss is the mean over the 4 rows, not the mean of the 2 batch
    means. The 3-row pair batch holds an ITM negative (an image with another row's caption): retrieval
    must rank only the 3 true pairs."""
    e = torch.eye(4)
    text = [
        {"kind": "text", "loss_rows": torch.tensor([1.0, 1.0, 1.0])},
        {"kind": "text", "loss_rows": torch.tensor([5.0])},
    ]
    pairs = [
        {
            "kind": "image_text",
            "loss_rows": torch.tensor([2.0, 2.0, 2.0]),
            "pixel_values": torch.stack([e[0], e[1], e[3]]),
            "input_ids": torch.tensor([[0, 9], [1, 9], [0, 9]]),  # row 2: row 0's caption
            "attention_mask": torch.ones(3, 2, dtype=torch.long),
            "itm_labels": torch.tensor([1, 1, 0]),
        },
        {
            "kind": "image_text",
            "loss_rows": torch.tensor([6.0]),
            # image 2 is closer to caption 1 (0.8) than to its own (0.6)
            "pixel_values": (0.6 * e[2] + 0.8 * e[1])[None],
            "input_ids": torch.tensor([[2, 9]]),
            "attention_mask": torch.ones(1, 2, dtype=torch.long),
            "itm_labels": torch.tensor([1]),
        },
    ]
    model = ScriptedModel().train()
    m = evaluate(model, {"text": text, "image_text": pairs}, text_vocab_size=100, mim_vocab_size=8192)
    assert model.training  # restored
    assert m["val/text/mlm"] == pytest.approx((3 * 1 + 5) / 4)  # 2.0; batch means averaged would be 3.0
    assert m["val/text/total"] == pytest.approx(2.0)
    assert m["val/image_text/itm"] == pytest.approx((3 * 2 + 6) / 4)  # 3.0, not 4.0
    assert m["val/image_text/global_contrastive"] == pytest.approx(6.0)
    assert m["val/image_text/total"] == pytest.approx(9.0)
    # retrieval over the 3 true pairs: images e0, e1, 0.6 e2 + 0.8 e1; captions 0, 1, 2
    assert m["val/retrieval/pool"] == 3.0
    assert m["val/retrieval/chance_r1"] == pytest.approx(1 / 3)
    assert m["val/retrieval/i2t_r1"] == pytest.approx(2 / 3)  # image 2 finds caption 1 first
    assert m["val/retrieval/t2i_r1"] == 1.0  # caption 1 still finds image 1 first (1.0 > 0.8)
    assert m["val/retrieval/i2t_r5"] == m["val/retrieval/t2i_r5"] == 1.0
    assert m["val/objective"] == pytest.approx((2.0 / math.log(100) + 1 / 6) / 2)  # 1 - (2/3 + 1) / 2
