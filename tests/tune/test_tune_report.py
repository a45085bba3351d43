"""The end-of-sweep artefacts: CSV, printed table, plot, choice of the best trial."""

from __future__ import annotations

import csv
import io
import math

import matplotlib.image
import pytest

from pipeline.tune.report import (
    COMPLETED,
    ERROR,
    STOPPED,
    TrialRow,
    best_trial,
    objective_plot,
    summary_table,
    trials_csv,
)

KINDS3 = ["image_text", "image", "text"]


def rows(kinds=KINDS3):
    k = len(kinds)
    centre, first, last = [1 / k] * k, [1.0] + [0.0] * (k - 1), [0.0] * (k - 1) + [1.0]

    def mix(weights):
        return dict(zip(kinds, weights, strict=True))

    return [
        TrialRow("a_00000", COMPLETED, mix(centre), 1e-3, 0.61, 8, "run0"),
        TrialRow("a_00001", STOPPED, mix(first), 1e-3, 0.80, 2, "run1"),
        TrialRow("a_00002", COMPLETED, mix(last), 3e-4, 0.55, 8, "run2"),
        TrialRow("a_00003", ERROR, mix(centre), 1e-3, None, None, "", "RuntimeError: x"),
    ]


def test_best_is_the_lowest_objective_for_min_and_ignores_missing():
    assert best_trial(rows(), "min").trial_id == "a_00002"
    assert best_trial(rows(), "max").trial_id == "a_00001"
    nan = [TrialRow("n", COMPLETED, {"text": 1.0}, 1e-3, math.nan, 4)]
    assert best_trial(nan, "min") is None
    assert best_trial([], "min") is None


def test_csv_has_one_row_per_trial_with_every_kind():
    parsed = list(csv.DictReader(io.StringIO(trials_csv(rows(), KINDS3))))
    assert [r["trial_id"] for r in parsed] == ["a_00000", "a_00001", "a_00002", "a_00003"]
    assert parsed[1]["status"] == STOPPED and parsed[1]["step"] == "2"
    assert float(parsed[2]["ratio_text"]) == 1.0 and float(parsed[2]["ratio_image"]) == 0.0
    assert parsed[3]["objective"] == "" and parsed[3]["error"] == "RuntimeError: x"
    assert parsed[0]["mlflow_run_id"] == "run0"


def test_summary_table_lines_up():
    table = summary_table(rows(), KINDS3, "val/objective").splitlines()
    assert table[0].split() == ["trial", *KINDS3, "lr", "val/objective", "step", "status"]
    assert set(table[1]) <= {"-", " "}
    assert len(table) == 2 + 4
    assert "stopped early" in table[3] and "0.8000" in table[3]
    assert "error: RuntimeError: x" in table[5]


@pytest.mark.parametrize("kinds", [["image_text", "text"], KINDS3, ["a", "b", "c", "d"]])
def test_plot_is_a_png_for_any_number_of_kinds(tmp_path, kinds):
    png = objective_plot(rows(kinds), kinds, "val/objective", "min")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    path = tmp_path / "p.png"
    path.write_bytes(png)
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 300 and height > 200


def test_plot_without_any_objective_still_renders():
    empty = [TrialRow("e", ERROR, {"text": 1.0, "image": 0.0, "image_text": 0.0}, 1e-3, None, None)]
    assert objective_plot(empty, KINDS3, "val/objective", "min")[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    return client, client.create_experiment("closing")


@pytest.mark.parametrize(
    ("outcome", "run_status", "closed_as"),
    [
        (COMPLETED, "FAILED", "FINISHED"),  # torn down by the sweep's interrupt after its last step
        (COMPLETED, "FINISHED", "FINISHED"),
        (STOPPED, "FAILED", "KILLED"),  # ASHA's stop reached it as an exception
        (STOPPED, "RUNNING", "KILLED"),
        (ERROR, "RUNNING", "FAILED"),
        (ERROR, "FAILED", "FAILED"),
    ],
)
def test_child_runs_are_closed_as_tune_saw_the_trial_end(mlflow_store, outcome, run_status, closed_as):
    from pipeline.tune.sweep import OUTCOME_TAG, _close_children

    client, experiment_id = mlflow_store
    run = client.create_run(experiment_id)
    if run_status != "RUNNING":
        client.set_terminated(run.info.run_id, status=run_status)
    row = TrialRow("t1", outcome, {"image": 1.0}, 1e-3, 0.5, 4, mlflow_run_id=run.info.run_id)
    _close_children(client.tracking_uri, [row])
    closed = client.get_run(run.info.run_id)
    assert closed.info.status == closed_as
    assert closed.data.tags[OUTCOME_TAG] == outcome
