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
        draws = random_state.dirichlet([domain.alpha] * len(domain.kinds), size=size)
        items = [domain.to_ratios(row) for row in draws]
        return items if size > 1 else items[0]


class Simplex(Domain):
    """Tune domain whose value is a ratios dict: Dirichlet(alpha) over ``kinds``, 0 for ``zero_kinds``."""

    default_sampler_cls = _DirichletSampler

    def __init__(self, kinds: list[str], alpha: float = 1.0, zero_kinds: tuple[str, ...] = ()):
        if not kinds:
            raise ConfigError("tune.kinds: the simplex needs at least one kind")
        self.kinds = list(kinds)
        self.alpha = float(alpha)
        self.zero_kinds = tuple(zero_kinds)

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
        return f"Dirichlet(alpha={self.alpha}) over {self.kinds}"


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


def param_space(config: Config) -> dict[str, Any]:
    """The Tuner's param_space: ``ratios`` (always) and ``lr`` (when tune.lr_choices is set)."""
    tc = config.tune
    kinds, zero = swept_kinds(config)
    space: dict[str, Any] = {}
    if tc.search == "random":
        space["ratios"] = Simplex(kinds, tc.dirichlet_alpha, zero)
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
    if tc.search == "random":
        return tc.num_samples
    kinds, _ = swept_kinds(config)
    grid = len(simplex_grid(kinds, tc.grid_steps))
    return grid * max(1, len(tc.lr_choices)) * tc.num_samples
