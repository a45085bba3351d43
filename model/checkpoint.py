"""Read and write transformers ``FlavaForPreTraining`` checkpoints (the ``facebook/flava-full`` layout).

Plain json + safetensors/torch, no transformers import. Paths are local directories: the trainer localises
``s3://`` URIs first. The dVAE image codebook is not part of our model (codes are precomputed by the data
pipeline): its keys are skipped on import, and the export sets ``init_codebook: false`` so that
``FlavaForPreTraining.from_pretrained`` builds no codebook and reports no missing keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import LOSS_NAMES, FlavaSpec
from model.flava import FlavaForPretraining

log = logging.getLogger(__name__)

CODEBOOK_PREFIX = "image_codebook."
POSITION_IDS = "flava.text_model.embeddings.position_ids"  # a buffer old exports persisted, not a weight
PHASE_KEY = "flava_phase"  # config.json of our exports: joint, or the unimodal phase that wrote it
# Scalars in transformers, shape (1,) here (FSDP2 shards no 0-dim parameter).
SCALAR_KEYS = {"logit_scale": (1,)}
HEADS = ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head")
# (our prefix, transformers prefix) of the three transformer stacks.
ENCODERS = (
    ("image_encoder", "flava.image_model"),
    ("text_encoder", "flava.text_model"),
    ("mm_encoder", "flava.multimodal_model"),
)
LAYER_PARTS = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
}
RENAMES = {
    "image_encoder.patch_embed": "flava.image_model.embeddings.patch_embeddings.projection",
    "image_encoder.cls_token": "flava.image_model.embeddings.cls_token",
    "image_encoder.mask_token": "flava.image_model.embeddings.mask_token",
    "image_encoder.pos_embed": "flava.image_model.embeddings.position_embeddings",
    "text_encoder.word_embed": "flava.text_model.embeddings.word_embeddings",
    "text_encoder.pos_embed": "flava.text_model.embeddings.position_embeddings",
    "text_encoder.type_embed": "flava.text_model.embeddings.token_type_embeddings",
    "text_encoder.embed_norm": "flava.text_model.embeddings.LayerNorm",
    "mm_encoder.cls_token": "flava.multimodal_model.cls_token",
    "mm_encoder.image_to_mm": "flava.image_to_mm_projection",
    "mm_encoder.text_to_mm": "flava.text_to_mm_projection",
    "image_projection": "flava.image_projection",
    "text_projection": "flava.text_projection",
    "logit_scale": "flava.logit_scale",
    "itm_head.pooler": "itm_head.pooler.dense",
    "itm_head.classifier": "itm_head.seq_relationship",
    **{f"{ours}.pooler": f"{hf}.pooler.dense" for ours, hf in ENCODERS},
    **{f"{ours}.encoder.norm": f"{hf}.layernorm" for ours, hf in ENCODERS},
    **{f"{h}.dense": f"{h}.transform.dense" for h in HEADS},
    **{f"{h}.norm": f"{h}.transform.LayerNorm" for h in HEADS},
    **{f"{h}.decoder": f"{h}.decoder" for h in HEADS},
}


def hf_names(key: str) -> list[str]:
    """transformers key(s) of one of our state-dict keys; the fused qkv maps to [query, key, value]."""
    for ours, hf in ENCODERS:
        prefix = f"{ours}.encoder.layers."
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            part, param = rest.rsplit(".", 1)
            base = f"{hf}.encoder.layer.{index}"
            if part == "attn.qkv":
                return [f"{base}.attention.attention.{name}.{param}" for name in ("query", "key", "value")]
            return [f"{base}.{LAYER_PARTS[part]}.{param}"]
    module, _, param = key.rpartition(".")
    if key in RENAMES:  # bare parameters (tokens, logit scale)
        return [RENAMES[key]]
    if module in RENAMES:
        return [f"{RENAMES[module]}.{param}"]
    raise KeyError(f"no transformers name for {key!r}")


def spec_from_hf_config(config: dict) -> FlavaSpec:
    """Our spec from a FlavaConfig dict; refuses configs our single-width model cannot represent, and the
    export of a unimodal phase (it holds one encoder: ``model.init_encoders`` takes it)."""
    phase = config.get(PHASE_KEY, "joint")
    if phase != "joint":
        raise ValueError(
            f"this is the export of a {phase}-phase run (only its {phase} encoder and head), not a whole "
            f"FLAVA: initialise from it with model.init_encoders.{phase}"
        )
    image, text, mm = (config.get(k) or {} for k in ("image_config", "text_config", "multimodal_config"))

    def get(sub: dict, name: str, default):
        return sub.get(name, default)

    widths = {
        name: get(sub, "hidden_size", 768) for name, sub in (("image", image), ("text", text), ("mm", mm))
    }
    stacks = {
        key: (get(image, key, default), get(text, key, default))
        for key, default in (
            ("num_hidden_layers", 12),
            ("num_attention_heads", 12),
            ("intermediate_size", 3072),
        )
    }
    problems = [f"hidden sizes differ: {widths}"] if len(set(widths.values())) > 1 else []
    problems += [f"image/text {key} differ: {pair}" for key, pair in stacks.items() if pair[0] != pair[1]]
    for name, sub in (("image", image), ("text", text), ("multimodal", mm)):
        if get(sub, "hidden_act", "gelu") != "gelu" or not get(sub, "qkv_bias", True):
            problems.append(f"{name}_config needs hidden_act='gelu' and qkv_bias=true")
    if get(mm, "num_attention_heads", 12) != stacks["num_attention_heads"][0]:
        problems.append("multimodal num_attention_heads differs from the unimodal encoders")
    if get(mm, "intermediate_size", 3072) != stacks["intermediate_size"][0]:
        problems.append("multimodal intermediate_size differs from the unimodal encoders")
    if problems:
        raise ValueError("unsupported FLAVA config: " + "; ".join(problems))
    return FlavaSpec(
        image_size=get(image, "image_size", 224),
        patch_size=get(image, "patch_size", 16),
        hidden_size=widths["image"],
        num_layers=stacks["num_hidden_layers"][0],
        num_heads=stacks["num_attention_heads"][0],
        mlp_dim=stacks["intermediate_size"][0],
        mm_num_layers=get(mm, "num_hidden_layers", 6),
        text_vocab_size=get(text, "vocab_size", 30522),
        max_position_embeddings=get(text, "max_position_embeddings", 512),
        type_vocab_size=get(text, "type_vocab_size", 2),
        pad_token_id=get(text, "pad_token_id", 0),
        mim_vocab_size=get(image, "vocab_size", 8192),
        projection_dim=config.get("projection_dim", 768),
        dropout=get(image, "hidden_dropout_prob", 0.0),
        layer_norm_eps=get(image, "layer_norm_eps", 1e-12),
        init_std=config.get("initializer_range", 0.02),
        loss_weights={name: float(config.get(f"{name}_weight", 1.0)) for name in LOSS_NAMES},
    )


def hf_config_from_spec(spec: FlavaSpec) -> dict:
    stack = {
        "hidden_size": spec.hidden_size,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": spec.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": spec.dropout,
        "attention_probs_dropout_prob": spec.dropout,
        "layer_norm_eps": spec.layer_norm_eps,
        "initializer_range": spec.init_std,
        "qkv_bias": True,
    }
    return {
        "architectures": ["FlavaForPreTraining"],
        "model_type": "flava",
        "image_config": {
            **stack,
            "model_type": "flava_image_model",
            "num_hidden_layers": spec.num_layers,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "num_channels": 3,
            "mask_token": True,
            "vocab_size": spec.mim_vocab_size,
        },
        "text_config": {
            **stack,
            "model_type": "flava_text_model",
            "num_hidden_layers": spec.num_layers,
            "vocab_size": spec.text_vocab_size,
            "max_position_embeddings": spec.max_position_embeddings,
            "type_vocab_size": spec.type_vocab_size,
            "pad_token_id": spec.pad_token_id,
        },
        "multimodal_config": {
            **stack,
            "model_type": "flava_multimodal_model",
            "num_hidden_layers": spec.mm_num_layers,
            "use_cls_token": True,
        },
        "init_codebook": False,
        PHASE_KEY: spec.phase,
        "hidden_size": spec.hidden_size,
        "projection_dim": spec.projection_dim,
        "layer_norm_eps": spec.layer_norm_eps,
        "initializer_range": spec.init_std,
        "logit_scale_init_value": 2.6592,
        "ce_ignore_index": -100,
        **{f"{name}_weight": weight for name, weight in spec.loss_weights.items()},
    }


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for name in files for k, v in load_file(path / name).items()}
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{path} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def load_hf_checkpoint(path: str | Path) -> FlavaForPretraining:
    """Our model with the weights of a transformers FlavaForPreTraining checkpoint directory.

    Strict: a missing weight or an unknown key is an error naming the keys. Codebook keys are skipped
    (counted in the log), as are the reference's head ``bias`` aliases of ``decoder.bias``.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a transformers FLAVA checkpoint directory")
    model = FlavaForPretraining(spec_from_hf_config(json.loads(config_file.read_text())))
    weights = _read_weights(path)
    for head in HEADS:  # checkpoints may hold the tied alias only, the decoder bias only, or both
        alias = weights.pop(f"{head}.bias", None)
        if alias is not None:
            weights.setdefault(f"{head}.decoder.bias", alias)
    codebook = [k for k in weights if k.startswith(CODEBOOK_PREFIX)]
    used: set[str] = set()
    state, missing = {}, []
    for key in model.state_dict():
        names = hf_names(key)
        if not all(name in weights for name in names):
            missing += [name for name in names if name not in weights]
            continue
        used.update(names)
        tensor = torch.cat([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
        state[key] = tensor.reshape(SCALAR_KEYS.get(key, tensor.shape))
    unexpected = sorted(set(weights) - used - set(codebook) - {POSITION_IDS})
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit FLAVA: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, strict=True)
    if codebook:
        log.info("skipped %d image_codebook tensors of %s (codes are precomputed)", len(codebook), path)
    return model


def to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (full, unsharded) state dict -> transformers names, shapes and separate q/k/v tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if key in SCALAR_KEYS:
            value = value.reshape(())
        names = hf_names(key)
        parts = value.chunk(len(names)) if len(names) > 1 else (value,)
        for name, part in zip(names, parts, strict=True):
            tensors[name] = part.contiguous().clone()
    return tensors


def save_hf_checkpoint(model: FlavaForPretraining, path: str | Path) -> Path:
    """Write config.json + model.safetensors loadable by transformers' FlavaForPreTraining.from_pretrained.

    Takes an unsharded model (gather a sharded one's full state dict into a fresh model first).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state(model.export_state()), path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config_from_spec(model.spec), indent=2) + "\n")
    return path


def hf_encoder_state(path: str | Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """From an exported model directory (a whole FLAVA or a phase's export), exactly the tensors of one
    encoder: ``expected`` maps our keys of it (all under one prefix, e.g. ``text_encoder.``) to their
    shapes. Strict: a missing tensor, another tensor of that encoder, or a shape that differs is an error
    naming them."""
    path = Path(path)
    weights = _read_weights(path)
    prefix = next(iter(expected)).split(".", 1)[0]
    hf_prefix = dict(ENCODERS)[prefix] + "."
    state, missing, used = {}, [], set()
    for key in expected:
        names = hf_names(key)
        missing += [name for name in names if name not in weights]
        if all(name in weights for name in names):
            used.update(names)
            state[key] = torch.cat([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
    unexpected = sorted(k for k in weights if k.startswith(hf_prefix) and k not in used | {POSITION_IDS})
    if len(missing) == sum(len(hf_names(k)) for k in expected):
        raise ValueError(f"{path} holds no {prefix} (no {hf_prefix}* tensors)")
    if missing or unexpected:
        raise ValueError(f"{path}: the {prefix} does not fit: missing {missing}, unexpected {unexpected}")
    check_shapes(state, expected, str(path))
    return state


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str) -> None:
    """Every tensor of ``state`` has its ``expected`` shape, else an error naming each one that does not."""
    wrong = [
        f"{k}: {tuple(v.shape)} there, {tuple(expected[k])} here"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k])
    ]
    if wrong:
        raise ValueError(f"{where}: shapes differ from this model's (other dimensions?): " + "; ".join(wrong))
