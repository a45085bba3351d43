"""Retrieval metrics against hand-computed cases, and the documented objective formula."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.evaluate import objective, retrieval_metrics


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
