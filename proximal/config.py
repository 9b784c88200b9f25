"""Hyperparameters: one frozen dataclass per concern, and their validation (the presets built
from them are in proximal/presets.toml, read by proximal/presets.py).

`TrainConfig` is the single source of truth for a run. It is saved as `config.json` in the run
directory and inside every checkpoint, and the CLI builds its flags from these fields (the
`help` of each field is its `--help` text). Every field is validated in `__post_init__`, so a
bad value fails before any environment is built or any file is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from proximal.errors import ConfigError


def _param(default: Any, help: str) -> Any:
    """A dataclass field with its CLI help text attached."""
    return field(default=default, metadata={"help": help})


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}", field=name)


def _require_positive_int(name: str, value: Any) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             name, "a positive integer", value)


def _require_host_and_port(host: Any, port: Any) -> None:
    """Where a labelling page listens (`--reward.labeller human`, in prefs and rlhf)."""
    _require(isinstance(host, str) and re.fullmatch(r"[A-Za-z0-9.:\-]+", host) is not None, "host",
             "a host name or IP address (127.0.0.1, 0.0.0.0, ::1, myhost.local)", host)
    _require(isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535, "port", "in [0, 65535]",
             port)


def _require_finite(name: str, value: float) -> None:
    _require(isinstance(value, (int, float)) and math.isfinite(value), name, "a finite number", value)


ACTIVATIONS = ("tanh", "relu")


@dataclass(frozen=True)
class EnvConfig:
    """Which environment, and how many copies step in parallel."""

    env_id: str = _param("CartPole-v1", "Gymnasium environment id")
    num_envs: int = _param(4, "parallel environments in the vector env (N)")

    def __post_init__(self) -> None:
        _require(isinstance(self.env_id, str) and self.env_id.strip() != "", "env_id",
                 "a non-empty Gymnasium id", self.env_id)
        _require_positive_int("num_envs", self.num_envs)


@dataclass(frozen=True)
class PPOConfig:
    """The algorithm's hyperparameters (Schulman et al. 2017, Algorithm 1 and Table 3)."""

    total_timesteps: int = _param(500_000, "environment steps to train for, summed over envs")
    num_steps: int = _param(128, "steps per env in one rollout (T); batch = T * N")
    learning_rate: float = _param(2.5e-4, "Adam step size")
    anneal_lr: bool = _param(True, "decay the learning rate linearly to 0 over training")
    gamma: float = _param(0.99, "discount factor, in [0, 1]")
    gae_lambda: float = _param(0.95, "GAE lambda, in [0, 1] (Schulman et al. 2016)")
    epochs: int = _param(4, "passes over each batch (K in the paper)")
    minibatch_size: int = _param(128, "transitions per gradient step (M in the paper)")
    clip_coef: float = _param(0.2, "clip range epsilon of Eq. 7, > 0")
    norm_adv: bool = _param(True, "normalise advantages to zero mean, unit std per minibatch")
    ent_coef: float = _param(0.01, "entropy bonus c2 of Eq. 9, >= 0")
    vf_coef: float = _param(0.5, "value loss weight c1 of Eq. 9, >= 0")
    max_grad_norm: float = _param(0.5, "clip the global gradient norm to this, > 0")
    early_stop_kl: float | None = _param(None, "stop an update's epochs early once the mean approx-KL of an epoch "
                                               "exceeds this (none: never)")
    hidden_sizes: tuple[int, ...] = _param((64, 64), "widths of the hidden layers of each body")
    activation: str = _param("tanh", "the bodies' nonlinearity: tanh or relu")
    log_std_init: float = _param(0.0, "initial log-std of a Gaussian (continuous) policy")
    shared_body: bool = _param(False, "one MLP body under both heads instead of one per head")
    normalize_observations: bool = _param(False, "feed the networks observations standardised by running "
                                                 "mean/std (frozen when acting after training)")
    normalize_rewards: bool = _param(False, "divide rewards by the running std of the discounted return")
    use_critic: bool = _param(True, "use V(s) as GAE's baseline and bootstrap; off (an ablation): "
                                    "V = 0, so with gae_lambda 1 advantages are plain discounted returns")

    def __post_init__(self) -> None:
        for name in ("total_timesteps", "num_steps", "epochs", "minibatch_size"):
            _require_positive_int(name, getattr(self, name))
        for name in ("learning_rate", "gamma", "gae_lambda", "clip_coef", "ent_coef", "vf_coef",
                     "max_grad_norm"):
            _require_finite(name, getattr(self, name))
        _require(self.learning_rate > 0, "learning_rate", "> 0", self.learning_rate)
        _require(0.0 <= self.gamma <= 1.0, "gamma", "in [0, 1]", self.gamma)
        _require(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", "in [0, 1]", self.gae_lambda)
        _require(self.clip_coef > 0, "clip_coef", "> 0", self.clip_coef)
        _require(self.ent_coef >= 0, "ent_coef", ">= 0", self.ent_coef)
        _require(self.vf_coef >= 0, "vf_coef", ">= 0", self.vf_coef)
        _require(self.max_grad_norm > 0, "max_grad_norm", "> 0", self.max_grad_norm)
        if self.early_stop_kl is not None:
            _require_finite("early_stop_kl", self.early_stop_kl)
            _require(self.early_stop_kl > 0, "early_stop_kl", "> 0 (or none)", self.early_stop_kl)
        _require(self.activation in ACTIVATIONS, "activation", " or ".join(ACTIVATIONS), self.activation)
        _require_finite("log_std_init", self.log_std_init)
        _require(isinstance(self.hidden_sizes, tuple) and len(self.hidden_sizes) > 0
                 and all(isinstance(h, int) and h > 0 for h in self.hidden_sizes),
                 "hidden_sizes", "one or more positive integers", self.hidden_sizes)


@dataclass(frozen=True)
class RunConfig:
    """Everything about a run that is not the algorithm: seeding, threads, files."""

    seed: int = _param(0, "seeds torch, the environments and evaluation")
    threads: int = _param(1, "torch.set_num_threads; small MLPs are fastest on 1")
    update_threads: int | None = _param(None, "torch threads for the update phase alone (none: --threads); "
                                              "wide networks update faster on 2 while the rollout stays on 1")
    checkpoint_every: int = _param(10, "write the checkpoint every this many iterations (and at the end)")
    eval_episodes: int = _param(100, "greedy episodes per evaluation (at the end, and for stop_return)")
    stop_return: float | None = _param(None, "stop once the greedy mean return reaches this")
    eval_every: int = _param(5, "iterations between greedy evaluations when stop_return is set")
    runs_dir: str = _param("runs", "where run directories are created")
    dist_timeout: float = _param(120.0, "launched by torchrun: seconds a rank waits for the others (to join, "
                                        "then at each exchange) before it stops with an error")

    def __post_init__(self) -> None:
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        for name in ("threads", "checkpoint_every", "eval_episodes", "eval_every"):
            _require_positive_int(name, getattr(self, name))
        if self.update_threads is not None:
            _require_positive_int("update_threads", self.update_threads)
        _require_finite("dist_timeout", self.dist_timeout)
        _require(self.dist_timeout > 0, "dist_timeout", "> 0", self.dist_timeout)
        if self.stop_return is not None:
            _require_finite("stop_return", self.stop_return)
        _require(isinstance(self.runs_dir, str) and self.runs_dir.strip() != "", "runs_dir", "a non-empty path",
                 self.runs_dir)


@dataclass(frozen=True)
class TrainConfig:
    """A whole run: environment, algorithm, run settings."""

    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        batch_size = self.batch_size
        _require(self.ppo.minibatch_size <= batch_size, "minibatch_size",
                 f"<= the batch num_steps * num_envs = {batch_size}", self.ppo.minibatch_size)
        _require(self.ppo.total_timesteps >= batch_size, "total_timesteps",
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


def section_from_dict(name: str, section_cls: type, values: dict[str, Any]) -> Any:
    """One section of a config file, built (`section_settings`)."""
    return section_cls(**section_settings(name, section_cls, values))


def section_settings(name: str, section_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """{field: value} of one section as a file writes it (config.json, a --config file,
    presets.toml), read as today's: the names older versions wrote (`RENAMED`) renamed, lists as
    tuples, and "none" as None where the field may be none (TOML has no null); an unknown field
    is a ConfigError."""
    values = {RENAMED.get(name, {}).get(key, key): value for key, value in dict(values).items()}
    known = {f.name: f for f in dataclasses.fields(section_cls)}
    _refuse_unknown(name, section_cls, values)

    def read(key: str, value: Any) -> Any:
        if known[key].type.startswith("tuple") and isinstance(value, list):
            return tuple(value)
        return None if value == "none" and known[key].type.endswith("| None") else value

    return {key: read(key, value) for key, value in values.items()}


def replace_sections(config: Any, overrides: dict[str, dict[str, Any]]) -> Any:
    """A copy of a sectioned config (TrainConfig, RLHFConfig) with `{section: {field: value}}`
    applied; a refused value's error knows its section (`ConfigError.field` "ppo.clip_coef"), so
    the command line says it as the flag that was typed."""
    replaced = {}
    for section, values in overrides.items():
        if not hasattr(config, section):
            raise ConfigError(f"unknown section {section!r}")
        _refuse_unknown(section, type(getattr(config, section)), values)
        with in_section(section):
            replaced[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **replaced)


def _refuse_unknown(section: str, section_cls: type, names) -> None:
    unknown = sorted(set(names) - {f.name for f in dataclasses.fields(section_cls)})
    if unknown:
        raise ConfigError(f"unknown {section} settings: {', '.join(unknown)}")


@contextlib.contextmanager
def in_section(section: str):
    """A ConfigError raised inside about a field of `section` says so (`field` "clip_coef" ->
    "ppo.clip_coef")."""
    try:
        yield
    except ConfigError as error:
        if error.field is not None and "." not in error.field:
            error.field = f"{section}.{error.field}"
        raise


QUERY_SELECTIONS = ("disagreement", "random")
LABELLERS = ("synthetic", "replay", "human")
HUMAN_PACES = ("wait", "continue")
LABELLER_NOISES = ("none", "uniform", "boltzmann")


@dataclass(frozen=True)
class PrefsConfig:
    """Learning the reward from pairwise preferences instead of reading the env's (Christiano et
    al. 2017, Section 2.2): what is asked, of whom, and how the reward model is fitted."""

    labels: int = _param(1000, "comparisons the labeller answers over the whole run")
    segment_length: int = _param(25, "steps per clip (k); clips never cross an episode's end")
    query: str = _param("disagreement", "which pairs are asked: disagreement (largest variance of the "
                                        "ensemble's predicted preference) or random")
    candidates_per_query: int = _param(10, "candidate pairs sampled per pair asked (disagreement)")
    ensemble_size: int = _param(3, "reward predictors, each fitted to its own bootstrap resample")
    model_error_rate: float = _param(0.1, "the reward model's chance that the labeller answered uniformly "
                                          "at random, in [0, 1); 0 is plain Bradley-Terry")
    initial_label_fraction: float = _param(0.25, "share of the labels asked about the initial policy's "
                                                 "first rollout, before any PPO update")
    label_decay: float = _param(0.25, "labelling rate ~ tau / (tau + step), tau = this x total_timesteps")
    label_rounds: int = _param(50, "times labels are asked and the reward model refitted, spread evenly "
                                   "over training (the first at the first rollout)")
    hidden_sizes: tuple[int, ...] = _param((64, 64), "hidden widths of each reward predictor")
    learning_rate: float = _param(1e-3, "Adam step size of the reward model")
    batch_size: int = _param(64, "comparisons per reward-model gradient step")
    steps: int = _param(100, "reward-model gradient steps after each round of new labels")
    initial_steps: int = _param(500, "reward-model gradient steps after the first round")
    validation_fraction: float = _param(round(1 / math.e, 4), "share of comparisons held out for validation")
    learned_std: float = _param(1.0, "standard deviation the learned reward is normalised to")
    input_clip: float | None = _param(10.0, "clip the reward model's standardised inputs to +- this many "
                                            "standard deviations of the first labelled data (none: no clip)")
    labeller: str = _param("synthetic", "who labels: synthetic (prefers the clip with the higher true "
                                      "return), replay (the answers recorded in --reward.replay-from) or human "
                                      "(a person, on a local web page whose URL is printed)")
    labeller_noise: str = _param("none", "synthetic labeller's noise: none, uniform (answers at random "
                                       "with probability --reward.labeller-error-rate) or boltzmann")
    labeller_error_rate: float = _param(0.1, "the uniform-noise labeller's chance of a random answer")
    labeller_temperature: float = _param(1.0, "the Boltzmann labeller's temperature: "
                                            "P[1 > 2] = sigmoid((R1 - R2) / temperature)")
    replay_from: str = _param("", "a comparisons.jsonl whose answers the replay labeller gives, in order")
    host: str = _param("127.0.0.1", "--reward.labeller human: the address the page listens on; anything but "
                                    "127.0.0.1 lets other machines reach it (the URL's token is still required)")
    port: int = _param(8765, "--reward.labeller human: the page's port (0: any free port)")
    human_pace: str = _param("wait", "--reward.labeller human, when the person is slower than the schedule: wait "
                                     "(training pauses at each label round until every query shown is answered) "
                                     "or continue (training goes on with the reward model fitted so far)")
    human_queue_size: int = _param(100, "--reward.labeller human: queries waiting at most; when full, wait blocks the "
                                        "round and continue drops the oldest")

    def __post_init__(self) -> None:
        for name in ("labels", "segment_length", "candidates_per_query", "ensemble_size", "label_rounds",
                     "batch_size", "steps", "initial_steps"):
            _require_positive_int(name, getattr(self, name))
        for name in ("model_error_rate", "initial_label_fraction", "label_decay", "learning_rate",
                     "validation_fraction", "learned_std", "labeller_error_rate", "labeller_temperature"):
            _require_finite(name, getattr(self, name))
        _require(self.query in QUERY_SELECTIONS, "query", " or ".join(QUERY_SELECTIONS), self.query)
        _require(self.labeller in LABELLERS, "labeller", " or ".join(LABELLERS), self.labeller)
        _require(self.labeller_noise in LABELLER_NOISES, "labeller_noise", " or ".join(LABELLER_NOISES),
                 self.labeller_noise)
        _require(0.0 <= self.model_error_rate < 1.0, "model_error_rate", "in [0, 1)", self.model_error_rate)
        _require(0.0 <= self.initial_label_fraction <= 1.0, "initial_label_fraction", "in [0, 1]",
                 self.initial_label_fraction)
        _require(0.0 <= self.validation_fraction < 1.0, "validation_fraction", "in [0, 1)", self.validation_fraction)
        _require(0.0 <= self.labeller_error_rate <= 1.0, "labeller_error_rate", "in [0, 1]", self.labeller_error_rate)
        for name in ("label_decay", "learning_rate", "learned_std", "labeller_temperature"):
            _require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        if self.input_clip is not None:
            _require_finite("input_clip", self.input_clip)
            _require(self.input_clip > 0, "input_clip", "> 0 (or none)", self.input_clip)
        _require(isinstance(self.hidden_sizes, tuple) and len(self.hidden_sizes) > 0
                 and all(isinstance(h, int) and h > 0 for h in self.hidden_sizes),
                 "hidden_sizes", "one or more positive integers", self.hidden_sizes)
        _require(self.query == "random" or self.ensemble_size > 1, "query",
                 "random with a single predictor (disagreement needs an ensemble)", self.query)
        _require(self.human_pace in HUMAN_PACES, "human_pace", " or ".join(HUMAN_PACES), self.human_pace)
        _require_positive_int("human_queue_size", self.human_queue_size)
        _require_host_and_port(self.host, self.port)
        _require((self.labeller == "replay") == (self.replay_from != ""), "replay_from",
                 "a comparisons.jsonl exactly when --reward.labeller replay", self.replay_from)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def check_against(self, config: TrainConfig) -> None:
        """Errors that need the PPO config too: a clip must fit in one rollout."""
        _require(self.segment_length <= config.ppo.num_steps, "segment_length",
                 f"<= --ppo.num-steps = {config.ppo.num_steps} (a clip lies within one rollout)", self.segment_length)


TRAIN_SECTIONS: dict[str, type] = {"env": EnvConfig, "ppo": PPOConfig, "run": RunConfig}  # `proximal train`
PREFS_SECTIONS: dict[str, type] = {**TRAIN_SECTIONS, "reward": PrefsConfig}  # `proximal prefs`

# Fields renamed since a run directory may have been written: {section: {old name: new name}}.
# Files written before are read with them (a run resumes, a checkpoint evaluates); flags are not
# (the command line refuses an old flag and names the new one).
RENAMED: dict[str, dict[str, str]] = {
    "ppo": {"update_epochs": "epochs", "target_kl": "early_stop_kl"},
    "reward": {"reward_hidden_sizes": "hidden_sizes", "reward_learning_rate": "learning_rate",
               "reward_minibatch_size": "batch_size", "reward_steps": "steps",
               "initial_reward_steps": "initial_steps", "learned_reward_std": "learned_std",
               "reward_input_clip": "input_clip"},
}
