"""Online mixing in real 2-worker runs over named sources: the weights are the same on every rank (the loop
checks it at every update and logs the spread), and after a SIGKILLed worker the restarted group continues
the mixing state exactly: every logged weight equals the unfaulted run's at the same step."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.drills import observe
from pipeline.drills.harness import prepare_workspace, train_worker_pids
from pipeline.drills.process_faults import train_through_fault
from pipeline.train.launch import run_pretraining

pytestmark = pytest.mark.slow

SOURCES = {"pairs": "image_text", "clipart": "image", "glosses-a": "text", "glosses-b": "text"}


@pytest.fixture(scope="module")
def ws(ray_cluster, tmp_path_factory):
    return prepare_workspace(tmp_path_factory.mktemp("mixing"))


def online(ws) -> list[str]:
    """Four named sources over the demo shards (two text sources share a dataset), mixed by EXP3."""
    sources = {
        name: {
            "kind": kind,
            "train": str(ws.demo / kind / "train"),
            "val": str(ws.demo / kind / "val"),
        }
        for name, kind in SOURCES.items()
    }
    return [
        "data.train={}",
        "data.val={}",
        f"data.sources={json.dumps(sources)}",
        f"data.ratios={json.dumps(dict.fromkeys(SOURCES, 1))}",
        "data.mixing=bandit",
        "data.mixing_every=2",
        "train.max_failures=2",
    ]


def weights(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of ``mix/weight/<source>`` per source, and of ``mix/rank_spread``."""
    metrics = {name: f"mix/weight/{name}" for name in SOURCES} | {"rank_spread": "mix/rank_spread"}
    return {
        name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
        for name, metric in metrics.items()
    }


def test_mixing_weights_agree_across_ranks_and_resume_exactly_after_a_sigkill(ws):
    clean = run_pretraining(ws.config("mix-clean", "train.steps=12", *online(ws)))
    client = MlflowClient(clean.tracking_uri)
    expected = weights(client, clean.mlflow_run_id)
    assert [s for s, _ in expected["pairs"]] == [1, 2, 4, 6, 8, 10, 12]  # every mixing_every steps
    assert {v for _, v in expected["rank_spread"]} == {0.0}  # both ranks computed the same weights
    assert len({v for _, v in expected["glosses-a"]}) > 1  # the weights moved

    def kill():
        os.kill(train_worker_pids()[-1], signal.SIGKILL)

    # the clean run's vocabulary: a WordPiece trained twice may order its tokens differently
    tokenizer = f"data.tokenizer={clean.run_dir}/tokenizer"
    config, result, _, fault_step = train_through_fault(ws, "mix-kill", kill, *online(ws), tokenizer)
    assert observe.record(config, result.metrics).resumed_at, "no restart from a checkpoint happened"
    faulted = weights(client, result.mlflow_run_id)
    for name in SOURCES:  # steps redone after the restart were logged twice: every value must match
        by_step = dict(expected[name])
        assert {s for s, _ in faulted[name]} == set(by_step), name
        assert all(v == by_step[s] for s, v in faulted[name]), (
            name,
            fault_step,
            faulted[name],
            expected[name],
        )

    run_dir = Path(result.run_dir)
    averaged = json.loads((run_dir / "mixing/weights.json").read_text())["time_averaged"]
    recommended = yaml.safe_load((run_dir / "mixing/recommended_config.yaml").read_text())
    assert recommended["data"]["mixing"] == "static"
    assert recommended["data"]["ratios"] == {s: round(w, 4) for s, w in averaged.items()}
    assert set(json.loads((run_dir / "source_losses.json").read_text())) == set(SOURCES)
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "mixing")}
    assert artifacts == {"mixing/weights.png", "mixing/weights.json", "mixing/recommended_config.yaml"}
