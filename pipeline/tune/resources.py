"""How many trials run at once and how many Train workers each gets, from the cluster and the config.

A trial is a small Tune driver (no CPU of its own: it only waits on its Train run) plus a Train worker
group plus its Ray Data tasks, capped at ``tune.data_cpus_per_trial`` CPUs. A Train run starts only once
all of its workers fit, so launching more trials than fit would leave drivers idling and workers waiting;
the concurrency limit keeps exactly as many runs in flight as the cluster can hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import Config, ConfigError


@dataclass(frozen=True)
class TrialResources:
    workers_per_trial: int
    cpus_per_worker: int
    gpus_per_worker: int
    data_cpus: float
    max_concurrent_trials: int

    @property
    def cpus_per_trial(self) -> float:
        return self.workers_per_trial * self.cpus_per_worker + self.data_cpus

    @property
    def worker_bundle(self) -> dict[str, float]:
        """One Train worker's reservation, as Ray Train asks for it (pipeline/train/launch.py)."""
        bundle = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker:
            bundle["GPU"] = float(self.gpus_per_worker)
        return bundle


def derive_resources(cluster: dict[str, float], config: Config, num_trials: int) -> TrialResources:
    """``cluster`` is ``ray.cluster_resources()``; explicit tune.* settings win where they fit."""
    tc, train = config.tune, config.train
    cpus = float(cluster.get("CPU", 0))
    gpus = float(cluster.get("GPU", 0))
    gpus_per_worker = 1 if train.use_gpu else 0
    if train.use_gpu and gpus < 1:
        raise ConfigError(f"train.use_gpu is set but the Ray cluster has no GPU ({cluster})")

    # the most workers one trial can get on this cluster
    cpu_room = math.floor((cpus - tc.data_cpus_per_trial) / train.cpus_per_worker)
    fit = min(cpu_room, int(gpus)) if train.use_gpu else cpu_room
    if fit < 1:
        raise ConfigError(
            f"the Ray cluster ({cpus:g} CPU, {gpus:g} GPU) cannot hold one trial: one worker needs "
            f"{train.cpus_per_worker} CPU{' and 1 GPU' if train.use_gpu else ''} plus "
            f"tune.data_cpus_per_trial={tc.data_cpus_per_trial:g} CPU for its data"
        )
    if tc.workers_per_trial > fit:
        raise ConfigError(
            f"tune.workers_per_trial={tc.workers_per_trial} does not fit the Ray cluster "
            f"({cpus:g} CPU, {gpus:g} GPU): at most {fit} per trial"
        )
    workers = tc.workers_per_trial or min(train.num_workers, fit)

    per_trial = workers * train.cpus_per_worker + tc.data_cpus_per_trial
    by_cpu = math.floor(cpus / per_trial)
    fits_at_once = min(by_cpu, math.floor(gpus / workers)) if train.use_gpu else by_cpu
    concurrent = tc.max_concurrent_trials or fits_at_once
    return TrialResources(
        workers_per_trial=workers,
        cpus_per_worker=train.cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        data_cpus=tc.data_cpus_per_trial,
        max_concurrent_trials=max(1, min(concurrent, num_trials)),
    )
