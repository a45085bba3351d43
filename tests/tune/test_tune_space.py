"""The search space on the simplex: valid mixes, pinned kinds, grid size, seeded reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ray.tune.search.variant_generator import generate_variants

from pipeline.config import ConfigError, load_config
from pipeline.tune.space import Simplex, num_trials, param_space, simplex_grid, swept_sources

THREE = "data.train={image_text: /d/it, image: /d/im, text: /d/tx}"


def variants(config, seed):
    """What Tune's BasicVariantGenerator expands: the space once per sample, one generator throughout."""
    rng = np.random.default_rng(seed)
    space = param_space(config)
    return [r for _ in range(config.tune.num_samples) for _, r in generate_variants(space, random_state=rng)]


def assert_on_simplex(ratios: dict[str, float], pinned=()):
    assert all(v >= 0 for v in ratios.values())
    assert math.isclose(sum(ratios.values()), 1.0, rel_tol=1e-9)
    assert all(ratios[k] == 0.0 for k in pinned)


def test_dirichlet_draws_are_mixes_and_repeat_with_the_seed():
    domain = Simplex(["image_text", "image", "text"], alpha=1.0)
    draws = domain.sample(size=200, random_state=7)
    assert len(draws) == 200
    for ratios in draws:
        assert list(ratios) == ["image_text", "image", "text"]
        assert_on_simplex(ratios)
    assert draws == domain.sample(size=200, random_state=7)
    assert draws != domain.sample(size=200, random_state=8)
    # a flat Dirichlet has mean 1/k per kind
    mean = np.array([list(r.values()) for r in draws]).mean(0)
    assert np.allclose(mean, 1 / 3, atol=0.06)


def test_small_alpha_pushes_mass_to_the_corners():
    sparse = Simplex(["image_text", "image", "text"], alpha=0.1).sample(size=300, random_state=0)
    flat = Simplex(["image_text", "image", "text"], alpha=1.0).sample(size=300, random_state=0)
    assert np.mean([max(r.values()) for r in sparse]) > np.mean([max(r.values()) for r in flat]) + 0.2


def test_regmix_draws_centre_on_the_natural_share_with_log_uniform_concentration():
    natural = [0.6, 0.3, 0.1]
    domain = Simplex(["image_text", "image", "text"], natural=natural, concentration=(0.3, 30.0))
    alphas = domain.alphas(np.random.default_rng(0), 4000)
    assert np.allclose(alphas / alphas.sum(1, keepdims=True), natural)  # every draw aims at the share
    log_c = np.log(alphas.sum(1))
    assert log_c.min() >= np.log(0.3) and log_c.max() <= np.log(30.0)
    # log-uniform: each quarter of the log range holds about a quarter of the draws
    quarters = np.histogram(log_c, bins=4, range=(np.log(0.3), np.log(30.0)))[0] / len(log_c)
    assert np.allclose(quarters, 0.25, atol=0.03)
    draws = np.array([list(r.values()) for r in domain.sample(size=3000, random_state=1)])
    assert np.allclose(draws.mean(0), natural, atol=0.03)  # a Dirichlet's mean is its normalised alpha
    assert (draws.max(1) > 0.95).mean() > 0.1  # near-corner mixtures
    assert (np.abs(draws - natural).sum(1) < 0.2).mean() > 0.1  # near-natural ones


def test_regmix_space_takes_the_natural_share_from_the_manifests(tmp_path):
    from pipeline.config import StorageConfig
    from pipeline.data.synthetic import write_synthetic_dataset

    for kind, rows in (("image_text", 48), ("image", 32), ("text", 16)):
        write_synthetic_dataset(str(tmp_path / kind), kind, rows, 2, 32, StorageConfig())
    train = "{" + ", ".join(f"{k}: {tmp_path / k}" for k in ("image_text", "image", "text")) + "}"
    domain = param_space(load_config(None, [f"data.train={train}", "tune.search=regmix"]))["ratios"]
    assert np.allclose(domain.natural, [0.5, 1 / 3, 1 / 6])
    assert "natural share" in domain.domain_str


def test_regmix_over_named_sources_centres_on_their_row_shares(tmp_path):
    """Five sources of three kinds: the simplex is over the sources, its prior their rows' shares."""
    import json

    from pipeline.config import StorageConfig
    from pipeline.data.synthetic import write_synthetic_dataset

    rows = {"pairs-a": ("image_text", 40), "pairs-b": ("image_text", 10), "clip": ("image", 20)}
    rows |= {"gloss": ("text", 20), "news": ("text", 10)}
    for name, (kind, n) in rows.items():
        write_synthetic_dataset(str(tmp_path / name), kind, n, 2, 32, StorageConfig())
    sources = {name: {"kind": kind, "train": str(tmp_path / name)} for name, (kind, _) in rows.items()}
    config = load_config(
        None,
        [
            f"data.sources={json.dumps(sources)}",
            f"data.ratios={json.dumps(dict.fromkeys(rows, 1))}",
            "tune.search=regmix",
            "tune.sources=[pairs-a, pairs-b, clip, gloss]",
            "tune.num_samples=400",
        ],
    )
    assert swept_sources(config) == (["pairs-a", "pairs-b", "clip", "gloss"], ("news",))
    domain = param_space(config)["ratios"]
    natural = np.array([40, 10, 20, 20]) / 90  # the rows of the swept sources
    assert np.allclose(domain.natural, natural)
    out = variants(config, seed=0)
    assert all(set(r["ratios"]) == set(rows) for r in out)
    for r in out:
        assert_on_simplex(r["ratios"], pinned=("news",))
    mean = np.array([[r["ratios"][k] for k in ("pairs-a", "pairs-b", "clip", "gloss")] for r in out]).mean(0)
    assert np.allclose(mean, natural, atol=0.05)


def test_sources_left_out_are_pinned_at_zero():
    config = load_config(None, [THREE, "tune.sources=[image_text, text]", "tune.num_samples=5"])
    swept, pinned = swept_sources(config)
    assert (swept, pinned) == (["image_text", "text"], ("image",))
    out = variants(config, seed=0)
    assert len(out) == 5
    for resolved in out:
        assert set(resolved["ratios"]) == {"image_text", "image", "text"}
        assert_on_simplex(resolved["ratios"], pinned=("image",))


def test_default_sources_are_those_with_training_data():
    config = load_config(None, ["data.train={image: /d/im, text: /d/tx}", "data.ratios={image: 1, text: 1}"])
    assert swept_sources(config) == (["image", "text"], ())


@pytest.mark.parametrize("kinds", [1, 2, 3, 4])
@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_grid_covers_every_multiple_of_one_over_steps(kinds, steps):
    names = [f"kind{i}" for i in range(kinds)]  # the simplex itself works for any number of kinds
    points = simplex_grid(names, steps)
    assert len(points) == math.comb(steps + kinds - 1, kinds - 1)
    assert len({tuple(p.values()) for p in points}) == len(points)
    for p in points:
        assert list(p) == names
        assert_on_simplex(p)
        assert all(math.isclose(v * steps, round(v * steps)) for v in p.values())


def test_grid_includes_vertices_and_the_centre():
    points = simplex_grid(["image_text", "image", "text"], 3)
    assert {"image_text": 1.0, "image": 0.0, "text": 0.0} in points
    assert any(all(math.isclose(v, 1 / 3) for v in p.values()) for p in points)


def test_grid_search_space_with_lr_choices():
    grid = ["tune.search=grid", "tune.grid_steps=2", "tune.lr_choices=[0.001, 0.0003]", "tune.num_samples=1"]
    config = load_config(None, [THREE, *grid])
    out = variants(config, seed=0)
    assert len(out) == num_trials(config) == 6 * 2
    assert {r["lr"] for r in out} == {0.001, 0.0003}
    assert len({(tuple(r["ratios"].values()), r["lr"]) for r in out}) == 12


def test_random_space_samples_lr_from_the_choices():
    config = load_config(None, [THREE, "tune.num_samples=20", "tune.lr_choices=[0.1, 0.2]"])
    out = variants(config, seed=3)
    assert len(out) == num_trials(config) == 20
    assert {r["lr"] for r in out} == {0.1, 0.2}
    assert out == variants(config, seed=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tune.sources=[video]"], r"tune.sources \['video'\]: no such data source"),
        (["tune.sources=[text, text]"], "listed twice"),
        (["data.train={text: /d/tx}", "tune.sources=[image]"], "no such data source"),
        (
            ["data.train={text: /d/tx}", "data.val={image: /d/iv}", "tune.sources=[image]"],
            "no training dataset",
        ),
        (["data.train={}"], "nothing to sweep"),
        (["tune.search=bayes"], "tune.search"),
        (["tune.grid_steps=0", "tune.search=grid"], "grid_steps"),
        (["tune.dirichlet_alpha=0"], "dirichlet_alpha"),
        (["tune.regmix_concentration_min=5", "tune.regmix_concentration_max=1"], "regmix_concentration_max"),
        (["tune.lr_choices=[0.001, -1]"], "lr_choices"),
        (["tune.num_samples=0"], "num_samples"),
    ],
)
def test_bad_space_settings_name_the_key(overrides, message):
    """Values wrong on their own fail at load (pipeline.config), those wrong for the data in the sweep."""
    with pytest.raises(ConfigError, match=message):
        param_space(load_config(None, [THREE, *overrides]))
