"""What a drill reads back from a run: its MLflow run, its checkpoints and its event log
(``pipeline.train.events``), never its log lines."""

from __future__ import annotations

from pipeline import storage
from pipeline.config import KINDS, Config
from pipeline.data.datasets import data_order, step_rows
from pipeline.data.reader import key_hash, keys_digest
from pipeline.drills.judge import RunRecord
from pipeline.train import checkpoint as ckpt
from pipeline.train import events
from pipeline.train.launch import resolve_paths, run_dir
from pipeline.train.tracking import RUN_KEY_TAG

STEP_METRIC = "train/lr"  # logged by rank 0 at every step: the run's step axis


def _run_location(config: Config):
    return storage.resolve(run_dir(resolve_paths(config)), config.storage)


def mlflow_runs(config: Config) -> list:
    """The MLflow runs of this run name (a resumed run must have continued the one run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(config.mlflow.experiment)
    if exp is None:
        return []
    key = run_dir(resolve_paths(config)).replace("'", "\\'")
    return client.search_runs([exp.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'")


def metric_history(config: Config, name: str) -> list:
    from mlflow.tracking import MlflowClient

    runs = mlflow_runs(config)
    if not runs:
        return []
    return MlflowClient(config.mlflow.tracking_uri).get_metric_history(runs[0].info.run_id, name)


def step_log(config: Config) -> list[tuple[int, float]]:
    """(step, wall time) of every step the run logged, in logging order; redone steps appear twice."""
    history = metric_history(config, STEP_METRIC)
    return [(m.step, m.timestamp / 1000) for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def last_logged_step(config: Config) -> int:
    return max((s for s, _ in step_log(config)), default=0)


def run_events(config: Config) -> list[dict]:
    return events.read(*_run_location(config))


def latest_checkpoint(config: Config) -> ckpt.Found | None:
    return ckpt.find_latest(*_run_location(config))


def checkpoint_step(config: Config) -> int:
    """Step of the run's newest complete checkpoint (0 before the first)."""
    found = latest_checkpoint(config)
    return found.step if found else 0


def final_metrics(config: Config) -> dict:
    """``step`` and ``samples/<kind>`` of the run as MLflow holds them (for a run in another process)."""
    run = mlflow_runs(config)[0]
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("samples/")}
    metrics["step"] = last_logged_step(config)
    return metrics


def logged_kinds(config: Config) -> dict[int, set[str]]:
    """Step -> the kinds of batch it trained on as logged (``train/<kind>/total``; a redone step twice)."""
    kinds: dict[int, set[str]] = {}
    for kind in KINDS:
        for m in metric_history(config, f"train/{kind}/total"):
            kinds.setdefault(m.step, set()).add(kind)
    return kinds


def logged_keys(config: Config) -> dict[int, list[int]]:
    """Step -> the fingerprints of the rows it trained, as logged (``data/keys/<kind>``; redone: twice)."""
    keys: dict[int, list[int]] = {}
    for kind in KINDS:
        for m in sorted(metric_history(config, f"data/keys/{kind}"), key=lambda m: m.timestamp):
            keys.setdefault(m.step, []).append(int(m.value))
    return keys


def unfaulted_keys(config: Config, steps: int) -> dict[int, int]:
    """Step -> the fingerprint of the rows an unfaulted run of ``config`` trains there (from the shards)."""
    layout = data_order(resolve_paths(config))[0]
    return {r.step: keys_digest(key_hash(sum(r.keys, []))) for r in step_rows(config, layout, 1, steps)}


def record(config: Config, final: dict | None = None) -> RunRecord:
    """Everything the judge needs of a finished run; ``final`` defaults to what MLflow holds."""
    final = final if final is not None else final_metrics(config)
    return RunRecord(
        final=final,
        step_log=step_log(config),
        mlflow_runs=len(mlflow_runs(config)),
        events=run_events(config),
        kinds=logged_kinds(config),
        keys=logged_keys(config),
        expected_keys=unfaulted_keys(config, int(final.get("step", 0))),
        rows_per_step=config.data.batch_size * config.train.num_workers * config.train.grad_accum,
    )
