"""Unimodal phases, DINO and encoder initialisation on tiny models (plain PyTorch, no Ray).

Oracles: hand-computed DINO loss, center and EMA values (scalar arithmetic written out here, not the
implementation's tensor code), the source model's own tensors for ``init_encoders``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
from flava_batches import make_batch

from model import build_flava, save_hf_checkpoint
from model.dino import DinoSpec, dino_loss, teacher_momentum, teacher_temperature, updated_center
from pipeline.config import load_config
from pipeline.train.init_encoders import encoder_shapes, load_encoder_, read_encoder
from pipeline.train.optim import param_groups

SMALL_DINO = DinoSpec(out_dim=16, hidden_dim=12, bottleneck_dim=6, warmup_teacher_temp_steps=10)
CONFIG = load_config(None)


def tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_flava("tiny", text_vocab_size=64, max_position_embeddings=16, **overrides)


def dino_model(seed: int = 0):
    return tiny(seed, phase="image", image_objective="dino", dino=SMALL_DINO)


def crops(batch_size: int = 2, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "kind": "image",
        "global_crops": torch.randn(2, batch_size, 3, 64, 64, generator=g),
        "local_crops": torch.randn(3, batch_size, 3, 32, 32, generator=g),
    }


def prefixes(names) -> set[str]:
    return {
        name.split(".")[0] if not name.startswith("dino.") else ".".join(name.split(".")[:2])
        for name in names
    }


@pytest.mark.parametrize(
    ("overrides", "state", "trained"),
    [
        ({"phase": "text"}, {"text_encoder", "mlm_head"}, {"text_encoder", "mlm_head"}),
        ({"phase": "image"}, {"image_encoder", "mim_head"}, {"image_encoder", "mim_head"}),
        (
            {"phase": "image", "image_objective": "dino", "dino": SMALL_DINO},
            {"image_encoder", "dino.head", "dino.teacher_encoder", "dino.teacher_head", "dino.center"},
            {"image_encoder", "dino.head"},
        ),
    ],
)
def test_a_unimodal_phase_builds_and_trains_only_its_encoder_and_head(overrides, state, trained):
    model = tiny(**overrides)
    assert prefixes(model.state_dict()) == state
    in_optimizer = [n for group in param_groups(model, 0.1) for n in group["names"]]
    assert prefixes(in_optimizer) == trained
    assert len(in_optimizer) == sum(p.requires_grad for p in model.parameters())
    kinds = {"text": ["text"], "image": ["image"]}[overrides["phase"]]
    for kind in ("image_text", "image", "text"):
        if kind not in kinds:
            with pytest.raises(ValueError, match=f"trains on .* not '{kind}'"):
                model(make_batch(kind, model.spec))


def test_dino_loss_against_hand_computed_values():
    # one row, K = 2; two global crops (teacher and student), one local crop (student only)
    teacher = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    student = [torch.tensor([[0.2, 0.0]]), torch.tensor([[0.0, 0.1]]), torch.tensor([[0.3, -0.1]])]
    center = torch.tensor([[0.5, 0.5]])
    t_temp, s_temp = 0.5, 0.1

    def softmax(a, b):
        return math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))

    q = [softmax((1 - 0.5) / 0.5, (0 - 0.5) / 0.5), softmax((0 - 0.5) / 0.5, (2 - 0.5) / 0.5)]
    p = [softmax(0.2 / 0.1, 0.0), softmax(0.0, 0.1 / 0.1), softmax(0.3 / 0.1, -0.1 / 0.1)]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # (teacher crop, student crop), never a crop with itself
    expected = sum(-(q[t][0] * math.log(p[s][0]) + q[t][1] * math.log(p[s][1])) for t, s in pairs) / 4
    assert dino_loss(student, teacher, center, s_temp, t_temp).item() == pytest.approx(expected, rel=1e-6)


def test_center_update_against_hand_computed_values():
    teacher = [torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([[0.0, 4.0], [0.0, 2.0]])]
    center = torch.tensor([[1.0, -1.0]])
    # mean of the four rows: (1 + 3 + 0 + 0) / 4 = 1, (0 + 2 + 4 + 2) / 4 = 2
    expected = torch.tensor([[0.9 * 1 + 0.1 * 1, 0.9 * -1 + 0.1 * 2]])
    torch.testing.assert_close(updated_center(center, teacher, 0.9), expected)


def test_schedules_against_hand_computed_values():
    assert teacher_temperature(SMALL_DINO, 0) == pytest.approx(0.04)
    assert teacher_temperature(SMALL_DINO, 5) == pytest.approx(0.055)
    assert teacher_temperature(SMALL_DINO, 10) == teacher_temperature(SMALL_DINO, 99) == pytest.approx(0.07)
    assert teacher_momentum(SMALL_DINO, 0, 100) == pytest.approx(0.996)
    assert teacher_momentum(SMALL_DINO, 50, 100) == pytest.approx(0.998)
    assert teacher_momentum(SMALL_DINO, 100, 100) == pytest.approx(1.0)


def test_ema_update_against_hand_computed_values():
    model = dino_model()
    with torch.no_grad():
        for i, (s, t) in enumerate(model.dino.pairs(model.image_encoder)):
            s.fill_(float(i))
            t.fill_(10.0)
    model.set_progress(50, 100)  # momentum 0.998
    model.after_optimizer_step_()
    for i, (_, t) in enumerate(model.dino.pairs(model.image_encoder)):
        torch.testing.assert_close(t, torch.full_like(t, 0.998 * 10.0 + 0.002 * i))


def test_the_teacher_never_gets_gradients_and_moves_only_by_ema():
    model = dino_model()
    teacher = [t for _, t in model.dino.pairs(model.image_encoder)]
    assert all(not t.requires_grad for t in teacher)
    optimizer = torch.optim.AdamW([p for group in param_groups(model, 0.1) for p in group["params"]], lr=0.1)
    for step in range(2):
        before = [t.detach().clone() for t in teacher]
        model.set_progress(step, 10)
        out = model(crops(seed=step))
        assert set(out.losses) == {"dino"} and torch.isfinite(out.loss)
        out.loss.backward()
        assert all(t.grad is None for t in teacher)
        optimizer.step()
        optimizer.zero_grad()
        model.after_optimizer_step_()
        m = teacher_momentum(SMALL_DINO, step, 10)
        for (s, t), old in zip(model.dino.pairs(model.image_encoder), before, strict=True):
            torch.testing.assert_close(t, m * old + (1 - m) * s.detach())


def test_the_center_moves_in_training_and_not_in_eval():
    model = dino_model()
    model(crops())
    moved = model.dino.center.clone()
    assert moved.abs().sum() > 0
    model.eval()
    model(crops(seed=9))
    torch.testing.assert_close(model.dino.center, moved)


# ------------------------------------------------------------------------------------- init_encoders


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_init_encoders_copies_exactly_the_encoder_from_an_export(tmp_path):
    source = tiny(seed=1, phase="text")
    save_hf_checkpoint(source, tmp_path / "text")
    target = tiny(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    load_encoder_(target, "text", str(tmp_path / "text"), CONFIG)
    assert_same(target.text_encoder.state_dict(), source.text_encoder.state_dict())
    others = {k: v for k, v in target.state_dict().items() if not k.startswith("text_encoder.")}
    assert_same(others, {k: before[k] for k in others})  # image, multimodal encoder and heads untouched


def test_init_encoders_from_a_dino_checkpoint_takes_the_teacher(tmp_path):
    source = dino_model(seed=1)
    with torch.no_grad():  # a teacher that differs from its student
        for _, t in source.dino.pairs(source.image_encoder):
            t.add_(1.0)
    dcp.save({"model": source.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    target = tiny(seed=2)
    load_encoder_(target, "image", str(tmp_path / "ckpt"), CONFIG)
    assert_same(target.image_encoder.state_dict(), source.dino.teacher_encoder.state_dict())
    save_hf_checkpoint(source, tmp_path / "export")  # the export carries the teacher too
    again = tiny(seed=3)
    load_encoder_(again, "image", str(tmp_path / "export"), CONFIG)
    assert_same(again.image_encoder.state_dict(), source.dino.teacher_encoder.state_dict())


def test_init_encoders_refuses_what_does_not_fit(tmp_path):
    save_hf_checkpoint(tiny(phase="text"), tmp_path / "text")
    wide = tiny(hidden_size=32, num_heads=2)
    dcp.save({"model": wide.state_dict()}, checkpoint_id=str(tmp_path / "wide"), no_dist=True)
    target = tiny()
    with pytest.raises(ValueError, match=r"holds no image_encoder"):
        read_encoder(str(tmp_path / "text"), encoder_shapes(target, "image"), CONFIG)
    with pytest.raises(
        ValueError, match=r"shapes differ .*text_encoder.word_embed.weight: \(64, 32\) there, \(64, 64\)"
    ):
        read_encoder(str(tmp_path / "wide"), encoder_shapes(target, "text"), CONFIG)
    deeper = tiny(num_layers=3)
    with pytest.raises(ValueError, match=r"does not fit: missing \[.*layer.2"):
        read_encoder(str(tmp_path / "text"), encoder_shapes(deeper, "text"), CONFIG)
    with pytest.raises(FileNotFoundError, match="directory not found"):
        read_encoder(str(tmp_path / "nowhere"), encoder_shapes(target, "text"), CONFIG)
    with pytest.raises(ValueError, match="export of a text-phase run .* model.init_encoders.text"):
        from model import load_hf_checkpoint

        load_hf_checkpoint(tmp_path / "text")
