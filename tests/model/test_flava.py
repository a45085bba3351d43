"""Model behaviour the parity tests cannot show: which passes and losses run per batch kind, presets."""

from __future__ import annotations

import pytest
import torch
from flava_batches import make_batch

from model import PRESETS, build_flava


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_flava("tiny", text_vocab_size=64, max_position_embeddings=16)


def count_rows(model) -> dict[str, int]:
    """Rows each encoder processes (a pass over a batch of B rows counts B, two passes stacked 2B)."""
    calls = {"image_encoder": 0, "text_encoder": 0, "mm_encoder": 0}
    for name in calls:

        def hook(module, args, output, name=name):
            calls[name] += args[0].shape[0]

        getattr(model, name).register_forward_hook(hook)
    return calls


@pytest.mark.parametrize(
    ("kind", "losses", "passes"),
    [
        ("image", {"mim"}, (1, 0, 0)),
        ("text", {"mlm"}, (0, 1, 0)),
        ("image_text", {"global_contrastive", "itm", "mmm_image", "mmm_text"}, (2, 2, 1)),
    ],
)
def test_kind_decides_losses_and_passes(kind, losses, passes):
    model = build_flava("tiny", text_vocab_size=64, max_position_embeddings=16)
    calls = count_rows(model)
    out = model(make_batch(kind, model.spec, batch_size=4))
    assert set(out.losses) == losses
    assert tuple(rows // 4 for rows in calls.values()) == passes  # unimodal batches: the masked pass only
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_loss_weights_scale_and_skip():
    torch.manual_seed(0)
    weights = {"itm": 0.0, "mmm_image": 0.0, "mmm_text": 0.0, "global_contrastive": 0.5}
    model = build_flava("tiny", text_vocab_size=64, max_position_embeddings=16, loss_weights=weights)
    calls = count_rows(model)
    out = model(make_batch("image_text", model.spec))
    assert set(out.losses) == {"global_contrastive"}
    assert calls["mm_encoder"] == 0  # nothing needs the masked multimodal pass
    assert torch.allclose(out.loss, 0.5 * out.losses["global_contrastive"])


def test_itm_negatives_do_not_change_contrastive_and_mmm_rows(tiny):
    batch = make_batch("image_text", tiny.spec, negatives=(1,))
    out = tiny(batch)
    assert out.logits["contrastive_per_image"].shape == (3, 4)  # negatives: distractor columns, not queries
    assert out.logits["mmm_text"].shape[0] == 3 * 2  # 3 positive rows x 2 masked tokens


def test_no_masked_target_gives_zero_not_nan(tiny):
    batch = make_batch("image", tiny.spec, masked_patches=0)
    out = tiny(batch)
    assert out.losses["mim"].item() == 0.0


def test_retrieval_embeddings_are_unit_norm(tiny):
    batch = make_batch("image_text", tiny.spec)
    image = tiny.encode_image(batch["pixel_values"])
    text = tiny.encode_text(batch["input_ids"], batch["attention_mask"])
    assert image.shape == text.shape == (4, tiny.spec.projection_dim)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize(
    ("batch_update", "match"),
    [
        ({"kind": "video"}, "kind"),
        ({"kind": None}, "kind"),
        ({"mim_labels": None}, "mim_labels"),
    ],
)
def test_bad_batches_name_the_problem(tiny, batch_update, match):
    batch = make_batch("image", tiny.spec)
    batch.update(batch_update)
    batch = {k: v for k, v in batch.items() if v is not None or k == "kind"}
    with pytest.raises(ValueError, match=match):
        tiny(batch)


def test_wrong_image_size_is_named(tiny):
    batch = make_batch("image", build_flava("tiny", image_size=32, text_vocab_size=64).spec)
    with pytest.raises(ValueError, match="image_size=64"):
        tiny(batch)


def test_unknown_preset_and_loss_names():
    with pytest.raises(ValueError, match="unknown FLAVA preset"):
        build_flava("huge")
    with pytest.raises(ValueError, match="unknown losses"):
        build_flava("tiny", loss_weights={"mlm_text": 1.0})


def test_presets_dimensions():
    with torch.device("meta"):
        base = build_flava("base")
        large = build_flava("large")
    heads = ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head", "itm_head")
    n_heads = sum(p.numel() for n, p in base.named_parameters() if n.split(".")[0] in heads)
    n_model = sum(p.numel() for p in base.parameters()) - n_heads
    assert 235e6 < n_model < 245e6 and 55e6 < n_heads < 65e6  # flava-full: ~241M model, ~62M heads
    assert len(base.transformer_layers()) == 12 + 12 + 6
    assert large.spec.hidden_size == 1024 and len(large.transformer_layers()) == 24 + 24 + 8
    assert set(PRESETS) == {"tiny", "small", "base", "large"}
    small = build_flava("small")
    assert small.spec.image_size == 64 and small.spec.mim_vocab_size == 8192
