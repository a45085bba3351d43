"""The whole-job benchmark's code paths at tiny size on the shared local Ray (its numbers are measured by
``jobs/benchmark_trainer.py``, never asserted): the bare ``torchrun`` baseline, the pretraining job with
its loop's parts timed and its processes' CPU sampled, and the table."""

from __future__ import annotations

import pytest

from pipeline.train.benchmark import bare_torchrun, whole_job, whole_job_table
from tests.train.test_pretrain_e2e import job_config

pytestmark = pytest.mark.slow

STEPS = 4


def test_whole_job_against_bare_torchrun(demo_root, tmp_path):
    config = job_config(
        demo_root, tmp_path, "bench", f"train.steps={STEPS}", "train.checkpoint_every=2", "train.val_every=0"
    )
    bare = bare_torchrun(config, STEPS)
    assert len(bare["times"]) == len(bare["cpu"]) == STEPS and min(bare["times"] + bare["cpu"]) > 0

    job = whole_job(config)
    assert job["steps"] == STEPS
    # the loop holds its steps, the MLflow flushes and the in-loop checkpoint (step 2)
    assert job["loop_s"] > job["step_s"] + job["mlflow_s"] + job["checkpoint_s"]
    assert min(job["mlflow_s"], job["checkpoint_s"]) > 0 and job["validation_s"] == 0
    assert job["step_s"] >= job["data_s"] > 0
    # the sampler found the Train workers' processes and Ray Data's read tasks by their titles
    assert job["cpu"]["train workers"] > 0 and job["cpu"]["data preparation"] > 0

    table = whole_job_table(config, bare, job)
    for row in ("bare torchrun", "whole job", "data wait", "MLflow", "checkpoints", "framework share"):
        assert row in table
