"""Running statistics against NumPy on the same stream; reward scaling against a plain loop."""

import numpy as np

from proximal.normalize import RewardScaler, RunningMeanStd


def test_running_mean_and_variance_equal_numpy_over_the_whole_stream():
    rng = np.random.default_rng(0)
    stats = RunningMeanStd((3,))
    seen = []
    for size in (1, 7, 64, 3, 200, 2):
        batch = rng.normal(loc=[1.0, -5.0, 100.0], scale=[0.1, 3.0, 20.0], size=(size, 3))
        stats.update(batch)
        seen.append(batch)
        stream = np.concatenate(seen)
        np.testing.assert_allclose(stats.mean, stream.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats.var, stream.var(axis=0), rtol=1e-10)
        assert stats.count == len(stream)


def test_normalize_is_identity_before_data_then_standardises_and_clips():
    stats = RunningMeanStd((2,))
    values = np.array([[0.5, -2.0]])
    np.testing.assert_allclose(stats.normalize(values), values, rtol=1e-6)
    stats.update(np.array([[0.0, 10.0], [2.0, 30.0]]))  # mean (1, 20), std (1, 10)
    np.testing.assert_allclose(stats.normalize(np.array([[3.0, 0.0]])), [[2.0, -2.0]], rtol=1e-6)
    assert stats.normalize(np.array([[1e6, 20.0]]))[0, 0] == 10.0  # clipped
    restored = RunningMeanStd((2,))
    restored.load_state_dict(stats.state_dict())
    np.testing.assert_array_equal(restored.normalize(values), stats.normalize(values))


def test_reward_scaler_divides_by_the_std_of_the_discounted_return():
    rng = np.random.default_rng(1)
    gamma, steps, num_envs = 0.9, 50, 3
    rewards = rng.normal(size=(steps, num_envs))
    ended = rng.random((steps, num_envs)) < 0.1
    scaler = RewardScaler(num_envs, gamma)
    scaled = scaler.scale(rewards, ended)
    # Reference: a plain loop over the same stream, NumPy variance of every R seen so far.
    discounted, history, expected = np.zeros(num_envs), [], []
    for t in range(steps):
        discounted = gamma * discounted + rewards[t]
        history.extend(discounted.tolist())
        expected.append(rewards[t] / np.sqrt(np.var(history) + 1e-8))
        discounted = np.where(ended[t], 0.0, discounted)
    np.testing.assert_allclose(scaled, np.array(expected), rtol=1e-5)
    assert (np.sign(scaled) == np.sign(rewards)).all()
