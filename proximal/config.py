"""Hyperparameters: one frozen dataclass per concern, and their validation (the presets built
from them are in proximal/presets.toml, read by proximal/presets.py).

`TrainConfig` is the single source of truth for a run. It is saved as `config.json` in the run
directory and inside every checkpoint, and the CLI builds its flags from these fields (the
`help` of each field is its `--help` text). Each field declares the checks its value must pass
(proximal/sections.py), run when the config is made, so a bad value fails before any
environment is built or any file is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from proximal.errors import ConfigError
from proximal.sections import (FINITE, HOST, NON_EMPTY_PATH, PATH, PORT, POSITIVE_INT, POSITIVE_INTS, Section, above,
                               at_least, int_at_least, non_empty, one_of, or_none, replace_sections, require,
                               section_from_dict, setting, within)


ACTIVATIONS = ("tanh", "relu")


@dataclass(frozen=True)
class EnvConfig(Section):
    """Which environment, and how many copies step in parallel."""

    env_id: str = setting("CartPole-v1", "Gymnasium environment id", non_empty("Gymnasium id"))
    num_envs: int = setting(4, "parallel environments in the vector env (N)", POSITIVE_INT)


@dataclass(frozen=True)
class PPOConfig(Section):
    """The algorithm's hyperparameters (Schulman et al. 2017, Algorithm 1 and Table 3)."""

    total_timesteps: int = setting(500_000, "environment steps to train for, summed over envs", POSITIVE_INT)
    num_steps: int = setting(128, "steps per env in one rollout (T); batch = T * N", POSITIVE_INT)
    learning_rate: float = setting(2.5e-4, "Adam step size", above(0))
    anneal_lr: bool = setting(True, "decay the learning rate linearly to 0 over training")
    gamma: float = setting(0.99, "discount factor, in [0, 1]", within(0, 1))
    gae_lambda: float = setting(0.95, "GAE lambda, in [0, 1] (Schulman et al. 2016)", within(0, 1))
    epochs: int = setting(4, "passes over each batch (K in the paper)", POSITIVE_INT)
    minibatch_size: int = setting(128, "transitions per gradient step (M in the paper)", POSITIVE_INT)
    clip_coef: float = setting(0.2, "clip range epsilon of Eq. 7, > 0", above(0))
    norm_adv: bool = setting(True, "normalise advantages to zero mean, unit std per minibatch")
    ent_coef: float = setting(0.01, "entropy bonus c2 of Eq. 9, >= 0", at_least(0))
    vf_coef: float = setting(0.5, "value loss weight c1 of Eq. 9, >= 0", at_least(0))
    max_grad_norm: float = setting(0.5, "clip the global gradient norm to this, > 0", above(0))
    early_stop_kl: float | None = setting(None, "stop an update's epochs early once the mean approx-KL of an epoch "
                                                "exceeds this (none: never)", or_none(above(0)))
    hidden_sizes: tuple[int, ...] = setting((64, 64), "widths of the hidden layers of each body", POSITIVE_INTS)
    activation: str = setting("tanh", "the bodies' nonlinearity: tanh or relu", one_of(ACTIVATIONS))
    log_std_init: float = setting(0.0, "initial log-std of a Gaussian (continuous) policy", FINITE)
    shared_body: bool = setting(False, "one MLP body under both heads instead of one per head")
    normalize_observations: bool = setting(False, "feed the networks observations standardised by running "
                                                  "mean/std (frozen when acting after training)")
    normalize_rewards: bool = setting(False, "divide rewards by the running std of the discounted return")
    use_critic: bool = setting(True, "use V(s) as GAE's baseline and bootstrap; off (an ablation): "
                                     "V = 0, so with gae_lambda 1 advantages are plain discounted returns")


@dataclass(frozen=True)
class RunConfig(Section):
    """Everything about a run that is not the algorithm: seeding, threads, files."""

    seed: int = setting(0, "seeds torch, the environments and evaluation", int_at_least(0))
    threads: int = setting(1, "torch.set_num_threads; small MLPs are fastest on 1", POSITIVE_INT)
    update_threads: int | None = setting(None, "torch threads for the update phase alone (none: --threads); "
                                               "wide networks update faster on 2 while the rollout stays on 1",
                                         or_none(POSITIVE_INT))
    checkpoint_every: int = setting(10, "write the checkpoint every this many iterations (and at the end)",
                                    POSITIVE_INT)
    eval_episodes: int = setting(100, "greedy episodes per evaluation (at the end, and for stop_return)",
                                 POSITIVE_INT)
    stop_return: float | None = setting(None, "stop once the greedy mean return reaches this", or_none(FINITE))
    eval_every: int = setting(5, "iterations between greedy evaluations when stop_return is set", POSITIVE_INT)
    runs_dir: str = setting("runs", "where run directories are created", NON_EMPTY_PATH)
    dist_timeout: float = setting(120.0, "launched by torchrun: seconds a rank waits for the others (to join, "
                                         "then at each exchange) before it stops with an error", above(0))


@dataclass(frozen=True)
class TrainConfig(Section):
    """A whole run: environment, algorithm, run settings."""

    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> None:
        batch_size = self.batch_size
        require(self.ppo.minibatch_size <= batch_size, "minibatch_size",
                f"<= the batch num_steps * num_envs = {batch_size}", self.ppo.minibatch_size)
        require(self.ppo.total_timesteps >= batch_size, "total_timesteps",
                f">= one batch (num_steps * num_envs = {batch_size})", self.ppo.total_timesteps)

    @property
    def batch_size(self) -> int:
        return self.ppo.num_steps * self.env.num_envs

    @property
    def num_iterations(self) -> int:
        return self.ppo.total_timesteps // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown or missing sections are a ConfigError."""
        if not isinstance(data, dict) or set(data) != set(TRAIN_SECTIONS):
            raise ConfigError(f"a config needs exactly the sections {sorted(TRAIN_SECTIONS)}")
        return cls(**{name: section_from_dict(name, section_cls, data[name])
                      for name, section_cls in TRAIN_SECTIONS.items()})

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> TrainConfig:
        """A copy with `{section: {field: value}}` applied (`replace_sections`)."""
        return replace_sections(self, overrides)


QUERY_SELECTIONS = ("disagreement", "random")
LABELLERS = ("synthetic", "replay", "human")
HUMAN_PACES = ("wait", "continue")
LABELLER_NOISES = ("none", "uniform", "boltzmann")


@dataclass(frozen=True)
class LabellerSettings(Section):
    """Who answers the preference queries and how a synthetic labeller errs: the settings `proximal
    prefs` and `proximal rlhf` share in their reward sections (--reward.labeller-noise in both)."""

    labeller: str = setting("synthetic", "who labels: synthetic (prefers the one with the higher true reward, "
                                         "with --reward.labeller-noise), replay (the answers recorded in "
                                         "--reward.replay-from) or human (a person, on a local web page whose URL "
                                         "is printed)", one_of(LABELLERS))
    labeller_noise: str = setting("none", "the synthetic labeller's noise: none (the higher true reward wins), "
                                          "uniform (a coin flip instead of the answer at "
                                          "--reward.labeller-error-rate) or boltzmann (P[1 > 2] = "
                                          "sigmoid((R1 - R2) / --reward.labeller-temperature))",
                                  one_of(LABELLER_NOISES))
    labeller_error_rate: float = setting(0.1, "the uniform-noise labeller's share of coin flips, in [0, 1] "
                                              "(Christiano et al. 2017 used 0.1)", within(0, 1))
    labeller_temperature: float = setting(1.0, "the Boltzmann labeller's temperature, > 0", above(0))
    host: str = setting("127.0.0.1", "--reward.labeller human: the address the page listens on; anything but "
                                     "127.0.0.1 lets other machines reach it (the URL's token is still required)", HOST)
    port: int = setting(8765, "--reward.labeller human: the page's port (0: any free port)", PORT)


@dataclass(frozen=True)
class PrefsConfig(LabellerSettings):
    """Learning the reward from pairwise preferences instead of reading the env's (Christiano et
    al. 2017, Section 2.2): what is asked, of whom (`LabellerSettings`), and how the reward model
    is fitted."""

    labels: int = setting(1000, "comparisons the labeller answers over the whole run", POSITIVE_INT)
    segment_length: int = setting(25, "steps per clip (k); clips never cross an episode's end", POSITIVE_INT)
    query: str = setting("disagreement", "which pairs are asked: disagreement (largest variance of the "
                                         "ensemble's predicted preference) or random", one_of(QUERY_SELECTIONS))
    candidates_per_query: int = setting(10, "candidate pairs sampled per pair asked (disagreement)", POSITIVE_INT)
    ensemble_size: int = setting(3, "reward predictors, each fitted to its own bootstrap resample", POSITIVE_INT)
    model_error_rate: float = setting(0.1, "the reward model's chance that the labeller answered uniformly "
                                           "at random, in [0, 1); 0 is plain Bradley-Terry",
                                      within(0, 1, high_open=True))
    initial_label_fraction: float = setting(0.25, "share of the labels asked about the initial policy's "
                                                  "first rollout, before any PPO update", within(0, 1))
    label_decay: float = setting(0.25, "labelling rate ~ tau / (tau + step), tau = this x total_timesteps", above(0))
    label_rounds: int = setting(50, "times labels are asked and the reward model refitted, spread evenly "
                                    "over training (the first at the first rollout)", POSITIVE_INT)
    hidden_sizes: tuple[int, ...] = setting((64, 64), "hidden widths of each reward predictor", POSITIVE_INTS)
    learning_rate: float = setting(1e-3, "Adam step size of the reward model", above(0))
    batch_size: int = setting(64, "comparisons per reward-model gradient step", POSITIVE_INT)
    steps: int = setting(100, "reward-model gradient steps after each round of new labels", POSITIVE_INT)
    initial_steps: int = setting(500, "reward-model gradient steps after the first round", POSITIVE_INT)
    validation_fraction: float = setting(round(1 / math.e, 4), "share of comparisons held out for validation",
                                         within(0, 1, high_open=True))
    learned_std: float = setting(1.0, "standard deviation the learned reward is normalised to", above(0))
    input_clip: float | None = setting(10.0, "clip the reward model's standardised inputs to +- this many "
                                             "standard deviations of the first labelled data (none: no clip)",
                                       or_none(above(0)))
    replay_from: str = setting("", "a comparisons.jsonl whose answers the replay labeller gives, in order", PATH)
    human_pace: str = setting("wait", "--reward.labeller human, when the person is slower than the schedule: wait "
                                      "(training pauses at each label round until every query shown is answered) "
                                      "or continue (training goes on with the reward model fitted so far)",
                              one_of(HUMAN_PACES))
    human_queue_size: int = setting(100, "--reward.labeller human: queries waiting at most; when full, wait blocks "
                                         "the round and continue drops the oldest", POSITIVE_INT)

    def check(self) -> None:
        require(self.query == "random" or self.ensemble_size > 1, "query",
                "random with a single predictor (disagreement needs an ensemble)", self.query)
        require((self.labeller == "replay") == (self.replay_from != ""), "replay_from",
                "a comparisons.jsonl exactly when --reward.labeller replay", self.replay_from)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def check_against(self, config: TrainConfig) -> None:
        """Errors that need the PPO config too: a clip must fit in one rollout."""
        require(self.segment_length <= config.ppo.num_steps, "segment_length",
                f"<= --ppo.num-steps = {config.ppo.num_steps} (a clip lies within one rollout)", self.segment_length)


TRAIN_SECTIONS: dict[str, type] = {"env": EnvConfig, "ppo": PPOConfig, "run": RunConfig}  # `proximal train`
PREFS_SECTIONS: dict[str, type] = {**TRAIN_SECTIONS, "reward": PrefsConfig}  # `proximal prefs`
