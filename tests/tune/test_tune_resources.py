"""Trial concurrency and workers per trial from the cluster's resources and the config."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.tune.resources import derive_resources


def derive(cluster, *overrides, trials=8):
    return derive_resources(cluster, load_config(None, list(overrides)), trials)


def test_cpu_cluster_packs_as_many_trials_as_fit():
    # 2 workers x 1 CPU + 1 CPU for data = 3 CPUs per trial
    r = derive({"CPU": 16}, "train.num_workers=2")
    assert (r.workers_per_trial, r.max_concurrent_trials, r.cpus_per_trial) == (2, 5, 3)


def test_the_test_cluster_runs_two_one_worker_trials():
    r = derive({"CPU": 4}, "tune.workers_per_trial=1")
    assert (r.workers_per_trial, r.max_concurrent_trials) == (1, 2)


def test_gpus_limit_concurrency_and_workers():
    r = derive({"CPU": 64, "GPU": 8}, "train.use_gpu=true", "train.num_workers=4", "train.cpus_per_worker=4")
    assert (r.workers_per_trial, r.gpus_per_worker, r.max_concurrent_trials) == (4, 1, 2)
    # a trial cannot have more GPU workers than the cluster has GPUs
    r = derive({"CPU": 64, "GPU": 2}, "train.use_gpu=true", "train.num_workers=4")
    assert (r.workers_per_trial, r.max_concurrent_trials) == (2, 1)


def test_workers_are_reduced_to_what_one_trial_can_get():
    r = derive({"CPU": 3}, "train.num_workers=4")
    assert (r.workers_per_trial, r.max_concurrent_trials) == (2, 1)


def test_never_more_concurrent_trials_than_trials():
    assert derive({"CPU": 64}, "train.num_workers=1", trials=3).max_concurrent_trials == 3


def test_explicit_concurrency_wins():
    assert derive({"CPU": 64}, "tune.max_concurrent_trials=2").max_concurrent_trials == 2


@pytest.mark.parametrize(
    ("cluster", "overrides", "message"),
    [
        ({"CPU": 1}, [], "cannot hold one trial"),
        ({"CPU": 8}, ["train.use_gpu=true"], "no GPU"),
        ({"CPU": 4}, ["tune.workers_per_trial=4"], "at most 3 per trial"),
        ({"CPU": 4}, ["tune.data_cpus_per_trial=-1"], "data_cpus_per_trial"),
        ({"CPU": 4}, ["tune.max_concurrent_trials=-1"], "max_concurrent_trials"),
    ],
)
def test_clusters_that_cannot_run_a_trial_are_named(cluster, overrides, message):
    with pytest.raises(ConfigError, match=message):
        derive(cluster, *overrides)
