"""Fault injection against real processes: the shared local Ray cluster, a moto S3 server that goes away,
a token-auth ``ray start --head`` for ``ray job submit``, a real MLflow sqlite store.

Each test runs one scenario of ``pipeline.drills`` (the same code as ``jobs/fault_drill.py``) and asserts its
outcome, which the drill reads from the run's MLflow run, checkpoints and event log; every wait inside a
scenario is bounded, so a regression fails instead of hanging.
"""

from __future__ import annotations

import pytest

from pipeline.drills import data_faults, job_faults, node_faults, process_faults, storage_faults
from pipeline.drills.flaky_s3 import FlakyS3
from pipeline.drills.harness import ROOT, Workspace, prepare_workspace
from pipeline.drills.judge import DrillResult, format_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ws(ray_cluster, tmp_path_factory) -> Workspace:
    return prepare_workspace(tmp_path_factory.mktemp("drills"))


@pytest.fixture(scope="module")
def flaky_s3() -> FlakyS3:
    return FlakyS3()


def assert_recovered(result: DrillResult, max_redone: int) -> None:
    assert result.passed, result
    assert result.samples_lost == 0 and result.details["doubled"] == 0, result
    assert result.details["mlflow_runs"] == 1, result
    assert result.steps_redone <= max_redone, result  # only the steps since the last checkpoint


def assert_restarted(result: DrillResult, after_step: int) -> None:
    """The fault hit: a second worker group started, resumed from a checkpoint taken before the fault,
    and trained again the steps since (a run that never noticed the fault has one group, no resume)."""
    assert result.details["worker_groups"] >= 2, result
    assert any(step >= after_step for step in result.details["resumed_at"]), result
    assert result.steps_redone >= 1, result


def test_a_killed_worker_is_replaced_and_the_run_resumes_without_losing_samples(ws):
    result = process_faults.kill_worker(ws)
    assert_recovered(result, max_redone=4)  # checkpoint_every=4
    assert_restarted(result, after_step=4)
    assert result.recover_s is not None


def test_a_stuck_worker_becomes_an_error_and_a_restart_within_the_collective_timeout(ws):
    result = process_faults.stuck_worker(ws, timeout_s=10)
    assert_recovered(result, max_redone=4)
    assert_restarted(result, after_step=4)
    assert 10 <= result.recover_s <= result.details["bound_s"], result


@pytest.fixture(scope="module")
def node_drills(ws, ray_cluster) -> list:
    return node_faults.node_lost_and_joined(ws, ray_cluster)


def test_a_preempted_node_leaves_the_run_training_on_what_is_left(node_drills):
    """2 -> 1 -> 2 workers through Ray Data: the samples, kinds and rows of each step of an unfaulted run."""
    lost, _ = node_drills
    assert lost.passed, lost
    assert lost.details["world_sizes"] == [2, 1, 2] and lost.details["world_sizes_per_step"] == [1, 2]
    assert lost.samples_lost == 0 and lost.details["doubled"] == 0 and not lost.details["kinds_differ"]
    assert lost.details["mlflow_runs"] == 1
    assert lost.steps_redone <= 2 * node_faults.CHECKPOINT_EVERY, lost  # two restarts
    assert lost.recover_s is not None


def test_a_joining_node_grows_the_run_to_full_size(node_drills):
    _, joined = node_drills
    assert joined.passed, joined
    assert (
        joined.recover_s is not None and joined.details["resumed_at_step"] > joined.details["joined_step"] - 4
    )


def test_a_cut_checkpoint_is_never_resumed_from(ws):
    result = data_faults.cut_checkpoint(ws)
    assert result.passed, result
    assert result.steps_redone == 4, result  # steps 5..8 again, from the complete step-4 checkpoint
    assert result.samples_lost == 0


def test_an_altered_shard_is_an_error_naming_it_before_training(ws):
    result = data_faults.altered_shard(ws)
    assert result.passed, result
    assert result.details["names_file"], result


def test_a_truncated_shard_and_corrupt_images_are_skipped_and_counted(ws):
    result = data_faults.skipped_input(ws)
    assert result.passed, result
    assert result.samples_lost == 0


def test_a_short_s3_outage_is_ridden_out_without_a_restart(ws, flaky_s3):
    result = storage_faults.s3_outage(ws, flaky_s3, outage_s=6)
    assert result.passed, result
    assert result.details["s3_connections_failed"] > 0, result  # the outage hit the run's S3 calls
    assert result.steps_redone == 0 and result.samples_lost == 0, result


def test_s3_that_stays_away_ends_the_run_with_a_clear_error_in_bounded_time(ws, flaky_s3):
    """What the README promises: the failing call names the endpoint and the key (the message is what
    ``jobs/pretrain.py`` prints after ``pretrain: training failed:``)."""
    result = storage_faults.s3_gone(ws, flaky_s3, attempts=4, bound_s=180)
    assert result.passed, result
    message = result.details["message"]
    assert "NETWORK_CONNECTION" in message or "S3" in message, result
    assert f"127.0.0.1:{flaky_s3.port}" in message and f"{FlakyS3.BUCKET}/" in message, result


def test_s3_data_that_stays_away_ends_the_run_with_an_error_naming_the_dataset(ws, flaky_s3):
    """Checkpoints local, so only data reads meet the outage: a read that fails after the S3 client's
    retries (DataReadError) or one that hangs past data.stall_timeout_s (DataStallError) ends the run,
    naming the dataset's URI."""
    result = storage_faults.s3_gone(ws, flaky_s3, stall_timeout_s=20, bound_s=180, checkpoints_on_s3=False)
    assert result.passed, result
    message = result.details["message"]
    assert ("DataReadError" in message or "DataStallError" in message) and "s3://" in message, result


@pytest.fixture(scope="module")
def stopped_job(ws, ray_head, flaky_s3) -> DrillResult:
    return job_faults.job_stop(ws, ray_head, flaky_s3)


def test_ray_job_stop_keeps_the_checkpoint_and_a_resubmission_resumes(stopped_job):
    result = stopped_job
    assert result.passed, result
    assert result.samples_lost == 0 and result.details["mlflow_runs"] == 1
    # SIGTERM closed the run; the resubmission reopened it
    assert result.details["mlflow_status_after_stop"] == "KILLED" and result.details["first_job_end"] == [
        "KILLED"
    ]
    # the resubmission ran as any ray job submit must: finished, exported, closed, the commit tracked
    assert result.details["final_status"] == "FINISHED" and result.details["final_job_end"] == ["FINISHED"]
    assert result.details["exported"] and len(result.details["export_events"]) == 1, result
    assert result.details["git_commit"].startswith("drill-commit-"), result  # no .git in the upload


def test_secrets_never_reach_logs_mlflow_or_storage(ws, ray_head, flaky_s3, stopped_job):
    result = job_faults.secrets_kept(ws, ray_head, flaky_s3, stopped_job.details["jobs"])
    assert result.passed, result
    assert result.details["sources"] > 10  # job logs, Ray's logs, MLflow, storage were all read


def test_leak_scan_finds_a_planted_secret():
    """The oracle of the secrets drill: it must see a value wherever it is."""
    secrets = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}
    sources = [("clean", b"nothing here"), ("dirty", b"...s3cr3t-value...")]
    assert job_faults.leaked(secrets, sources) == ["AWS_SECRET_ACCESS_KEY in dirty"]


def test_drill_table_has_a_row_per_scenario_and_a_closing_count():
    rows = [
        DrillResult("a", "x", "y", True, 1, 0, 2.0),
        DrillResult("b", "x", "y|z", False),
    ]
    table = format_table(rows)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3 and "y/z" in table
    assert table.endswith("1 passed, 1 failed")


def test_drill_command_rejects_an_unknown_scenario():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_drill", ROOT / "jobs" / "fault_drill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--only", "kill_worker,no_such_drill"])
    assert exit_info.value.code == 2
