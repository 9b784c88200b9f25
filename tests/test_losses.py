"""compute_gae against the sum form of GAE, and against hand-computed cases."""

import math

import pytest
import torch

from proximal.losses import compute_gae, explained_variance


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


# -- Properties that notes/week1_answers.md relies on -------------------------------------------


def chain_episode(length, gamma, noise, generator):
    """One terminating episode of `length` steps with reward 1 + noise; the true value of step t
    is sum_{k < length - t} gamma^k (the noise has mean zero)."""
    rewards = 1.0 + noise * torch.randn(length, 1, generator=generator, dtype=torch.float64)
    steps_left = torch.arange(length, 0, -1, dtype=torch.float64).unsqueeze(1)
    true_values = (1 - gamma ** steps_left) / (1 - gamma)
    next_values = torch.cat([true_values[1:], torch.zeros(1, 1, dtype=torch.float64)])
    terminated = torch.zeros(length, 1, dtype=torch.bool)
    terminated[-1] = True
    return rewards, true_values, next_values, terminated, torch.zeros_like(terminated)


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_with_the_true_value_and_no_noise_every_advantage_is_zero(lam):
    # A_t measures "better than expected"; a perfect critic on a deterministic chain leaves nothing.
    rewards, values, next_values, terminated, truncated = chain_episode(30, 0.9, 0.0, torch.Generator())
    advantages, _ = compute_gae(rewards, values, next_values, terminated, truncated, 0.9, lam)
    torch.testing.assert_close(advantages, torch.zeros_like(advantages), atol=1e-12, rtol=0)


def test_the_critic_as_baseline_cuts_the_variance_of_the_advantages():
    # 400 noisy episodes of 30 steps, noise std 0.5, gamma 0.9. Predicted by the law of total variance:
    #   lambda 0, true V: A_t = delta_t = noise_t                     -> Var = 0.25
    #   lambda 1, true V: A_t = sum_k gamma^k noise_{t+k}              -> Var = mean_t 0.25 sum_k 0.81^k
    #   no critic:        A_t = G_t = V(s_t) + that same noise sum     -> the above + Var_t[V(s_t)]
    generator = torch.Generator().manual_seed(0)
    samples = {"no critic": [], "lambda 1": [], "lambda 0": []}
    for _ in range(400):
        rewards, values, next_values, terminated, truncated = chain_episode(30, 0.9, 0.5, generator)
        zeros = torch.zeros_like(values)
        samples["no critic"].append(compute_gae(rewards, zeros, zeros, terminated, truncated, 0.9, 1.0)[0])
        samples["lambda 1"].append(compute_gae(rewards, values, next_values, terminated, truncated, 0.9, 1.0)[0])
        samples["lambda 0"].append(compute_gae(rewards, values, next_values, terminated, truncated, 0.9, 0.0)[0])
    variance = {name: torch.cat(runs).var().item() for name, runs in samples.items()}
    steps_left = torch.arange(30, 0, -1, dtype=torch.float64)
    noise_variance = (0.25 * (1 - 0.81 ** steps_left) / (1 - 0.81)).mean().item()  # about 1.13
    value_spread = ((1 - 0.9 ** steps_left) / 0.1).var(unbiased=False).item()  # about 5.9
    assert variance["lambda 0"] == pytest.approx(0.25, rel=0.05)
    assert variance["lambda 1"] == pytest.approx(noise_variance, rel=0.05)
    assert variance["no critic"] == pytest.approx(noise_variance + value_spread, rel=0.05)


def test_with_lambda_one_the_target_does_not_depend_on_the_critic():
    # lambda = 1 and a terminating episode: returns = A + V is the Monte-Carlo return, whatever V is;
    # the critic only moves the baseline (variance), never the target (no bias).
    generator = torch.Generator().manual_seed(1)
    rewards, values, next_values, terminated, truncated = chain_episode(12, 0.9, 0.5, generator)
    _, returns_true_critic = compute_gae(rewards, values, next_values, terminated, truncated, 0.9, 1.0)
    wrong = torch.randn(13, 1, generator=generator, dtype=torch.float64) * 5
    _, returns_wrong_critic = compute_gae(rewards, wrong[:-1], wrong[1:], terminated, truncated, 0.9, 1.0)
    torch.testing.assert_close(returns_wrong_critic, returns_true_critic, rtol=1e-12, atol=1e-12)


def test_sparse_terminal_reward_credit_assignment():
    # An LLM-style episode: reward R only at the last of T steps, gamma = 1, no critic (V = 0).
    T, R = 6, 2.0
    rewards = torch.zeros(T, 1, dtype=torch.float64)
    rewards[-1] = R
    zeros = torch.zeros_like(rewards)
    terminated = torch.zeros(T, 1, dtype=torch.bool)
    terminated[-1] = True
    truncated = torch.zeros_like(terminated)
    all_credit, _ = compute_gae(rewards, zeros, zeros, terminated, truncated, 1.0, 1.0)
    assert all_credit.flatten().tolist() == [R] * T  # lambda 1: every token gets the whole score
    decayed, _ = compute_gae(rewards, zeros, zeros, terminated, truncated, 1.0, 0.5)
    assert decayed.flatten().tolist() == [R * 0.5 ** (T - 1 - t) for t in range(T)]  # lambda^(T-1-t) R
