"""The sweep driver: a Ray Tune ``Tuner`` whose function trainable launches one pretraining run per trial.

Each trial is the Ray Train V2 pattern: the Tune function is only a driver that builds the same
``TorchTrainer`` as ``jobs/pretrain.py`` (same loop, same validation) with the trial's ratios and lr, and
a ``TuneReportCallback`` that forwards every ``ray.train.report`` (validation rounds and checkpoints) to
Tune, where ASHA compares trials on ``val/objective`` at the same training step.

Layout under ``<tune.storage_path>/<tune.name>/`` (local or s3://): Tune's experiment state and trial
dirs, ``train/trial-<id>/`` (each trial's Train run: checkpoints, so a retried trial resumes), and at the
end ``trials.csv``, ``objective_vs_ratios.png`` and ``best_config.yaml``. MLflow: a parent run for the
sweep; each trial's training run is its nested child (``mlflow.parentRunId``, ``tune.trial_id``).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import ray
from ray import tune
from ray.data import DataContext
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline import paths, storage
from pipeline.config import (
    Config,
    ConfigError,
    MLflowConfig,
    TrainConfig,
    dump_config,
    from_dict,
    to_dict,
)
from pipeline.data.tokenizer import TOKENIZER_FILE, load_or_train_tokenizer
from pipeline.train import launch
from pipeline.train.tracking import Tracker, child_runs, find_or_create_run, flatten
from pipeline.tune import report
from pipeline.tune.orphans import ReleaseOrphanedWorkerGroups
from pipeline.tune.resources import TrialResources, derive_resources
from pipeline.tune.space import num_trials, param_space, swept_sources

OBJECTIVE = "val/objective"  # defined and reported by pipeline/train/evaluate.py; lower is better
MODE = "min"
TRIAL_ID_TAG = "tune.trial_id"
SWEEP_TAG = "tune.sweep"
OUTCOME_TAG = "tune.outcome"
# the Tune function only waits on its Train run: no CPU (Tune refuses an empty request, hence 1 MiB)
DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}
ARTEFACTS = {"csv": "trials.csv", "plot": "objective_vs_ratios.png", "best": "best_config.yaml"}


@dataclass
class SweepOutcome:
    rows: list[report.TrialRow]
    best: report.TrialRow | None
    best_config_uri: str  # empty when no trial reported an objective
    experiment_uri: str
    parent_run_id: str
    resumed: bool
    interrupted: bool  # stopped by a signal before every trial finished: run the same command again


def experiment_uri(config: Config) -> str:
    return storage.join(config.tune.storage_path, config.tune.name)


def resolve_paths(config: Config) -> Config:
    """The training job's path resolution plus the sweep's own storage: trials run in other directories."""
    return paths.absolute_paths(config, paths.SWEEP)


def apply_params(base: Config, params: dict) -> Config:
    """The base config with a trial's (or the winner's) ratios and lr."""
    tree = to_dict(base)
    tree["data"]["ratios"] = dict(params["ratios"])
    if "lr" in params:
        tree["train"]["lr"] = float(params["lr"])
    return from_dict(tree)


def trial_config(base: Config, params: dict, trial_id: str, parent_run_id: str, workers: int) -> Config:
    """What one trial trains: its own run name and storage (so a retry resumes it), a nested MLflow run."""
    config = apply_params(base, params)
    config.train.run_name = f"trial-{trial_id}"
    config.train.storage_path = storage.join(experiment_uri(base), "train")
    config.train.num_workers = workers
    config.train.min_workers = 0  # a trial is a fixed-size run
    config.train.export_model = False  # a trial's weights are kept as checkpoints; the winner is rerun
    config.mlflow.parent_run_id = parent_run_id
    config.mlflow.run_tags = {**base.mlflow.run_tags, TRIAL_ID_TAG: trial_id, SWEEP_TAG: base.tune.name}
    return config


def best_config(base: Config, row: report.TrialRow) -> Config:
    """The winner as a standalone pretraining config: ``jobs/pretrain.py --config`` runs it as is."""
    config = apply_params(base, {"ratios": row.ratios, "lr": row.lr})
    config.train.run_name = f"{base.tune.name}-best"
    config.mlflow.parent_run_id = ""
    config.mlflow.run_tags = {
        k: v for k, v in base.mlflow.run_tags.items() if k not in (TRIAL_ID_TAG, SWEEP_TAG)
    }
    return config


def run_trial(params: dict, *, base: dict, parent_run_id: str, resources: TrialResources) -> None:
    """Tune function trainable: one pretraining run; its reports reach Tune through the callback."""
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(from_dict(base), params, trial_id, parent_run_id, resources.workers_per_trial)
    # Ray Data would otherwise take every free CPU for this trial's reads and starve the next trial's
    # workers; Train captures this process's DataContext when the trainer is built
    data = DataContext.get_current().execution_options
    data.resource_limits = data.resource_limits.copy(cpu=resources.data_cpus)
    launch.run_pretraining(config, callbacks=[TuneReportCallback()])


def _scheduler(config: Config):
    tc, train = config.tune, config.train
    if tc.scheduler == "none":
        return FIFOScheduler()
    if train.val_every < 1:
        raise ConfigError("tune.scheduler=asha compares validation rounds: train.val_every must be >= 1")
    grace_steps = tc.grace_period * train.val_every
    if grace_steps > train.steps:
        raise ConfigError(
            f"tune.grace_period={tc.grace_period} validation rounds ({grace_steps} steps) exceeds "
            f"train.steps={train.steps}: no trial could ever be stopped early"
        )
    # time is the training step every validation report carries, so trials are compared at equal steps;
    # a trial that reaches train.steps ends by itself (export, MLflow run closed) instead of being killed
    return ASHAScheduler(
        time_attr="step",
        max_t=train.steps,
        grace_period=grace_steps,
        reduction_factor=tc.reduction_factor,
        stop_last_trials=False,
    )


def _open_parent_run(config: Config, exp_uri: str, resources: TrialResources, n_trials: int) -> str:
    """The sweep's MLflow run, found again by its experiment path when a sweep is resumed."""
    uri = config.mlflow.tracking_uri
    parent_cfg = MLflowConfig(
        tracking_uri=uri, experiment=config.mlflow.experiment, run_tags={SWEEP_TAG: config.tune.name}
    )
    run_id = find_or_create_run(uri, parent_cfg, run_key=f"sweep:{exp_uri}", run_name=config.tune.name)
    swept, _ = swept_sources(config)
    params = {
        **flatten({"tune": to_dict(config.tune)}),
        "tune.sources_swept": ",".join(swept),
        "tune.num_trials": str(n_trials),
        "tune.workers_per_trial": str(resources.workers_per_trial),
        "tune.max_concurrent_trials": str(resources.max_concurrent_trials),
        "tune.objective": f"{OBJECTIVE} ({MODE})",
        "train.steps": str(config.train.steps),
        "train.val_every": str(config.train.val_every),
    }
    Tracker(uri, run_id).log_params(params)
    return run_id


def _tune_storage(config: Config) -> tuple[str, str, pafs.FileSystem | None]:
    """(storage path, experiment path, filesystem) as Tune takes them: a filesystem only for S3."""
    uri = config.tune.storage_path
    root = storage.fs_path(uri)
    fs = storage.portable_s3_filesystem(config.storage) if storage.is_s3(uri) else None
    return root, storage.join(root, config.tune.name), fs


def _unfinished_trials(config: Config) -> set[str]:
    """Trials the saved experiment state has neither finished nor failed: what a resume would continue."""
    _, exp_path, fs = _tune_storage(config)
    trials = ExperimentAnalysis(exp_path, storage_filesystem=fs).trials
    return {t.trial_id for t in trials if t.status not in (Trial.TERMINATED, Trial.ERROR)}


def _tuner(config: Config, trainable, resources: TrialResources) -> tuple[tune.Tuner, bool]:
    """A new Tuner, or the interrupted one at the same storage path and name (unfinished trials resume)."""
    tc = config.tune
    root, exp_path, fs_arg = _tune_storage(config)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs_arg):
        return tune.Tuner.restore(exp_path, trainable, resume_errored=True, storage_filesystem=fs_arg), True
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(config),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode=MODE,
            search_alg=BasicVariantGenerator(
                max_concurrent=resources.max_concurrent_trials, random_state=tc.seed
            ),
            scheduler=_scheduler(config),
            num_samples=tc.num_samples,
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=tc.name,
            storage_path=root,
            storage_filesystem=fs_arg,
            failure_config=tune.FailureConfig(max_failures=tc.max_failures),
            callbacks=[ReleaseOrphanedWorkerGroups(resources.worker_bundle, resources.workers_per_trial)],
            verbose=1,
        ),
    )
    return tuner, False


def _trial_rows(results, train: TrainConfig, children: dict[str, str]) -> list[report.TrialRow]:
    rows = []
    for result in results:
        trial_id = Path(result.path).name.removeprefix("trial-")
        if result.config is None:  # created but never started: the sweep was interrupted first
            rows.append(report.TrialRow(trial_id, report.PENDING, {}, math.nan, None, None))
            continue
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        objective = history[OBJECTIVE].dropna() if OBJECTIVE in history else pd.Series(dtype=float)
        steps = history["step"].dropna() if "step" in history else pd.Series(dtype=float)
        step = int(steps.iloc[-1]) if len(steps) else None
        if result.error is not None:
            status, error = (
                report.ERROR,
                f"{type(result.error).__name__}: {str(result.error).splitlines()[0][:200]}",
            )
        else:
            status, error = (report.COMPLETED if step == train.steps else report.STOPPED), ""
        rows.append(
            report.TrialRow(
                trial_id=trial_id,
                status=status,
                ratios=dict(result.config["ratios"]),
                lr=float(result.config.get("lr", train.lr)),
                objective=float(objective.iloc[-1]) if len(objective) else None,
                step=step,
                mlflow_run_id=children.get(trial_id, ""),
                error=error,
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def _close_children(uri: str, rows: list[report.TrialRow]) -> None:
    """A trial stopped by the scheduler is killed mid-run: its training run never closes itself, or closes as
    FAILED when the stop reaches it as an exception. So does a trial that had reported its last step when an
    interrupt of the sweep tore it down (the resumed sweep then finds it complete). Tune's outcome is the
    truth for all of them."""
    for row in rows:
        if not row.mlflow_run_id:
            continue
        child = Tracker(uri, row.mlflow_run_id)
        child.set_tags({OUTCOME_TAG: row.status})
        status = child.status()
        if row.status == report.STOPPED:
            child.finish("KILLED")
        elif row.status == report.COMPLETED and status != "FINISHED":
            child.finish("FINISHED")
        elif status == "RUNNING":
            child.finish("FAILED" if row.status == report.ERROR else "KILLED")


def _write_artefacts(
    config: Config, exp_uri: str, rows: list[report.TrialRow], best: report.TrialRow | None, parent: Tracker
) -> str:
    """Writes the table, the plot and the best config beside the Tune experiment and into the parent run."""
    swept, pinned = swept_sources(config)
    files = {
        ARTEFACTS["csv"]: report.trials_csv(rows, [*swept, *pinned]).encode(),
        ARTEFACTS["plot"]: report.objective_plot(rows, swept, OBJECTIVE, MODE),
    }
    if best is not None:
        files[ARTEFACTS["best"]] = dump_config(best_config(config, best)).encode()
    with tempfile.TemporaryDirectory(prefix="flava-sweep-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
            storage.write_bytes_atomic(storage.join(exp_uri, name), data, config.storage)
        parent.log_dir(tmp, "sweep")
    return storage.join(exp_uri, ARTEFACTS["best"]) if best is not None else ""


def shared_tokenizer(config: Config, exp_uri: str) -> Config:
    """One vocabulary for every trial (and the winner's YAML): the MLM term of the objective is only
    comparable across trials over the same vocabulary. Trained once into the sweep's directory."""
    if config.data.tokenizer:
        return config
    uri = storage.join(exp_uri, "tokenizer")
    if not storage.exists(storage.join(uri, TOKENIZER_FILE), config.storage):
        load_or_train_tokenizer(config, save_to=uri)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=uri))


def validate_sweep(config: Config) -> Config:
    """Everything checkable before Ray starts: the space, the scheduler, every swept source's data.

    Returns the config with absolute paths (what the trials receive). Raises ConfigError or InputError.
    """
    config = resolve_paths(config)
    param_space(config)
    _scheduler(config)
    swept, pinned = swept_sources(config)
    # every swept source gets a positive ratio in some trial: check all of their data before starting any
    launch.validate_inputs(
        apply_params(config, {"ratios": {**dict.fromkeys(pinned, 0.0), **dict.fromkeys(swept, 1.0)}})
    )
    return config


def run_sweep(config: Config) -> SweepOutcome:
    """Validates, runs (or resumes) the sweep on the connected Ray cluster, writes and prints the results."""
    config = validate_sweep(config)
    swept, _ = swept_sources(config)
    n_trials = num_trials(config)
    resources = derive_resources(ray.cluster_resources(), config, n_trials)
    exp_uri = experiment_uri(config)
    config = shared_tokenizer(config, exp_uri)
    print(
        f"[tune] {n_trials} trial(s), {resources.workers_per_trial} worker(s) each, at most "
        f"{resources.max_concurrent_trials} at once; objective {OBJECTIVE} ({MODE}); results in {exp_uri}",
        flush=True,
    )
    parent_run_id = _open_parent_run(config, exp_uri, resources, n_trials)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=to_dict(config), parent_run_id=parent_run_id, resources=resources
        ),
        DRIVER_RESOURCES,
    )
    tuner, resumed = _tuner(config, trainable, resources)
    if resumed:
        print(f"[tune] resuming the interrupted sweep at {exp_uri}", flush=True)
    parent = Tracker(config.mlflow.tracking_uri, parent_run_id)
    try:
        results = tuner.fit()
        rows = _trial_rows(
            results,
            config.train,
            child_runs(config.mlflow.tracking_uri, config.mlflow.experiment, parent_run_id, TRIAL_ID_TAG),
        )
        unfinished = _unfinished_trials(config)
        # Tune saved its state on SIGINT/SIGUSR1 and the parent run stays open for the resume. An interrupt
        # between two trials leaves none unfinished: the searcher simply had not created the next one yet
        if unfinished or len(rows) < n_trials:
            for row in rows:
                if row.trial_id in unfinished and row.status != report.PENDING:
                    row.status = report.INTERRUPTED
            print("\n" + report.summary_table(rows, swept, OBJECTIVE), flush=True)
            print(
                f"[tune] interrupted: run the same command again to resume the sweep at {exp_uri}", flush=True
            )
            return SweepOutcome(rows, None, "", exp_uri, parent_run_id, resumed, interrupted=True)
        _close_children(config.mlflow.tracking_uri, rows)
        best = report.best_trial(rows, MODE)
        best_uri = _write_artefacts(config, exp_uri, rows, best, parent)
        if best is not None:
            parent.add(0, {f"best/{OBJECTIVE}": best.objective})
            parent.set_tags({"tune.best_trial_id": best.trial_id})
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish("FINISHED" if best is not None else "FAILED")

    print("\n" + report.summary_table(rows, swept, OBJECTIVE), flush=True)
    if best is None:
        print("[tune] no trial reported an objective: no best config", flush=True)
    else:
        print(f"[tune] best trial {best.trial_id}: {OBJECTIVE} {best.objective:.4f}", flush=True)
        print(f"[tune] best config: {best_uri}", flush=True)
    return SweepOutcome(rows, best, best_uri, exp_uri, parent_run_id, resumed, interrupted=False)
