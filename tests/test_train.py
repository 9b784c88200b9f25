"""The training loop on tiny hand-made envs and short CartPole runs."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from proximal.agent import PPOAgent
from proximal.checkpoint import load_checkpoint
from proximal.config import EnvConfig, PPOConfig, RunConfig, TrainConfig
from proximal.envs import make_vector_env
from proximal.errors import TrainingDiverged
from proximal.metrics import MetricsLogger, read_metrics
from proximal.train import EnvState, collect_rollout, rollout_to_batch, train


class ValueIsTenTimesK(nn.Module):
    """Stands in for the network: uniform policy over 2 actions, V([k]) = 10 k exactly."""

    def forward(self, observations):
        return torch.zeros(observations.shape[0], 2), self.value(observations)

    def value(self, observations):
        return 10.0 * observations[:, 0]


def toy_rollout(env_id, num_steps=8, num_envs=2, use_critic=True, gae_lambda=0.0):
    config = TrainConfig(env=EnvConfig(env_id=env_id, num_envs=num_envs),
                         ppo=PPOConfig(total_timesteps=num_steps * num_envs, num_steps=num_steps,
                                       minibatch_size=num_steps, gamma=0.9, gae_lambda=gae_lambda,
                                       use_critic=use_critic))
    envs = make_vector_env(env_id, num_envs)
    agent = PPOAgent(obs_dim=1, action_dim=2, config=config)
    agent.network = ValueIsTenTimesK()
    state = EnvState.after_reset(envs.reset(seed=0)[0])
    rollout = collect_rollout(agent, envs, state, num_steps)
    envs.close()
    return rollout, rollout_to_batch(rollout, config.ppo)


def test_truncation_bootstraps_from_the_final_observation():
    # Episodes of 3 steps cut by the time limit; reward 1; V(k) = 10 k; gamma 0.9; lambda 0 so A = delta.
    rollout, batch = toy_rollout("proximal-test/Truncated-v0")
    by_k = {k: batch.advantages[batch.observations[:, 0] == k] for k in (0, 1, 2)}
    assert torch.allclose(by_k[0], torch.tensor(1 + 0.9 * 10 - 0.0))   # 10
    assert torch.allclose(by_k[1], torch.tensor(1 + 0.9 * 20 - 10.0))  # 9
    # the truncated step bootstraps from V(final obs [3]) = 30, not from the reset obs V([0]) = 0
    assert torch.allclose(by_k[2], torch.tensor(1 + 0.9 * 30 - 20.0))  # 8
    assert rollout.truncated.any() and not rollout.terminated.any()


def test_termination_does_not_bootstrap():
    rollout, batch = toy_rollout("proximal-test/Terminated-v0")
    last = batch.advantages[batch.observations[:, 0] == 2]
    assert torch.allclose(last, torch.tensor(1.0 - 20.0))  # r - V(s): the future is zero
    assert rollout.terminated.any() and not rollout.truncated.any()


def test_autoreset_transitions_never_reach_the_batch():
    # NEXT_STEP autoreset: the step after an episode end starts from the final obs [3] and its
    # action is ignored by the env. Those rows (t = 3 and 7 of each env) must be masked out.
    rollout, batch = toy_rollout("proximal-test/Truncated-v0", num_steps=8, num_envs=2)
    expected_valid = torch.tensor([True, True, True, False] * 2).unsqueeze(1).expand(8, 2)
    assert torch.equal(rollout.valid, expected_valid)
    assert batch.size == 12
    assert set(batch.observations[:, 0].tolist()) == {0.0, 1.0, 2.0}  # never the final obs 3
    assert rollout.rewards[~rollout.valid].eq(0).all()
    assert rollout.episode_returns == [3.0] * 4 and rollout.episode_lengths == [3] * 4


def test_without_the_critic_advantages_are_plain_discounted_returns():
    # use_critic off, lambda 1: A_t = sum of gamma^l r_{t+l} to the episode end, with no baseline
    # and no bootstrap; the toy critic's V([k]) = 10 k must not appear anywhere.
    _, batch = toy_rollout("proximal-test/Truncated-v0", use_critic=False, gae_lambda=1.0)
    expected = {0: 1 + 0.9 + 0.81, 1: 1 + 0.9, 2: 1.0}
    for k, discounted_return in expected.items():
        at_k = batch.advantages[batch.observations[:, 0] == k]
        assert torch.allclose(at_k, torch.tensor(discounted_return)), k
    torch.testing.assert_close(batch.returns, batch.advantages)
    assert torch.equal(batch.values, torch.zeros(12))


def cartpole_config(tmp_path, **overrides):
    ppo = dict(total_timesteps=2048, num_steps=64, minibatch_size=128, epochs=2, learning_rate=1e-3)
    run = dict(eval_episodes=5, runs_dir=str(tmp_path / "runs"), checkpoint_every=3)
    for key in list(overrides):
        if key in RunConfig.__dataclass_fields__:
            run[key] = overrides.pop(key)
    ppo.update(overrides)
    return TrainConfig(env=EnvConfig(env_id="CartPole-v1", num_envs=4), ppo=PPOConfig(**ppo), run=RunConfig(**run))


TIME_COLUMNS = ("wall_seconds", "steps_per_second")


def without_time(rows):
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows]


def test_same_seed_gives_identical_metrics_and_weights(tmp_path):
    config = cartpole_config(tmp_path)
    first, second = train(config), train(config)
    assert without_time(read_metrics(first.run_dir)) == without_time(read_metrics(second.run_dir))
    np.testing.assert_array_equal(first.eval_returns, second.eval_returns)
    first_weights = load_checkpoint(first.run_dir)["model"]
    second_weights = load_checkpoint(second.run_dir)["model"]
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    other_seed = train(cartpole_config(tmp_path, seed=1))
    assert without_time(read_metrics(other_seed.run_dir)) != without_time(read_metrics(first.run_dir))


def test_run_directory_contents_and_learning_rate_annealing(tmp_path):
    config = cartpole_config(tmp_path)
    result = train(config)
    names = {path.name for path in result.run_dir.iterdir()}
    assert {"config.json", "metrics.csv", "checkpoint.pt", "eval.json", "learning_curve.png"} <= names
    assert TrainConfig.from_dict(json.loads((result.run_dir / "config.json").read_text())) == config
    rows = read_metrics(result.run_dir)
    assert [row["iteration"] for row in rows] == list(range(1, config.num_iterations + 1))
    assert [row["env_steps"] for row in rows] == [256 * i for i in range(1, 9)]
    for row in rows:  # linear decay: lr * (1 - (i - 1) / num_iterations)
        expected = 1e-3 * (1 - (row["iteration"] - 1) / config.num_iterations)
        assert row["learning_rate"] == pytest.approx(expected, rel=1e-5)
        for column in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
                       "explained_variance", "steps_per_second"):
            assert row[column] is not None, column
    assert json.loads((result.run_dir / "eval.json").read_text())["episodes"] == 5


def test_crash_then_resume_continues_from_the_checkpoint(tmp_path, monkeypatch):
    config = cartpole_config(tmp_path, checkpoint_every=3)  # 8 iterations
    original_log = MetricsLogger.log

    def crash_at_iteration_5(self, metrics):
        if metrics["iteration"] == 5:
            raise KeyboardInterrupt
        original_log(self, metrics)

    monkeypatch.setattr(MetricsLogger, "log", crash_at_iteration_5)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(MetricsLogger, "log", original_log)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [row["iteration"] for row in read_metrics(run_dir)] == [1, 2, 3, 4]
    checkpoint = load_checkpoint(run_dir)
    assert (checkpoint["iteration"], checkpoint["global_step"]) == (3, 768)

    result = train(config, run_dir=run_dir, resume=checkpoint)
    rows = read_metrics(run_dir)
    assert [row["iteration"] for row in rows] == list(range(1, 9))  # iteration 4 redone, not duplicated
    assert result.global_step == 2048 and rows[-1]["env_steps"] == 2048
    assert load_checkpoint(run_dir)["iteration"] == 8
    # resuming restores weights, optimiser and RNG: resuming the same checkpoint twice agrees
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    again = train(config, run_dir=copy_dir, resume=checkpoint)
    assert without_time(read_metrics(again.run_dir))[-1] == without_time(rows)[-1]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    config = TrainConfig(env=EnvConfig(env_id="proximal-test/NaNReward-v0", num_envs=2),
                         ppo=PPOConfig(total_timesteps=64 * 2 * 20, num_steps=64, minibatch_size=64),
                         run=RunConfig(checkpoint_every=2, runs_dir=str(tmp_path / "runs")))
    # each env's reward turns NaN after 600 of its steps: during iteration 10 (steps 577-640)
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite at iteration 10 .*last good checkpoint kept"):
        train(config)
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["iteration"] == 8
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values())
    assert [row["iteration"] for row in read_metrics(run_dir)] == list(range(1, 10))


def test_stop_return_stops_at_the_first_evaluation_that_reaches_it(tmp_path):
    # A low bar that a near-random CartPole policy clears (episodes last ~20 steps): the first
    # evaluation, after iteration 2, must stop the run; its returns are the final evaluation.
    config = cartpole_config(tmp_path, stop_return=5.0, eval_every=2, eval_episodes=20)
    result = train(config)
    rows = read_metrics(result.run_dir)
    assert [row["iteration"] for row in rows] == [1, 2]
    assert rows[0]["eval_return"] is None and rows[1]["eval_return"] >= 5.0
    assert result.eval_returns.mean() == pytest.approx(rows[1]["eval_return"], rel=1e-5)
    assert len(result.eval_returns) == 20
    assert load_checkpoint(result.run_dir)["iteration"] == 2
    assert result.global_step == 2 * config.batch_size
    assert result.reached_stop_return is True  # a Python bool: it goes into bench.json


def test_unreachable_stop_return_trains_the_whole_budget(tmp_path):
    config = cartpole_config(tmp_path, stop_return=10_000.0, eval_every=3, eval_episodes=5)
    result = train(config)
    rows = read_metrics(result.run_dir)
    assert len(rows) == config.num_iterations == 8
    evaluated = [row["iteration"] for row in rows if row["eval_return"] is not None]
    assert evaluated == [3, 6, 8]  # every eval_every iterations, and the last one
    assert result.global_step == config.ppo.total_timesteps and not result.reached_stop_return


def test_continuous_actions_train_end_to_end_on_pendulum(tmp_path):
    """A smoke run of the Gaussian head through the whole loop (learning Pendulum is issue 5's
    benchmark, not a CI test): actions are stored unclipped, the run saves, loads and evaluates."""
    config = TrainConfig(env=EnvConfig(env_id="Pendulum-v1", num_envs=4),
                         ppo=PPOConfig(total_timesteps=2048, num_steps=128, minibatch_size=128),
                         run=RunConfig(eval_episodes=3, runs_dir=str(tmp_path / "runs")))
    result = train(config)
    rows = read_metrics(result.run_dir)
    assert len(rows) == 4 and all(np.isfinite(row["policy_loss"]) for row in rows)
    assert result.eval_returns.shape == (3,) and (result.eval_returns < 0).all()  # Pendulum's costs
    agent = PPOAgent.load(result.run_dir)
    assert agent.continuous and agent.action_shape == (1,)
    assert agent.act(np.zeros((5, 3))).shape == (5, 1)


def test_normalisation_switches_train_save_and_resume(tmp_path):
    config = TrainConfig(env=EnvConfig(env_id="Pendulum-v1", num_envs=2),
                         ppo=PPOConfig(total_timesteps=1024, num_steps=128, minibatch_size=128,
                                       normalize_observations=True, normalize_rewards=True),
                         run=RunConfig(eval_episodes=2, checkpoint_every=2, runs_dir=str(tmp_path / "runs")))
    result = train(config)
    checkpoint = load_checkpoint(result.run_dir)
    # every observation the two envs produced during 4 rollouts of 128 steps was folded in
    assert checkpoint["observation_stats"]["count"] == 4 * 128 * 2
    assert checkpoint["reward_stats"]["count"] == 4 * 128 * 2
    longer = train(config.with_overrides({"ppo": {"total_timesteps": 1536}}), run_dir=result.run_dir, resume=checkpoint)
    assert longer.global_step == 1536
    assert load_checkpoint(result.run_dir)["observation_stats"]["count"] == 6 * 128 * 2
