"""The Eq. 7 loss, the categorical policy, PPOAgent.update/act, saving and loading."""

import math

import numpy as np
import pytest
import torch

from proximal.agent import ActorCritic, PPOAgent, RolloutBatch, gaussian_policy
from proximal.losses import clipped_surrogate_loss
from proximal.config import EnvConfig, PPOConfig, TrainConfig
from proximal.errors import TrainingDiverged

EPS = 0.2


def eq7_reference(logprobs, old_logprobs, advantages, eps):
    """-mean_t min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t), one sample at a time in Python floats."""
    terms = []
    for new, old, advantage in zip(logprobs, old_logprobs, advantages):
        ratio = math.exp(new - old)
        clipped_ratio = min(max(ratio, 1 - eps), 1 + eps)
        terms.append(min(ratio * advantage, clipped_ratio * advantage))
    return -sum(terms) / len(terms)


def test_loss_matches_eq7_on_random_inputs():
    generator = torch.Generator().manual_seed(0)
    old_logprobs = torch.randn(200, generator=generator, dtype=torch.float64)
    logprobs = old_logprobs + 0.5 * torch.randn(200, generator=generator, dtype=torch.float64)
    advantages = torch.randn(200, generator=generator, dtype=torch.float64)
    loss = clipped_surrogate_loss(logprobs, old_logprobs, advantages, EPS)
    expected = eq7_reference(logprobs.tolist(), old_logprobs.tolist(), advantages.tolist(), EPS)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


# (ratio r, advantage A, is the gradient zero?) covering all six regions of Figure 1.
REGIONS = [
    (1.5, 2.0, True),    # A > 0, r > 1 + eps: improvement already past the clip edge -> no push
    (0.5, -2.0, True),   # A < 0, r < 1 - eps: likewise on the negative side
    (0.5, 2.0, False),   # A > 0, r < 1 - eps: the change made things worse -> unclipped, gradient flows
    (1.5, -2.0, False),  # A < 0, r > 1 + eps: likewise
    (1.1, 2.0, False),   # inside the trust region
    (0.9, -2.0, False),  # inside the trust region
]


def test_gradient_is_exactly_zero_where_clipped_and_r_times_a_elsewhere():
    ratios = torch.tensor([r for r, _, _ in REGIONS], dtype=torch.float64)
    advantages = torch.tensor([a for _, a, _ in REGIONS], dtype=torch.float64)
    old_logprobs = torch.zeros(len(REGIONS), dtype=torch.float64)
    logprobs = torch.log(ratios).requires_grad_(True)
    clipped_surrogate_loss(logprobs, old_logprobs, advantages, EPS).backward()
    n = len(REGIONS)
    for (ratio, advantage, zero), gradient in zip(REGIONS, logprobs.grad.tolist()):
        if zero:
            assert gradient == 0.0, (ratio, advantage)
        else:
            # d/dlogp of -(1/n) r A, with r = exp(logp - old_logprobs): -(1/n) r A, never zero here
            assert gradient == pytest.approx(-ratio * advantage / n, rel=1e-12), (ratio, advantage)
            assert gradient != 0.0


def small_config(**ppo_overrides):
    ppo = dict(total_timesteps=512, num_steps=64, minibatch_size=64, epochs=4)
    ppo.update(ppo_overrides)
    return TrainConfig(env=EnvConfig(env_id="CartPole-v1", num_envs=4), ppo=PPOConfig(**ppo))


def random_batch(agent, size=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    observations = torch.randn(size, agent.obs_dim, generator=generator)
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action(observations)
    advantages = torch.randn(size, generator=generator)
    return RolloutBatch(observations, actions, logprobs, values, advantages, advantages + values)


def test_get_action_log_prob_and_entropy_match_torch_categorical():
    torch.manual_seed(0)
    agent = PPOAgent(obs_dim=4, action_dim=3, config=small_config())
    observations = torch.randn(64, 4)
    actions, logp, entropy, values = agent.get_action(observations)
    logits, reference_values = agent.network(observations)
    reference = torch.distributions.Categorical(logits=logits)  # independent reference, tests only
    torch.testing.assert_close(logp, reference.log_prob(actions))
    torch.testing.assert_close(entropy, reference.entropy())
    torch.testing.assert_close(values, reference_values)
    assert actions.shape == (64,) and values.shape == (64,)
    # scoring given actions returns those actions and their log-probs
    given = torch.randint(0, 3, (64,))
    _, given_logp, _, _ = agent.get_action(observations, given)
    torch.testing.assert_close(given_logp, reference.log_prob(given))


def test_sampling_frequencies_follow_the_policy():
    torch.manual_seed(0)
    agent = PPOAgent(obs_dim=2, action_dim=3, config=small_config())
    with torch.no_grad():
        agent.network.actor_head.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
        agent.network.actor_head.weight.zero_()
    observations = torch.zeros(200_000, 2)
    actions, _, _, _ = agent.get_action(observations)
    frequencies = torch.bincount(actions, minlength=3).double() / len(actions)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0)
    torch.testing.assert_close(frequencies, expected, atol=5e-3, rtol=0)


def test_two_heads_and_orthogonal_init():
    torch.manual_seed(0)
    network = ActorCritic(obs_dim=4, action_dim=2, hidden_sizes=(64, 64), shared_body=False)
    logits, values = network(torch.randn(5, 4))
    assert logits.shape == (5, 2) and values.shape == (5,)
    hidden = network.actor_body[2].weight  # 64 x 64, gain sqrt(2): W W^T = 2 I
    torch.testing.assert_close(hidden @ hidden.T, 2.0 * torch.eye(64), atol=1e-5, rtol=0)
    head = network.actor_head.weight  # 2 x 64, gain 0.01: orthonormal rows scaled by 0.01
    torch.testing.assert_close(head @ head.T, 1e-4 * torch.eye(2), atol=1e-9, rtol=0)
    assert network.critic_head.bias.item() == 0.0
    shared = ActorCritic(obs_dim=4, action_dim=2, hidden_sizes=(32,), shared_body=True)
    assert shared.critic_body is None
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in network.parameters())


def test_update_returns_statistics_and_changes_the_policy():
    torch.manual_seed(0)
    agent = PPOAgent(obs_dim=4, action_dim=2, config=small_config())
    batch = random_batch(agent)
    before = [p.detach().clone() for p in agent.network.parameters()]
    stats = agent.update(batch)
    assert set(stats) == {"policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "epochs",
                          "explained_variance"}
    assert stats["epochs"] == 4
    assert stats["approx_kl"] >= 0 and 0 <= stats["clip_fraction"] <= 1
    assert all(not torch.equal(b, p) for b, p in zip(before, agent.network.parameters()))


def test_early_stop_kl_stops_the_epochs_early():
    torch.manual_seed(0)
    agent = PPOAgent(obs_dim=4, action_dim=2, config=small_config(early_stop_kl=1e-9, epochs=10, learning_rate=1e-2))
    assert agent.update(random_batch(agent))["epochs"] == 1


def test_nan_loss_raises_training_diverged_before_any_step():
    torch.manual_seed(0)
    agent = PPOAgent(obs_dim=4, action_dim=2, config=small_config())
    batch = random_batch(agent)
    batch.returns[3] = float("nan")
    before = [p.detach().clone() for p in agent.network.parameters()]
    with pytest.raises(TrainingDiverged, match="NaN"):
        agent.update(batch)
    assert all(torch.equal(b, p) for b, p in zip(before, agent.network.parameters()))


def test_act_is_greedy_and_takes_raw_numpy(tmp_path):
    torch.manual_seed(0)
    agent = PPOAgent(obs_dim=4, action_dim=3, config=small_config())
    observations = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float64)
    actions = agent.act(observations)
    logits, _ = agent.network(torch.as_tensor(observations, dtype=torch.float32))
    assert actions.shape == (10,) and actions.dtype == np.int64
    np.testing.assert_array_equal(actions, logits.argmax(-1).numpy())
    assert agent.act(observations[0]) == actions[0]
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        agent.act(np.zeros((2, 5)))


def test_saved_and_loaded_agent_acts_identically(tmp_path):
    from proximal.checkpoint import save_checkpoint

    torch.manual_seed(0)
    agent = PPOAgent(obs_dim=4, action_dim=2, config=small_config())
    agent.update(random_batch(agent))
    save_checkpoint(tmp_path / "checkpoint.pt", agent.state_dict())
    loaded = PPOAgent.load(tmp_path)  # a directory holding checkpoint.pt
    observations = np.random.default_rng(1).normal(size=(100, 4))
    np.testing.assert_array_equal(agent.act(observations), loaded.act(observations))
    assert loaded.config == agent.config
    saved, restored = agent.optimizer.state_dict(), loaded.optimizer.state_dict()
    assert restored["steps"] == saved["steps"] > 0
    for name in ("exp_avg", "exp_avg_sq"):
        for restored_moment, saved_moment in zip(restored[name], saved[name]):
            torch.testing.assert_close(restored_moment, saved_moment)


# -- Properties that notes/week1_answers.md relies on -------------------------------------------


def test_clipped_objective_is_a_pessimistic_bound_equal_to_the_unclipped_one_near_r_1():
    ratios = torch.linspace(0.3, 2.0, 341, dtype=torch.float64)
    for advantage in (-2.0, -0.5, 0.5, 2.0):
        advantages = torch.full_like(ratios, advantage)
        per_sample = [-clipped_surrogate_loss(torch.log(r).view(1), torch.zeros(1, dtype=torch.float64),
                                              torch.tensor([advantage], dtype=torch.float64), EPS).item()
                      for r in ratios]
        unclipped = (ratios * advantages).tolist()
        for ratio, clipped_value, unclipped_value in zip(ratios.tolist(), per_sample, unclipped):
            assert clipped_value <= unclipped_value + 1e-12  # L^CLIP <= L^CPI: a lower bound
            if 1 - EPS <= ratio <= 1 + EPS:
                assert clipped_value == pytest.approx(unclipped_value, abs=1e-12)


def test_at_r_equal_1_the_gradient_is_the_plain_policy_gradient():
    # First update step of each epoch 1: r = 1, so grad L^CLIP = mean(A grad log pi), the
    # (advantage-weighted) policy gradient.
    advantages = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    logp = torch.tensor([-0.3, -1.2, -2.0], dtype=torch.float64, requires_grad=True)
    clipped_surrogate_loss(logp, logp.detach(), advantages, EPS).backward()
    torch.testing.assert_close(logp.grad, -advantages / 3)


def test_score_function_has_zero_mean_so_any_state_baseline_is_unbiased():
    # sum_a pi(a|s) grad log pi(a|s) = grad sum_a pi(a|s) = grad 1 = 0: subtracting b(s) from the
    # return changes no expected gradient. Checked on the real actor head, every parameter.
    torch.manual_seed(0)
    network = ActorCritic(obs_dim=4, action_dim=3, hidden_sizes=(16,), shared_body=False)
    observation = torch.randn(1, 4)
    logits, _ = network(observation)
    log_probs = torch.log_softmax(logits, -1)[0]
    expected_score = [torch.zeros_like(p) for p in network.actor_body.parameters()] + \
                     [torch.zeros_like(p) for p in network.actor_head.parameters()]
    parameters = list(network.actor_body.parameters()) + list(network.actor_head.parameters())
    for action in range(3):
        gradients = torch.autograd.grad(log_probs[action], parameters, retain_graph=True)
        for total, gradient in zip(expected_score, gradients):
            total += log_probs[action].exp().detach() * gradient
    for total in expected_score:
        torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-6, rtol=0)


# -- Continuous actions: the diagonal Gaussian head ---------------------------------------------


def continuous_agent(action_dim=2, seed=0):
    torch.manual_seed(seed)
    bounds = (np.full(action_dim, -2.0), np.full(action_dim, 2.0))
    return PPOAgent(obs_dim=3, action_dim=action_dim, config=small_config(), action_bounds=bounds)


def test_gaussian_log_prob_and_entropy_match_torch_normal():
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    log_std = torch.randn(3, generator=generator, dtype=torch.float64)
    actions, logp, entropy = gaussian_policy(means, log_std)
    reference = torch.distributions.Normal(means, log_std.exp())  # independent reference, tests only
    torch.testing.assert_close(logp, reference.log_prob(actions).sum(-1))
    torch.testing.assert_close(entropy, reference.entropy().sum(-1))
    given = torch.randn(64, 3, generator=generator, dtype=torch.float64) * 5  # far outside: not clipped
    _, given_logp, _ = gaussian_policy(means, log_std, given)
    torch.testing.assert_close(given_logp, reference.log_prob(given).sum(-1))


def test_gaussian_samples_have_the_policy_mean_and_std():
    means = torch.tensor([[0.5, -1.0]]).expand(100_000, 2)
    log_std = torch.log(torch.tensor([0.3, 2.0]))
    torch.manual_seed(0)
    actions, _, _ = gaussian_policy(means, log_std)
    torch.testing.assert_close(actions.mean(0), torch.tensor([0.5, -1.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(actions.std(0), torch.tensor([0.3, 2.0]), atol=0.02, rtol=0)


def test_continuous_agent_acts_with_the_clipped_mean_and_learns_its_log_std():
    agent = continuous_agent()
    assert agent.continuous and agent.action_shape == (2,)
    observations = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    with torch.no_grad():
        agent.network.actor_head.bias.copy_(torch.tensor([0.5, 9.0]))  # second mean beyond the bound 2
        means = agent.network.actor(torch.from_numpy(observations)).numpy()
    actions = agent.act(observations)
    assert actions.shape == (8, 2) and actions.dtype == np.float32
    np.testing.assert_allclose(actions, np.clip(means, -2.0, 2.0))
    assert (actions[:, 1] == 2.0).all()
    sampled = agent.act(observations, deterministic=False)
    assert sampled.shape == (8, 2) and (np.abs(sampled) <= 2.0).all()
    with torch.no_grad():
        batch_obs = torch.randn(256, 3)
        batch_actions, logprobs, _, values = agent.get_action(batch_obs)
    assert batch_actions.shape == (256, 2)
    advantages = torch.randn(256)
    before = agent.network.actor_log_std.detach().clone()
    agent.update(RolloutBatch(batch_obs, batch_actions, logprobs, values, advantages, advantages + values))
    assert not torch.equal(before, agent.network.actor_log_std)


def test_continuous_agent_saved_and_loaded_acts_identically(tmp_path):
    from proximal.checkpoint import save_checkpoint

    agent = continuous_agent(action_dim=3)
    with torch.no_grad():
        agent.network.actor_log_std.fill_(-0.7)
    save_checkpoint(tmp_path / "checkpoint.pt", agent.state_dict())
    loaded = PPOAgent.load(tmp_path / "checkpoint.pt")
    observations = np.random.default_rng(2).normal(size=(50, 3))
    np.testing.assert_array_equal(agent.act(observations), loaded.act(observations))
    np.testing.assert_array_equal(loaded.action_bounds[1], np.full(3, 2.0, dtype=np.float32))
    assert torch.equal(loaded.network.actor_log_std, agent.network.actor_log_std)


def test_observation_statistics_are_frozen_when_acting_and_restored_on_load(tmp_path):
    from proximal.checkpoint import save_checkpoint

    torch.manual_seed(0)
    agent = PPOAgent(obs_dim=4, action_dim=2, config=small_config(normalize_observations=True))
    rng = np.random.default_rng(0)
    raw = rng.normal(loc=50.0, scale=10.0, size=(256, 4)).astype(np.float32)
    training_view = agent.prepare_observations(raw, update_stats=True)  # what a rollout does
    assert abs(training_view.mean().item()) < 1e-3 and abs(training_view.std().item() - 1) < 1e-2
    count = agent.observation_stats.count
    agent.act(rng.normal(size=(100, 4)))  # acting leaves the statistics alone
    assert agent.observation_stats.count == count
    save_checkpoint(tmp_path / "checkpoint.pt", agent.state_dict())
    loaded = PPOAgent.load(tmp_path)
    np.testing.assert_array_equal(loaded.observation_stats.mean, agent.observation_stats.mean)
    np.testing.assert_array_equal(agent.act(raw), loaded.act(raw))


def test_ratio_statistics_by_hand():
    from proximal.losses import ratio_statistics

    old_logprobs = torch.zeros(4)
    logprobs = torch.log(torch.tensor([1.0, 1.1, 1.5, 0.5]))  # ratios
    approx_kl, clip_fraction = ratio_statistics(logprobs, old_logprobs, clip_coef=0.2)
    k3 = [(r - 1) - math.log(r) for r in (1.0, 1.1, 1.5, 0.5)]
    assert math.isclose(float(approx_kl), sum(k3) / 4, rel_tol=1e-5)
    assert float(clip_fraction) == 0.5  # 1.5 and 0.5 left [0.8, 1.2]
    mask = torch.tensor([True, True, False, False])
    approx_kl, clip_fraction = ratio_statistics(logprobs, old_logprobs, 0.2, mask)
    assert math.isclose(float(approx_kl), sum(k3[:2]) / 2, rel_tol=1e-5)
    assert float(clip_fraction) == 0.0
