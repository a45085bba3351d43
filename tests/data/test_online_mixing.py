"""The online mixing rules against hand-computed values, and the policy's guarantees: weights never reach
0, a missing source keeps its estimate, a bad loss is an error, the state resumes exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data.mixing import AdaptiveMixing, doremi_update, exp3_probabilities


def test_doremi_step_is_exponentiated_gradient_then_smoothing():
    # softmax(log 0.5 + [1, 0]) = [e, 1] / (e + 1)
    plain = doremi_update(np.array([0.5, 0.5]), np.array([1.0, 0.0]), step_size=1.0, smoothing=0.0)
    assert plain == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)])
    smoothed = doremi_update(np.array([0.5, 0.5]), np.array([1.0, 0.0]), step_size=1.0, smoothing=0.1)
    assert smoothed == pytest.approx([0.9 * 0.7310585786 + 0.05, 0.9 * 0.2689414214 + 0.05])


def test_exp3_probabilities_by_hand():
    # k = 3, 30 rounds: eps = sqrt(ln 3 / 90) = 0.110484; p = (1 - 3 eps) softmax(eps * R) + eps
    p = exp3_probabilities(np.array([2.0, 0.0, 1.0]), rounds=30)
    assert p == pytest.approx([0.3583567043, 0.3092139607, 0.3324293349])
    # early rounds explore uniformly: eps is capped at 1/k
    assert exp3_probabilities(np.array([5.0, 0.0, 0.0]), rounds=1) == pytest.approx([1 / 3] * 3)


def test_doremi_moves_weight_to_the_source_with_excess_loss_and_never_to_zero():
    policy = AdaptiveMixing(
        "doremi",
        {"a": 1, "b": 1, "c": 1},
        seed=0,
        every=4,
        step_size=5.0,
        smoothing=0.01,
        reference={"a": 0.5, "b": 0.5, "c": 0.5},
    )
    for _ in range(400):
        source = next(policy)
        policy.observe(source, {"a": 0.9, "b": 0.5, "c": 0.2}[source])  # only a is above its reference
    w = policy.current()
    assert w["a"] > 0.95 and min(w.values()) >= 0.01 / 3 - 1e-12  # smoothing keeps every source drawable
    assert policy.rounds == 100
    avg = policy.time_averaged()
    assert math.isclose(sum(avg.values()), 1.0) and w["a"] > avg["a"] > 1 / 3


def test_a_source_missing_from_a_window_keeps_its_last_excess():
    policy = AdaptiveMixing(
        "doremi", {"a": 1, "b": 1}, seed=0, every=2, step_size=1.0, smoothing=0.0, reference={"a": 0, "b": 0}
    )
    for source, loss in (("a", 1.0), ("b", 3.0)):  # window 1: both seen
        next(policy)
        policy.observe(source, loss)
    assert policy.estimates == pytest.approx([1.0, 3.0])
    before = policy.weights.copy()
    for _ in range(2):  # window 2: only a
        next(policy)
        policy.observe("a", 2.0)
    assert policy.estimates == pytest.approx([2.0, 3.0]) and policy.missing.tolist() == [0, 1]
    expected = doremi_update(before, np.array([2.0, 3.0]), 1.0, 0.0)
    assert policy.weights == pytest.approx(expected)


def test_bandit_estimates_are_importance_weighted_and_its_floor_is_eps():
    policy = AdaptiveMixing("bandit", {"a": 3, "b": 1}, seed=0, every=1, decay=0.5)
    next(policy)
    policy.observe("b", 0.8)  # p(b) = 0.25 when drawn: R_b = 0.5 * 0 + 0.5 * 0.8 / 0.25
    assert policy.estimates == pytest.approx([0.0, 1.6])
    assert policy.weights == pytest.approx(exp3_probabilities(np.array([0.0, 1.6]), 1))
    for _ in range(500):
        source = next(policy)
        policy.observe(source, {"a": 0.1, "b": 2.0}[source])
    eps = math.sqrt(math.log(2) / (2 * policy.rounds))
    assert policy.current()["b"] > policy.current()["a"] >= eps - 1e-12


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_is_an_error_naming_the_source(bad):
    policy = AdaptiveMixing("bandit", {"web": 1, "books": 1}, seed=0, every=1)
    next(policy)
    with pytest.raises(ValueError, match="source 'books'"):
        policy.observe("books", bad)


def test_doremi_needs_a_reference_for_every_source():
    with pytest.raises(ValueError, match=r"no reference loss for source\(s\) \['b'\]"):
        AdaptiveMixing("doremi", {"a": 1, "b": 1}, seed=0, every=1, reference={"a": 1.0})


@pytest.mark.parametrize("rule", ["doremi", "bandit"])
def test_the_state_resumes_the_same_draws_and_weights(rule):
    losses = {"a": 0.7, "b": 0.4, "c": 0.9}

    def make():
        ref = dict.fromkeys(losses, 0.3)
        return AdaptiveMixing(rule, {"a": 2, "b": 1, "c": 1}, seed=3, every=5, reference=ref)

    def run(policy, steps):
        out = []
        for _ in range(steps):
            out.append(next(policy))
            policy.observe(out[-1], losses[out[-1]])
        return out

    unfaulted, resumed = make(), make()
    first = run(unfaulted, 37)
    assert run(resumed, 37) == first
    state = resumed.state_dict()
    fresh = make()
    fresh.load_state_dict(state)
    assert run(fresh, 60) == run(unfaulted, 60)
    assert fresh.weights.tolist() == unfaulted.weights.tolist()
    assert fresh.time_averaged() == unfaulted.time_averaged()
