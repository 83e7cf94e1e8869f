"""GRPO's pure math against hand-computed values: group advantages, k3 KL, the clipped policy loss
and its aggregations (DeepSeekMath eq. 3-4, docs/facts.md §8)."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek.train.grpo import group_advantages, k3_kl, policy_loss

NAN = math.nan
INF = math.inf


def approx(values, rel: float = 1e-6):
    return pytest.approx(values, rel=rel, abs=1e-9)


# --- advantages ---------------------------------------------------------------------------------

# Two groups of G = 3. Group 0: mean 3, deviations (-2, 0, 2), Bessel std sqrt((4 + 0 + 4) / 2) = 2.
# Group 1: constant, so std 0 and advantages 0.
# The batch: mean 21/6 = 3.5, deviations (-2.5, -0.5, 1.5, 0.5, 0.5, 0.5), squares summing to 9.5,
# Bessel std sqrt(9.5 / 5) = sqrt(1.9). The centring stays per group in every mode.
@pytest.mark.parametrize(("scale", "expected"), [
    ("group", [-2 / 2.0001, 0.0, 2 / 2.0001, 0.0, 0.0, 0.0]),
    ("batch", [-2 / (math.sqrt(1.9) + 1e-4), 0.0, 2 / (math.sqrt(1.9) + 1e-4), 0.0, 0.0, 0.0]),
    ("none", [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]),
])
def test_group_advantages_by_scaling(scale, expected):
    advantages = group_advantages(torch.tensor([1.0, 3.0, 5.0, 4.0, 4.0, 4.0]), group_size=3, scale_rewards=scale)
    assert advantages.tolist() == approx(expected)


def test_group_scaling_matches_torch_bessel_std():
    rewards = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards.view(-1), 8), expected.view(-1))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_group_gives_exact_zeros(scale):
    # In float32, 0.9 - (0.9 + 0.9 + 0.9) / 3 = 6e-8, not 0; divided by (std ~ 1e-8 + 1e-4) that would
    # leave advantages of ~6e-4. The first group keeps the batch std away from 0.
    advantages = group_advantages(torch.tensor([0.0, 1.0, 0.5, 0.9, 0.9, 0.9]), 3, scale)
    assert advantages[3:].tolist() == [0.0, 0.0, 0.0]
    assert advantages[:3].abs().sum() > 0


# Four groups of G = 3 with None rewards as NaN:
#   group 0 (1, NaN, 3): valid mean 2, deviations -1, +1, Bessel std sqrt(2 / 1) = sqrt(2);
#   group 1 (5, 5, NaN): constant -> 0;  group 2 all NaN -> 0;  group 3 (NaN, 7, NaN): one value -> 0.
# The batch's valid rewards 1, 3, 5, 5, 7: mean 4.2, deviations -3.2, -1.2, 0.8, 0.8, 2.8,
# squares 10.24 + 1.44 + 0.64 + 0.64 + 7.84 = 20.8, Bessel std sqrt(20.8 / 4) = sqrt(5.2).
@pytest.mark.parametrize(("scale", "scale_value"), [
    ("group", math.sqrt(2) + 1e-4), ("batch", math.sqrt(5.2) + 1e-4), ("none", 1.0),
])
def test_nan_rewards_are_left_out(scale, scale_value):
    rewards = torch.tensor([1.0, NAN, 3.0, 5.0, 5.0, NAN, NAN, NAN, NAN, NAN, 7.0, NAN])
    advantages = group_advantages(rewards, 3, scale)
    assert advantages.tolist() == approx([-1 / scale_value, 0.0, 1 / scale_value] + [0.0] * 9)


def test_group_advantages_reject_bad_arguments():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), 2)


# --- k3 KL --------------------------------------------------------------------------------------

def test_k3_kl_values():
    # d = ref - logp. d = log(1/2): 1/2 - log(1/2) - 1 = 0.5 + 0.693147 - 1 = 0.193147.
    # d = log 2: 2 - log 2 - 1 = 1 - 0.693147 = 0.306853. d = 0: 1 - 0 - 1 = 0.
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref_logprobs = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    assert k3_kl(logprobs, ref_logprobs).tolist() == approx([0.5 + math.log(2) - 1, 1 - math.log(2), 0.0])


def test_k3_kl_is_non_negative_even_for_tiny_differences():
    # exp(d) - d - 1 computed naively rounds to about -6e-8 for many |d| < 1e-4.
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(100_000, generator=generator)
    for scale in (1e-7, 1e-5, 1e-3, 1.0):
        ref_logprobs = logprobs + scale * torch.randn(100_000, generator=generator)
        assert k3_kl(logprobs, ref_logprobs).min() >= 0
    assert k3_kl(logprobs, logprobs).abs().max() == 0


# --- policy loss ---------------------------------------------------------------------------------

def log_ratios(ratios) -> torch.Tensor:
    """logp with old_logprobs = 0, so exp(logp - old) is the given ratio; float64 for exact checks."""
    return torch.tensor(ratios, dtype=torch.float64).log().requires_grad_()


def padded_example():
    """B = 3, T = 3: ratios (1.1, 0.9, 1.0) with A = +1, (1.0, 1.1, pad) with A = -2, and a row that is
    all padding with A = 5. The padding holds garbage that must not leak: -inf, +inf, NaN."""
    logprobs = torch.tensor([[1.1, 0.9, 1.0], [1.0, 1.1, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64).log()
    logprobs[1, 2], logprobs[2] = -INF, torch.tensor([INF, -INF, NAN])
    old_logprobs = torch.zeros(3, 3, dtype=torch.float64)
    old_logprobs[1, 2], old_logprobs[2, 0] = INF, NAN
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    return logprobs.requires_grad_(), old_logprobs, torch.tensor([1.0, -2.0, 5.0]), mask


# Per-token loss -ratio·A (every ratio is inside the 0.2 clip): row 0 -1.1, -0.9, -1.0 (sum -3.0, mean -1.0);
# row 1 +2.0, +2.2 (sum 4.2, mean 2.1); row 2 nothing. Σ l·m = 1.2 over 5 active tokens.
@pytest.mark.parametrize(("loss_type", "options", "expected"), [
    ("grpo", {}, (-1.0 + 2.1) / 2),  # the empty row is left out of the mean: 0.55
    ("bnpo", {}, 1.2 / 5),  # 0.24
    ("dr_grpo", {"max_completion_length": 4}, 1.2 / (3 * 4)),  # B counts the empty row: 0.1
    ("dapo", {}, 1.2 / 5),  # defaults to the local active tokens
    ("dapo", {"num_items_in_batch": 6}, 1.2 / 6),  # the grad-accumulated batch's tokens
])
def test_loss_aggregations(loss_type, options, expected):
    logprobs, old_logprobs, advantages, mask = padded_example()
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, loss_type=loss_type, **options)
    assert loss.item() == approx(expected)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[1, 2] == 0 and (logprobs.grad[2] == 0).all()
    assert stats["ratio_mean"] == approx((1.1 + 0.9 + 1.0 + 1.0 + 1.1) / 5)  # 1.02, padding left out
    assert stats["clip"] == 0.0 and stats["kl"] == 0.0


def test_bnpo_gradient_is_minus_ratio_times_advantage_over_tokens():
    # d(-ratio·A)/dlogp = -ratio·A (d ratio / dlogp = ratio), divided by the 5 active tokens.
    logprobs, old_logprobs, advantages, mask = padded_example()
    policy_loss(logprobs, old_logprobs, advantages, mask, loss_type="bnpo")[0].backward()
    expected = torch.tensor([[-1.1, -0.9, -1.0], [2.0, 2.2, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64) / 5
    torch.testing.assert_close(logprobs.grad, expected)


def test_all_padding_batch_gives_zero_loss_and_gradient():
    logprobs, old_logprobs, advantages, _ = padded_example()
    for loss_type in ("grpo", "bnpo", "dapo"):
        loss, stats = policy_loss(logprobs, old_logprobs, advantages, torch.zeros(3, 3), loss_type=loss_type)
        loss.backward()
        assert loss.item() == 0.0 and (logprobs.grad == 0).all()
        assert stats == {"clip_low": 0.0, "clip_high": 0.0, "clip": 0.0, "kl": 0.0, "ratio_mean": 0.0}
        logprobs.grad = None


def test_kl_penalty_adds_beta_times_k3():
    # ref = logp + log(1/2) on every token: k3 = 0.193147 (see test_k3_kl_values) and its gradient
    # d/dlogp [e^d - d - 1] with d = ref - logp is 1 - e^d = 0.5.
    # bnpo loss = 0.24 + 0.1·0.193147; gradient = (-ratio·A + 0.1·0.5) / 5.
    logprobs, old_logprobs, advantages, mask = padded_example()
    ref_logprobs = logprobs.detach() + math.log(0.5)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, beta=0.1, loss_type="bnpo")
    k3 = 0.5 + math.log(2) - 1
    assert loss.item() == approx(0.24 + 0.1 * k3)
    assert stats["kl"] == approx(k3)
    loss.backward()
    assert logprobs.grad[0].tolist() == approx([(-1.1 + 0.05) / 5, (-0.9 + 0.05) / 5, (-1.0 + 0.05) / 5])
    # With beta = 0 the KL is still reported but not in the loss.
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, loss_type="bnpo")
    assert loss.item() == approx(0.24) and stats["kl"] == approx(k3)


def test_clipping_on_both_sides():
    # ε_low = 0.2, ε_high = 0.28: the clip range is [0.8, 1.28]. Per token l = -min(ρ·A, clip(ρ)·A).
    # A = +1, ρ = (1.5, 0.5, 1.25, 1.0): l = -1.28 (clip binds high: constant, no gradient), -0.5 (a low
    #   ratio with A > 0 is not clipped), -1.25 (inside 1.28 though outside a symmetric 1.2), -1.0.
    # A = -1, ρ = (0.5, 1.5, 0.85, 1.0): l = max(ρ, clip(ρ)) = 0.8 (clip binds low: no gradient), 1.5 (a
    #   high ratio with A < 0 is not clipped), 0.85, 1.0.
    # bnpo: (-1.28 - 0.5 - 1.25 - 1.0 + 0.8 + 1.5 + 0.85 + 1.0) / 8 = 0.12 / 8 = 0.015.
    logprobs = log_ratios([[1.5, 0.5, 1.25, 1.0], [0.5, 1.5, 0.85, 1.0]])
    loss, stats = policy_loss(logprobs, torch.zeros(2, 4), torch.tensor([1.0, -1.0]), torch.ones(2, 4),
                              epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo")
    assert loss.item() == approx(0.015)
    loss.backward()
    # Where the clip does not bind, dl/dlogp = -ρ·A; divided by 8 tokens.
    expected = torch.tensor([[0.0, -0.5, -1.25, -1.0], [0.0, 1.5, 0.85, 1.0]], dtype=torch.float64) / 8
    torch.testing.assert_close(logprobs.grad, expected)
    # One token of eight clipped on each side; ratio mean 8.1 / 8.
    assert stats == approx({"clip_low": 1 / 8, "clip_high": 1 / 8, "clip": 2 / 8, "kl": 0.0, "ratio_mean": 8.1 / 8})


def test_only_logprobs_get_gradient():
    logprobs, old_logprobs, advantages, mask = padded_example()
    old_logprobs.requires_grad_()
    advantages.requires_grad_()
    ref_logprobs = logprobs.detach().clone().requires_grad_()
    policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, beta=0.1)[0].backward()
    assert logprobs.grad is not None
    assert old_logprobs.grad is None and advantages.grad is None and ref_logprobs.grad is None


def test_policy_loss_rejects_bad_arguments():
    logprobs, old_logprobs, advantages, mask = padded_example()
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logprobs, old_logprobs, advantages, mask, loss_type="sum")
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logprobs, old_logprobs, advantages, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs, old_logprobs, advantages, mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logprobs, old_logprobs, advantages[:2], mask)
