"""MLflow bookkeeping against a real sqlite store: one run per run key, batching, redaction."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import REDACTED, Config, MLflowConfig, dump_config, redact
from pipeline.train import tracking


def test_redact_masks_secret_keys_and_uri_credentials():
    tree = {
        "storage": {"aws_secret_access_key": "abc", "s3_endpoint_url": "http://u:p@minio:9000"},
        "data": {"tokenizer": "/tok", "auth_token": "xyz", "empty_token": ""},
        "mlflow": {"tracking_uri": "https://bob:hunter2@mlflow.example/"},
    }
    red = redact(tree)
    text = yaml.safe_dump(red)
    for secret in ("abc", "xyz", "hunter2", "u:p"):
        assert secret not in text
    assert red["data"]["tokenizer"] == "/tok" and red["data"]["empty_token"] == ""
    assert red["mlflow"]["tracking_uri"] == f"https://{REDACTED}@mlflow.example/"


def test_flatten_and_dump_config():
    flat = tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}})
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "e": "{}"}
    assert yaml.safe_load(dump_config(Config()))["train"]["run_name"] == "flava-demo"


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One store for the module: creating an MLflow sqlite schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def test_one_run_per_run_key_and_batched_metrics(uri):
    cfg = MLflowConfig(experiment="t", parent_run_id="", run_tags={"team": "a"})
    first = tracking.find_or_create_run(uri, cfg, "/runs/a", "a")
    assert tracking.find_or_create_run(uri, cfg, "/runs/a", "a") == first  # died before a checkpoint
    assert tracking.find_or_create_run(uri, cfg, "/runs/a", "a", prior_run_id=first) == first
    other = tracking.find_or_create_run(uri, cfg, "/runs/b", "b")
    assert other != first
    assert tracking.find_or_create_run(uri, cfg, "/runs/a", "a", prior_run_id="0" * 32) == first

    tracker = tracking.Tracker(uri, first)
    tracker.log_params({"train.steps": "10", "train.lr": "0.1"})
    tracker.log_params({"train.steps": "20", "model.preset": "tiny"})  # a rerun extending the run
    for step in range(1, 4):
        tracker.add(step, {"train/loss": 1.0 / step, "perf/step_time_s": 0.5})
    tracker.flush()
    tracker.log_text("a: 1\n", "config/resolved.yaml")
    tracker.finish("FINISHED")

    run = MlflowClient(uri).get_run(first)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.steps": "10", "train.lr": "0.1", "model.preset": "tiny"}
    assert run.data.tags["changed_on_resume.train.steps"] == "20"
    assert run.data.tags["team"] == "a" and run.data.tags[tracking.RUN_KEY_TAG] == "/runs/a"
    history = MlflowClient(uri).get_metric_history(first, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert [f.path for f in MlflowClient(uri).list_artifacts(first, "config")] == ["config/resolved.yaml"]


def test_child_run_of_a_sweep(uri):
    parent = tracking.find_or_create_run(uri, MLflowConfig(experiment="t"), "/sweep", "sweep")

    child = tracking.find_or_create_run(
        uri, MLflowConfig(experiment="t", parent_run_id=parent), "/sweep/t0", "t0"
    )
    assert MlflowClient(uri).get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_git_commit_outside_a_checkout_comes_from_the_submitter(tmp_path, monkeypatch):
    from pipeline.train.tracking import git_commit

    monkeypatch.delenv("FLAVA_GIT_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("FLAVA_GIT_COMMIT", "0123abc")
    assert git_commit(tmp_path) == "0123abc"


def test_background_flush_lands_before_any_other_call_and_its_error_surfaces(uri):
    run_id = tracking.find_or_create_run(uri, MLflowConfig(experiment="t"), "/runs/bg", "bg")
    tracker = tracking.Tracker(uri, run_id)
    for step in range(1, 4):
        tracker.add(step, {"train/loss": float(step)})
        tracker.flush(background=True)
    assert [(m.step, m.value) for m in tracker.metric_history("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]

    lost = tracking.Tracker(uri, "0" * 32)  # no such run: the send fails in the thread
    lost.add(1, {"train/loss": 1.0})
    lost.flush(background=True)
    with pytest.raises(Exception, match="0" * 32):
        lost.wait()
    tracker.finish("FINISHED")
