"""Clips as a person sees them: the env re-drawn from each step's observation, as a film strip.

A clip in `comparisons.jsonl` holds observations and actions, not frames. For the envs whose
observation is their whole state the frames can be drawn again exactly: the env's state is set
from each observation and `render()` called (`render_mode="rgb_array"`). The k frames are laid
side by side in one PNG (a film strip [H, k W, 3]) that the page plays on a canvas; both clips of
a query share one timer there, so they loop at the same speed, in step.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Callable

import numpy as np
from PIL import Image

from proximal.envs import make_env
from proximal.errors import EnvError

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame draws off screen: no display is needed or probed
os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")  # SIGTERM and SIGINT stay Python's (cli.main's handler)

FRAME_WIDTH = 240  # pixels per frame on the page; the env's frame is scaled to it


def _cartpole_state(observation: np.ndarray, action: np.ndarray) -> dict:
    return {"state": np.asarray(observation[:4], dtype=np.float64)}  # x, x_dot, theta, theta_dot


def _pendulum_state(observation: np.ndarray, action: np.ndarray) -> dict:
    cos_theta, sin_theta, theta_dot = (float(value) for value in observation[:3])
    return {"state": np.array([math.atan2(sin_theta, cos_theta), theta_dot]),
            "last_u": float(action[0])}  # the torque arrow Pendulum draws


# The env classes whose observation is their whole state, and how to set it (attributes of env.unwrapped).
STATE_SETTERS: dict[str, Callable[[np.ndarray, np.ndarray], dict]] = {
    "CartPoleEnv": _cartpole_state,
    "FixedHorizonCartPole": _cartpole_state,
    "PendulumEnv": _pendulum_state,
}
# What the person is told the task is (the paper gave its raters a sentence or two per task).
TASKS = {
    "CartPoleEnv": "Keep the pole upright, without the cart running off the track.",
    "FixedHorizonCartPole": "Keep the pole upright, without the cart running off the track.",
    "PendulumEnv": "Swing the pendulum up and hold it upright (the arrow is the torque: less is better).",
}


def check_renderable(env_id: str) -> None:
    """Raise EnvError unless clips of `env_id` can be drawn for a person."""
    env = make_env(env_id)
    name = type(env.unwrapped).__name__
    env.close()
    if name not in STATE_SETTERS:
        raise EnvError(f"--reward.labeller human draws clips of CartPole and Pendulum envs (their observation is their "
                       f"whole state); {env_id} ({name}) is not one of them yet")


class ClipRenderer:
    """Draws clips of one env id as PNG film strips; safe to call from several threads (one
    env, one lock: pygame draws on one surface)."""

    def __init__(self, env_id: str):
        check_renderable(env_id)
        self.env = make_env(env_id, render_mode="rgb_array")
        self.env.reset(seed=0)
        self.set_state = STATE_SETTERS[type(self.env.unwrapped).__name__]
        self.fps = int(self.env.metadata.get("render_fps", 30))
        self.task = TASKS[type(self.env.unwrapped).__name__]
        self.lock = threading.Lock()

    def frames(self, observations: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The env drawn at each step of a clip, [k, obs_dim] and [k, A] -> [k, H, W, 3] uint8."""
        frames = []
        with self.lock:
            for observation, action in zip(observations, actions):
                for name, value in self.set_state(np.asarray(observation), np.asarray(action)).items():
                    setattr(self.env.unwrapped, name, value)
                frames.append(self.env.render())
        return np.stack(frames)

    def film_strip(self, observations: np.ndarray, actions: np.ndarray) -> bytes:
        """One PNG holding the clip's k frames left to right, each FRAME_WIDTH pixels wide."""
        frames = self.frames(observations, actions)  # [k, H, W, 3]
        length, height, width, _ = frames.shape
        frame_height = round(height * FRAME_WIDTH / width)
        strip = Image.new("RGB", (FRAME_WIDTH * length, frame_height))
        for position, frame in enumerate(frames):
            image = Image.fromarray(frame).resize((FRAME_WIDTH, frame_height), Image.Resampling.BILINEAR)
            strip.paste(image, (position * FRAME_WIDTH, 0))
        buffer = io.BytesIO()
        strip.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def frame_size(self) -> tuple[int, int]:
        """(width, height) of one frame on the page."""
        with self.lock:
            height, width, _ = self.env.render().shape
        return FRAME_WIDTH, round(height * FRAME_WIDTH / width)

    def close(self) -> None:
        self.env.close()
