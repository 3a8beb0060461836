"""Weightings: uniform reproduces the unweighted objective; prior-based weights are mean 1 with a floor outside K."""

from __future__ import annotations

import pytest
import torch

from fair_calib.prior.position_prior import PositionPrior
from fair_calib.registry import ConfigError, build
from fair_calib.weighting.weights import Fair, Frontier, PositionWeight, Reliability, Uniform

# F raw [1, 2, 3, 2] -> F / mean = [.5, 1, 1.5, 1];  R raw [4, 4, 0, 0] -> R / mean = [2, 2, 0, 0]
PRIOR = PositionPrior(torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([4.0, 4.0, 0.0, 0.0]), n_rollouts=1)

# two sequences: prompt (-1), answer offsets 0..5 (4 and 5 are beyond K = 4); row 1 is left-padded
OFFSETS = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5],
                        [-1, -1, -1, 0, 1, 2, 3, 4]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1],
                     [0, 1, 1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize("prior", [None, PRIOR])
def test_uniform_is_ones_with_padding_zero(prior):
    w = Uniform().token_weights(OFFSETS, MASK, prior)
    assert w.dtype == torch.float32
    assert torch.equal(w, MASK.float())
    assert torch.equal(Uniform().token_weights(OFFSETS, None, prior), torch.ones(2, 8))
    assert Uniform().position_weight(prior)(torch.tensor([-1, 0, 99])).tolist() == [1.0, 1.0, 1.0]


def test_uniform_position_weights():
    assert Uniform().position_weights(PRIOR).tolist() == [1.0] * 4
    assert Uniform().position_weights(None, window=3).tolist() == [1.0] * 3


def test_frontier_floor_outside_window_and_padding_zero():
    w = Frontier(floor=0.05).token_weights(OFFSETS, MASK, PRIOR)
    expected = torch.tensor([[0.05, 0.05, 0.5, 1.0, 1.5, 1.0, 0.05, 0.05],
                             [0.0, 0.05, 0.05, 0.5, 1.0, 1.5, 1.0, 0.05]])
    assert torch.allclose(w, expected)
    w = Frontier(floor=0.2).token_weights(OFFSETS, None, PRIOR)
    assert w[0, :2].tolist() == pytest.approx([0.2, 0.2]) and w[0, 6:].tolist() == pytest.approx([0.2, 0.2])


def test_reliability_zero_weight_positions_stay_zero_inside_window():
    w = Reliability().token_weights(OFFSETS, MASK, PRIOR)
    # R / mean = [2, 2, 0, 0]: zero-weight positions inside the window get 0, not the floor
    assert w[0].tolist() == pytest.approx([0.05, 0.05, 2.0, 2.0, 0.0, 0.0, 0.05, 0.05])
    assert w[1, 0].item() == 0.0


def test_fair_is_normalized_mix_of_normalized_maps():
    # alpha = beta = 1: [.5 + 2, 1 + 2, 1.5 + 0, 1 + 0] = [2.5, 3, 1.5, 1], mean 2
    assert Fair().position_weights(PRIOR).tolist() == pytest.approx([1.25, 1.5, 0.75, 0.5])
    # alpha 2, beta 1: [3, 4, 3, 2], mean 3
    assert Fair(alpha=2.0, beta=1.0).position_weights(PRIOR).tolist() == pytest.approx([1.0, 4 / 3, 1.0, 2 / 3])
    # beta = 0 is frontier, alpha = 0 is reliability
    assert torch.allclose(Fair(alpha=1.0, beta=0.0).position_weights(PRIOR), Frontier().position_weights(PRIOR))
    assert torch.allclose(Fair(alpha=0.0, beta=3.0).position_weights(PRIOR), Reliability().position_weights(PRIOR))


@pytest.mark.parametrize("weighting", [Frontier(), Reliability(), Fair(), Fair(alpha=0.3, beta=2.0)])
def test_mean_one_over_window(weighting):
    g = torch.Generator().manual_seed(0)
    prior = PositionPrior(torch.rand(32, generator=g) * 100, torch.rand(32, generator=g) * 7, n_rollouts=4)
    w = weighting.position_weights(prior)
    assert w.shape == (32,) and w.dtype == torch.float32
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert (w >= 0).all()
    # token weights on answer offsets 0..K-1 reproduce the window weights
    tw = weighting.token_weights(torch.arange(32)[None], torch.ones(1, 32), prior)
    assert torch.equal(tw[0], w)


def test_position_weight_view_matches_token_weights():
    view = Fair().position_weight(PRIOR)
    assert isinstance(view, PositionWeight) and view.window == 4
    assert torch.equal(view(OFFSETS), Fair().token_weights(OFFSETS, None, PRIOR))
    assert view(torch.tensor(-1)).item() == pytest.approx(0.05)


@pytest.mark.parametrize("name", ["frontier", "reliability", "fair"])
def test_non_uniform_without_prior_is_config_error(name):
    w = build("weighting", {"name": name})
    with pytest.raises(ConfigError, match=f"weighting={name} needs a prior: set prior=fair"):
        w.token_weights(OFFSETS, MASK, None)


def test_all_zero_map_is_an_error():
    prior = PositionPrior(torch.ones(4), torch.zeros(4), n_rollouts=1)
    with pytest.raises(ValueError, match="all zero"):
        Reliability().position_weights(prior)


def test_registry_and_config_checks():
    assert isinstance(build("weighting", {"name": "uniform", "floor": 0.05}), Uniform)
    fair = build("weighting", {"name": "fair", "alpha": 2.0, "beta": 0.5, "floor": 0.1})
    assert (fair.alpha, fair.beta, fair.floor) == (2.0, 0.5, 0.1)
    with pytest.raises(ConfigError):
        Fair(alpha=-1.0)
    with pytest.raises(ConfigError):
        Fair(alpha=0.0, beta=0.0)
    with pytest.raises(ConfigError):
        Frontier(floor=-0.1)


@pytest.mark.parametrize("weighting", [Uniform(), Frontier(), Reliability(), Fair(alpha=0.3, beta=2.0)])
def test_calibration_weights_of_prior_weightings_are_their_token_weights(weighting):
    """The pipeline's call (calib, prior, teacher) gives the prior-based weightings' numbers unchanged, no teacher."""
    from fair_calib.data.calibration import CalibrationSet

    calib = CalibrationSet(torch.zeros(2, 8, dtype=torch.long), MASK, OFFSETS, ["a", "b"])
    w = weighting.calibration_weights(calib, PRIOR, teacher=None)
    assert torch.equal(w, weighting.token_weights(OFFSETS, MASK, PRIOR))
    assert not weighting.needs_teacher and weighting.summary(calib, w) == {}
