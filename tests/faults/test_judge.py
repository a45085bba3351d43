"""The drills' judging functions (``pipeline.drills.judge``) on hand-made records, passing and failing."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.drills.judge import (
    RunRecord,
    expected_samples,
    judge_recovery,
    kind_sequence,
    recovery_time,
    redone_steps,
    rows_differ,
    sample_accounting,
)

STEPS = 6


@pytest.fixture
def config():
    return load_config(
        None,
        [
            "data.train={image_text: /d/it, image: /d/im, text: /d/tx}",
            "data.ratios={image_text: 0.5, image: 0.25, text: 0.25}",
            "data.batch_size=2",
            "train.num_workers=2",
        ],
    )


def clean_run(config) -> RunRecord:
    """A run that trained steps 1..6 once, in one MLflow run, on the expected rows."""
    kinds = kind_sequence(config, STEPS)
    return RunRecord(
        final={"step": STEPS, **{f"samples/{k}": n for k, n in expected_samples(config, STEPS).items()}},
        step_log=[(s, 10.0 + s) for s in range(1, STEPS + 1)],
        mlflow_runs=1,
        events=[{"event": "train_start", "step": 0, "resumed_from": ""}],
        kinds={s: {kinds[s - 1]} for s in range(1, STEPS + 1)},
        keys={s: [100 + s] for s in range(1, STEPS + 1)},
        expected_keys={s: 100 + s for s in range(1, STEPS + 1)},
        rows_per_step=4,
    )


def test_expected_samples_follow_the_kind_sequence(config):
    kinds = kind_sequence(config, STEPS)
    assert sum(expected_samples(config, STEPS).values()) == STEPS * 4  # 2 rows x 2 workers per step
    assert expected_samples(config, STEPS)["text"] == kinds.count("text") * 4


def test_sample_accounting_finds_lost_and_doubled_samples(config):
    final = {f"samples/{k}": n for k, n in expected_samples(config, STEPS).items()}
    assert sample_accounting(config, final, STEPS) == (0, 0)
    kind = kind_sequence(config, STEPS)[0]
    assert sample_accounting(config, {**final, f"samples/{kind}": final[f"samples/{kind}"] - 4}, STEPS) == (
        4,
        0,
    )
    assert sample_accounting(config, {**final, f"samples/{kind}": final[f"samples/{kind}"] + 8}, STEPS) == (
        0,
        8,
    )


def test_redone_steps_and_recovery_time():
    log = [(1, 1.0), (2, 2.0), (3, 3.0), (2, 9.0), (3, 10.5), (4, 11.0)]
    assert redone_steps(log) == 2
    assert recovery_time(log, fault_at=4.0) == 5.0  # the first step logged after the fault
    assert recovery_time(log, fault_at=20.0) is None  # nothing trained after it
    assert redone_steps([(1, 1.0), (2, 2.0)]) == 0


def test_rows_differ_counts_every_row_of_a_step_whose_rows_changed(config):
    run = clean_run(config)
    assert rows_differ(run) == 0
    run.keys[3] = [103, 999]  # redone on other rows
    run.keys[5] = [7]
    assert rows_differ(run) == 2 * run.rows_per_step
    del run.keys[6]  # a step never logged is a step whose rows are unknown
    assert rows_differ(run) == 3 * run.rows_per_step


def test_a_clean_recovery_passes_and_each_defect_fails(config):
    good = judge_recovery("kill", "recovers", config, clean_run(config), fault_at=12.5, steps=STEPS)
    assert good.passed and good.rows_differ == 0 and good.samples_lost == 0 and good.recover_s == 0.5
    defects = {
        "gap": lambda r: setattr(r, "step_log", [e for e in r.step_log if e[0] != 4]),
        "two mlflow runs": lambda r: setattr(r, "mlflow_runs", 2),
        "short": lambda r: r.final.update(step=STEPS - 1),
        "lost samples": lambda r: r.final.update({k: v - 4 for k, v in r.final.items() if k != "step"}),
        "wrong kind": lambda r: r.kinds[2].add("never"),
        "wrong rows": lambda r: r.keys[2].append(0),
    }
    for name, defect in defects.items():
        run = clean_run(config)
        defect(run)
        assert not judge_recovery("kill", "recovers", config, run, 12.5, STEPS).passed, name
