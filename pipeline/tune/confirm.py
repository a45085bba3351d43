"""Confirming a fitted mixture: train, with the same steps, seed and settings, the mixture the regression
recommends (``mixture_fit/recommended_config.yaml``), the sweep's best sampled trial's mixture and the
natural (size-proportional) mixture, and compare their validation objectives.

A regression over proxy runs can be confidently wrong (too few trials, a noisy objective); a mixture is
only better once a run with it is. The three runs are ordinary pretraining runs (named
``<tune.name>-confirm-<which>``, so a rerun resumes or reuses them), tracked in MLflow under the sweep's
parent run when there is one.
"""

from __future__ import annotations

import dataclasses
import json
import math

import yaml

from pipeline import storage
from pipeline.config import Config, StorageConfig, from_dict
from pipeline.tune.mixture_fit import FIT_DIR, TrialsError

MIXTURES = ("recommended", "best_trial", "natural")
ONLINE = ("doremi", "bandit")  # data.mixing rules started from the natural mixture (--online)
TERMS = {  # the objective's terms (pipeline.train.evaluate) as the table shows them
    "mlm": "val/text/mlm",
    "mim": "val/image/mim",
    "R@1 i2t": "val/retrieval/i2t_r1",
    "R@1 t2i": "val/retrieval/t2i_r1",
}


def natural_mixture(config: Config, sources: list[str]) -> dict[str, float]:
    """The sources' shares of the training rows (their manifests)."""
    from pipeline.tune.space import natural_share

    return dict(zip(sources, natural_share(config, sources), strict=True))


def confirmation_configs(sweep_uri: str, storage_cfg: StorageConfig) -> dict[str, Config]:
    """The three runs' configs: the recommended config with each mixture's ratios and its own run name."""
    paths = {
        "recommended": storage.join(sweep_uri, FIT_DIR, "recommended_config.yaml"),
        "best_trial": storage.join(sweep_uri, "best_config.yaml"),
    }
    for name, uri in paths.items():
        if not storage.exists(uri, storage_cfg):
            hint = (
                "run jobs/fit_mixture.py on it first" if name == "recommended" else "is it a finished sweep?"
            )
            raise TrialsError(f"{uri} not found: {hint}")
    base, best = (from_dict(yaml.safe_load(storage.read_bytes(paths[n], storage_cfg))) for n in MIXTURES[:2])
    swept = [s for s, w in base.data.ratios.items() if w > 0 or best.data.ratios.get(s, 0) > 0]
    ratios = {
        "recommended": base.data.ratios,
        "best_trial": best.data.ratios,
        "natural": {**dict.fromkeys(base.data.ratios, 0.0), **natural_mixture(base, swept)},
    }
    stem = base.train.run_name.removesuffix("-best")  # best_config's run name is <tune.name>-best
    return {
        which: dataclasses.replace(
            base,
            data=dataclasses.replace(base.data, ratios=dict(ratios[which])),
            train=dataclasses.replace(base.train, run_name=f"{stem}-confirm-{which}"),
            mlflow=dataclasses.replace(
                base.mlflow, run_tags={**base.mlflow.run_tags, "mixture.confirm": which}
            ),
        )
        for which in MIXTURES
    }


def confirmation_table(results: dict[str, dict], ratios: dict[str, dict[str, float]]) -> str:
    """One row per mixture: its weights, ``val/objective`` and the objective's terms."""
    sources = list(next(iter(ratios.values())))
    header = ["mixture", *sources, "val/objective", *TERMS]
    rows = [
        [
            which,
            *[f"{ratios[which].get(s, 0.0):.3f}" for s in sources],
            _fmt(metrics.get("val/objective")),
            *[_fmt(metrics.get(key)) for key in TERMS.values()],
        ]
        for which, metrics in results.items()
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    best = min(results, key=lambda w: results[w].get("val/objective", math.inf))
    lines.append(f"lowest val/objective: {best}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def online_configs(natural: Config, natural_run_dir: str) -> dict[str, Config]:
    """The online mixing runs: from the natural mixture, ``doremi`` against the natural run as reference."""
    stem = natural.train.run_name.removesuffix("-natural")
    return {
        rule: dataclasses.replace(
            natural,
            data=dataclasses.replace(natural.data, mixing=rule, mixing_reference=natural_run_dir),
            train=dataclasses.replace(natural.train, run_name=f"{stem}-{rule}"),
            mlflow=dataclasses.replace(
                natural.mlflow, run_tags={**natural.mlflow.run_tags, "mixture.confirm": rule}
            ),
        )
        for rule in ONLINE
    }


def run_confirmation(
    sweep_uri: str, storage_cfg: StorageConfig, steps: int = 0, online: bool = False
) -> tuple[str, dict]:
    """Trains the three mixtures one after the other on the connected Ray cluster (``steps`` > 0 replaces
    ``train.steps`` for all), with ``online`` also ``data.mixing=doremi`` and ``bandit`` from the natural
    mixture, and writes ``SWEEP/mixture_fit/confirmation.{json,txt}``. Returns the table and the results."""
    from pipeline.train.launch import run_pretraining

    configs = confirmation_configs(sweep_uri, storage_cfg)
    if steps:
        configs = {
            w: dataclasses.replace(c, train=dataclasses.replace(c.train, steps=steps))
            for w, c in configs.items()
        }
    results = {}
    for which in [*MIXTURES, *(ONLINE if online else ())]:
        if which == ONLINE[0]:
            configs.update(online_configs(configs["natural"], results["natural"].run_dir))
        config = configs[which]
        print(f"[confirm] {which}: ratios {config.data.ratios}, mixing {config.data.mixing}", flush=True)
        results[which] = run_pretraining(config)
    results = {which: result.metrics for which, result in results.items()}
    ratios = {which: config.data.ratios for which, config in configs.items()}
    table = confirmation_table(results, ratios)
    out = storage.join(sweep_uri, FIT_DIR)
    summary = {
        w: {"ratios": ratios[w], **{k: results[w].get(k) for k in ("val/objective", *TERMS.values())}}
        for w in results
    }
    storage.write_bytes_atomic(
        storage.join(out, "confirmation.json"), json.dumps(summary, indent=2).encode(), storage_cfg
    )
    storage.write_bytes_atomic(storage.join(out, "confirmation.txt"), (table + "\n").encode(), storage_cfg)
    return table, results
