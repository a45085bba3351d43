"""The search space: mixing ratios on the probability simplex, plus optional learning rates.

Ratios (over data sources: named, or one per kind) only matter up to scale, so trials sample normalised
weights directly instead of independent per-source numbers (which would waste trials on rescaled copies of
the same mix). Sources left out of the sweep are pinned at ratio 0, which the data stream accepts without
needing their data.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search.sample import BaseSampler, Domain

from pipeline.config import Config, ConfigError


class _DirichletSampler(BaseSampler):
    """Draws from the Dirichlet with the searcher's generator, so a seeded sweep repeats its trials."""

    def sample(self, domain: Simplex, config=None, size: int = 1, random_state=None):
        alphas = domain.alphas(random_state, size)
        items = [domain.to_ratios(random_state.dirichlet(alpha)) for alpha in alphas]
        return items if size > 1 else items[0]


class Simplex(Domain):
    """Tune domain whose value is a ratios dict: a Dirichlet over ``sources``, 0 for ``zero_sources``.

    Symmetric Dirichlet(``alpha``) by default. With ``natural`` (RegMix, Liu et al. 2024) each draw is
    Dirichlet(c x natural) around the sources' natural share, its concentration ``c`` log-uniform over
    ``concentration``: small ``c`` lands near corners and edges, large ``c`` near the natural mixture."""

    default_sampler_cls = _DirichletSampler

    def __init__(
        self,
        sources: list[str],
        alpha: float = 1.0,
        zero_sources: tuple[str, ...] = (),
        natural: list[float] | None = None,
        concentration: tuple[float, float] = (1.0, 1.0),
    ):
        if not sources:
            raise ConfigError("tune.sources: the simplex needs at least one source")
        self.sources = list(sources)
        self.alpha = float(alpha)
        self.zero_sources = tuple(zero_sources)
        self.natural = None if natural is None else np.asarray(natural, dtype=float) / sum(natural)
        self.concentration = concentration

    def alphas(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """The Dirichlet parameters of ``size`` draws, one row each."""
        if self.natural is None:
            return np.full((size, len(self.sources)), self.alpha)
        low, high = np.log(self.concentration)
        return np.exp(rng.uniform(low, high, size=(size, 1))) * self.natural

    def to_ratios(self, weights) -> dict[str, float]:
        return {
            **{k: float(w) for k, w in zip(self.sources, weights, strict=True)},
            **dict.fromkeys(self.zero_sources, 0.0),
        }

    def is_valid(self, value: Any) -> bool:
        if not isinstance(value, dict) or set(value) != set(self.sources) | set(self.zero_sources):
            return False
        weights = np.array(list(value.values()), dtype=float)
        return bool((weights >= 0).all() and np.isclose(weights.sum(), 1.0))

    @property
    def domain_str(self) -> str:
        if self.natural is None:
            return f"Dirichlet(alpha={self.alpha}) over {self.sources}"
        share = ", ".join(f"{k} {w:.3f}" for k, w in zip(self.sources, self.natural, strict=True))
        return f"Dirichlet(c x natural share [{share}]), c log-uniform over {self.concentration}"


def simplex_grid(
    sources: list[str], steps: int, zero_sources: tuple[str, ...] = ()
) -> list[dict[str, float]]:
    """Every mix whose weights are multiples of 1/steps (faces and vertices included): C(steps+k-1, k-1)."""
    domain = Simplex(sources, zero_sources=zero_sources)
    points = []
    # stars and bars: choose k-1 bar positions among steps+k-1 slots
    for bars in itertools.combinations(range(steps + len(sources) - 1), len(sources) - 1):
        edges = (-1, *bars, steps + len(sources) - 1)
        counts = [edges[i + 1] - edges[i] - 1 for i in range(len(sources))]
        points.append(domain.to_ratios([c / steps for c in counts]))
    return points


def swept_sources(config: Config) -> tuple[list[str], tuple[str, ...]]:
    """(sources on the simplex, sources pinned at 0), in config order; defaults to every source with a
    training dataset."""
    trainable = [name for name, s in config.data.named_sources().items() if s.train]
    unknown = [k for k in config.tune.sources if k not in config.data.named_sources()]
    if unknown:
        raise ConfigError(f"tune.sources {unknown}: no such data source; the sources are {trainable}")
    missing = [k for k in config.tune.sources if k not in trainable]
    if missing:
        raise ConfigError(f"tune.sources {missing} have no training dataset")
    swept = [k for k in trainable if k in config.tune.sources] if config.tune.sources else trainable
    if not swept:
        raise ConfigError("no data source has a training dataset: nothing to sweep")
    zero = tuple(
        k
        for k in config.data.named_sources()
        if k not in swept and (k in config.data.ratios or k in trainable)
    )
    return swept, zero


def natural_share(config: Config, sources: list[str]) -> list[float]:
    """The sources' shares of the training rows, from their manifests: RegMix's prior mixture."""
    from pipeline.shards.format import read_manifest

    named = config.data.named_sources()
    rows = [read_manifest(named[k].train, config.storage).rows for k in sources]
    if not sum(rows):
        raise ConfigError(f"tune.search=regmix: the training datasets of {sources} hold no rows")
    return [r / sum(rows) for r in rows]


def param_space(config: Config) -> dict[str, Any]:
    """The Tuner's param_space: ``ratios`` (always) and ``lr`` (when tune.lr_choices is set)."""
    tc = config.tune
    sources, zero = swept_sources(config)
    space: dict[str, Any] = {}
    if tc.search in ("random", "regmix"):
        natural = natural_share(config, sources) if tc.search == "regmix" else None
        concentration = (tc.regmix_concentration_min, tc.regmix_concentration_max)
        space["ratios"] = Simplex(sources, tc.dirichlet_alpha, zero, natural, concentration)
        if tc.lr_choices:
            space["lr"] = tune.choice(list(tc.lr_choices))
    else:
        space["ratios"] = tune.grid_search(simplex_grid(sources, tc.grid_steps, zero))
        if tc.lr_choices:
            space["lr"] = tune.grid_search(list(tc.lr_choices))
    return space


def num_trials(config: Config) -> int:
    """How many trials the space yields (grid points times repeats, or the number of draws)."""
    tc = config.tune
    if tc.search in ("random", "regmix"):
        return tc.num_samples
    sources, _ = swept_sources(config)
    grid = len(simplex_grid(sources, tc.grid_steps))
    return grid * max(1, len(tc.lr_choices)) * tc.num_samples
