"""The Kubernetes tracking setup on this machine: a real PostgreSQL server and ``mlflow server --app-name
basic-auth`` on it (``pipeline.drills.tracking_server``). A job submitted to the token-auth ``ray start
--head``, whose processes hold the MLflow user's credentials in their environment as the pods get them from
Secrets, logs its run through authentication; a wrong password stops ``jobs/pretrain.py`` before
training; and no credential (MLflow user and admin, database, S3, Ray token, Flask key) reaches a log, an
MLflow param, tag or artifact, the run's storage, or the servers' logs. One PostgreSQL and one MLflow
server for the module."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient

from pipeline.drills import job_faults
from pipeline.drills.harness import EXPERIMENT, ROOT, TINY_CONFIG, Workspace
from pipeline.drills.tracking_server import AuthTrackingServer, Postgres, postgres_bin

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres():
    if postgres_bin() is None:
        pytest.skip("Debian's postgresql package is not installed (.ci/run installs it)")
    with Postgres(f"pg-p@ss-{uuid.uuid4().hex}") as pg:
        yield pg


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    backend, auth = postgres.create_database("mlflow"), postgres.create_database("mlflow_auth")
    admin, flask_key = f"admin-p@ss-{uuid.uuid4().hex}", uuid.uuid4().hex
    with AuthTrackingServer(root, backend, auth, admin, flask_key) as srv:
        yield srv


@pytest.fixture(scope="module")
def ws(make_demo_shards, tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("auth-ws"), make_demo_shards(24, 24, 24))


def overrides(ws: Workspace, server: AuthTrackingServer, name: str) -> list[str]:
    # the demo shards hold 18 train rows per kind: one batch of 8 per rank
    return [*ws.overrides(name), f"mlflow.tracking_uri={server.url}", "train.steps=4", "data.batch_size=8"]


def test_a_wrong_password_stops_the_job_before_training(server, tmp_path):
    """``jobs/pretrain.py`` on this machine (no Ray address: it would start a local Ray after its checks).
    The data paths lead nowhere: the credentials are checked first, and the data would fail second."""
    ws = Workspace(tmp_path, tmp_path / "no-shards")
    wrong = f"wrong-p@ss-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_") and k != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_USERNAME="drill", MLFLOW_TRACKING_PASSWORD=wrong)  # no such user, or not so
    args = [sys.executable, str(ROOT / "jobs/pretrain.py"), "--config", str(TINY_CONFIG)]
    done = subprocess.run(
        [*args, *overrides(ws, server, "wrong-password")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # imports alone take minutes on a busy 2-core machine
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "rejects the credentials (HTTP 401, user 'drill')" in done.stderr, output[-3000:]
    assert "Started a local Ray instance" not in output and not (ws.root / "runs").exists()
    assert wrong not in output


def test_a_submitted_job_logs_through_auth_and_no_credential_leaks(
    server, postgres, ray_head, ws, monkeypatch
):
    user, password = (ray_head.extra_env[f"MLFLOW_TRACKING_{k}"] for k in ("USERNAME", "PASSWORD"))
    server.create_user(user, password)  # the user whose credentials the Ray cluster's processes hold
    job = f"auth-{ws.tag}"
    job_faults.submit(ray_head, job, overrides(ws, server, "auth"), wait=True)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["mlflow.tracking_uri"] == server.url
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lr")] == [1, 2, 3, 4]

    secrets = {k: v for k, v in ray_head.extra_env.items() if k != "MLFLOW_TRACKING_USERNAME"}
    secrets |= {
        "RAY_AUTH_TOKEN": ray_head.token,
        "MLflow admin password": server.admin_password,
        "Flask secret key": server.flask_key,
        "database password": postgres.password,
        "database password (in a URI)": quote(postgres.password, safe=""),
    }
    sources = [
        ("ray job logs", ray_head.ray("job", "logs", job).stdout.encode()),
        *(
            (f"ray log {p.relative_to(ray_head.logs_dir)}", d)
            for p, d in job_faults.text_files(ray_head.logs_dir)
        ),
        *job_faults.mlflow_texts(server.url, EXPERIMENT, ws.root / "mlflow-scan"),
        *((f"storage {p}", d) for p, d in job_faults.text_files(ws.root / "runs")),
        ("mlflow server log", server.log()),
        ("postgres log", postgres.log()),
    ]
    assert any(where.startswith("mlflow:") and "artifact" in where for where, _ in sources)
    assert job_faults.leaked(secrets, sources) == []
