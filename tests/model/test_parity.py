"""Parity with transformers' FlavaForPreTraining (the correctness oracle), identical weights via interop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flava_batches import make_batch, perturbed_reference, reference_call

from model import load_hf_checkpoint
from model.checkpoint import to_hf_state

RTOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference, ours) with identical, deliberately non-trivial weights."""
    hf = perturbed_reference()
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, load_hf_checkpoint(path).eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=1e-5, msg=lambda m: f"{what}: {m}")


def assert_losses(ours, ref, expected: set[str]) -> None:
    assert set(ours.losses) == expected
    for name in expected:
        reference = getattr(ref.loss_info, name)
        assert torch.isclose(ours.losses[name], reference, rtol=RTOL, atol=0), (
            name,
            ours.losses[name],
            reference,
        )
    assert torch.isclose(ours.loss, ref.loss, rtol=RTOL, atol=0)


def test_image_batch_mim(pair):
    hf, ours = pair
    batch = make_batch("image", ours.spec, batch_size=3, seed=1)
    out, ref = ours(batch), reference_call(hf, batch)
    assert_losses(out, ref, {"mim"})
    assert_close(out.logits["mim"], ref.mim_logits, "mim logits")
    assert_close(out.hidden["image_masked"], ref.image_masked_embeddings, "masked image states")


def test_text_batch_mlm_with_padding(pair):
    hf, ours = pair
    batch = make_batch("text", ours.spec, batch_size=4, seed=2)
    assert (batch["attention_mask"] == 0).any()
    out, ref = ours(batch), reference_call(hf, batch)
    assert_losses(out, ref, {"mlm"})
    assert_close(out.logits["mlm"], ref.mlm_logits, "mlm logits")
    assert_close(out.hidden["text_masked"], ref.text_masked_embeddings, "masked text states")


@pytest.mark.parametrize("negatives", [(1,), (0, 1, 2, 3)], ids=["some-negatives", "all-negatives"])
def test_image_text_batch_all_pair_losses(pair, negatives):
    hf, ours = pair
    batch = make_batch("image_text", ours.spec, batch_size=4, seed=3, negatives=negatives)
    assert (batch["attention_mask"] == 0).any()
    out, ref = ours(batch), reference_call(hf, batch)
    assert_losses(out, ref, {"global_contrastive", "itm", "mmm_image", "mmm_text"})
    rows = batch["itm_labels"] != 0
    rows |= ~rows.any()
    assert_close(out.hidden["image"], ref.image_embeddings, "image states")
    assert_close(out.hidden["text"], ref.text_embeddings, "text states")
    assert_close(out.hidden["multimodal_masked"][rows], ref.multimodal_masked_embeddings, "multimodal states")
    for ours_name, ref_name in [
        ("itm", "itm_logits"),
        ("contrastive_per_image", "contrastive_logits_per_image"),
        ("contrastive_per_text", "contrastive_logits_per_text"),
        ("mmm_image", "mmm_image_logits"),
        ("mmm_text", "mmm_text_logits"),
    ]:
        assert_close(out.logits[ours_name], getattr(ref, ref_name), ours_name)


def test_gradients_match_reference(pair):
    hf, ours = pair
    batch = make_batch("image_text", ours.spec, batch_size=4, seed=4)
    ours.zero_grad()
    hf.zero_grad()
    ours(batch).loss.backward()
    reference_call(hf, batch).loss.backward()
    ref = hf.named_parameters(remove_duplicate=False)  # the tied head biases under their decoder name
    ref_grads = {n: p.grad for n, p in ref if p.grad is not None and not n.endswith("head.bias")}
    grads = to_hf_state({n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=1e-3, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    ours.zero_grad()
    hf.zero_grad()


def test_retrieval_embeddings_match_reference(pair):
    hf, ours = pair
    batch = make_batch("image_text", ours.spec, seed=5)
    with torch.no_grad():
        image = hf.flava.get_image_features(pixel_values=batch["pixel_values"]).pooler_output[:, 0]
        text = hf.flava.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output[:, 0]
        assert_close(ours.encode_image(batch["pixel_values"]), F.normalize(image, dim=-1), "image embedding")
        assert_close(
            ours.encode_text(batch["input_ids"], batch["attention_mask"]),
            F.normalize(text, dim=-1),
            "text embedding",
        )
