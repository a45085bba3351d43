"""Gradient accumulation in ``optimizer_step``: ``accum`` micro-batches make the gradient of their mean loss.

``optimizer_step`` backpropagates ``loss / accum`` of each micro-batch and steps once, so its gradient is
the mean of the micro-batch gradients. That equals the gradient of one big batch only where the loss of
the big batch is the mean of the micro-batch losses. Two formulations check it on the tiny preset, on one
process (no Ray, no process group), with dropout 0 so that a forward pass is a pure function of its batch:

* **Two halves vs. the whole batch** (``text`` MLM, ``image`` MIM). Both losses are a mean over the masked
  positions of the batch (``model.heads.masked_prediction``: sum / number of targets), and every row of a
  ``make_batch`` batch has the same number of targets (``masked_tokens`` / ``masked_patches``), so each
  half has half the targets and the mean of the two half-batch losses *is* the full-batch loss. Rows are
  encoded independently (per-token LayerNorm, attention within a row), so the gradients, the pre-clip
  norm and the reported loss must agree up to float32 summation order (``RTOL``/``ATOL``). The parameters
  after the AdamW step are compared to 1% of the step's lr: AdamW's first update is
  ``lr * g / (|g| + eps)``, which turns float noise in a gradient that is zero in exact arithmetic (the
  key bias of attention) into an update of order lr, while a second optimizer step per micro-batch
  would move them by a whole lr. ``image_text`` is left out on purpose: the global contrastive loss is a
  softmax over every pair in the batch and ITM's negatives are other rows' images, so its loss is not
  linear in the batch and two halves legitimately differ from the whole. Unequal masked counts per half would
  weight targets differently, too; ``make_batch`` rules that out, and the test asserts it.
* **The same micro-batch twice vs. once** (every kind, ``image_text`` included). ``(g/2) + (g/2) == g``
  needs no linearity, and halving is exact in binary floating point, so this must match exactly: it
  pins the ``/ accum`` scaling and that gradients accumulate (are not overwritten or zeroed) between
  micro-batches.

A missing ``/ accum`` doubles the gradient and its norm; a ``zero_grad`` inside the loop keeps only the last
half's gradient: both fail here. Gradients are read in an optimizer step pre-hook, i.e. after
accumulation and clipping (clipping is disabled so that they are the raw accumulated gradients) and
before ``optimizer_step`` zeroes them.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model import build_flava
from pipeline.config import TrainConfig
from pipeline.train.loop import optimizer_step
from pipeline.train.optim import build_optimizer, build_scheduler
from tests.model.flava_batches import make_batch, slice_batch

TRAIN = TrainConfig(lr=1e-3, warmup_steps=2, steps=10)
NO_CLIP = 1e9  # clip_grad_norm_ leaves the gradients as they are, so the hook sees them raw
BATCH = 8
RTOL, ATOL = 1e-5, 1e-6  # float32: the full batch and the two halves sum in different orders
PARAM_TOL = 0.01  # of the step's lr, for parameters after AdamW (see the module docstring)


@pytest.fixture(scope="module")
def initial_model():
    torch.manual_seed(0)
    return build_flava("tiny", text_vocab_size=64, dropout=0.0)


def run_step(initial_model, micro_batches: list[dict], accum: int):
    """One ``optimizer_step`` of a fresh copy of the model; returns (grads seen by AdamW, losses, grad norm,
    the lr of the step, parameters after the step)."""
    model = copy.deepcopy(initial_model)
    model.train()
    optimizer = build_optimizer(model, TRAIN)
    scheduler = build_scheduler(optimizer, TRAIN)
    grads: dict[str, torch.Tensor] = {}

    def capture(opt, args, kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    optimizer.register_step_pre_hook(capture)
    kind = micro_batches[0]["kind"]
    expected = model.spec.losses_for(kind)
    losses, grad_norm, lr, _ = optimizer_step(
        model, optimizer, scheduler, iter(micro_batches), accum, NO_CLIP, expected
    )
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return grads, losses, grad_norm, lr, params


def assert_all_close(actual: dict, expected: dict, **tolerance) -> None:
    """Per-parameter ``assert_close`` over the same, non-empty set of names."""
    assert actual.keys() == expected.keys() and expected, "different or no parameters"
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def targets(batch: dict) -> int:
    """How many positions the batch's masked-prediction loss averages over."""
    if batch["kind"] == "text":
        return int((batch["mlm_labels"] != -100).sum())
    return int(batch["bool_masked_pos"].sum())


@pytest.mark.parametrize("kind", ["text", "image"])
def test_two_half_batches_match_the_full_batch(initial_model, kind):
    full = make_batch(kind, initial_model.spec, batch_size=BATCH, seed=3)
    halves = [slice_batch(full, slice(0, BATCH // 2)), slice_batch(full, slice(BATCH // 2, BATCH))]
    # the premise of the comparison: equal target counts, so mean of the half means == full mean
    assert targets(halves[0]) == targets(halves[1]) == targets(full) // 2 > 0

    grads_full, losses_full, norm_full, lr, params_full = run_step(initial_model, [full], accum=1)
    grads_acc, losses_acc, norm_acc, _, params_acc = run_step(initial_model, halves, accum=2)

    assert norm_full > 0
    assert_all_close(grads_acc, grads_full, rtol=RTOL, atol=ATOL)
    assert norm_acc == pytest.approx(norm_full, rel=RTOL)
    assert losses_acc.keys() == losses_full.keys()
    for name, value in losses_full.items():
        assert losses_acc[name] == pytest.approx(value, rel=RTOL), name
    assert_all_close(params_acc, params_full, rtol=0, atol=PARAM_TOL * lr)
    moved = max((params_full[n] - p).abs().max().item() for n, p in initial_model.named_parameters())
    assert moved > 0.5 * lr, "the step hardly moved the parameters"


@pytest.mark.parametrize("kind", ["text", "image", "image_text"])
def test_the_same_micro_batch_twice_matches_it_once_exactly(initial_model, kind):
    batch = make_batch(kind, initial_model.spec, batch_size=4, seed=5)

    grads_once, losses_once, norm_once, _, params_once = run_step(initial_model, [batch], accum=1)
    grads_twice, losses_twice, norm_twice, _, params_twice = run_step(initial_model, [batch, batch], accum=2)

    assert_all_close(grads_twice, grads_once, rtol=0, atol=0)
    assert norm_twice == norm_once
    assert losses_twice == losses_once
    assert_all_close(params_twice, params_once, rtol=0, atol=0)
