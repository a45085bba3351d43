"""The model learns: with the project's optimizer, schedule and step, tiny FLAVA memorises one fixed
batch of each kind on CPU. Every loss the kind runs must fall by ``FACTOR`` within ``STEPS`` steps; a loss
whose gradient is cut, an optimizer that does not step, or a head trained on the wrong targets stalls.

Measured (4 rows, lr 1e-3 constant, weight decay 0.1, clip 1.0, seed 0): after 60 steps every loss is at
least 8x lower (mmm_image the slowest, ~8x; itm ~140x), so a factor of 5 leaves room for thread-count
and platform rounding without letting a stalled loss through.
"""

from __future__ import annotations

import pytest
import torch

from model import build_flava
from pipeline.config import KINDS, TrainConfig
from pipeline.train.loop import optimizer_step
from pipeline.train.optim import build_optimizer, build_scheduler
from tests.model.flava_batches import make_batch

STEPS = 60
FACTOR = 5.0


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_flava_overfits_one_batch(kind):
    torch.manual_seed(0)
    model = build_flava("tiny", text_vocab_size=60, mim_vocab_size=50)
    train = TrainConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, steps=STEPS)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    batch = make_batch(kind, model.spec, batch_size=4, negatives=(1,))
    expected = model.spec.losses_for(kind)
    first = last = None
    for _ in range(STEPS):
        losses, *_ = optimizer_step(model, optimizer, scheduler, iter([batch]), 1, train.grad_clip, expected)
        first = first or dict(losses)
        last = dict(losses)
    assert set(first) == expected | {"total"}
    for name, start in first.items():
        assert last[name] < start / FACTOR, (kind, name, start, last[name])
