"""Ratio validation and the kind sampler (pure; the pretrain job validates before starting workers)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.mixing import SourceSampler, validate_ratios

ALL = ("image_text", "image", "text")


def test_validate_ratios_normalises_in_fixed_order():
    assert validate_ratios({"text": 1, "image_text": 3, "image": 0}, ALL) == {
        "image_text": 0.75,
        "text": 0.25,
    }
    assert validate_ratios({"text": 2.0}, ["text"]) == {"text": 1.0}


@pytest.mark.parametrize(
    "ratios,message",
    [
        ("{image_text: -1, text: 1}", "non-negative"),
        ("{image_text: .nan, image: 1, text: 1}", "non-negative"),
        ("{image_text: 0, image: 0, text: 0}", "all ratios are zero"),
        ("{images: 1}", "unknown kind"),
    ],
)
def test_ratios_wrong_on_their_own_fail_at_load(ratios, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"data.ratios={ratios}"])


@pytest.mark.parametrize(
    "ratios,configured,message",
    [
        ({"image_text": 1}, ["image_text", "text"], r"no ratio for configured train dataset\(s\) \['text'\]"),
        ({"image_text": 1, "text": 1}, ["text"], r"\['image_text'\] have ratio > 0 but no train dataset"),
    ],
)
def test_ratios_that_do_not_fit_the_datasets_fail_pre_flight(ratios, configured, message):
    with pytest.raises(ValueError, match=message):
        validate_ratios(ratios, configured)


def test_sampler_follows_ratios_and_restores_its_sequence():
    ratios = {"image_text": 0.5, "image": 0.3, "text": 0.2}
    a, b = SourceSampler(ratios, 3), SourceSampler(ratios, 3)
    first = [next(a) for _ in range(4000)]
    assert first == [next(b) for _ in range(4000)]
    for kind, p in ratios.items():  # binomial sd <= 0.008 at n=4000: 0.03 is > 3.5 sd
        assert abs(first.count(kind) / 4000 - p) < 0.03
    state = a.state_dict()
    ahead = [next(a) for _ in range(50)]
    c = SourceSampler(ratios, 99)
    c.load_state_dict(state)
    assert [next(c) for _ in range(50)] == ahead and c.steps == 4050
    with pytest.raises(ValueError, match="sampler state is for sources"):
        SourceSampler({"text": 1.0}, 3).load_state_dict(state)


def test_zero_ratio_kind_is_never_drawn():
    s = SourceSampler(validate_ratios({"image_text": 1, "image": 0, "text": 1}, ALL), 0)
    assert set(np.unique([next(s) for _ in range(500)])) == {"image_text", "text"}
