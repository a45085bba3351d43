"""transformers checkpoint interop: lossless round trip, clean from_pretrained, flava-full-style .bin."""

from __future__ import annotations

import json

import pytest
import torch
from flava_batches import small_hf_config
from transformers import FlavaForPreTraining

from model import build_flava, load_hf_checkpoint, save_hf_checkpoint
from model.checkpoint import to_hf_state


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    model = build_flava(
        "tiny", text_vocab_size=64, max_position_embeddings=16, mim_vocab_size=40, projection_dim=48
    )
    with torch.no_grad():  # make every tensor distinct from its init so nothing passes by accident
        for t in model.state_dict().values():
            t.add_(torch.randn_like(t) * 0.1)
    return model


def test_export_loads_in_transformers_without_missing_keys(ours, tmp_path):
    save_hf_checkpoint(ours, tmp_path)
    hf, info = FlavaForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"], info
    assert hf.image_codebook is None  # exported with init_codebook=false: codes come precomputed
    hf_state = hf.state_dict()
    for name, value in to_hf_state(ours.state_dict()).items():
        torch.testing.assert_close(hf_state[name], value, rtol=0, atol=0, msg=name)


def test_round_trip_is_lossless(ours, tmp_path):
    save_hf_checkpoint(ours, tmp_path)
    back = load_hf_checkpoint(tmp_path)
    assert back.spec == ours.spec
    original, loaded = ours.state_dict(), back.state_dict()
    assert original.keys() == loaded.keys()
    for key in original:
        assert torch.equal(original[key], loaded[key]), key


def test_loads_flava_full_layout_bin_with_codebook_and_bias_aliases(tmp_path):
    """facebook/flava-full ships pytorch_model.bin with the codebook and both head bias names."""
    torch.manual_seed(1)
    config = small_hf_config(init_codebook=True, image_codebook_config=dict(hidden_size=8))
    hf = FlavaForPreTraining(config)
    state = hf.state_dict()
    for head in ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head"):
        state[f"{head}.bias"] = state[f"{head}.decoder.bias"]
    assert any(k.startswith("image_codebook.") for k in state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    config.save_pretrained(tmp_path)
    model = load_hf_checkpoint(tmp_path)
    torch.testing.assert_close(model.mim_head.decoder.bias, hf.mim_head.bias)
    reference = hf.state_dict()
    for name, value in to_hf_state(model.state_dict()).items():
        assert torch.equal(reference[name], value), name


def test_incompatible_checkpoints_are_refused_with_names(ours, tmp_path):
    save_hf_checkpoint(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["hidden_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden sizes differ"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path / "nowhere")


def test_missing_weight_is_named(ours, tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_checkpoint(ours, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["itm_head.seq_relationship.weight"]
    weights["extra.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['itm_head.seq_relationship.weight'\].*extra.weight"):
        load_hf_checkpoint(tmp_path)
