"""Weight-decay groups on the real FLAVA module, and the warmup-cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from model import build_flava
from pipeline.config import TrainConfig
from pipeline.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


@pytest.fixture(scope="module")
def model():
    return build_flava("tiny", text_vocab_size=100)


def test_groups_cover_every_parameter_once(model):
    decay, plain = param_groups(model, 0.1)
    names = decay["names"] + plain["names"]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0


def test_no_decay_on_norms_biases_embeddings_and_logit_scale(model):
    decay, plain = param_groups(model, 0.1)
    plain_names, decay_names = set(plain["names"]), set(decay["names"])
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        owner = modules[name.rpartition(".")[0]]
        if (
            isinstance(owner, torch.nn.LayerNorm | torch.nn.Embedding)
            or name.endswith("bias")
            or name in ("logit_scale", "image_encoder.cls_token", "image_encoder.mask_token")
            or name in ("image_encoder.pos_embed", "mm_encoder.cls_token")
        ):
            assert name in plain_names, name
        elif isinstance(owner, torch.nn.Linear | torch.nn.Conv2d) and param.ndim >= 2:
            assert name in decay_names, name  # incl. the patch-embedding conv and the projections
    assert "logit_scale" in plain_names
    assert "text_encoder.word_embed.weight" in plain_names
    assert "image_encoder.patch_embed.weight" in decay_names


def test_optimizer_applies_the_groups(model):
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05, lr=3e-4))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    warmup, total, floor = 10, 110, 0.1
    assert lr_factor(0, warmup, total, floor) == pytest.approx(0.1)
    assert lr_factor(9, warmup, total, floor) == pytest.approx(1.0)
    assert lr_factor(10, warmup, total, floor) == pytest.approx(1.0)
    mid = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_factor(60, warmup, total, floor) == pytest.approx(mid)
    assert lr_factor(110, warmup, total, floor) == pytest.approx(floor)
    assert lr_factor(500, warmup, total, floor) == pytest.approx(floor)


def test_scheduler_drives_the_optimizer_lr(model):
    train = TrainConfig(lr=1e-3, warmup_steps=4, steps=20, min_lr_ratio=0.0)
    opt = build_optimizer(model, train)
    sched = build_scheduler(opt, train)
    seen = []
    for _ in range(20):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert max(seen) == pytest.approx(1e-3)
    assert seen[4:] == sorted(seen[4:], reverse=True)  # cosine only goes down after warmup
    assert seen[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_eager_state_matches_lazy_adamw():
    """A head that first gets a gradient at step 3 updates exactly as under AdamW's lazy state init."""
    train = TrainConfig(lr=1e-2, weight_decay=0.1)

    def run(eager: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        trunk, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        model = torch.nn.Sequential(trunk, head)
        if eager:
            opt = build_optimizer(model, train)
        else:
            opt = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, eps=train.adam_eps)
        for step in range(5):
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step))
            loss = (head(trunk(x)).sum() if step >= 2 else trunk(x).sum()) ** 2
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]

    for eager, lazy in zip(run(True), run(False), strict=True):
        assert torch.equal(eager, lazy)
