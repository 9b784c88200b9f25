"""Greedy evaluation over vectorised envs, and rendering an episode to a GIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from proximal.agent import PPOAgent
from proximal.envs import make_env, make_vector_env

MAX_PARALLEL_EPISODES = 128


def evaluate(agent: PPOAgent, env_id: str, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted returns [episodes] of the greedy policy, `seed` fixing the initial states.

    Each env is given its number of episodes up front (never "the first k to finish", which
    would favour short episodes), and all envs step together.
    """
    num_envs = min(episodes, MAX_PARALLEL_EPISODES)
    quota = np.full(num_envs, episodes // num_envs) + (np.arange(num_envs) < episodes % num_envs)  # [N]
    envs = make_vector_env(env_id, num_envs)
    try:
        observations, _ = envs.reset(seed=seed)
        just_ended = np.zeros(num_envs, dtype=bool)  # next step is an autoreset: ignore it
        running = np.zeros(num_envs)
        completed = np.zeros(num_envs, dtype=np.int64)
        returns: list[float] = []
        while (completed < quota).any():
            observations, rewards, terminated, truncated, _ = envs.step(agent.act(observations))
            counting = ~just_ended & (completed < quota)
            running += np.where(counting, rewards, 0.0)
            done = (terminated | truncated) & counting
            returns.extend(running[done].tolist())
            completed += done
            running[done] = 0.0
            just_ended = terminated | truncated
    finally:
        envs.close()
    return np.asarray(returns)


def render_gif(agent: PPOAgent, env_id: str, path: Path, seed: int, fps: int | None = None) -> int:
    """Play one greedy episode with rgb_array rendering and save it as an animated GIF.

    Returns the number of frames written.
    """
    from PIL import Image

    env = make_env(env_id, render_mode="rgb_array")
    try:
        observation, _ = env.reset(seed=seed)
        frames = [env.render()]
        done = False
        while not done:
            observation, _, terminated, truncated, _ = env.step(agent.act(observation))
            frames.append(env.render())
            done = terminated or truncated
        fps = fps or env.metadata.get("render_fps", 30)
    finally:
        env.close()
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return len(images)
