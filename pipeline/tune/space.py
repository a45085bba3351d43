"""The search space: mixing ratios on the probability simplex, plus optional learning rates.

Ratios only matter up to scale, so trials sample normalised weights directly instead of independent
per-kind numbers (which would waste trials on rescaled copies of the same mix). Kinds left out of the
sweep are pinned at ratio 0, which the data stream accepts without needing their data.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search.sample import BaseSampler, Domain

from pipeline.config import KINDS, Config, ConfigError


class _DirichletSampler(BaseSampler):
    """Draws from the Dirichlet with the searcher's generator, so a seeded sweep repeats its trials."""

    def sample(self, domain: Simplex, config=None, size: int = 1, random_state=None):
        alphas = domain.alphas(random_state, size)
        items = [domain.to_ratios(random_state.dirichlet(alpha)) for alpha in alphas]
        return items if size > 1 else items[0]


class Simplex(Domain):
    """Tune domain whose value is a ratios dict: a Dirichlet over ``kinds``, 0 for ``zero_kinds``.

    Symmetric Dirichlet(``alpha``) by default. With ``natural`` (RegMix, Liu et al. 2024) each draw is
    Dirichlet(c x natural) around the kinds' natural share, its concentration ``c`` log-uniform over
    ``concentration``: small ``c`` lands near corners and edges, large ``c`` near the natural mixture."""

    default_sampler_cls = _DirichletSampler

    def __init__(
        self,
        kinds: list[str],
        alpha: float = 1.0,
        zero_kinds: tuple[str, ...] = (),
        natural: list[float] | None = None,
        concentration: tuple[float, float] = (1.0, 1.0),
    ):
        if not kinds:
            raise ConfigError("tune.kinds: the simplex needs at least one kind")
        self.kinds = list(kinds)
        self.alpha = float(alpha)
        self.zero_kinds = tuple(zero_kinds)
        self.natural = None if natural is None else np.asarray(natural, dtype=float) / sum(natural)
        self.concentration = concentration

    def alphas(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """The Dirichlet parameters of ``size`` draws, one row each."""
        if self.natural is None:
            return np.full((size, len(self.kinds)), self.alpha)
        low, high = np.log(self.concentration)
        return np.exp(rng.uniform(low, high, size=(size, 1))) * self.natural

    def to_ratios(self, weights) -> dict[str, float]:
        ratios = {k: 0.0 for k in KINDS if k in self.kinds or k in self.zero_kinds}
        ratios.update({k: float(w) for k, w in zip(self.kinds, weights, strict=True)})
        return ratios

    def is_valid(self, value: Any) -> bool:
        if not isinstance(value, dict) or set(value) != set(self.kinds) | set(self.zero_kinds):
            return False
        weights = np.array(list(value.values()), dtype=float)
        return bool((weights >= 0).all() and np.isclose(weights.sum(), 1.0))

    @property
    def domain_str(self) -> str:
        if self.natural is None:
            return f"Dirichlet(alpha={self.alpha}) over {self.kinds}"
        share = ", ".join(f"{k} {w:.3f}" for k, w in zip(self.kinds, self.natural, strict=True))
        return f"Dirichlet(c x natural share [{share}]), c log-uniform over {self.concentration}"


def simplex_grid(kinds: list[str], steps: int, zero_kinds: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """Every mix whose weights are multiples of 1/steps (faces and vertices included): C(steps+k-1, k-1)."""
    domain = Simplex(kinds, zero_kinds=zero_kinds)
    points = []
    # stars and bars: choose k-1 bar positions among steps+k-1 slots
    for bars in itertools.combinations(range(steps + len(kinds) - 1), len(kinds) - 1):
        edges = (-1, *bars, steps + len(kinds) - 1)
        counts = [edges[i + 1] - edges[i] - 1 for i in range(len(kinds))]
        points.append(domain.to_ratios([c / steps for c in counts]))
    return points


def swept_kinds(config: Config) -> tuple[list[str], tuple[str, ...]]:
    """(kinds on the simplex, kinds pinned at 0); defaults to every kind with a training dataset."""
    kinds = list(config.tune.kinds) or [k for k in KINDS if k in config.data.train]
    if not kinds:
        raise ConfigError("tune.kinds is empty and data.train names no dataset: nothing to sweep")
    missing = [k for k in kinds if k not in config.data.train]
    if missing:
        raise ConfigError(f"tune.kinds {missing} have no training dataset in data.train")
    zero = tuple(k for k in KINDS if k not in kinds and (k in config.data.ratios or k in config.data.train))
    return kinds, zero


def natural_share(config: Config, kinds: list[str]) -> list[float]:
    """The kinds' shares of the training rows, from their manifests: RegMix's prior mixture."""
    from pipeline.shards.format import read_manifest

    rows = [read_manifest(config.data.train[k], config.storage).rows for k in kinds]
    if not sum(rows):
        raise ConfigError(f"tune.search=regmix: the training datasets of {kinds} hold no rows")
    return [r / sum(rows) for r in rows]


def param_space(config: Config) -> dict[str, Any]:
    """The Tuner's param_space: ``ratios`` (always) and ``lr`` (when tune.lr_choices is set)."""
    tc = config.tune
    kinds, zero = swept_kinds(config)
    space: dict[str, Any] = {}
    if tc.search in ("random", "regmix"):
        natural = natural_share(config, kinds) if tc.search == "regmix" else None
        concentration = (tc.regmix_concentration_min, tc.regmix_concentration_max)
        space["ratios"] = Simplex(kinds, tc.dirichlet_alpha, zero, natural, concentration)
        if tc.lr_choices:
            space["lr"] = tune.choice(list(tc.lr_choices))
    else:
        space["ratios"] = tune.grid_search(simplex_grid(kinds, tc.grid_steps, zero))
        if tc.lr_choices:
            space["lr"] = tune.grid_search(list(tc.lr_choices))
    return space


def num_trials(config: Config) -> int:
    """How many trials the space yields (grid points times repeats, or the number of draws)."""
    tc = config.tune
    if tc.search in ("random", "regmix"):
        return tc.num_samples
    kinds, _ = swept_kinds(config)
    grid = len(simplex_grid(kinds, tc.grid_steps))
    return grid * max(1, len(tc.lr_choices)) * tc.num_samples
