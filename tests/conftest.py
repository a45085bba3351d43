"""Shared fixtures: one real local Ray cluster per test session, since starting Ray costs ~10 s."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Dummy credentials for the moto S3 endpoint, set before any Ray worker starts: workers inherit the
# environment of the raylet, so setting them later (inside a fixture) would not reach them. Forcing
# them also guarantees that no real AWS credentials are ever used by a test.
pytest_plugins = ["skip_report"]

os.environ.update(
    {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
)


def pytest_configure(config):
    """One intra-op torch thread in the test process: the models here are tiny, and two threads on the
    2 shared cores fight each other and the Ray workers (measured: tests/model/test_flava.py and
    test_parity.py took 289 s with 2 threads, 52 s with 1, on a loaded machine; CPU time 22 s vs 10 s).
    Ray workers and spawned ranks set their own thread counts."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real Ray cluster of two nodes on this machine (``pipeline.drills.nodes.LocalCluster``: a head and
    a node of 2 logical CPUs each, 4 in all so that 2 Train workers and Ray Data fit on 2 cores); the node
    drills add and kill nodes of it. Yields the ``LocalCluster``."""
    from pipeline.drills.harness import FAST_RESTART_ENV  # a hung rank is killed 5 s after its peers failed
    from pipeline.drills.nodes import LocalCluster

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    with LocalCluster(env_vars=FAST_RESTART_ENV, log_dir=tmp_path_factory.mktemp("ray-nodes")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real token-auth ``ray start --head`` of this session (its own ports, temp dir and HOME), for
    ``ray job submit``. Its processes get S3 and MLflow credentials with unique values
    (``head.extra_env``), so that the secrets drill can tell any copy of them."""
    from pipeline.drills.head import RayHead
    from pipeline.drills.job_faults import secret_env

    with RayHead(tmp_path_factory.mktemp("ray-home"), extra_env=secret_env()) as head:
        yield head


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: real-corpus and KubeRay-schema tests need the shared material")
    return SHARED


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3-compatible HTTP endpoint (moto server on a free port) with bucket ``test-bucket``.

    Yields the endpoint URL; use it as ``storage.s3_endpoint_url`` and write under ``s3://test-bucket/``.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="test-bucket")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def make_demo_shards(tmp_path_factory, ray_cluster):
    """Prepares a small demo corpus through the real prepare path: ``make(pairs, images, texts)`` -> root
    holding ``<kind>/{train,val}``, a quarter held out. Made once per size and session."""
    from pipeline.config import load_config
    from pipeline.shards.demo import prepare_demo

    made: dict[tuple[int, int, int], Path] = {}

    def make(pairs: int, images: int, texts: int) -> Path:
        if (pairs, images, texts) not in made:
            root = tmp_path_factory.mktemp(f"demo-{pairs}-{images}-{texts}")
            sizes = [f"demo.pairs={pairs}", f"demo.images={images}", f"demo.texts={texts}"]
            config = load_config(
                ROOT / "jobs/configs/demo.yaml", [f"demo.root={root}", *sizes, "demo.val_fraction=0.25"]
            )
            prepare_demo(config)
            made[(pairs, images, texts)] = root
        return made[(pairs, images, texts)]

    return make
