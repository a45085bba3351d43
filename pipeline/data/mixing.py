"""Which source the next batch comes from: ratio validation and the rank-identical sampler (pure numpy)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.config import KINDS, DataConfig


def validate_ratios(
    ratios: dict[str, float], configured: Iterable[str], names: Sequence[str] = KINDS
) -> dict[str, float]:
    """Normalised ratios of the sources that get batches (ratio > 0), in the order of ``names``.

    ``configured`` are the sources that have a train dataset. Every configured source needs a ratio (so no
    dataset is ignored by accident), a source with ratio > 0 needs a dataset, one with ratio 0 needs none.
    """
    configured = set(configured)
    unmatched = sorted(configured - set(ratios))
    if unmatched:
        raise ValueError(
            f"data.ratios: no ratio for configured train dataset(s) {unmatched}; "
            "give each a ratio (0 to leave it out)"
        )
    total = sum(ratios.values())
    missing = sorted(k for k, v in ratios.items() if v > 0 and k not in configured)
    if missing:
        raise ValueError(f"data.ratios: source(s) {missing} have ratio > 0 but no train dataset")
    return {k: ratios[k] / total for k in names if ratios.get(k, 0) > 0}


def mixture(data: DataConfig) -> dict[str, float]:
    """The run's normalised ratios over its sources with train data (``validate_ratios`` of the config)."""
    sources = data.named_sources()
    return validate_ratios(data.ratios, [n for n, s in sources.items() if s.train], list(sources))


def seed_index(name: str) -> int:
    """A source's place in the seeds of its order and augmentation: a kind's index for a source named
    after its kind (so runs of one source per kind keep their seeds), else a stable hash of the name."""
    return KINDS.index(name) if name in KINDS else len(KINDS) + zlib.crc32(name.encode())


class SourceSampler:
    """Draws the source of every step from the ratios; seeded identically on every rank, checkpointable."""

    def __init__(self, ratios: dict[str, float], seed: int):
        self.sources = tuple(ratios)
        self._p = np.array([ratios[k] for k in self.sources], dtype=np.float64)
        self._p /= self._p.sum()
        self._rng = np.random.default_rng(seed)
        self.steps = 0

    def __next__(self) -> str:
        self.steps += 1
        return self.sources[int(self._rng.choice(len(self.sources), p=self._p))]

    def state_dict(self) -> dict:
        return {"sources": list(self.sources), "steps": self.steps, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        saved = (
            state["sources"] if "sources" in state else state["kinds"]
        )  # "kinds": checkpoints before sources
        if tuple(saved) != self.sources:
            raise ValueError(f"sampler state is for sources {saved}, this stream mixes {list(self.sources)}")
        self.steps = state["steps"]
        self._rng.bit_generator.state = state["rng"]
