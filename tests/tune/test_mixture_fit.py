"""The mixture regression (``pipeline.tune.mixture_fit``): it finds the optimum of a known objective from
sampled trials, says when there are too few, and writes its files into the sweep and its MLflow parent."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from jobs import fit_mixture as job
from pipeline.config import KINDS, dump_config, load_config
from pipeline.tune import report
from pipeline.tune.mixture_fit import Trials, TrialsError, fit_mixture, read_trials

SOURCES = ["cc_pairs", "clipart", "stamps", "glosses"]
OPTIMUM = np.array([0.4, 0.3, 0.2, 0.1])  # where the true objective below is lowest


def true_objective(weights: np.ndarray) -> np.ndarray:
    """A smooth bowl with its minimum at OPTIMUM (on the simplex), plus a cross term."""
    d = weights - OPTIMUM
    return 2.0 + 3.0 * (d**2).sum(axis=1) + 1.5 * d[:, 0] * d[:, 1]


def sampled_trials(n: int, noise: float, seed: int = 1) -> Trials:
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(len(SOURCES)), size=n)
    objective = true_objective(weights) + rng.normal(0, noise, n)
    return Trials(SOURCES, weights, objective, [f"t{i:03d}" for i in range(n)])


def test_the_fit_recovers_the_optimum_of_a_known_objective():
    trials = sampled_trials(40, noise=0.005)
    fit, _, _ = fit_mixture(trials, candidates=20_000, top_k=50)
    found = np.array([fit.recommended[s] for s in SOURCES])
    assert np.abs(found - OPTIMUM).sum() < 0.1, found
    assert fit.cv_spearman > 0.9
    # closer to the optimum than the best sampled trial: the point of fitting rather than picking
    best = trials.weights[trials.trial_ids.index(fit.best_trial)]
    assert np.abs(found - OPTIMUM).sum() < np.abs(best - OPTIMUM).sum()
    assert abs(fit.predicted_objective - 2.0) < 0.02


def test_the_boosted_trees_fit_finds_the_same_region():
    fit, _, _ = fit_mixture(sampled_trials(150, noise=0.005), model="gbm", candidates=20_000, top_k=200)
    assert fit.cv == "10-fold"
    found = np.array([fit.recommended[s] for s in SOURCES])
    assert np.abs(found - OPTIMUM).sum() < 0.3, found
    assert fit.cv_spearman > 0.8


def test_a_fit_on_noise_says_so_by_its_rank_correlation():
    trials = sampled_trials(40, noise=0.0)
    trials.objective = np.random.default_rng(7).normal(size=40)  # unrelated to the weights
    fit, _, _ = fit_mixture(trials, candidates=5_000)
    assert fit.cv_spearman < 0.5


def test_too_few_trials_is_an_error_naming_the_need():
    with pytest.raises(TrialsError, match=r"5 finished trial\(s\) over 4 sources; the fit needs at least 7"):
        fit_mixture(sampled_trials(5, noise=0.0))


def trial_rows(trials: Trials, run_ids: list[str]) -> list[report.TrialRow]:
    rows = [
        report.TrialRow(t, report.COMPLETED, dict(zip(trials.sources, w, strict=True)), 1e-3, float(o), 40, r)
        for t, w, o, r in zip(trials.trial_ids, trials.weights, trials.objective, run_ids, strict=True)
    ]
    stopped = dict.fromkeys(trials.sources, 1 / len(trials.sources))
    rows.append(report.TrialRow("stopped", report.STOPPED, stopped, 1e-3, 9.0, 10))
    return rows


def test_only_finished_trials_are_read():
    trials = sampled_trials(8, noise=0.0)
    read = read_trials(report.trials_csv(trial_rows(trials, [""] * 8), SOURCES))
    assert read.sources == SOURCES and read.trial_ids == trials.trial_ids
    np.testing.assert_allclose(read.weights, trials.weights, rtol=1e-5)


def test_the_job_writes_the_fit_into_the_sweep_and_its_mlflow_parent(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    trials = sampled_trials(12, noise=0.005)
    trials = Trials(
        list(KINDS),
        trials.weights[:, :3] / trials.weights[:, :3].sum(1, keepdims=True),
        trials.objective,
        trials.trial_ids,
    )
    children = [
        client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
        for _ in trials.trial_ids
    ]
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "trials.csv").write_text(report.trials_csv(trial_rows(trials, children), list(KINDS)))
    best = load_config(None, [f"mlflow.tracking_uri={uri}", "train.steps=40"])
    (sweep / "best_config.yaml").write_text(dump_config(best))

    assert job.main([str(sweep), "--candidates", "5000"]) == 0
    assert "recommended mixture" in capsys.readouterr().out
    written = {p.name for p in (sweep / "mixture_fit").iterdir()}
    assert written == {
        "mixture_fit.json",
        "predicted_vs_actual.png",
        "predicted_objective.png",
        "recommended_config.yaml",
    }
    fit = json.loads((sweep / "mixture_fit" / "mixture_fit.json").read_text())
    assert fit["trials"] == 12 and set(fit["recommended"]) == set(KINDS)
    recommended = load_config(str(sweep / "mixture_fit" / "recommended_config.yaml"))
    assert recommended.data.ratios == {s: round(w, 4) for s, w in fit["recommended"].items()}
    assert recommended.train.steps == 40  # the rest of the best trial's config
    logged = {a.path for a in client.list_artifacts(parent, "mixture_fit")}
    assert logged == {f"mixture_fit/{name}" for name in written}
    assert client.get_run(parent).data.tags["mixture_fit.cv_spearman"] == f"{fit['cv_spearman']:.4f}"


def test_the_job_refuses_a_directory_that_is_not_a_sweep(tmp_path, capsys):
    assert job.main([str(tmp_path)]) == 2
    assert "trials.csv not found" in capsys.readouterr().err
