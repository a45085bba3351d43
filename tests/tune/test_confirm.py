"""The confirmation runs of a fitted mixture: same settings for all three, each its own mixture (the
recommended one, the best trial's, the natural one from the manifests' row counts), and their table."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.config import StorageConfig, dump_config, load_config
from pipeline.data.synthetic import write_synthetic_dataset
from pipeline.tune.confirm import confirmation_configs, confirmation_table, online_configs
from pipeline.tune.mixture_fit import FIT_DIR, TrialsError

ROWS = {"pairs": ("image_text", 30), "clip": ("image", 20), "gloss": ("text", 50), "unused": ("text", 10)}


@pytest.fixture
def sweep(tmp_path):
    for name, (kind, rows) in ROWS.items():
        write_synthetic_dataset(str(tmp_path / name), kind, rows, 2, 32, StorageConfig())
    sources = {n: {"kind": k, "train": str(tmp_path / n)} for n, (k, _) in ROWS.items()}
    best = load_config(
        None,
        [
            f"data.sources={json.dumps(sources)}",
            "data.ratios={pairs: 0.7, clip: 0.2, gloss: 0.1, unused: 0}",
            "train.run_name=my-sweep-best",
            "train.steps=37",
            "train.seed=5",
        ],
    )
    recommended = dataclasses.replace(
        best,
        data=dataclasses.replace(best.data, ratios={"pairs": 0.5, "clip": 0.1, "gloss": 0.4, "unused": 0.0}),
    )
    sweep = tmp_path / "sweep"
    (sweep / FIT_DIR).mkdir(parents=True)
    (sweep / "best_config.yaml").write_text(dump_config(best))
    (sweep / FIT_DIR / "recommended_config.yaml").write_text(dump_config(recommended))
    return sweep


def test_three_runs_differ_only_in_their_mixture(sweep):
    configs = confirmation_configs(str(sweep), StorageConfig())
    assert list(configs) == ["recommended", "best_trial", "natural"]
    assert configs["recommended"].data.ratios == {"pairs": 0.5, "clip": 0.1, "gloss": 0.4, "unused": 0.0}
    assert configs["best_trial"].data.ratios == {"pairs": 0.7, "clip": 0.2, "gloss": 0.1, "unused": 0.0}
    # natural: the swept sources' shares of the train rows (30:20:50), the unswept one stays out
    natural = configs["natural"].data.ratios
    assert natural == pytest.approx({"pairs": 0.3, "clip": 0.2, "gloss": 0.5, "unused": 0.0})
    for which, config in configs.items():
        assert config.train.run_name == f"my-sweep-confirm-{which}"
        assert config.mlflow.run_tags["mixture.confirm"] == which
        same = dataclasses.replace(
            config,
            data=configs["recommended"].data,
            train=configs["recommended"].train,
            mlflow=configs["recommended"].mlflow,
        )
        assert same == configs["recommended"]  # nothing else differs
        assert (config.train.steps, config.train.seed) == (37, 5)


def test_a_sweep_without_a_fit_is_a_clear_error(sweep):
    (sweep / FIT_DIR / "recommended_config.yaml").unlink()
    with pytest.raises(TrialsError, match="recommended_config.yaml not found: run jobs/fit_mixture.py"):
        confirmation_configs(str(sweep), StorageConfig())


def test_the_table_shows_each_mixture_its_objective_and_terms():
    results = {
        "recommended": {"val/objective": 0.61, "val/text/mlm": 5.1, "val/retrieval/i2t_r1": 0.2},
        "best_trial": {"val/objective": 0.65, "val/text/mlm": 5.3, "val/retrieval/i2t_r1": 0.1},
        "natural": {"val/objective": 0.70},
    }
    ratios = {w: {"a": 0.5, "b": 0.5} for w in results}
    table = confirmation_table(results, ratios).splitlines()
    assert table[0].split() == [
        "mixture",
        "a",
        "b",
        "val/objective",
        "mlm",
        "mim",
        "R@1",
        "i2t",
        "R@1",
        "t2i",
    ]
    assert table[1].split()[:4] == ["recommended", "0.500", "0.500", "0.6100"]
    assert table[3].split()[-4:] == ["-", "-", "-", "-"]
    assert table[-1] == "lowest val/objective: recommended"


def test_online_runs_start_from_the_natural_mixture_with_the_natural_run_as_reference(sweep):
    natural = confirmation_configs(str(sweep), StorageConfig())["natural"]
    online = online_configs(natural, "/runs/my-sweep-confirm-natural")
    assert list(online) == ["doremi", "bandit"]
    for rule, config in online.items():
        assert (config.data.mixing, config.data.ratios) == (rule, natural.data.ratios)
        assert config.train.run_name == f"my-sweep-confirm-{rule}"
    assert online["doremi"].data.mixing_reference == "/runs/my-sweep-confirm-natural"
