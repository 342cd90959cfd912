"""Advantages and dynamic sampling on rewards small enough to work by hand."""

import math

import pytest
import torch

from npr.train.advantages import (
    ADVANTAGE_KINDS,
    batch_std_normalized,
    compute_advantages,
    dynamic_sampling_mask,
    group_normalized,
    mean_centered,
)


def test_group_normalized_by_hand():
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0])
    # group (1, -1): mean 0, Bessel std sqrt(2); group (1, 1): constant, advantage 0 (not nan)
    torch.testing.assert_close(
        group_normalized(rewards, 2), torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2), 0.0, 0.0])
    )


def test_group_normalized_with_uneven_group_ids():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 5.0])
    ids = torch.tensor([7, 7, 7, 3, 3, 9])
    # group 7: mean 1/3, deviations (2/3, -1/3, -1/3), Bessel variance (4/9 + 1/9 + 1/9) / 2 = 1/3
    std = math.sqrt(1 / 3)
    expected = torch.tensor([(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_normalized(rewards, ids), expected)


def test_batch_std_is_computed_once_over_the_batch():
    # group A (1, -1) and group B (1, 0): group stds differ (sqrt 2 vs sqrt 0.5), batch std is one number
    rewards = torch.tensor([1.0, -1.0, 1.0, 0.0])
    batch_std = rewards.std()  # mean 1/4; Σ dev² = 9/16 + 25/16 + 9/16 + 1/16 = 11/4; / 3 → 11/12
    torch.testing.assert_close(batch_std, torch.tensor(math.sqrt(11 / 12)))
    centered = torch.tensor([1.0, -1.0, 0.5, -0.5])
    got = batch_std_normalized(rewards, 2)
    torch.testing.assert_close(got, centered / (math.sqrt(11 / 12) + 1e-6))
    # every group shares the scale: group-std normalisation would give ±0.7071 in both groups instead
    torch.testing.assert_close(got / centered, torch.full((4,), 1 / (math.sqrt(11 / 12) + 1e-6)))
    assert not torch.allclose(got, group_normalized(rewards, 2))


def test_mean_centered_by_hand():
    torch.testing.assert_close(
        mean_centered(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2), torch.tensor([1.0, -1.0, 0.0, 0.0])
    )
    # integer rewards are promoted to float
    torch.testing.assert_close(mean_centered(torch.tensor([1, 0]), 2), torch.tensor([0.5, -0.5]))


def test_single_rollout_groups_get_zero_advantage():
    rewards = torch.tensor([1.0, -1.0, 1.0])
    for kind in ADVANTAGE_KINDS:
        torch.testing.assert_close(compute_advantages(rewards, 1, kind), torch.zeros(3))


@pytest.mark.parametrize(
    ("kind", "function"),
    [("group_std", group_normalized), ("batch_std", batch_std_normalized), ("mean", mean_centered)],
)
def test_compute_advantages_dispatches_by_kind(kind, function):
    torch.manual_seed(0)
    rewards = torch.randn(12)
    torch.testing.assert_close(compute_advantages(rewards, 4, kind), function(rewards, 4))


def test_dynamic_sampling_drops_constant_reward_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -2.0, 1.0])
    keep = dynamic_sampling_mask(rewards, 2)
    assert keep.tolist() == [False, False, True, True, False, False, True, True]
    # by ids: groups 5 (all -1) and 8 (single rollout) are dropped, group 2 is mixed
    ids = torch.tensor([2, 5, 2, 5, 8])
    assert dynamic_sampling_mask(torch.tensor([0.0, -1.0, 1.0, -1.0, 1.0]), ids).tolist() == [
        True,
        False,
        True,
        False,
        False,
    ]


def test_bad_groups_are_named():
    with pytest.raises(ValueError, match="5 rewards do not split into groups of size 2"):
        group_normalized(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"group ids must be \[N\] = \(4,\)"):
        mean_centered(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="flat"):
        dynamic_sampling_mask(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="advantage kind must be one of"):
        compute_advantages(torch.zeros(4), 2, "bogus")  # type: ignore[arg-type]
