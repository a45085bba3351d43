"""Which kind of batch comes next: ratio validation and the rank-identical kind sampler (pure numpy)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.config import KINDS


def validate_ratios(ratios: dict[str, float], configured: Iterable[str]) -> dict[str, float]:
    """Normalised ratios of the kinds that get batches (ratio > 0), in the fixed ``KINDS`` order.

    ``configured`` are the kinds that have a train dataset. Every configured kind needs a ratio (so no
    dataset is ignored by accident), a kind with ratio > 0 needs a dataset, a kind with ratio 0 needs none.
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
        raise ValueError(f"data.ratios: kind(s) {missing} have ratio > 0 but no dataset under data.train")
    return {k: ratios[k] / total for k in KINDS if ratios.get(k, 0) > 0}


class KindSampler:
    """Draws the kind of every step from the ratios; seeded identically on every rank, checkpointable."""

    def __init__(self, ratios: dict[str, float], seed: int):
        self.kinds = tuple(ratios)
        self._p = np.array([ratios[k] for k in self.kinds], dtype=np.float64)
        self._p /= self._p.sum()
        self._rng = np.random.default_rng(seed)
        self.steps = 0

    def __next__(self) -> str:
        self.steps += 1
        return self.kinds[int(self._rng.choice(len(self.kinds), p=self._p))]

    def state_dict(self) -> dict:
        return {"kinds": list(self.kinds), "steps": self.steps, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["kinds"]) != self.kinds:
            raise ValueError(
                f"sampler state is for kinds {state['kinds']}, this stream mixes {list(self.kinds)}"
            )
        self.steps = state["steps"]
        self._rng.bit_generator.state = state["rng"]
