"""Learning the reward from pairwise preferences: clips, the labeller, query selection, the
label schedule, and the loop that interleaves them with PPO (Christiano et al. 2017, Section 2.2).

Each PPO iteration (`PreferenceLearner.relabel`, called by `train` after every rollout):
  1. cut clips of k steps out of the rollout (never across an episode's end);
  2. if the label schedule says so, pick pairs of clips to ask about (the ones the ensemble
     disagrees on most, or at random), ask the labeller, record question and answer;
  3. refit the reward model on all comparisons so far;
  4. replace the rollout's rewards by the learned reward r_hat(o, a), so PPO never sees the env's.
The labeller judges clips by the env's *true* reward (never the learned one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from proximal.checkpoint import load_checkpoint, save_checkpoint
from proximal.config import PrefsConfig, TrainConfig
from proximal.errors import EnvError
from proximal.reward_model import RewardModel, rank_correlation
from proximal.human.labeller import HumanLabeller, Query, question_of
from proximal.labellers import ReplayLabeller, SyntheticLabeller, make_labeller
from proximal.run import read_jsonl, write_json_atomic, write_text_atomic
from proximal.envs import make_vector_env
from proximal.train import Rollout, TrainResult, new_run_dir, train

COMPARISONS_NAME = "comparisons.jsonl"
PREFS_CONFIG_NAME = "prefs.json"
REWARD_MODEL_NAME = "reward_model.pt"
REWARD_FIT_NAME = "reward_fit.json"


def step_features(env_observations: np.ndarray, env_actions: np.ndarray, action_space: gym.Space) -> np.ndarray:
    """The reward model's input per step: the observation and the action (one-hot when
    discrete), [T, N, obs_dim] and [T, N] or [T, N, A] -> [T, N, obs_dim + A]."""
    if isinstance(action_space, gym.spaces.Discrete):
        actions = np.eye(int(action_space.n), dtype=np.float32)[env_actions]  # [T, N, n]
    else:
        actions = env_actions.astype(np.float32)
    return np.concatenate([env_observations, actions], axis=-1)


def clip_starts(valid: np.ndarray, done: np.ndarray, length: int) -> np.ndarray:
    """(t, n) pairs [C, 2] where a clip of `length` steps starts inside one episode: rows
    t..t+length-1 of env n are all valid (no autoreset row) and no episode ends before the last."""
    num_steps = valid.shape[0]
    if length > num_steps:
        return np.zeros((0, 2), dtype=np.int64)
    invalid = np.concatenate([np.zeros((1, valid.shape[1])), np.cumsum(~valid, axis=0)])  # [T+1, N]
    ended = np.concatenate([np.zeros((1, valid.shape[1])), np.cumsum(done, axis=0)])  # [T+1, N]
    last_start = num_steps - length
    starts = np.arange(last_start + 1)
    fits = ((invalid[starts + length] - invalid[starts] == 0)
            & (ended[starts + length - 1] - ended[starts] == 0))  # [S, N]
    return np.argwhere(fits)


class LabelSchedule:
    """When labels are asked, and how many.

    Labels are asked in `rounds` rounds spread evenly over the training iterations, the first at
    the first rollout (the initial policy). By env step s, L0 + (L - L0) log(1 + s / tau) /
    log(1 + S / tau) labels are due: a share L0 = `initial_fraction` x L at the start, then a rate
    proportional to tau / (tau + s) (the paper's 2e6 / (T + 2e6)), reaching L at the last step S.
    Each round asks, up front, for the labels due by the next round.
    """

    def __init__(self, total_labels: int, initial_fraction: float, iterations: int, batch_size: int,
                 rounds: int, decay: float):
        self.total_labels = total_labels
        self.initial_labels = round(total_labels * initial_fraction)
        self.total_steps = iterations * batch_size
        self.tau = decay * self.total_steps
        rounds = min(rounds, iterations)
        self.round_steps = [(iterations * j // rounds) * batch_size for j in range(rounds)] + [self.total_steps]

    def due_by(self, step: int) -> int:
        progress = math.log1p(step / self.tau) / math.log1p(self.total_steps / self.tau)
        return min(self.total_labels, self.initial_labels + math.floor(
            (self.total_labels - self.initial_labels) * progress + 1e-9))

    def labels_to_ask(self, steps_before: int, asked: int) -> int:
        """Labels to ask after the rollout that began at `steps_before`: none unless a round starts
        there; then the first round's share, or what is due by the next round."""
        if steps_before not in self.round_steps[:-1]:
            return 0
        if steps_before == 0:  # less what was asked before a resume
            return max(0, self.initial_labels - asked)
        return self.due_by(self.round_steps[self.round_steps.index(steps_before) + 1]) - asked


@dataclass
class Comparisons:
    """Every answered query so far ("can't tell" ones dropped)."""

    clips_1: list[torch.Tensor]  # each [k, D]
    clips_2: list[torch.Tensor]
    labels: list[float]  # mu(1)
    is_validation: list[bool]
    true_returns: list[tuple[float, float]]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.stack(self.clips_1), torch.stack(self.clips_2),  # [M, k, D] each
                torch.tensor(self.labels), torch.tensor(self.is_validation))  # [M], [M]


def query_from_record(record: dict[str, Any]) -> Query:
    """A query as comparisons.jsonl or queries.jsonl holds it, back as tensors (resume)."""
    clips = tuple(torch.cat([torch.tensor(clip["observations"], dtype=torch.float32),
                             torch.tensor(clip["actions"], dtype=torch.float32)], dim=-1)  # [k, D]
                  for clip in record["clips"])
    return Query(record["query"], question_of(record), clips, bool(record["validation"]), int(record.get("left", 1)))


class PreferenceLearner:
    """The reward side of the loop; `train(..., reward_learner=...)` calls `relabel` once per
    rollout. Writes comparisons.jsonl (one query and its answer per line) and reward_model.pt
    into the run directory as it goes.

    The labeller is a synthetic or replay labeller, answering each query at once, or a person
    (`proximal.human.HumanLabeller`), answering on a web page while training goes on. The reward
    model is refitted whenever new answers have come in. With `resume`, the answers already in
    comparisons.jsonl are read back and reward_model.pt reloaded: no answer is asked twice.
    """

    metric_columns = ("labels", "reward_train_loss", "reward_val_loss", "reward_val_accuracy", "reward_l2",
                      "learned_true_correlation")

    def __init__(self, prefs: PrefsConfig, config: TrainConfig, observation_space: gym.spaces.Box,
                 action_space: gym.Space, run_dir: Path, labeller: SyntheticLabeller | ReplayLabeller | HumanLabeller,
                 resume: bool = False):
        prefs.check_against(config)
        self.prefs = prefs
        self.action_space = action_space
        action_features = int(action_space.n) if isinstance(action_space, gym.spaces.Discrete) else action_space.shape[0]
        self.obs_dim = observation_space.shape[0]
        self.input_dim = self.obs_dim + action_features
        self.run_dir = Path(run_dir)
        seed = config.run.seed
        self.rng = np.random.default_rng(seed)
        self.left_rng = np.random.default_rng(seed + 3)  # which clip a person sees on the left
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # the reward model's init must not shift PPO's random stream
            torch.manual_seed(seed + 1)
            self.model = RewardModel(self.input_dim, prefs.ensemble_size, prefs.hidden_sizes,
                                     prefs.learning_rate, prefs.model_error_rate, prefs.learned_std,
                                     input_clip=prefs.input_clip)
        self.batch_size = config.batch_size
        self.schedule = LabelSchedule(prefs.labels, prefs.initial_label_fraction, config.num_iterations,
                                      config.batch_size, prefs.label_rounds, prefs.label_decay)
        self.labeller = labeller
        self.human = isinstance(labeller, HumanLabeller)
        self.comparisons = Comparisons([], [], [], [], [])
        self.queries_asked = 0
        self.fits = 0
        self.fitted_labels = 0  # comparisons the reward model was last fitted on
        if resume:
            self._reload()
        write_text_atomic(self.run_dir / PREFS_CONFIG_NAME, prefs.to_json())
        self.comparisons_file = None if self.human else open(self.run_dir / COMPARISONS_NAME, "a" if resume else "w")

    def _reload(self) -> None:
        """Continue a killed run: every recorded answer back in, the last reward model reloaded."""
        records = read_jsonl(self.run_dir / COMPARISONS_NAME, repair=True)
        for record in records:
            self._add(query_from_record(record), record["label"])
        asked = self.labeller.asked if self.human else len(records)
        self.queries_asked = max([asked] + [record["query"] + 1 for record in records])
        if (self.run_dir / REWARD_MODEL_NAME).exists():
            saved = load_checkpoint(self.run_dir / REWARD_MODEL_NAME)
            self.model.load_state_dict(saved["reward_model"])
            self.fits, self.fitted_labels = 1, int(saved["labels"])

    def relabel(self, rollout: Rollout, global_step: int) -> dict[str, float]:
        features = step_features(rollout.env_observations, rollout.env_actions, self.action_space)  # [T, N, D]
        due = self.schedule.labels_to_ask(global_step - self.batch_size, self.queries_asked)
        if due > 0:
            done = (rollout.terminated | rollout.truncated).numpy()
            queries = self._choose(features, rollout.env_rewards, rollout.valid.numpy(), done, due, global_step)
            if self.human:
                self.labeller.submit(queries)
            else:
                for query in queries:
                    label = self.labeller.answer(*query.true_returns())
                    self.comparisons_file.write(json.dumps({**query.record, "label": label}) + "\n")
                    self.comparisons_file.flush()
                    self._add(query, label)
        if self.human and self.prefs.human_pace == "wait":
            self.labeller.wait_until_answered()  # this round's queries, and those a resumed run put back
        if self.human:
            for query, label in self.labeller.take_answers():
                self._add(query, label)
            self.labeller.set_progress(env_steps=global_step)
        stats: dict[str, float] = {}
        if len(self.comparisons.labels) > self.fitted_labels and not all(self.comparisons.is_validation):
            stats = self.model.fit(*self.comparisons.tensors(),
                                   steps=self.prefs.initial_steps if self.fits == 0 else self.prefs.steps,
                                   minibatch_size=self.prefs.batch_size, generator=self.generator)
            self.fits += 1
            self.fitted_labels = len(self.comparisons.labels)
            save_checkpoint(self.run_dir / REWARD_MODEL_NAME, {
                "reward_model": self.model.state_dict(), "input_dim": self.input_dim,
                "prefs": self.prefs.to_json(), "labels": self.fitted_labels})
        valid = rollout.valid  # [T, N]
        if self.fits == 0:  # no answer to learn from yet (a person has not answered): reward 0
            learned = torch.zeros(valid.shape)
        else:
            learned = self.model.reward(torch.from_numpy(features).flatten(0, 1)).reshape(valid.shape)  # [T, N]
        rollout.rewards = torch.where(valid, learned, torch.zeros(()))
        true_rewards = rollout.env_rewards[valid.numpy()]
        stats["labels"] = float(len(self.comparisons.labels))
        stats["learned_true_correlation"] = (float(np.corrcoef(learned[valid].numpy(), true_rewards)[0, 1])
                                             if true_rewards.std() > 0 and self.fits > 0 else math.nan)
        return stats

    def _choose(self, features: np.ndarray, true_rewards: np.ndarray, valid: np.ndarray, done: np.ndarray,
                count: int, global_step: int) -> list[Query]:
        """Choose `count` pairs of clips of this rollout to ask about."""
        length = self.prefs.segment_length
        starts = clip_starts(valid, done, length)  # [S, 2] (t, n)
        if len(starts) < 2:
            raise EnvError(f"no two clips of {length} steps fit within episodes of this rollout; "
                           "lower --reward.segment-length")
        num_candidates = count * (self.prefs.candidates_per_query if self.prefs.query == "disagreement" else 1)
        first = self.rng.integers(len(starts), size=num_candidates)
        second = (first + self.rng.integers(1, len(starts), size=num_candidates)) % len(starts)  # never itself
        offsets = np.arange(length)

        def clips_at(picks: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
            times, envs = starts[picks, 0, None] + offsets, starts[picks, 1, None]  # [C, k]
            return torch.from_numpy(features[times, envs]), true_rewards[times, envs].sum(-1)  # [C, k, D], [C]

        clips_1, returns_1 = clips_at(first)
        clips_2, returns_2 = clips_at(second)
        if self.prefs.query == "disagreement":  # the pairs whose predicted preference varies most
            disagreement = self.model.member_preferences(clips_1, clips_2).var(0)  # [C]
            chosen = torch.argsort(disagreement, descending=True, stable=True)[:count].numpy()
        else:
            chosen = np.arange(count)
        queries = []
        for position, index in enumerate(chosen):
            is_validation = bool(self.rng.random() < self.prefs.validation_fraction)
            clips = (clips_1[index], clips_2[index])
            record = self._record(self.queries_asked + position, clips, (returns_1[index], returns_2[index]),
                                  (starts[first[index]], starts[second[index]]), is_validation, global_step)
            left = int(self.left_rng.integers(1, 3)) if self.human else 1
            queries.append(Query(record["query"], record, clips, is_validation, left))
        self.queries_asked += count
        return queries

    def _add(self, query: Query, label: float | None) -> None:
        """An answered query into the data ("can't tell", None, is dropped)."""
        if label is None:
            return
        self.comparisons.clips_1.append(query.clips[0])
        self.comparisons.clips_2.append(query.clips[1])
        self.comparisons.labels.append(label)
        self.comparisons.is_validation.append(query.is_validation)
        self.comparisons.true_returns.append(query.true_returns())

    def _record(self, query: int, clips: tuple[torch.Tensor, torch.Tensor], true_returns: tuple[float, float],
                starts: tuple[np.ndarray, np.ndarray], is_validation: bool, global_step: int) -> dict[str, Any]:
        """A query's line of comparisons.jsonl, less the answer: its two clips (where in the
        rollout, what the model sees: observations and actions) and their true returns."""
        return {
            "query": query,
            "env_steps": global_step,
            "true_returns": [round(float(value), 6) for value in true_returns],
            "validation": is_validation,
            "clips": [{"env": int(start[1]), "rollout_row": int(start[0]),
                       "observations": np.round(clip[:, :self.obs_dim].double().numpy(), 5).tolist(),
                       "actions": np.round(clip[:, self.obs_dim:].double().numpy(), 5).tolist()}
                      for clip, start in zip(clips, starts)],
        }

    def held_out_returns(self) -> tuple[np.ndarray, np.ndarray]:
        """(true, learned) summed returns [2V] of the clips of the validation comparisons,
        which the reward model never trained on."""
        if not any(self.comparisons.is_validation):
            return np.zeros(0), np.zeros(0)
        clips_1, clips_2, _, is_validation = self.comparisons.tensors()
        clips = torch.cat([clips_1[is_validation], clips_2[is_validation]])  # [2V, k, D]
        true_pairs = np.asarray(self.comparisons.true_returns)[is_validation.numpy()]  # [V, 2]
        true = np.concatenate([true_pairs[:, 0], true_pairs[:, 1]])
        learned = self.model.reward(clips.flatten(0, 1)).reshape(clips.shape[:2]).sum(-1).numpy()
        return true, learned

    def close(self) -> None:
        if self.comparisons_file is not None:
            self.comparisons_file.close()

    def finish(self) -> dict[str, Any]:
        """Write reward_fit.json, the held-out scatter plot and the preference curves."""
        true, learned = self.held_out_returns()
        varied = len(true) > 2 and true.std() > 0 and learned.std() > 0
        fit = {
            "labels": len(self.comparisons.labels),
            "queries": self.queries_asked,
            "held_out_clips": int(len(true)),
            "pearson": float(np.corrcoef(true, learned)[0, 1]) if varied else None,
            "spearman": rank_correlation(true, learned) if varied else None,
        }
        write_json_atomic(self.run_dir / REWARD_FIT_NAME, fit)
        from proximal.plots import plot_learned_vs_true, plot_preference_curves

        plot_learned_vs_true(true, learned, fit, self.run_dir / "learned_vs_true_reward.png")
        plot_preference_curves(self.run_dir)
        return fit


def train_from_preferences(config: TrainConfig, prefs: PrefsConfig, show_progress: bool = False,
                           resume: dict[str, Any] | None = None, run_dir: Path | None = None,
                           continuing: bool = False, announce=print) -> tuple[TrainResult, dict[str, Any]]:
    """PPO on a reward learned from preferences, in `run_dir` (None: a new one in runs_dir), or
    `continuing` the killed run there (from its checkpoint `resume`, if it wrote one): everything
    `proximal train` writes (the checkpoint evaluates unchanged) plus prefs.json,
    comparisons.jsonl, reward_model.pt, reward_fit.json and the preference plots. With
    `--reward.labeller human` a web page serves the queries to a person while training runs
    (`announce` prints its URL). Returns the training result and the reward model's fit on
    held-out clips."""
    prefs.check_against(config)
    probe = make_vector_env(config.env.env_id, 1)  # an unknown or unsupported env fails here
    observation_space, action_space = probe.single_observation_space, probe.single_action_space
    probe.close()
    renderer = None
    if prefs.labeller == "human":
        from proximal.human.clips import ClipRenderer

        renderer = ClipRenderer(config.env.env_id)  # an env whose clips cannot be drawn fails here
        labeller = None
    else:
        # an unreadable replay file fails here
        labeller = make_labeller(prefs, np.random.default_rng(config.run.seed + 2))
    server = None
    if renderer is not None:
        from proximal.human.server import TOKEN_NAME, FeedbackServer

        token_path = run_dir / TOKEN_NAME if run_dir is not None else None  # a resume serves the same URL
        server = FeedbackServer(renderer, prefs.host, prefs.port, token_path=token_path)  # a port in use fails here
    run_dir = run_dir if run_dir is not None else new_run_dir(config)
    if server is not None:
        labeller = HumanLabeller(run_dir, COMPARISONS_NAME, prefs.human_pace, prefs.human_queue_size, prefs.labels,
                               query_from_record)
        server.start(labeller, run_dir / TOKEN_NAME)
        announce(f"label the clips at {server.url}")
        if prefs.host not in ("127.0.0.1", "localhost", "::1"):
            announce(f"--reward.host {prefs.host}: the page is reachable from other machines (the token is still required)")
    learner = PreferenceLearner(prefs, config, observation_space, action_space, run_dir, labeller, resume=continuing)
    try:
        result = train(config, run_dir=run_dir, resume=resume, show_progress=show_progress, reward_learner=learner)
    finally:
        learner.close()
        if server is not None:
            labeller.finish()
            server.stop()
            labeller.close()
            renderer.close()
    return result, learner.finish()
