"""Learning from preferences: clips, the label schedule, the labeller, query selection, the
fixed-horizon CartPole, and the whole loop (smoke run, replay, CLI)."""

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from proximal.cli import main
from proximal.config import PrefsConfig
from proximal.presets import preset_for
from proximal.fixed_horizon import FIXED_HORIZON_CARTPOLE_ID, FixedHorizonCartPole
from proximal.labellers import SyntheticLabeller, make_labeller
from proximal.preferences import (COMPARISONS_NAME, LabelSchedule, PreferenceLearner, clip_starts,
                                  step_features, train_from_preferences)
from proximal.train import EnvState, collect_rollout
from proximal.envs import make_vector_env
from proximal.agent import PPOAgent


def brute_force_clip_starts(valid, done, length):
    starts = []
    num_steps, num_envs = valid.shape
    for t in range(num_steps - length + 1):
        for n in range(num_envs):
            rows = range(t, t + length)
            if all(valid[r, n] for r in rows) and not any(done[r, n] for r in rows[:-1]):
                starts.append((t, n))
    return sorted(starts)


@pytest.mark.parametrize("seed", range(10))
def test_clip_starts_match_a_brute_force_scan(seed):
    rng = np.random.default_rng(seed)
    done = rng.random((40, 3)) < 0.08
    valid = np.ones_like(done)
    valid[1:] = ~done[:-1]  # NEXT_STEP autoreset: the row after an episode's end is a reset row
    valid[0] = rng.random(3) < 0.8
    for length in (1, 5, 12):
        found = sorted(map(tuple, clip_starts(valid, done, length).tolist()))
        assert found == brute_force_clip_starts(valid, done, length)
    assert len(clip_starts(valid, done, 41)) == 0


def test_a_clip_may_end_on_the_last_step_of_an_episode_but_not_cross_it():
    done = np.zeros((6, 1), dtype=bool)
    done[2, 0] = True
    valid = np.ones((6, 1), dtype=bool)
    valid[3, 0] = False  # the autoreset row
    assert clip_starts(valid, done, 3).tolist() == [[0, 0]]  # rows 0-2; rows 4-5 are too short


def test_label_schedule_front_loads_then_decays_and_ends_exactly_at_the_budget():
    iterations, batch = 97, 2048
    schedule = LabelSchedule(1000, initial_fraction=0.25, iterations=iterations, batch_size=batch, rounds=50,
                             decay=0.25)
    asked, per_round = 0, []
    for iteration in range(iterations):  # what the learner does after each rollout
        count = schedule.labels_to_ask(iteration * batch, asked)
        if iteration * batch in schedule.round_steps[:-1]:
            per_round.append(count)
        asked += count
    assert len(per_round) == 50 and per_round[0] == 250 and asked == 1000
    assert np.mean(per_round[1:11]) > 2.5 * np.mean(per_round[-10:])  # rate ~ tau / (tau + step)
    # cumulative count L0 + (L - L0) log(1 + s/tau) / log(1 + S/tau)
    total, tau = iterations * batch, 0.25 * iterations * batch
    assert schedule.due_by(0) == 250 and schedule.due_by(total) == 1000
    assert schedule.due_by(40 * batch) == 250 + math.floor(750 * math.log1p(40 * batch / tau) / math.log1p(total / tau))
    # fewer iterations than rounds: a round every iteration
    assert LabelSchedule(10, 0.5, iterations=4, batch_size=8, rounds=50, decay=1.0).round_steps == [0, 8, 16, 24, 32]


def test_labeller_prefers_the_higher_true_return_and_calls_ties_equal():
    labeller = SyntheticLabeller("none", 0.1, 1.0, np.random.default_rng(0))
    assert labeller.answer(3.0, 1.0) == 1.0
    assert labeller.answer(-5.0, -2.0) == 0.0
    assert labeller.answer(7.0, 7.0) == 0.5


def test_uniform_noise_labeller_errs_at_half_its_error_rate():
    labeller = SyntheticLabeller("uniform", 0.2, 1.0, np.random.default_rng(0))
    answers = np.array([labeller.answer(1.0, 0.0) for _ in range(20_000)])
    # a random answer is right half of the time: wrong with probability 0.2 / 2
    assert abs((answers == 0.0).mean() - 0.1) < 0.01


def test_boltzmann_labeller_matches_its_choice_probability():
    labeller = SyntheticLabeller("boltzmann", 0.0, 2.0, np.random.default_rng(0))
    answers = np.array([labeller.answer(1.0, 0.0) for _ in range(20_000)])
    assert abs(answers.mean() - 1 / (1 + math.exp(-0.5))) < 0.01


def test_labeller_labels_constructed_clips_by_their_true_rewards():
    """Clips cut from a constructed rollout: the labeller's label follows the summed true reward."""
    true_rewards = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # [T, N]
    valid, done = np.ones((4, 2), dtype=bool), np.zeros((4, 2), dtype=bool)
    starts = clip_starts(valid, done, 2)
    returns = {(int(t), int(n)): true_rewards[t:t + 2, n].sum() for t, n in starts}
    assert returns == {(0, 0): 2.0, (1, 0): 2.0, (2, 0): 1.0, (0, 1): 0.0, (1, 1): 1.0, (2, 1): 2.0}
    labeller = SyntheticLabeller("none", 0.0, 1.0, np.random.default_rng(0))
    assert labeller.answer(returns[(0, 0)], returns[(0, 1)]) == 1.0
    assert labeller.answer(returns[(2, 0)], returns[(1, 1)]) == 0.5
    assert labeller.answer(returns[(2, 0)], returns[(2, 1)]) == 0.0


def test_discrete_actions_are_one_hot_in_the_reward_features():
    observations = np.zeros((2, 1, 3), dtype=np.float32)
    actions = np.array([[2], [0]])
    features = step_features(observations, actions, gym.spaces.Discrete(3))
    assert features.shape == (2, 1, 6)
    assert features[0, 0, 3:].tolist() == [0, 0, 1] and features[1, 0, 3:].tolist() == [1, 0, 0]


def test_fixed_horizon_cartpole_runs_to_the_limit_and_pays_only_inside_the_bounds():
    actions = np.random.default_rng(0).integers(2, size=500)
    reference = gym.make("CartPole-v1")
    fixed = gym.make(FIXED_HORIZON_CARTPOLE_ID)
    observation_ref, _ = reference.reset(seed=3)
    observation, _ = fixed.reset(seed=3)
    assert np.array_equal(observation, observation_ref)
    falls, fall_step, episode_return = 0, None, 0.0
    for step, action in enumerate(actions):
        observation, reward, terminated, truncated, _ = fixed.step(int(action))
        assert not terminated and truncated == (step == 499)
        episode_return += reward
        if fall_step is None:  # balancing: same physics as CartPole-v1 until that one would end
            observation_ref, _, fell, _, _ = reference.step(int(action))
            assert np.array_equal(observation, observation_ref)
            assert reward == (0.0 if fell else 1.0)
            if fell:
                falls, fall_step = falls + 1, step
        else:  # falling: 25 more steps pay 0, then the cart starts afresh
            assert reward == 0.0
            if step == fall_step + FixedHorizonCartPole.FALL_STEPS:
                assert np.all(np.abs(observation) <= 0.05)
                reference.reset()
                reference.unwrapped.state = fixed.unwrapped.state.copy()  # follow the fresh start
                fall_step = None
    assert falls >= 5
    assert episode_return == 500 - falls * (1 + FixedHorizonCartPole.FALL_STEPS) - (
        0 if fall_step is None else 499 - fall_step - FixedHorizonCartPole.FALL_STEPS)


def small_run(tmp_path, **prefs_overrides):
    config = preset_for("Pendulum-v1").with_overrides(
        {"ppo": {"total_timesteps": 4096}, "run": {"eval_episodes": 3, "runs_dir": str(tmp_path / "runs")}})
    prefs = PrefsConfig(labels=40, initial_steps=30, steps=10, **prefs_overrides)
    return train_from_preferences(config, prefs)


def test_learned_reward_replaces_the_env_reward_in_the_rollout(tmp_path):
    config = preset_for("Pendulum-v1").with_overrides({"env": {"num_envs": 2}, "ppo": {
        "num_steps": 64, "minibatch_size": 64, "total_timesteps": 1280}})
    envs = make_vector_env("Pendulum-v1", 2)
    agent = PPOAgent.for_spaces(envs.single_observation_space, envs.single_action_space, config)
    learner = PreferenceLearner(PrefsConfig(labels=20, initial_steps=5), config, envs.single_observation_space,
                                envs.single_action_space, tmp_path, make_labeller(PrefsConfig(), np.random.default_rng(2)))
    state = EnvState.after_reset(envs.reset(seed=0)[0])
    rollout = collect_rollout(agent, envs, state, 64)
    env_rewards = rollout.env_rewards.copy()
    stats = learner.relabel(rollout, 128)
    features = torch.from_numpy(step_features(rollout.env_observations, rollout.env_actions,
                                              envs.single_action_space))
    expected = learner.model.reward(features.flatten(0, 1)).reshape(64, 2)
    assert torch.allclose(rollout.rewards, torch.where(rollout.valid, expected, torch.zeros(())))
    assert np.array_equal(rollout.env_rewards, env_rewards)  # the true rewards are kept for labelling
    assert stats["labels"] == 5  # the initial 25% of 20, asked at the first rollout
    lines = (tmp_path / COMPARISONS_NAME).read_text().splitlines()
    assert len(lines) == 5
    record = json.loads(lines[0])
    clip = record["clips"][0]
    rows = slice(clip["rollout_row"], clip["rollout_row"] + 25)
    assert np.allclose(clip["observations"], rollout.env_observations[rows, clip["env"]], atol=1e-5)
    assert record["true_returns"][0] == pytest.approx(env_rewards[rows, clip["env"]].sum(), abs=1e-4)
    envs.close()


def test_disagreement_asks_the_pairs_the_ensemble_disagrees_on_most(tmp_path, monkeypatch):
    config = preset_for("Pendulum-v1").with_overrides({"env": {"num_envs": 2}, "ppo": {
        "num_steps": 64, "minibatch_size": 64, "total_timesteps": 1280}})
    envs = make_vector_env("Pendulum-v1", 2)
    agent = PPOAgent.for_spaces(envs.single_observation_space, envs.single_action_space, config)
    prefs = PrefsConfig(labels=20, initial_steps=5, candidates_per_query=10)
    learner = PreferenceLearner(prefs, config, envs.single_observation_space, envs.single_action_space,
                                tmp_path, make_labeller(prefs, np.random.default_rng(2)))
    seen = {}
    member_preferences = learner.model.member_preferences

    def spy(clips_1, clips_2):  # the first call scores the candidates (later ones: validation accuracy)
        if not seen:
            seen["variance"] = member_preferences(clips_1, clips_2).var(0)
            seen["clips_1"] = clips_1
        return member_preferences(clips_1, clips_2)

    monkeypatch.setattr(learner.model, "member_preferences", spy)
    rollout = collect_rollout(agent, envs, EnvState.after_reset(envs.reset(seed=0)[0]), 64)
    learner.relabel(rollout, 128)
    assert len(seen["variance"]) == 50  # 10 candidates per query, 5 queries
    top = torch.argsort(seen["variance"], descending=True)[:5]
    asked = torch.stack(learner.comparisons.clips_1)
    assert torch.equal(asked, seen["clips_1"][top])
    envs.close()


def test_smoke_run_of_the_whole_loop_writes_everything_and_replays_exactly(tmp_path):
    result, fit = small_run(tmp_path / "first")
    run_dir = result.run_dir
    expected_files = {"config.json", "prefs.json", "metrics.csv", "checkpoint.pt", "reward_model.pt",
                      "comparisons.jsonl", "reward_fit.json", "eval.json", "learning_curve.png",
                      "preference_curves.png", "learned_vs_true_reward.png"}
    assert expected_files <= {path.name for path in run_dir.iterdir()}
    records = [json.loads(line) for line in (run_dir / COMPARISONS_NAME).read_text().splitlines()]
    assert len(records) == 40 and [r["query"] for r in records] == list(range(40))
    assert fit["labels"] == 40 and fit["held_out_clips"] == 2 * sum(r["validation"] for r in records)
    # Replaying the recorded answers reproduces the run: same queries, same labels, same policy.
    replayed, _ = small_run(tmp_path / "replay", labeller="replay", replay_from=str(run_dir / COMPARISONS_NAME))
    replayed_records = [json.loads(line) for line in (replayed.run_dir / COMPARISONS_NAME).read_text().splitlines()]
    assert replayed_records == records
    original = PPOAgent.load(run_dir).network.state_dict()
    for name, tensor in PPOAgent.load(replayed.run_dir).network.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_replay_refuses_answers_to_different_queries(tmp_path):
    result, _ = small_run(tmp_path / "first")
    from proximal.labellers import ReplayError

    with pytest.raises(ReplayError, match="query 0 differs from the recorded one"):
        config = preset_for("Pendulum-v1").with_overrides(
            {"ppo": {"total_timesteps": 4096}, "run": {"eval_episodes": 3, "runs_dir": str(tmp_path / "runs"), "seed": 1}})
        train_from_preferences(config, PrefsConfig(labels=40, initial_steps=30, steps=10,
                                                   labeller="replay",
                                                   replay_from=str(result.run_dir / COMPARISONS_NAME)))


def test_prefs_command_then_eval_on_its_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["prefs", "Pendulum-v1", "--ppo.total-timesteps", "4096", "--reward.labels", "40", "--reward.query", "random",
                 "--reward.initial-steps", "30", "--reward.steps", "10", "--eval-episodes", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "PPO on the learned reward, 40 labels" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "prefs.json").read_text())["query"] == "random"
    assert main(["eval", str(run_dir), "--episodes", "2"]) == 0
    assert "greedy evaluation, 2 episodes" in capsys.readouterr().out


def test_prefs_on_cartpole_with_its_preset_runs_to_the_end(tmp_path, monkeypatch, capsys):
    """First contact: `proximal prefs CartPole-v1` once stopped with "segment_length must be <=
    num_steps = 16", and with longer rollouts found no two 25-step clips in an untrained policy's
    short episodes; its preset's 8-step clips fit both."""
    monkeypatch.chdir(tmp_path)
    code = main(["prefs", "CartPole-v1", "--ppo.total-timesteps", "2048", "--reward.labels", "20", "--eval-episodes", "2",
                 "--reward.initial-steps", "20", "--reward.steps", "5"])
    assert code == 0 and "PPO on the learned reward, 20 labels" in capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "prefs.json").read_text())["segment_length"] == 8
