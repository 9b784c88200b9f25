"""compute_gae against the sum form of GAE, and against hand-computed cases."""

import math

import pytest
import torch

from proximal.utils import compute_gae, explained_variance


def brute_force_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """GAE as the explicit sum of Schulman et al. 2016, Eq. 16: A_t = sum_l (gamma lam)^l delta_{t+l},
    the sum stopping after the step that ends the episode; one (t, env) at a time, no recursion."""
    T, N = rewards.shape
    advantages = torch.zeros(T, N, dtype=torch.float64)
    for i in range(N):
        for t in range(T):
            total, weight = 0.0, 1.0
            for step in range(t, T):
                bootstrap = 0.0 if terminated[step, i] else gamma * next_values[step, i].item()
                delta = rewards[step, i].item() + bootstrap - values[step, i].item()
                total += weight * delta
                if terminated[step, i] or truncated[step, i]:
                    break
                weight *= gamma * lam
            advantages[t, i] = total
    return advantages


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (1.0, 1.0), (0.5, 0.7)])
def test_gae_matches_brute_force_sum_with_mixed_episode_ends(seed, gamma, lam):
    generator = torch.Generator().manual_seed(seed)
    T, N = 17, 5
    rewards = torch.randn(T, N, generator=generator, dtype=torch.float64)
    values = torch.randn(T, N, generator=generator, dtype=torch.float64)
    next_values = torch.randn(T, N, generator=generator, dtype=torch.float64)
    ends = torch.rand(T, N, generator=generator)
    terminated = ends < 0.15
    truncated = (ends >= 0.15) & (ends < 0.3)
    assert terminated.any() and truncated.any()

    advantages, returns = compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam)

    expected = brute_force_gae(rewards, values, next_values, terminated, truncated, gamma, lam)
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, expected + values, rtol=1e-12, atol=1e-12)


def test_gae_hand_computed_truncation_bootstraps_and_termination_does_not():
    # One env, three steps, gamma = 0.5, lambda = 0.5, every reward 1, V(s_t) = 2.
    # step 0: ordinary;  step 1: truncated, V(final obs) = 4;  step 2: terminated.
    rewards = torch.ones(3, 1)
    values = torch.full((3, 1), 2.0)
    next_values = torch.tensor([[2.0], [4.0], [100.0]])  # 100 must be ignored: terminated
    terminated = torch.tensor([[False], [False], [True]])
    truncated = torch.tensor([[False], [True], [False]])
    advantages, returns = compute_gae(rewards, values, next_values, terminated, truncated, 0.5, 0.5)
    # delta_2 = 1 - 2 = -1 (no bootstrap);  A_2 = -1
    # delta_1 = 1 + 0.5 * 4 - 2 = 1 (bootstrap from the final obs);  A_1 = 1 (recursion cut)
    # delta_0 = 1 + 0.5 * 2 - 2 = 0;  A_0 = 0 + 0.25 * A_1 = 0.25
    assert advantages.flatten().tolist() == [0.25, 1.0, -1.0]
    assert returns.flatten().tolist() == [2.25, 3.0, 1.0]


def test_gae_lambda_one_without_episode_ends_gives_discounted_return_minus_value():
    # lambda = 1: A_t + V_t is the discounted sum of rewards bootstrapped with V at the end.
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [-1.0], [2.0]])
    next_values = torch.tensor([[-1.0], [2.0], [10.0]])
    no = torch.zeros(3, 1, dtype=torch.bool)
    _, returns = compute_gae(rewards, values, next_values, no, no, 0.9, 1.0)
    expected_first = 1 + 0.9 * 2 + 0.81 * 3 + 0.729 * 10
    assert returns[0, 0].item() == pytest.approx(expected_first, abs=1e-5)


def test_explained_variance_exact_cases():
    targets = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(targets, targets) == 1.0
    assert explained_variance(torch.full((4,), 2.5), targets) == 0.0  # predicting the mean
    # residuals [1, 1, 1, 1] have zero variance: a constant offset is "explained"
    assert explained_variance(targets - 1.0, targets) == 1.0
    assert explained_variance(-targets, targets) == pytest.approx(1.0 - 4.0)  # Var(2t)/Var(t) = 4
    assert math.isnan(explained_variance(targets, torch.ones(4)))
