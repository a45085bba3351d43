"""``ray job submit`` against a real token-auth ``ray start --head`` (``pipeline.drills.head``: its own
ports, temp dir and HOME).

A submitted job runs in Ray's temporary copy of the uploaded working dir, so where its paths point is
checked here with real submissions: the README's cluster command (taken from the README text, so the two
cannot drift) must leave its checkpoints and MLflow run in the submitting checkout, and relative paths
must fail before training. The ``job_stop`` drill (tests/faults) submits a run twice (stop, resume from
S3, export, the commit through the runtime env); here also what a client without the right token gets.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import KINDS
from pipeline.drills.head import RAY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README_COMMAND = "ray job submit --working-dir . -- python jobs/pretrain.py"
# appended to the README's command: the same run, shorter (demo shards of this session hold 18 train rows
# per kind, so 2 ranks take batches of 8)
SHORTER = ("train.steps=2", "data.batch_size=8")


def job_list(head, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [str(RAY), "job", "list", "--address", head.address]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_the_head_wrote_its_own_token(ray_head):
    assert (ray_head.home / ".ray" / "auth_token").is_file()
    listed = job_list(ray_head, ray_head.env)
    assert listed.returncode == 0, listed.stderr[-2000:]


def test_client_with_a_wrong_token_is_refused(ray_head):
    assert job_list(ray_head, {**ray_head.env, "RAY_AUTH_TOKEN": uuid.uuid4().hex}).returncode != 0


def readme_cluster_command() -> str:
    lines = [
        line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(README_COMMAND)
    ]
    assert len(lines) == 1, f"README.md should show the cluster command once, found {lines}"
    return lines[0]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, demo_root) -> Path:
    """A user's checkout: the code, the ignore files, and the demo shards where the demo config reads them."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("jobs", "pipeline", "model"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".rayignore", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    (root / "demo_data").symlink_to(demo_root, target_is_directory=True)
    return root


def submit(head, cwd: Path, command: str) -> subprocess.CompletedProcess:
    """``command`` run by bash in ``cwd`` as a user's shell would (``$PWD`` expanded by it)."""
    env = {**head.env, "RAY_ADDRESS": head.address}
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_readme_cluster_command_leaves_checkpoints_and_mlflow_run_in_the_checkout(ray_head, checkout):
    done = submit(ray_head, checkout, " ".join([readme_cluster_command(), *SHORTER]))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    run = checkout / "runs" / "flava-demo"  # where README "Pretraining" says they go
    assert [p.name for p in sorted(run.glob("checkpoint_step*"))] == ["checkpoint_step00000002"], output[
        -3000:
    ]
    assert (run / "hf_model" / "config.json").is_file()
    client = MlflowClient(f"sqlite:///{checkout / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("flava-demo")
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("flava-demo", "FINISHED")]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/lr")] == [1, 2]
    said = [line for line in done.stdout.splitlines() if line.startswith("pretrain: ")]
    assert len(said) == 3 and not any("_ray_pkg_" in line for line in said), said  # run, checkpoints, export
    assert said[0].endswith(f"at sqlite:///{checkout.resolve() / 'mlflow.db'}"), said


def test_relative_run_storage_and_sqlite_uri_under_ray_job_submit_fail_before_training(
    ray_head, checkout, demo_root
):
    splits = {s: {k: str(demo_root / k / s) for k in KINDS} for s in ("train", "val")}
    job_id = f"relative-{uuid.uuid4().hex[:6]}"
    command = " ".join(
        [
            README_COMMAND.replace("--working-dir .", f"--working-dir . --submission-id {job_id}"),
            "--config jobs/configs/demo.yaml",
            f"'data.train={json.dumps(splits['train'])}'",
            f"'data.val={json.dumps(splits['val'])}'",
            "train.run_name=relative-paths",
            "train.storage_path=runs",
            "mlflow.tracking_uri=sqlite:///mlflow.db",
        ]
    )
    done = submit(ray_head, checkout, command)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    errors = {line for line in output.splitlines() if line.startswith("config error: ")}
    assert len(errors) == 1, output[-3000:]  # (Ray prints a failed job's log twice)
    error = errors.pop()
    assert error.startswith("config error: relative paths in a job running in Ray's temporary package")
    for key in ("train.storage_path=runs -> ", "mlflow.tracking_uri=mlflow.db -> "):
        assert key in error, error
    assert "/_ray_pkg_" in error and "storage.base_dir=$PWD" in error  # where it would go, and the fix
    assert "data.train" not in error  # absolute paths are fine
    info = ray_head.job_info(job_id)
    assert (info["status"], info["driver_exit_code"]) == ("FAILED", 2)  # a config error, before training
    assert not (checkout / "runs" / "relative-paths").exists()
