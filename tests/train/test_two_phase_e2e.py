"""The two-phase recipe through the real job on the shared local Ray: a text phase, a DINO image phase,
then a joint run initialised from both (``run:NAME``), 2 FSDP2 workers each, tiny FLAVA, real MLflow.

Oracles: the checkpoints' own keys (a phase saves only its encoder and head, and optimizer state for what
it trains), the phases' stored tensors (what a joint worker loads must equal them), and the pre-flight
refusing bad sources before any worker starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from mlflow.tracking import MlflowClient
from test_pretrain_e2e import job_config

from model import build_flava
from pipeline.train.init_encoders import load_encoder_
from pipeline.train.launch import (
    InputError,
    resolve_init_encoders,
    resolve_paths,
    run_pretraining,
    validate_inputs,
)
from pipeline.train.loop import model_kwargs

pytestmark = pytest.mark.slow

STEPS = 3
DINO = [
    "model.dino.out_dim=64",
    "model.dino.hidden_dim=32",
    "model.dino.bottleneck_dim=16",
    "model.dino.local_crops=2",
]


def phase_config(demo: Path, work: Path, run_name: str, kinds: tuple[str, ...], *extra: str):
    """The e2e job's config (tiny preset, 2 workers) on the datasets of ``kinds`` only."""
    splits = {s: {k: str(demo / k / s) for k in kinds} for s in ("train", "val")}
    return job_config(
        demo,
        work,
        run_name,
        f"data.train={json.dumps(splits['train'])}",
        f"data.val={json.dumps(splits['val'])}",
        f"data.ratios={json.dumps(dict.fromkeys(kinds, 1.0))}",
        f"train.steps={STEPS}",
        "train.val_every=3",
        *extra,
    )


@pytest.fixture(scope="module")
def phases(demo_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("two-phase")
    text = run_pretraining(phase_config(demo_root, work, "text", ("text",), "model.phase=text"))
    tokenizer = f"data.tokenizer={work / 'runs' / 'text' / 'tokenizer'}"
    image = run_pretraining(
        phase_config(
            demo_root,
            work,
            "image",
            ("image",),
            "model.phase=image",
            "model.image_objective=dino",
            tokenizer,
            *DINO,
        )
    )
    encoders = "model.init_encoders={text: 'run:text', image: 'run:image'}"
    joint = phase_config(demo_root, work, "joint", ("image_text", "image", "text"), tokenizer, encoders)
    return work, text, image, joint


def model_keys(checkpoint_dir: str) -> set[str]:
    return set(dcp.FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata)


def test_a_phase_checkpoints_only_its_encoder_and_head(phases):
    work, text, image, _ = phases
    for result, model_parts in ((text, {"text_encoder", "mlm_head"}), (image, {"image_encoder", "dino"})):
        assert result.metrics["step"] == STEPS
        latest = sorted(Path(result.run_dir).glob("checkpoint_step*"))[-1]
        keys = model_keys(str(latest))
        assert {k.split(".")[1] for k in keys if k.startswith("model.")} == model_parts
        assert {k.split(".")[2] for k in keys if k.startswith("optim.state.")} == model_parts
        assert not [k for k in keys if k.startswith("optim.state.dino.teacher")]  # no optimizer for it
        assert f"val/term/{'mlm' if result is text else 'dino'}" in result.metrics


def test_the_joint_phase_starts_from_both_encoders_and_records_them(phases):
    work, text, image, joint = phases
    resolved = resolve_init_encoders(resolve_paths(joint))
    text_ckpt, image_ckpt = resolved.model.init_encoders["text"], resolved.model.init_encoders["image"]
    assert text_ckpt.endswith(f"checkpoint_step{STEPS:08d}") and image_ckpt.endswith(
        f"checkpoint_step{STEPS:08d}"
    )
    result = run_pretraining(joint)
    assert result.metrics["step"] == STEPS and "val/retrieval/i2t_r1" in result.metrics
    params = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_run(result.mlflow_run_id).data.params
    assert params["init/text_encoder"] == text_ckpt and params["init/image_encoder"] == image_ckpt

    # the encoders a joint worker starts from are exactly the phases' (the text student, the DINO teacher)
    vocab = dcp.FileSystemReader(text_ckpt).read_metadata().state_dict_metadata
    vocab = vocab["model.text_encoder.word_embed.weight"].size[0]
    model = build_flava("tiny", **model_kwargs(resolved, vocab))
    load_encoder_(model, "text", text_ckpt, resolved)
    load_encoder_(model, "image", image_ckpt, resolved)
    for part, source, prefix in (
        ("text", text_ckpt, "text_encoder."),
        ("image", image_ckpt, "dino.teacher_encoder."),
    ):
        mine = getattr(model, f"{part}_encoder").state_dict()
        stored = {f"{prefix}{k}": torch.empty_like(v) for k, v in mine.items()}
        dcp.load({"model": stored}, checkpoint_id=source, no_dist=True)
        for key, value in stored.items():
            assert torch.equal(mine[key[len(prefix) :]], value), key


@pytest.mark.parametrize(
    ("encoders", "message"),
    [
        ("{image: 'run:text'}", r"model.init_encoders.image \(run:text\): .* holds no image_encoder"),
        ("{text: 'run:nothing'}", r"model.init_encoders: run 'nothing' has no complete checkpoint"),
        ("{text: '/no/such/dir'}", r"model.init_encoders.text \(/no/such/dir\): directory not found"),
    ],
)
def test_bad_encoder_sources_are_refused_before_any_worker_starts(phases, demo_root, encoders, message):
    work, *_ = phases
    tokenizer = f"data.tokenizer={work / 'runs' / 'text' / 'tokenizer'}"
    config = phase_config(
        demo_root, work, "bad", ("image_text", "image", "text"), tokenizer, f"model.init_encoders={encoders}"
    )
    with pytest.raises(InputError, match=message):
        validate_inputs(resolve_paths(config))


def test_an_encoder_of_other_dimensions_is_refused(phases, demo_root):
    work, *_ = phases
    tokenizer = f"data.tokenizer={work / 'runs' / 'text' / 'tokenizer'}"
    config = phase_config(
        demo_root,
        work,
        "wide",
        ("image_text", "image", "text"),
        tokenizer,
        "model.init_encoders={text: 'run:text'}",
        "model.overrides={hidden_size: 32, num_heads: 2}",
    )
    with pytest.raises(InputError, match=r"model.init_encoders.text \(run:text\): .*shapes differ"):
        validate_inputs(resolve_paths(config))
