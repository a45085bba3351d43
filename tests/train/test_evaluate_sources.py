"""``evaluate`` over named sources: a kind's held-out losses pool the batches of all its sources,
row-weighted, and each source named apart from its kind gets its own losses; retrieval ranks the pairs of
all image-text sources together. The expectation is computed here from the model's per-batch losses."""

from __future__ import annotations

import math

import pytest
import torch

from model import build_flava
from pipeline.train.evaluate import evaluate
from tests.model.flava_batches import make_batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_flava("tiny").eval()


def row_weighted(model, batches: list[dict]) -> dict[str, float]:
    """Per loss: sum over batches of (batch loss x rows) / rows: the mean per held-out row."""
    sums, rows = {}, 0
    with torch.no_grad():
        for b in batches:
            out = model(b)
            n = b["attention_mask" if b["kind"] == "text" else "pixel_values"].shape[0]
            for name, value in {**out.losses, "total": out.loss}.items():
                sums[name] = sums.get(name, 0.0) + value.item() * n
            rows += n
    return {name: s / rows for name, s in sums.items()}


def test_a_kind_pools_its_sources_row_weighted_and_each_source_keeps_its_own(model):
    spec = model.spec
    glosses = [make_batch("text", spec, batch_size=6, seed=1), make_batch("text", spec, batch_size=2, seed=2)]
    news = [make_batch("text", spec, batch_size=3, seed=3)]
    pairs_a = [make_batch("image_text", spec, batch_size=4, seed=4, negatives=(1,))]
    pairs_b = [make_batch("image_text", spec, batch_size=5, seed=5, negatives=(0, 3))]
    clipart = [make_batch("image", spec, batch_size=4, seed=6)]
    val = {"glosses": glosses, "news": news, "pairs-a": pairs_a, "pairs-b": pairs_b, "image": clipart}
    metrics = evaluate(model, val, spec.text_vocab_size, spec.mim_vocab_size)

    pooled = row_weighted(model, glosses + news)  # 11 rows over three batches of 6, 2 and 3
    for name, value in pooled.items():
        assert math.isclose(metrics[f"val/text/{name}"], value, rel_tol=1e-6), name
    unweighted = (row_weighted(model, glosses)["mlm"] + row_weighted(model, news)["mlm"]) / 2
    assert not math.isclose(metrics["val/text/mlm"], unweighted, rel_tol=1e-4)  # rows weigh, not sources
    for source, batches in (("glosses", glosses), ("news", news), ("pairs-a", pairs_a), ("pairs-b", pairs_b)):
        for name, value in row_weighted(model, batches).items():
            assert math.isclose(metrics[f"val/source/{source}/{name}"], value, rel_tol=1e-6), (source, name)
    for name, value in row_weighted(model, pairs_a + pairs_b).items():
        assert math.isclose(metrics[f"val/image_text/{name}"], value, rel_tol=1e-6), name
    # a source named after its kind is the kind: no second copy of its metrics
    assert not any(k.startswith("val/source/image/") for k in metrics)
    assert math.isclose(metrics["val/image/mim"], row_weighted(model, clipart)["mim"], rel_tol=1e-6)
    # retrieval pools the true pairs of both image-text sources: 3 + 3 of 4 + 5 rows (ITM negatives left out)
    assert metrics["val/retrieval/pool"] == 6.0
