"""The mixture a regression over sweep trials predicts best (RegMix, Liu et al. 2024): fit the validation
objective as a function of the mixing weights, check the fit by leave-one-out rank correlation, score many
candidate mixtures on the simplex and average the best ones.

The default regressor is a ridge regression on the weights and their pairwise products (scikit-learn):
a sweep here has tens of trials, not RegMix's 512, and the objective is smooth in the weights (Data
Mixing Laws, Ye et al. 2024), so a quadratic surface with a penalty fits without the variance of boosted
trees. ``model="gbm"`` (scikit-learn's histogram gradient boosting, the LightGBM algorithm) is there for
sweeps with hundreds of trials.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from pipeline import storage
from pipeline.config import Config, StorageConfig, dump_config, from_dict

MODELS = ("quadratic", "gbm")
LOO_UP_TO = 60  # trials; above, 10-fold (a boosted model refitted per trial gets slow)
RATIO_PREFIX = "ratio_"


class TrialsError(ValueError):
    """Trials that cannot be fitted: too few, or without a usable objective."""


@dataclass
class Trials:
    sources: list[str]
    weights: np.ndarray  # (n, k), each row on the simplex
    objective: np.ndarray  # (n,)
    trial_ids: list[str]


@dataclass
class MixtureFit:
    model: str
    sources: list[str]
    trials: int
    cv: str  # how the trials were held out: leave-one-out, or 10-fold for more than LOO_UP_TO trials
    cv_spearman: float  # held-out prediction vs actual objective of the trials
    cv_rmse: float
    recommended: dict[str, float]
    predicted_objective: float  # at the recommended mixture
    predicted_spread: float  # std of the prediction over the top-k candidates averaged into it
    best_trial: str
    best_trial_objective: float
    candidates: int
    top_k: int

    def to_json(self) -> dict:
        return asdict(self)


def read_trials(trials_csv: str, source: str = "trials.csv") -> Trials:
    """The finished trials (status ``report.COMPLETED``, a finite objective) of a sweep's ``trials.csv``."""
    from pipeline.tune.report import COMPLETED

    rows = list(csv.DictReader(io.StringIO(trials_csv)))
    sources = [c.removeprefix(RATIO_PREFIX) for c in (rows[0] if rows else {}) if c.startswith(RATIO_PREFIX)]
    done = [
        r
        for r in rows
        if r["status"] == COMPLETED and r["objective"] and math.isfinite(float(r["objective"]))
    ]
    weights = np.array([[float(r[RATIO_PREFIX + s]) for s in sources] for r in done]).reshape(
        -1, len(sources)
    )
    total = weights.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise TrialsError(f"{source}: a finished trial has no positive weight")
    return Trials(
        sources,
        weights / total,
        np.array([float(r["objective"]) for r in done]),
        [r["trial_id"] for r in done],
    )


def min_trials(sources: int) -> int:
    """Fewer trials than this leave the quadratic surface (``sources`` + pairwise terms) unchecked."""
    return max(6, sources + 3)


def regressor(model: str, seed: int):
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures

    if model == "quadratic":
        return make_pipeline(
            PolynomialFeatures(2, include_bias=False), RidgeCV(alphas=np.logspace(-6, 2, 17))
        )
    if model == "gbm":
        return HistGradientBoostingRegressor(
            max_iter=100, learning_rate=0.1, min_samples_leaf=3, random_state=seed
        )
    raise ValueError(f"unknown model {model!r}; models are {list(MODELS)}")


def simplex_candidates(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` mixtures of ``k`` sources, Dirichlet with concentrations log-uniform over 0.1..10, so that
    near-corner and near-centre mixtures are both covered."""
    alpha = np.exp(rng.uniform(math.log(0.1), math.log(10.0), size=(n, 1))) * np.ones(k)
    draws = rng.gamma(alpha)
    total = draws.sum(axis=1, keepdims=True)
    return np.where(total > 0, draws / np.where(total > 0, total, 1), 1.0 / k)  # all-zero draws: centre


def fit_mixture(
    trials: Trials,
    model: str = "quadratic",
    mode: str = "min",
    candidates: int = 100_000,
    top_k: int = 100,
    seed: int = 0,
) -> tuple[MixtureFit, np.ndarray, np.ndarray]:
    """(the fit, its held-out predictions of the trials, the scored candidates:
    weights in columns ``[:, :k]``, predicted objective in the last)."""
    from scipy.stats import spearmanr
    from sklearn.model_selection import KFold, LeaveOneOut, cross_val_predict

    n, k = trials.weights.shape
    if n < min_trials(k):
        raise TrialsError(
            f"{n} finished trial(s) over {k} sources; the fit needs at least {min_trials(k)}: run more trials"
        )
    folds = LeaveOneOut() if n <= LOO_UP_TO else KFold(10, shuffle=True, random_state=seed)
    loo = cross_val_predict(regressor(model, seed), trials.weights, trials.objective, cv=folds)
    spearman = float(spearmanr(loo, trials.objective).statistic)
    fitted = regressor(model, seed).fit(trials.weights, trials.objective)
    rng = np.random.default_rng(seed)
    pool = np.vstack([simplex_candidates(k, candidates, rng), trials.weights])
    predicted = fitted.predict(pool)
    order = np.argsort(predicted if mode == "min" else -predicted)[:top_k]
    recommended = pool[order].mean(axis=0)
    best = int(np.argmin(trials.objective) if mode == "min" else np.argmax(trials.objective))
    fit = MixtureFit(
        model=model,
        sources=trials.sources,
        trials=n,
        cv="leave-one-out" if n <= LOO_UP_TO else "10-fold",
        cv_spearman=spearman,
        cv_rmse=float(np.sqrt(np.mean((loo - trials.objective) ** 2))),
        recommended={s: float(w) for s, w in zip(trials.sources, recommended, strict=True)},
        predicted_objective=float(fitted.predict(recommended[None])[0]),
        predicted_spread=float(predicted[order].std()),
        best_trial=trials.trial_ids[best],
        best_trial_objective=float(trials.objective[best]),
        candidates=len(pool),
        top_k=top_k,
    )
    return fit, loo, np.column_stack([pool, predicted])


FIT_DIR = "mixture_fit"  # beside the sweep's trials.csv, and the artifact folder in the sweep's parent run
PARENT_TAG = "mlflow.parentRunId"


def recommended_config(best_config_yaml: bytes, fit: MixtureFit) -> Config:
    """The sweep's best trial's complete config with the recommended ratios (4 decimals)."""
    base = from_dict(yaml.safe_load(best_config_yaml))
    ratios = {s: round(w, 4) for s, w in fit.recommended.items()}
    return replace(base, data=replace(base.data, ratios=ratios))


def sweep_parent_run(tracking_uri: str, child_run_ids: list[str]) -> str:
    """The MLflow parent run of a sweep, from its trials' runs ("" if none is recorded)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for run_id in filter(None, child_run_ids):
        parent = client.get_run(run_id).data.tags.get(PARENT_TAG, "")
        if parent:
            return parent
    return ""


def run_fit(
    sweep_uri: str,
    storage_cfg: StorageConfig,
    model: str = "quadratic",
    candidates: int = 100_000,
    top_k: int = 100,
    seed: int = 0,
    objective: str = "val/objective",
    mode: str = "min",
) -> tuple[MixtureFit, dict[str, str]]:
    """Fits a finished sweep (``tune.storage_path/tune.name``), writes the fit's files to
    ``SWEEP/mixture_fit`` and logs them to the sweep's MLflow parent run. Returns the fit and where to."""
    from pipeline.train.tracking import Tracker
    from pipeline.tune import report

    csv_uri = storage.join(sweep_uri, "trials.csv")
    best_uri = storage.join(sweep_uri, "best_config.yaml")
    for uri in (csv_uri, best_uri):
        if not storage.exists(uri, storage_cfg):
            raise TrialsError(
                f"{uri} not found: is {sweep_uri} a finished sweep (tune.storage_path/tune.name)?"
            )
    text = storage.read_bytes(csv_uri, storage_cfg).decode()
    trials = read_trials(text, csv_uri)
    fit, loo, scored = fit_mixture(trials, model, mode, candidates, top_k, seed)
    config = recommended_config(storage.read_bytes(best_uri, storage_cfg), fit)
    files = {
        "mixture_fit.json": json.dumps(fit.to_json(), indent=2).encode(),
        "predicted_vs_actual.png": report.predicted_vs_actual_plot(
            trials.objective, loo, fit.cv_spearman, objective
        ),
        "predicted_objective.png": report.mixture_surface_plot(
            trials.sources, scored, trials.weights, np.array(list(fit.recommended.values())), objective, mode
        ),
        "recommended_config.yaml": dump_config(config).encode(),
    }
    out = storage.join(sweep_uri, FIT_DIR)
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(out, name), data, storage_cfg)
    where = {"files": out}
    children = [r["mlflow_run_id"] for r in csv.DictReader(io.StringIO(text))]
    parent = sweep_parent_run(config.mlflow.tracking_uri, children) if config.mlflow.tracking_uri else ""
    if parent:
        with tempfile.TemporaryDirectory(prefix="flava-fit-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            tracker = Tracker(config.mlflow.tracking_uri, parent)
            tracker.log_dir(tmp, FIT_DIR)
            tracker.set_tags({"mixture_fit.cv_spearman": f"{fit.cv_spearman:.4f}"})
        where["mlflow_parent_run"] = parent
    return fit, where


def format_fit(fit: MixtureFit) -> str:
    width = max(len(s) for s in fit.sources)
    lines = [
        f"{fit.model} fit of {fit.trials} trials: {fit.cv} Spearman {fit.cv_spearman:.3f}, "
        f"RMSE {fit.cv_rmse:.4f}",
        f"recommended mixture (mean of the top {fit.top_k} of {fit.candidates} candidates):",
        *[f"  {s:<{width}}  {w:.4f}" for s, w in fit.recommended.items()],
        f"predicted objective {fit.predicted_objective:.4f} (spread {fit.predicted_spread:.4f}); "
        f"best trial {fit.best_trial}: {fit.best_trial_objective:.4f}",
    ]
    return "\n".join(lines)
