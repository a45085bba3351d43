"""Relative paths: resolved against storage.base_dir or the working directory, and refused inside the
temporary package directory that ``ray job submit`` runs a job in (tests/train/test_job_submit.py submits
real jobs; here the package directory is a directory of the same name)."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.paths import SWEEP, TRAINING, absolute_paths, inside_package_hint, ray_package_dir


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A working directory shaped like Ray's per-job package copy."""
    pkg = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (pkg / "jobs").mkdir(parents=True)
    monkeypatch.chdir(pkg / "jobs")  # anywhere inside it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return pkg


ABSOLUTE = [
    "data.train={text: /data/text/train}",
    "data.val={}",
    "train.storage_path=s3://bucket/runs",
    "mlflow.tracking_uri=http://mlflow:5000",
]


def test_package_dir_is_recognised(package, tmp_path):
    assert ray_package_dir() == package
    assert ray_package_dir(tmp_path) is None


def test_outside_a_job_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = absolute_paths(load_config(None, ["data.train={text: shards/text}", "train.storage_path=runs"]))
    assert config.data.train["text"] == str(tmp_path / "shards/text")
    assert config.train.storage_path == str(tmp_path / "runs")
    assert config.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert absolute_paths(load_config()).mlflow.tracking_uri == "http://mlflow:5000"
    assert (
        absolute_paths(load_config(None, ["mlflow.tracking_uri=file:///x"])).mlflow.tracking_uri
        == "file:///x"
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.storage_path=runs", "train.storage_path=runs"),
        ("mlflow.tracking_uri=sqlite:///mlflow.db", "mlflow.tracking_uri=mlflow.db"),
        ("mlflow.tracking_uri=", "mlflow.tracking_uri empty"),
        ("data.train={text: demo_data/text/train}", "data.train.text=demo_data/text/train"),
        ("data.tokenizer=tok", "data.tokenizer=tok"),
        ("model.init_checkpoint=ckpt", "model.init_checkpoint=ckpt"),
    ],
)
def test_a_relative_path_inside_a_job_package_is_an_error_naming_key_target_and_fix(package, override, key):
    with pytest.raises(ConfigError) as error:
        absolute_paths(load_config(None, [*ABSOLUTE, override]), TRAINING)
    message = str(error.value)
    assert key in message and str(package) in message
    assert "storage.base_dir=$PWD" in message and "s3://" in message


def test_sweep_storage_is_checked_for_sweeps_only(package):
    config = load_config(None, [*ABSOLUTE, "tune.storage_path=tune_runs"])
    assert absolute_paths(config, TRAINING).tune.storage_path == "tune_runs"  # pretraining never reads it
    with pytest.raises(ConfigError, match="tune.storage_path=tune_runs"):
        absolute_paths(config, SWEEP)


def test_base_dir_makes_relative_paths_safe_inside_a_job(package, tmp_path):
    base = tmp_path / "checkout"
    config = absolute_paths(
        load_config(
            None, [f"storage.base_dir={base}", "data.train={text: demo/text}", "train.storage_path=runs"]
        )
    )
    assert config.data.train["text"] == str(base / "demo/text")
    assert config.train.storage_path == str(base / "runs")
    assert config.mlflow.tracking_uri == f"sqlite:///{base / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="storage.base_dir=checkout is relative"):
        absolute_paths(load_config(None, ["storage.base_dir=checkout"]))


def test_not_found_hint_only_for_paths_inside_the_package(package, tmp_path):
    assert "not uploaded" in inside_package_hint(str(package / "demo_data" / "text"))
    assert inside_package_hint(str(tmp_path / "elsewhere")) == ""
