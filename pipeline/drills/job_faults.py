"""Faults around ``ray job submit``: ``ray job stop`` and a resubmission of the same run, and the secrets a
cluster's jobs hold (S3 keys, Ray token, MLflow password), which must never reach logs, MLflow or storage."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.config import StorageConfig, load_config
from pipeline.drills import observe
from pipeline.drills.flaky_s3 import FlakyS3, s3_overrides
from pipeline.drills.harness import EXPERIMENT, ROOT, TINY_CONFIG, Workspace, train_worker_pids, wait_for
from pipeline.drills.judge import DrillResult, judge_recovery, recovery_time
from pipeline.train.launch import resolve_paths, run_dir


def submit(head, job_id: str, overrides: list[str], wait: bool, env_vars: dict[str, str] | None = None):
    """``ray job submit`` of jobs/pretrain.py with this checkout as the working dir."""
    args = [
        "job",
        "submit",
        "--submission-id",
        job_id,
        "--working-dir",
        str(ROOT),
        *(("--runtime-env-json", json.dumps({"env_vars": env_vars})) if env_vars else ()),
        *(() if wait else ("--no-wait",)),
    ]
    entry = ["--", "python", "jobs/pretrain.py", "--config", "jobs/configs/tiny-test.yaml", *overrides]
    done = head.ray(*args, *entry, timeout=600)
    if done.returncode and wait:
        raise RuntimeError(f"job {job_id} failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return done


def job_stop(ws: Workspace, head, s3: FlakyS3) -> DrillResult:
    """``ray job stop`` on a running pretraining job (checkpoints on S3): the last complete checkpoint stays
    intact, and submitting the same run name again resumes from it (one MLflow run, continuous steps),
    finishes, exports the model beside its checkpoints and closes the MLflow run FINISHED. The commit comes
    with the runtime env (the uploaded working dir has no .git) and must reach MLflow's params."""
    name, steps = "job-stop", 32
    overrides = [*s3_overrides(ws, s3, name), f"train.steps={steps}", "train.export_model=true"]
    config = load_config(TINY_CONFIG, overrides)
    commit = {"FLAVA_GIT_COMMIT": f"drill-commit-{ws.tag}"}
    first = f"drill-stop-{ws.tag}-1"
    submit(head, first, overrides, wait=False, env_vars=commit)
    wait_for(
        lambda: (
            head.job_status(first) in ("FAILED", "SUCCEEDED")
            or (observe.checkpoint_step(config) >= 8 and observe.last_logged_step(config) >= 10)
        ),
        400,
        "job-stop: checkpoint 8 of the submitted job",
    )
    before = observe.latest_checkpoint(config).step
    stop_at, stop_step = time.time(), observe.last_logged_step(config)
    head.ray("job", "stop", first)
    stopped = wait_for(lambda: head.job_status(first) == "STOPPED" and "STOPPED", 60, "job-stop: STOPPED")
    wait_for(lambda: not train_worker_pids(), 60, "job-stop: the stopped job's Train workers gone")
    after = observe.latest_checkpoint(config)
    intact = after is not None and after.step >= before
    run_status = observe.mlflow_runs(config)[0].info.status
    ended_first = [e["status"] for e in observe.run_events(config) if e["event"] == "job_end"]

    second, resubmitted_at = f"drill-stop-{ws.tag}-2", time.time()
    submit(head, second, overrides, wait=True, env_vars=commit)
    record = observe.record(config)
    resumed_at = [
        e["step"] for e in record.of("train_start") if e["resumed_from"] and e["time"] > resubmitted_at
    ]
    exports = record.of("export")
    final_run = observe.mlflow_runs(config)[0]
    exported = storage.exists(
        storage.join(run_dir(resolve_paths(config)), "hf_model", "config.json"), config.storage
    )
    commit_logged = final_run.data.params.get("git.commit") == commit["FLAVA_GIT_COMMIT"]
    out = judge_recovery(
        "ray job stop, then the same run submitted again",
        "the last complete checkpoint stays intact; the resubmitted job resumes from it and finishes",
        config,
        record,
        stop_at,
        steps,
    )
    out.passed = (
        out.passed
        and stopped == "STOPPED"
        and ended_first == ["KILLED"]
        and intact
        and resumed_at == ([after.step] if after else [])
        and final_run.info.status == "FINISHED"
        and exported
        and len(exports) == 1
        and commit_logged
    )
    # the stopped job's workers log a step or two after the stop: recovery is the resubmission's first step
    first_step = recovery_time(record.step_log, resubmitted_at)
    out.recover_s = None if first_step is None else round(first_step + resubmitted_at - stop_at, 1)
    out.observed = (
        f"stopped at step {stop_step} ({stopped}; MLflow run {run_status}, job_end {ended_first}); latest "
        f"complete checkpoint step {after.step if after else None} (was {before}); resubmission resumed at "
        f"step {resumed_at}, exported the model: {exported}, MLflow run {final_run.info.status}, git.commit "
        f"from the runtime env: {commit_logged}; " + out.observed
    )
    out.details.update(
        jobs=[first, second],
        first_job_end=ended_first,
        mlflow_status_after_stop=run_status,
        checkpoint_on_s3=after is not None,
        exported=exported,
        export_events=[e["uri"] for e in exports],
        final_status=final_run.info.status,
        final_job_end=[e["status"] for e in record.of("job_end")][-1:],
        git_commit=final_run.data.params.get("git.commit"),
    )
    return out


def text_files(root: Path, limit: int = 16 * 2**20):
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.stat().st_size <= limit:
            yield path, path.read_bytes()


def mlflow_texts(tracking_uri: str, experiment: str, scratch: Path):
    """(where, bytes) of everything MLflow holds for an experiment: params, tags, metric names, artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    for run in client.search_runs([exp.experiment_id]):
        rid = run.info.run_id
        yield f"mlflow:{rid}:params", json.dumps(run.data.params).encode()
        yield f"mlflow:{rid}:tags", json.dumps(run.data.tags).encode()
        yield f"mlflow:{rid}:metrics", json.dumps(sorted(run.data.metrics)).encode()
        local = Path(client.download_artifacts(rid, "", str(scratch / rid)))
        for path, data in text_files(local):
            yield f"mlflow:{rid}:artifact:{path.relative_to(local)}", data


def storage_texts(uri: str, storage_cfg: StorageConfig):
    """(where, bytes) of the small files of a run's storage (checkpoint metadata, events, Ray's snapshots)."""
    fs, root = storage.resolve(uri, storage_cfg)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File and not info.base_name.endswith(".distcp") and info.size < 2**20:
            with fs.open_input_stream(info.path) as f:
                yield f"storage:{info.path}", f.read()


def leaked(secrets: dict[str, str], sources) -> list[str]:
    """``"<secret name> in <where>"`` for every secret value found in any of ``sources`` ((where, bytes))."""
    found = []
    for where, data in sources:
        for name, value in secrets.items():
            if value.encode() in data:
                found.append(f"{name} in {where}")
    return found


def secret_env() -> dict[str, str]:
    """Credentials for a drill's cluster: unique values, so that any copy of them is unmistakable."""
    mark = uuid.uuid4().hex
    return {
        "AWS_ACCESS_KEY_ID": f"AKDRILL{mark[:12].upper()}",
        "AWS_SECRET_ACCESS_KEY": f"drill-aws-secret-{mark}",
        "MLFLOW_TRACKING_USERNAME": "drill",
        "MLFLOW_TRACKING_PASSWORD": f"drill-mlflow-p@ssword-{mark}",  # "@" as a generated one may hold
    }


def secrets_kept(ws: Workspace, head, s3: FlakyS3, jobs: list[str]) -> DrillResult:
    """Jobs submitted with token auth and S3 credentials in the cluster's environment (as KubeRay pods get
    them from Secrets; ``head.extra_env``), checkpointing to S3: no secret value may appear in the jobs'
    logs, Ray's logs, MLflow params, tags or artifacts, or the runs' storage. ``jobs``: the ids of jobs
    already run on ``head`` (e.g. by ``job_stop``); with none, a short one is submitted first."""
    if not jobs:
        jobs = [f"drill-secrets-{ws.tag}"]
        submit(head, jobs[0], [*s3_overrides(ws, s3, "secrets"), "train.steps=4"], wait=True)
    secrets = {k: v for k, v in head.extra_env.items() if k != "MLFLOW_TRACKING_USERNAME"}
    secrets["RAY_AUTH_TOKEN"] = head.token
    job_logs = "\n".join(head.ray("job", "logs", job).stdout for job in jobs)
    runs = f"s3://{FlakyS3.BUCKET}/runs"
    sources = [
        ("ray job logs", job_logs.encode()),
        *((f"ray log {p.relative_to(head.logs_dir)}", data) for p, data in text_files(head.logs_dir)),
        *mlflow_texts(ws.tracking_uri, EXPERIMENT, ws.root / f"mlflow-scan-{uuid.uuid4().hex[:6]}"),
        *storage_texts(runs, s3.storage),
    ]
    found = leaked(secrets, sources)
    used = any(where.startswith("storage:") and "checkpoint_step" in where for where, _ in sources)
    return DrillResult(
        "secrets: S3 keys, Ray token, MLflow password",
        "no secret value in job or Ray logs, MLflow params/tags/artifacts, or the runs' storage",
        f"{len(sources)} sources scanned ({len(jobs)} jobs; checkpoints on S3: {used}); "
        + (f"LEAKED: {'; '.join(found[:5])}" if found else "no secret value found"),
        passed=used and bool(job_logs.strip()) and not found,
        details={"leaks": found, "sources": len(sources)},
    )
