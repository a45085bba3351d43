"""What each trial trains and what the winner's YAML holds (no Ray needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.config import ConfigError, dump_config, load_config
from pipeline.tune.report import COMPLETED, TrialRow
from pipeline.tune.sweep import (
    SWEEP_TAG,
    TRIAL_ID_TAG,
    _scheduler,
    best_config,
    experiment_uri,
    resolve_paths,
    trial_config,
)

ROOT = Path(__file__).resolve().parents[2]
BASE = [
    "data.train={image_text: /d/it, image: /d/im, text: /d/tx}",
    "tune.storage_path=/sweeps",
    "tune.name=mix",
    "train.storage_path=/runs",
    "train.run_name=base",
    "mlflow.run_tags={team: vision}",
]


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trial_config_gets_its_own_run_and_a_nested_mlflow_run():
    base = load_config(None, BASE)
    params = {"ratios": {"image_text": 0.2, "image": 0.0, "text": 0.8}, "lr": 3e-4}
    config = trial_config(base, params, "abc_00001", parent_run_id="p123", workers=1)
    assert config.data.ratios == params["ratios"]
    assert config.train.lr == 3e-4
    assert config.train.num_workers == 1
    # the run name is stable across retries of the trial, so a retried trial resumes its checkpoints
    assert (config.train.storage_path, config.train.run_name) == ("/sweeps/mix/train", "trial-abc_00001")
    assert config.mlflow.parent_run_id == "p123"
    assert config.mlflow.run_tags == {"team": "vision", TRIAL_ID_TAG: "abc_00001", SWEEP_TAG: "mix"}
    assert base.data.ratios != params["ratios"] and base.train.run_name == "base"  # base untouched


def test_trial_without_lr_keeps_the_base_lr():
    base = load_config(None, [*BASE, "train.lr=0.002"])
    config = trial_config(base, {"ratios": {"text": 1.0}}, "t", "p", 2)
    assert config.train.lr == 0.002


def test_best_config_is_a_plain_pretraining_config(tmp_path):
    base = load_config(None, BASE)
    row = TrialRow("abc_00002", COMPLETED, {"image_text": 0.5, "image": 0.25, "text": 0.25}, 5e-4, 0.4, 8)
    best = best_config(base, row)
    assert best.data.ratios == row.ratios and best.train.lr == 5e-4
    assert best.train.run_name == "mix-best" and best.train.storage_path == "/runs"
    assert best.mlflow.parent_run_id == "" and best.mlflow.run_tags == {"team": "vision"}
    path = tmp_path / "best.yaml"
    path.write_text(dump_config(best))
    # exactly what `jobs/pretrain.py --config best.yaml` parses
    parsed, args = load_job("pretrain").parse(["--config", str(path)])
    assert parsed == best and args.overrides == []


def test_paths_are_made_absolute_for_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve_paths(load_config(None, ["data.train={text: shards/text}", "tune.storage_path=sweeps"]))
    assert config.data.train["text"] == str(tmp_path / "shards/text")
    assert experiment_uri(config) == str(tmp_path / "sweeps" / "mixing-sweep")
    assert config.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    s3 = resolve_paths(load_config(None, ["tune.storage_path=s3://bucket/sweeps"]))
    assert experiment_uri(s3) == "s3://bucket/sweeps/mixing-sweep"


def test_asha_compares_trials_at_validation_steps():
    config = load_config(None, ["train.steps=40", "train.val_every=5", "tune.grace_period=2"])
    asha = _scheduler(config)
    assert (asha._time_attr, asha._max_t) == ("step", 40)
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [40, 20, 10]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tune.scheduler=hyperband"], "tune.scheduler"),
        (["train.val_every=0"], "val_every"),
        (["tune.reduction_factor=1"], "reduction_factor"),
        (["train.steps=10", "train.val_every=5", "tune.grace_period=3"], "exceeds train.steps"),
    ],
)
def test_bad_scheduler_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _scheduler(load_config(None, overrides))


def test_tune_job_parse_keeps_its_contract():
    config, args = load_job("tune_mixing").parse(["tune.num_samples=3", "--dry-run"])
    assert config.tune.num_samples == 3 and args.dry_run
