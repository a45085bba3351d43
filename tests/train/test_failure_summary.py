"""The one line ``jobs/pretrain.py`` prints after ``pretrain: training failed:``: the innermost cause, and for
an S3 call that failed after its retries, the endpoint and the run's storage too (Ray Train's controller
names only bucket and key when it cannot write its own state)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config
from pipeline.train.launch import StorageFailure, failure_summary, name_the_storage

ROOT = Path(__file__).resolve().parents[2]
CONTROLLER_S3_ERROR = (
    "When initiating multiple part upload for key 'runs/r/checkpoint_manager_snapshot.json' in bucket "
    "'drills': AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 56"
)


class ControllerError(RuntimeError):  # stands in for Ray Train's wrapper class: only its shape matters here
    pass


def wrapped(inner: BaseException) -> BaseException:
    """As Ray delivers it: a wrapper whose cause is the failing call's error."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise ControllerError("Traceback (most recent call last):\n  ...\nthe controller failed") from e
    except ControllerError as outer:
        return outer


def raised(error: BaseException, config) -> BaseException:
    """What ``run_pretraining`` raises for a failed fit: ``raise name_the_storage(e) from e``."""
    failure = name_the_storage(error, config)
    try:
        raise failure from error
    except BaseException as e:
        return e


def config(*overrides: str):
    return load_config(ROOT / "jobs/configs/tiny-test.yaml", list(overrides))


def test_the_innermost_cause_is_the_line():
    assert failure_summary(wrapped(ValueError("first\nbad value"))) == "ValueError: bad value"


def test_an_s3_failure_names_the_endpoint_the_key_and_the_run_storage():
    cfg = config("storage.s3_endpoint_url=http://127.0.0.1:19467", "train.storage_path=s3://drills/runs")
    failure = raised(wrapped(OSError(CONTROLLER_S3_ERROR)), cfg)
    assert isinstance(failure, StorageFailure)
    line = failure_summary(failure)
    assert line.startswith("StorageFailure: OSError: When initiating multiple part upload for key 'runs/r/")
    assert "S3 endpoint http://127.0.0.1:19467" in line and "run storage s3://drills/runs/" in line
    # what jobs/pretrain.py prints keeps it through Ray's own wrapping of the re-raised error
    assert failure_summary(wrapped(failure)) == line


def test_aws_default_endpoint_and_local_run_storage():
    failure = raised(wrapped(OSError(CONTROLLER_S3_ERROR)), config("train.storage_path=/tmp/runs"))
    line = failure_summary(failure)
    assert "S3 endpoint AWS S3 (us-east-1)" in line and "run storage" not in line


def test_other_failures_are_left_as_they_are():
    error = wrapped(ValueError("NaN loss at step 3"))
    assert name_the_storage(error, config("storage.s3_endpoint_url=http://127.0.0.1:1")) is error
