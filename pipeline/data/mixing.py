"""Which source the next batch comes from: ratio validation and the rank-identical sampler (pure numpy)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.config import KINDS, DataConfig

SOURCE_LOSSES = "source_losses.json"  # in a run's directory: its final loss per source (DoReMi's reference)


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

    def observe(self, source: str, loss: float) -> None:
        """Static ratios do not move (``AdaptiveMixing`` learns from the losses)."""

    def current(self) -> dict[str, float]:
        return dict(zip(self.sources, self._p.tolist(), strict=True))

    def state_dict(self) -> dict:
        return {"sources": list(self.sources), "steps": self.steps, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rule", "static") != "static":
            raise ValueError(f"the checkpoint mixes with data.mixing={state['rule']}, this run with static")
        saved = state.get("sources", state.get("kinds"))  # "kinds": checkpoints from before named sources
        if tuple(saved) != self.sources:
            raise ValueError(f"sampler state is for sources {saved}, this stream mixes {list(self.sources)}")
        self.steps = state["steps"]
        self._rng.bit_generator.state = state["rng"]


def doremi_update(weights: np.ndarray, excess: np.ndarray, step_size: float, smoothing: float) -> np.ndarray:
    """DoReMi's step (Xie et al. 2023): exponentiated gradient on the excess losses, then mixed with the
    uniform mixture so that no weight reaches 0: ``a = softmax(log w + step_size * excess)``,
    ``(1 - smoothing) * a + smoothing / k``."""
    logits = np.log(weights) + step_size * excess
    a = np.exp(logits - logits.max())
    a /= a.sum()
    return (1.0 - smoothing) * a + smoothing / len(a)


def exp3_probabilities(estimates: np.ndarray, rounds: int) -> np.ndarray:
    """EXP3 as Online Data Mixing uses it (Albalak et al. 2023): after ``rounds`` updates, exploration
    ``eps = min(1/k, sqrt(ln k / (k * rounds)))`` and ``p = (1 - k * eps) * softmax(eps * estimates) + eps``:
    every source keeps at least ``eps`` > 0."""
    k = len(estimates)
    eps = min(1.0 / k, math.sqrt(math.log(k) / (k * max(rounds, 1)))) if k > 1 else 0.0
    logits = eps * estimates
    w = np.exp(logits - logits.max())
    return (1.0 - k * eps) * w / w.sum() + eps


class AdaptiveMixing:
    """The online mixing policies (``data.mixing``): the source of each step is drawn from weights that
    every ``every`` steps move toward the sources the model still gets wrong.

    ``observe(source, loss)`` takes the step's training loss on one scale across kinds (each loss divided
    by its value at a uniform guess, ``pipeline.train.loop.normalized_loss``), the same on every rank
    (all-reduced). ``doremi``: per source the mean loss over the window, its excess over ``reference``
    (clipped at 0) drives ``doremi_update``; a source not drawn in a window keeps its last excess (counted
    in ``missing``). ``bandit``: EXP3 rewarded by the loss: each step updates the drawn source's estimate
    ``R <- decay * R + (1 - decay) * loss / p`` (importance-weighted, so rarely drawn sources are not
    undervalued), and every ``every`` steps the probabilities follow ``exp3_probabilities``.
    A NaN or infinite loss is an error naming the source: it would otherwise decide the weights.
    """

    def __init__(
        self,
        rule: str,
        initial: dict[str, float],
        seed: int,
        every: int,
        step_size: float = 1.0,
        smoothing: float = 1e-3,
        decay: float = 0.9,
        reference: dict[str, float] | None = None,
    ):
        if rule not in ("doremi", "bandit"):
            raise ValueError(f"unknown mixing rule {rule!r}")
        if rule == "doremi":
            missing = sorted(set(initial) - set(reference or {}))
            if missing:
                raise ValueError(f"data.mixing=doremi: no reference loss for source(s) {missing}")
        self.rule, self.every = rule, every
        self.step_size, self.smoothing, self.decay = step_size, smoothing, decay
        self.sources = tuple(initial)
        self.reference = np.array([(reference or {}).get(s, 0.0) for s in self.sources])
        p = np.array([initial[s] for s in self.sources], dtype=np.float64)
        self.weights = p / p.sum()
        self._rng = np.random.default_rng(seed)
        self.steps = 0
        self.rounds = 0  # weight updates so far
        self.estimates = np.zeros(len(self.sources))  # bandit: R; doremi: the last excess per source
        self._sums = np.zeros(len(self.sources))
        self._counts = np.zeros(len(self.sources), dtype=np.int64)
        self.weight_sum = np.zeros(len(self.sources))  # for the time-averaged weights
        self.missing = np.zeros(len(self.sources), dtype=np.int64)

    def __next__(self) -> str:
        self.steps += 1
        self.weight_sum += self.weights
        return self.sources[int(self._rng.choice(len(self.sources), p=self.weights))]

    def observe(self, source: str, loss: float) -> None:
        if not math.isfinite(loss):
            raise ValueError(f"data.mixing={self.rule}: the training loss of source {source!r} is {loss}")
        i = self.sources.index(source)
        if self.rule == "bandit":
            self.estimates[i] = self.decay * self.estimates[i] + (1 - self.decay) * loss / self.weights[i]
        self._sums[i] += loss
        self._counts[i] += 1
        if self.steps % self.every == 0:
            self._update()

    def _update(self) -> None:
        self.rounds += 1
        seen = self._counts > 0
        if self.rule == "doremi":
            mean = np.divide(self._sums, self._counts, out=np.zeros_like(self._sums), where=seen)
            self.estimates = np.where(seen, np.maximum(mean - self.reference, 0.0), self.estimates)
            self.weights = doremi_update(self.weights, self.estimates, self.step_size, self.smoothing)
        else:
            self.weights = exp3_probabilities(self.estimates, self.rounds)
        self.missing += ~seen
        self._sums[:] = 0.0
        self._counts[:] = 0

    def time_averaged(self) -> dict[str, float]:
        """The mean of the weights over the steps drawn so far: DoReMi's output mixture."""
        mean = self.weight_sum / max(self.steps, 1)
        return dict(zip(self.sources, (mean / mean.sum()).tolist(), strict=True))

    def current(self) -> dict[str, float]:
        return dict(zip(self.sources, self.weights.tolist(), strict=True))

    _ARRAYS = ("weights", "estimates", "_sums", "_counts", "weight_sum", "missing")

    def state_dict(self) -> dict:
        return {
            "rule": self.rule,
            "sources": list(self.sources),
            "steps": self.steps,
            "rounds": self.rounds,
            "rng": self._rng.bit_generator.state,
            **{name: getattr(self, name).tolist() for name in self._ARRAYS},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("rule") != self.rule or tuple(state["sources"]) != self.sources:
            raise ValueError(
                f"mixing state is for {state.get('rule', 'static')} over {state['sources']}, this run mixes "
                f"{list(self.sources)} with {self.rule}"
            )
        self.steps, self.rounds = state["steps"], state["rounds"]
        self._rng.bit_generator.state = state["rng"]
        for name in self._ARRAYS:
            setattr(self, name, np.array(state[name], dtype=getattr(self, name).dtype))


@dataclass(frozen=True)
class MixingSpec:
    """``data.mixing*`` as the workers need it, with the reference losses read on the driver."""

    rule: str = "static"
    every: int = 10
    step_size: float = 1.0
    smoothing: float = 1e-3
    decay: float = 0.9
    reference: dict[str, float] | None = None

    def policy(self, ratios: dict[str, float], seed: int) -> SourceSampler | AdaptiveMixing:
        if self.rule == "static":
            return SourceSampler(ratios, seed)
        return AdaptiveMixing(
            self.rule, ratios, seed, self.every, self.step_size, self.smoothing, self.decay, self.reference
        )


def mixing_spec(data: DataConfig, reference: dict[str, float] | None = None) -> MixingSpec:
    return MixingSpec(
        data.mixing,
        data.mixing_every,
        data.mixing_step_size,
        data.mixing_smoothing,
        data.mixing_decay,
        reference,
    )
