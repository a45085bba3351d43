"""Every MLflow write of the project: one run per training job, continued across restarts and reruns of
the same name; a sweep's parent run and its trials' nested runs.

The driver (``start_run``) finds or creates the run and logs what it knows before any worker starts:
parameters, versions, git commit, dataset identities and the redacted resolved config. Rank 0 then logs
metrics in batches and the exported model (``Tracker``); the driver closes the run with the job's final
status. A sweep opens its parent run, finds its trials' runs and closes each as Tune saw it end.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import logging
import os
import subprocess
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.config import Config, MLflowConfig, dump_config, redact, redact_uri, to_dict

EXPORTED_MODEL_TAG = "flava.exported_model"

log = logging.getLogger(__name__)

RUN_KEY_TAG = "flava.run_key"  # <storage_path>/<run_name>: what "the same run" means
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value (3.x)
_BATCH = {"metrics": 1000, "params": 100}  # MLflow's per-call limits of log_batch


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{name}."))
        else:
            flat[name] = str(v)[:_MAX_PARAM_LEN]
    return flat


def git_commit(root: Path) -> str:
    """HEAD (with ``-dirty`` for local changes); outside a git checkout (an uploaded ``ray job submit``
    working dir, the container image) the ``FLAVA_GIT_COMMIT`` that the submitter or the image build set,
    else ``unknown``."""
    fallback = os.environ.get("FLAVA_GIT_COMMIT", "") or "unknown"
    if not (root / ".git").exists():
        return fallback
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return fallback
    return f"{head}-dirty" if dirty else head


def environment_params(root: Path) -> dict[str, str]:
    params = {f"version.{pkg}": importlib.metadata.version(pkg) for pkg in ("torch", "ray", "transformers")}
    params["git.commit"] = git_commit(root)
    return params


def check_access(uri: str, experiment: str) -> None:
    """Pre-flight on the driver: a tracking server (``http(s)://``) answers and accepts the credentials of
    ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (a basic-auth server answers 401 otherwise)
    and lets them read the experiment (403), so that a wrong password stops the job before any worker
    starts. Raises ``PermissionError``
    (credentials) or ``ConnectionError`` (anything else), with the URI redacted."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(uri).get_experiment_by_name(experiment)
    except MlflowException as e:
        status = e.get_http_status_code()
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
        who = f"user {user!r}" if user else "no MLFLOW_TRACKING_USERNAME set"
        if status == 401:
            raise PermissionError(
                f"the MLflow server at {redact_uri(uri)} rejects the credentials (HTTP 401, {who}): "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment"
            ) from None
        if status == 403:
            raise PermissionError(
                f"the MLflow server at {redact_uri(uri)} denies {who} the experiment {experiment!r} "
                "(HTTP 403): ask its admin for a permission on it, or use another mlflow.experiment"
            ) from None
        raise ConnectionError(
            f"the MLflow server at {redact_uri(uri)} failed: {redact_uri(str(e))}"
        ) from None
    except Exception as e:
        raise ConnectionError(
            f"the MLflow server at {redact_uri(uri)} is unreachable: {type(e).__name__}: {redact_uri(str(e))}"
        ) from None


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in whoever's cwd
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def find_or_create_run(
    uri: str, cfg: MLflowConfig, run_key: str, run_name: str, prior_run_id: str = ""
) -> str:
    """The run to log into: the checkpoint's (``prior_run_id``) if the store knows it, else the latest
    run tagged with this run key (a job that died before its first checkpoint), else a new one."""
    client = MlflowClient(uri)
    if prior_run_id:
        try:
            client.get_run(prior_run_id)
            client.update_run(prior_run_id, status="RUNNING")
            return prior_run_id
        except Exception as e:  # the store was replaced: start afresh, but say so
            log.warning(
                "MLflow run %s from the checkpoint is not in %s (%s); starting a new run",
                prior_run_id,
                redact_uri(uri),
                e,
            )
    experiment_id = _experiment_id(client, uri, cfg.experiment)
    escaped = run_key.replace("'", "\\'")
    found = client.search_runs(
        [experiment_id], f"tags.`{RUN_KEY_TAG}` = '{escaped}'", order_by=["start_time DESC"], max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {RUN_KEY_TAG: run_key, **cfg.run_tags}
    if cfg.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.parent_run_id
    return client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id


class Tracker:
    """Logs to one existing run; metrics are buffered and sent with one ``log_batch`` per flush. A
    ``flush(background=True)`` sends from a thread, so that the training step does not wait for the
    tracking server; at most one such send is in flight, and every other call waits for it first (and
    raises its error)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self._pending: list[Metric] = []
        self._sender: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: concurrent.futures.Future | None = None

    def wait(self) -> None:
        """Until a background flush has been sent; raises what it raised."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def log_params(self, params: dict[str, str]) -> None:
        """New keys are logged; a key whose value changed since the run began (a rerun with other
        overrides) cannot be re-logged in MLflow, so it becomes a ``changed_on_resume.<key>`` tag."""
        self.wait()
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = [RunTag(f"changed_on_resume.{k}", v) for k, v in params.items() if existing.get(k, v) != v]
        for i in range(0, len(new), _BATCH["params"]):
            self.client.log_batch(self.run_id, params=new[i : i + _BATCH["params"]])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.wait()
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dir(self, local_dir: str, artifact_path: str) -> None:
        self.wait()
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self, background: bool = False) -> None:
        self.wait()
        pending, self._pending = self._pending, []
        if not background:
            self._send(pending)
            return
        if self._sender is None:
            self._sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlflow-flush")
        self._in_flight = self._sender.submit(self._send, pending)

    def _send(self, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), _BATCH["metrics"]):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH["metrics"]])

    def metric_history(self, key: str) -> list[Metric]:
        self.wait()
        return self.client.get_metric_history(self.run_id, key)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.wait()
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_model(self, local_dir: str, uri: str) -> None:
        """The exported model's files as artifact ``model``, and where the export lives as a tag."""
        self.log_dir(local_dir, "model")
        self.set_tags({EXPORTED_MODEL_TAG: uri})

    def status(self) -> str:
        self.wait()
        return self.client.get_run(self.run_id).info.status

    def finish(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def start_run(config: Config, run_key: str, prior_run_id: str, params: dict[str, str]) -> str:
    """The job's MLflow run (the checkpoint's, else the run key's, else new) with the driver's params and
    the redacted resolved config logged. Returns its id."""
    uri = config.mlflow.tracking_uri
    run_id = find_or_create_run(uri, config.mlflow, run_key, config.train.run_name, prior_run_id)
    tracker = Tracker(uri, run_id)
    tracker.log_params({**flatten(redact(to_dict(config))), **params})
    tracker.log_text(dump_config(config), "config/resolved.yaml")
    return run_id


def child_runs(uri: str, experiment: str, parent_run_id: str, key_tag: str) -> dict[str, str]:
    """``tags[key_tag]`` -> run id of the runs nested under ``parent_run_id`` that carry the tag."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags[key_tag]: r.info.run_id for r in runs if key_tag in r.data.tags}
