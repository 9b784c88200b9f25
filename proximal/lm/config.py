"""The LM pipeline's hyperparameters: one frozen dataclass per stage, nested in `RLHFConfig`.

`RLHFConfig` is the single source of truth of a `proximal rlhf` run: saved as config.json in the
run directory, and turned into command-line flags named after their section (`--sft.steps`,
`--ppo.kl-coef`; the run section's flags have no prefix: `--seed`, `--device`). Every field is
validated in `__post_init__`, before anything is written.

Longer than the ~400 lines a module keeps to, on purpose: eight sections of some 90 fields, each
with its help line and range check, are the one place a reader looks up what a setting means;
cut in two, the flags of one command would live in two files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from proximal.config import (LABELLER_NOISES, LABELLERS, _param, _require, _require_finite, _require_host_and_port,
                             _require_positive_int, replace_sections, section_from_dict)
from proximal.errors import ConfigError
from proximal.losses import AGGREGATIONS
from proximal.lm.tasks import TASKS

FILE_TASK = "files"  # the task's name when the data comes from the user's files
MIN_TEMPERATURE = 0.01  # below it, logits / temperature overflow float32 (greedy decoding is the limit case)


def _require_probability(name: str, value: float) -> None:
    _require_finite(name, value)
    _require(0.0 <= value <= 1.0, name, "in [0, 1]", value)


@dataclass(frozen=True)
class TaskConfig:
    """What the model learns and how the data is drawn."""

    name: str = _param("addition", f"the task: {', '.join(TASKS)}, or {FILE_TASK} (set by the --data.* files)")
    carry_noise: float = _param(0.6, "share of the carry prompts' demonstrations that drop the carry, in [0, 1]")
    demonstrations: int = _param(20_000, "noisy demonstrations SFT imitates")
    eval_prompts: int = _param(500, "held-out prompts every stage is evaluated on (gold reward)")

    def __post_init__(self) -> None:
        _require(self.name in (*TASKS, FILE_TASK), "task", " or ".join(TASKS), self.name)
        _require_probability("carry_noise", self.carry_noise)
        for name in ("demonstrations", "eval_prompts"):
            _require_positive_int(name, getattr(self, name))


@dataclass(frozen=True)
class DataConfig:
    """A user's own data: JSON-lines files in the formats of TRL's dataset documentation, standard
    or conversational (docs/your_data.md). Any file given makes the run's task these files."""

    prompts: str = _param("", 'prompts PPO samples from: {"prompt": "..."} or {"prompt": [{"role": "user", '
                              '"content": "..."}]} per line')
    sft: str = _param("", 'demonstrations SFT imitates: {"prompt": ..., "completion": ...} or {"messages": [...]}')
    preferences: str = _param("", 'labelled pairs for the reward model and DPO: {"prompt": ..., "chosen": ..., '
                                  '"rejected": ...} (or conversational chosen/rejected with the prompt inside)')
    eval_prompts: str = _param("", "held-out prompts to evaluate on, in the prompts format (empty: a seeded "
                                   "--data.eval-fraction of --data.prompts)")
    eval_preferences: str = _param("", "held-out labelled pairs (empty: a seeded --reward.validation-fraction "
                                       "of --data.preferences)")
    eval_fraction: float = _param(0.1, "share of --data.prompts held out for evaluation when no "
                                       "--data.eval-prompts is given, in (0, 1)")

    def __post_init__(self) -> None:
        for name in ("prompts", "sft", "preferences", "eval_prompts", "eval_preferences"):
            _require(isinstance(getattr(self, name), str), name, "a path", getattr(self, name))
        _require_finite("eval_fraction", self.eval_fraction)
        _require(0.0 < self.eval_fraction < 1.0, "eval_fraction", "in (0, 1)", self.eval_fraction)

    @property
    def has_files(self) -> bool:
        return any((self.prompts, self.sft, self.preferences, self.eval_prompts, self.eval_preferences))


@dataclass(frozen=True)
class ModelConfig:
    """The policy's network: a local Hugging Face directory, or a tiny GPT-2 trained from scratch."""

    path: str = _param("", "a local directory with a Hugging Face causal LM and its tokenizer, or a .gguf file "
                           "(dequantised on load): SFT starts from it, or, when the run has no SFT stage "
                           "(--stages reward,ppo), every later stage does (empty: a tiny GPT-2 from a local config)")
    lora_rank: int = _param(0, "LoRA adapters of this rank on every linear layer of the reward model's and the "
                               "policy's body (the reference is the policy with its adapters disabled); 0: "
                               "every weight trains")
    lora_alpha: float = _param(32.0, "LoRA's scale alpha (the adapters' output is multiplied by alpha / rank)")
    lora_layers: int = _param(0, "LoRA on the top this many transformer blocks only (0: all): the backward pass "
                                 "stops below them")
    width: int = _param(64, "tiny GPT-2: embedding width")
    layers: int = _param(2, "tiny GPT-2: transformer blocks")
    heads: int = _param(4, "tiny GPT-2: attention heads (must divide width)")
    context: int = _param(16, "tiny GPT-2: longest sequence, prompt + response, in tokens")

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads", "context"):
            _require_positive_int(name, getattr(self, name))
        for name in ("lora_rank", "lora_layers"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0",
                     getattr(self, name))
        _require_finite("lora_alpha", self.lora_alpha)
        _require(self.lora_alpha > 0, "lora_alpha", "> 0", self.lora_alpha)
        _require(self.width % self.heads == 0, "heads", f"a divisor of width {self.width}", self.heads)


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on the demonstrations."""

    steps: int = _param(1600, "AdamW steps")
    batch_size: int = _param(128, "demonstrations per step")
    learning_rate: float = _param(3e-3, "peak AdamW step size (linear warm-up, then linear decay to 0)")
    warmup_steps: int = _param(100, "steps of linear warm-up (at most a tenth of --sft.steps, plus one)")
    adam_beta1: float = _param(0.9, "AdamW beta1")
    adam_beta2: float = _param(0.98, "AdamW beta2")
    weight_decay: float = _param(0.0, "AdamW weight decay")
    max_grad_norm: float = _param(1.0, "clip the global gradient norm to this")
    checkpoint_every: int = _param(200, "steps between checkpoints a killed stage resumes from")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps", "checkpoint_every"):
            _require_positive_int(name, getattr(self, name))
        for name in ("learning_rate", "adam_beta1", "adam_beta2", "weight_decay", "max_grad_norm"):
            _require_finite(name, getattr(self, name))
        for name in ("learning_rate", "max_grad_norm"):
            _require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, name, "in [0, 1)", getattr(self, name))
        _require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)


LM_LABELLERS = tuple(kind for kind in LABELLERS if kind != "replay")  # a run's own labels replay by --run-dir
FUNCTION_ROLES = ("reward", "labeller")
POOLINGS = ("last", "mean")


@dataclass(frozen=True)
class RewardConfig:
    """The labelled pairs and the reward model fitted to them."""

    labels: int = _param(20_000, "pairs of SFT samples the labeller compares (one prompt per pair; with --data.* "
                                 "files, at most one pair per training prompt)")
    function: str = _param("", "a reward function, module:callable or path/to/file.py:callable, taking (prompts, "
                               "completions) and returning one float each (see --reward.function-role)")
    function_role: str = _param("reward", "reward (PPO/RLOO optimise the function itself; no reward model is "
                                          "fitted) or labeller (the synthetic labeller prefers the completion the "
                                          "function scores higher, and a reward model is fitted to its answers)")
    function_timeout: float = _param(0.0, "seconds one call of --reward.function may take before the run stops with "
                                          "the checkpoint kept (0: no limit; a call past 30 s is announced either way)")
    labeller: str = _param("synthetic", "synthetic (the gold reward decides, with --reward.labeller-noise) or human "
                                        "(a person on a local web page whose URL is printed; needs "
                                        "--ppo.relabel-every 0, and a --reward.labels a person can answer)")
    host: str = _param("127.0.0.1", "--reward.labeller human: the address the page listens on; anything but "
                                    "127.0.0.1 lets other machines reach it (the URL's token is still required)")
    port: int = _param(8765, "--reward.labeller human: the page's port (0: any free port)")
    sample_temperature: float = _param(1.5, "temperature the SFT samples of a pair are drawn at: above 1 "
                                            "makes varied wrong answers, which refute a shortcut")
    samples_per_prompt: int = _param(4, "SFT samples drawn per prompt; the pair is the first and the first "
                                        "that differs from it (when any does)")
    labeller_noise: str = _param("none", "none (exact: the higher gold wins, a tie is 'equally good'), "
                                         "boltzmann (P[1 > 2] = sigmoid((gold1 - gold2) / labeller temperature)) or "
                                         "uniform (a coin flip instead of the exact answer at the labeller error rate)")
    labeller_temperature: float = _param(0.25, "temperature of the boltzmann labeller, > 0")
    labeller_error_rate: float = _param(0.1, "share of the uniform labeller's answers that are coin flips, in [0, 1] "
                                              "(Christiano et al. 2017 used 0.1)")
    validation_fraction: float = _param(0.2, "share of the pairs held out to measure accuracy")
    standardise_samples: int = _param(1024, "start-model samples (at the PPO temperature) whose scores the reward "
                                            "model is shifted and scaled to mean 0, std 1 on")
    pooling: str = _param("last", "where the scalar head reads the response: last (its last token, the EOS) or "
                                  "mean (the mean over its tokens: suits a score that adds up words, like VADER)")
    blocks: int = _param(0, "the reward model's body: the start model's bottom this many transformer blocks and its "
                            "final norm (0: every block); fewer cost less to fit and to score with")
    epochs: int = _param(8, "passes over the training pairs")
    batch_size: int = _param(64, "pairs per step")
    learning_rate: float = _param(3e-4, "AdamW step size")
    validations: int = _param(20, "accuracy checks on the held-out pairs during the fit (the last, at its end, is "
                                  "the stage's); each costs a forward pass over them")
    keep_best: bool = _param(False, "keep the reward model as it was at its validation of highest agreement with the "
                                    "labeller on the held-out pairs (the later on a tie), not as the fit ends")

    def __post_init__(self) -> None:
        for name in ("labels", "epochs", "batch_size", "standardise_samples", "validations"):
            _require_positive_int(name, getattr(self, name))
        _require(self.pooling in POOLINGS, "pooling", " or ".join(POOLINGS), self.pooling)
        _require(isinstance(self.blocks, int) and self.blocks >= 0, "blocks", "an integer >= 0", self.blocks)
        _require(isinstance(self.samples_per_prompt, int) and self.samples_per_prompt >= 2, "samples_per_prompt",
                 "an integer >= 2", self.samples_per_prompt)
        for name in ("sample_temperature", "labeller_temperature", "learning_rate"):
            _require_finite(name, getattr(self, name))
            _require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        _require(self.sample_temperature >= MIN_TEMPERATURE, "sample_temperature", f">= {MIN_TEMPERATURE}",
                 self.sample_temperature)
        _require(self.labeller_noise in LABELLER_NOISES, "labeller_noise", " or ".join(LABELLER_NOISES),
                 self.labeller_noise)
        _require(self.labeller in LM_LABELLERS, "labeller", " or ".join(LM_LABELLERS), self.labeller)
        _require(self.function_role in FUNCTION_ROLES, "function_role", " or ".join(FUNCTION_ROLES),
                 self.function_role)
        _require(isinstance(self.function, str) and (self.function == "" or ":" in self.function), "function",
                 "module:callable or path/to/file.py:callable", self.function)
        _require_finite("function_timeout", self.function_timeout)
        _require(self.function_timeout >= 0, "function_timeout", ">= 0 (0: no limit)", self.function_timeout)
        _require_host_and_port(self.host, self.port)
        _require_probability("labeller_error_rate", self.labeller_error_rate)
        _require(0.0 <= self.validation_fraction < 1.0, "validation_fraction", "in [0, 1)", self.validation_fraction)


RL_METHODS = ("ppo", "rloo", "grpo")
GROUPED_METHODS = ("rloo", "grpo")  # k samples per prompt, baselined within their group
KL_PLACES = ("reward", "loss")


@dataclass(frozen=True)
class PPOStageConfig:
    """The RL stage: PPO on the reward model's score with a per-token KL penalty to the SFT model
    (or RLOO, the critic-free alternative, with the same penalty, samples and update)."""

    method: str = _param("ppo", "ppo (value head, GAE over tokens), rloo (no critic: each of k samples of a "
                                "prompt is baselined by the mean reward of the other k - 1; Ahmadian et al. 2024) "
                                "or grpo (no critic: the k samples' rewards minus their mean, over their std; "
                                "Shao et al. 2024)")
    rloo_samples: int = _param(4, "rloo and grpo: samples per prompt, k >= 2 (the prompts per iteration are "
                                  "prompts_per_iteration / k)")
    group_std: bool = _param(True, "grpo: divide each group's advantages by its reward std (off: Dr. GRPO, "
                                   "Liu et al. 2025)")
    iterations: int = _param(250, "rollout + update cycles")
    prompts_per_iteration: int = _param(256, "responses sampled per iteration (B); one per prompt for ppo")
    max_new_tokens: int = _param(5, "length limit of a response, EOS included")
    temperature: float = _param(1.0, "sampling temperature; the same one divides the logits of the policy and "
                                     "the reference whenever log-probs are computed")
    epochs: int = _param(2, "passes over each rollout")
    minibatch_size: int = _param(128, "responses per gradient step")
    micro_batch_size: int = _param(0, "responses per forward and backward pass inside a minibatch; the passes' "
                                      "gradients add up to the minibatch's (0: as many as keep a pass's activations "
                                      "and logits near 256 MiB, lm/memory.py)")
    learning_rate: float = _param(2e-4, "AdamW step size")
    clip_coef: float = _param(0.2, "clip range epsilon of Eq. 7")
    clip_coef_high: float = _param(0.0, "the clip range's upper side, 1 + this (DAPO's clip-higher, e.g. 0.28; "
                                        "0: --ppo.clip-coef)")
    loss_aggregation: str = _param("token", "how the per-token loss is averaged: token (every token of the "
                                            "minibatch weighs the same), sequence (every response does: GRPO) or "
                                            "constant (the sum over responses x --ppo.max-new-tokens: Dr. GRPO)")
    vf_coef: float = _param(0.5, "weight of the value head's loss")
    gae_lambda: float = _param(0.95, "GAE lambda over the response tokens (gamma is 1)")
    kl_coef: float = _param(0.3, "beta: weight of the per-token KL penalty to the SFT model (initial value "
                                 "when --ppo.adaptive-kl), >= 0")
    kl_in: str = _param("reward", "where the KL penalty goes: reward (beta * k1 per token in the reward, "
                                  "InstructGPT) or loss (beta * k3 per token added to the loss, GRPO as TRL has it)")
    adaptive_kl: bool = _param(True, "adapt beta towards --ppo.kl-target (Ziegler et al. 2019)")
    kl_target: float = _param(0.5, "adaptive KL: the KL per response (nats) beta steers towards")
    kl_horizon: int = _param(2000, "adaptive KL: responses over which beta moves by up to 20%")
    missing_eos_score: float = _param(-3.0, "the score of a response cut at the length limit without EOS "
                                            "(reward-model scores are standardised on SFT samples)")
    score_cut_responses: bool = _param(False, "score a response cut at the length limit as it stands (as TRL "
                                              "does) instead of giving it --ppo.missing-eos-score")
    max_grad_norm: float = _param(1.0, "clip the global gradient norm to this")
    relabel_every: int = _param(10, "every this many iterations, the labeller compares policy samples with SFT "
                                    "samples; the reward model's agreement with those fresh answers is logged, "
                                    "then it is refitted on every label so far (0: never)")
    relabel_pairs: int = _param(256, "pairs labelled per relabelling round (capped at prompts_per_iteration)")
    refit_steps: int = _param(50, "reward-model AdamW steps after each relabelling round")
    kl_budget: float = _param(0.0, "stop before --ppo.iterations once the training samples' KL to the start model "
                                   "(k1, nats per response, the mean over the last --ppo.kl-budget-window "
                                   "iterations) reaches this (0: always run every iteration)")
    kl_budget_window: int = _param(3, "iterations whose sample KLs --ppo.kl-budget averages")
    eval_every: int = _param(10, "iterations between evaluations of the policy on held-out prompts")
    snapshot_every: int = _param(10, "every this many iterations (and at the first), record every per-token "
                                     "quantity of a few completions to ppo/snapshots.jsonl for `proximal inspect` "
                                     "(0: never)")
    snapshot_prompts: int = _param(4, "fixed RL prompts a snapshot answers (k times each for rloo); never trained on")

    @property
    def group_size(self) -> int:
        """Samples per prompt: k for rloo and grpo, 1 for ppo."""
        return self.rloo_samples if self.method in GROUPED_METHODS else 1

    @property
    def old_logprobs_in_update(self) -> bool:
        """Whether the rollout can skip its policy pass and the update's first epoch take the old
        log-probs from its own passes (detached: a ratio of exactly 1): true when nothing else
        reads them first (no critic's values, no KL in the reward) and one minibatch takes the
        whole batch, so the first epoch runs before the first step."""
        return self.method != "ppo" and self.kl_in == "loss" and self.minibatch_size == self.prompts_per_iteration

    @property
    def clip_high(self) -> float:
        return self.clip_coef_high or self.clip_coef

    @property
    def cut_response_score(self) -> float | None:
        """What a response cut at the length limit scores: missing_eos_score, or None (scored as it stands)."""
        return None if self.score_cut_responses else self.missing_eos_score

    def __post_init__(self) -> None:
        for name in ("iterations", "prompts_per_iteration", "max_new_tokens", "epochs", "minibatch_size",
                     "kl_horizon", "kl_budget_window", "eval_every", "relabel_pairs", "refit_steps",
                     "snapshot_prompts"):
            _require_positive_int(name, getattr(self, name))
        _require(isinstance(self.snapshot_every, int) and self.snapshot_every >= 0, "snapshot_every",
                 "an integer >= 0", self.snapshot_every)
        _require(isinstance(self.relabel_every, int) and self.relabel_every >= 0, "relabel_every",
                 "an integer >= 0", self.relabel_every)
        for name in ("temperature", "learning_rate", "clip_coef", "clip_coef_high", "vf_coef", "gae_lambda", "kl_coef",
                     "kl_target", "kl_budget", "missing_eos_score", "max_grad_norm"):
            _require_finite(name, getattr(self, name))
        for name in ("temperature", "learning_rate", "clip_coef", "kl_target", "max_grad_norm"):
            _require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        _require(self.temperature >= MIN_TEMPERATURE, "temperature", f">= {MIN_TEMPERATURE}", self.temperature)
        _require(self.vf_coef >= 0, "vf_coef", ">= 0", self.vf_coef)
        _require(self.clip_coef_high >= 0, "clip_coef_high", ">= 0", self.clip_coef_high)
        _require(isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 0, "micro_batch_size",
                 "an integer >= 0", self.micro_batch_size)
        _require(self.kl_in in KL_PLACES, "kl_in", " or ".join(KL_PLACES), self.kl_in)
        _require(self.loss_aggregation in AGGREGATIONS, "loss_aggregation", " or ".join(AGGREGATIONS),
                 self.loss_aggregation)
        _require(self.kl_coef >= 0, "kl_coef", ">= 0", self.kl_coef)
        _require(self.kl_budget >= 0, "kl_budget", ">= 0", self.kl_budget)
        _require(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", "in [0, 1]", self.gae_lambda)
        _require(self.minibatch_size <= self.prompts_per_iteration, "minibatch_size",
                 f"<= prompts_per_iteration ({self.prompts_per_iteration})", self.minibatch_size)
        _require(self.method in RL_METHODS, "method", " or ".join(RL_METHODS), self.method)
        _require(isinstance(self.rloo_samples, int) and self.rloo_samples >= 2, "rloo_samples", "an integer >= 2",
                 self.rloo_samples)
        if self.method in GROUPED_METHODS:
            _require(self.prompts_per_iteration % self.rloo_samples == 0, "prompts_per_iteration",
                     f"a multiple of rloo_samples ({self.rloo_samples})", self.prompts_per_iteration)


@dataclass(frozen=True)
class DPOConfig:
    """An optional stage in place of reward model + PPO: DPO on the reward stage's pairs."""

    beta: float = _param(1.0, "the implicit reward's scale, beta * log(pi / pi_ref): larger keeps the policy "
                              "nearer the SFT model (0.1, common for large LMs, drifts to a KL of 6 nats here)")
    epochs: int = _param(2, "passes over the training pairs")
    batch_size: int = _param(64, "pairs per step")
    learning_rate: float = _param(1e-4, "AdamW step size")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            _require_positive_int(name, getattr(self, name))
        for name in ("beta", "learning_rate"):
            _require_finite(name, getattr(self, name))
            _require(getattr(self, name) > 0, name, "> 0", getattr(self, name))


DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class LMRunConfig:
    """Seeding, device, threads and where the run goes."""

    seed: int = _param(0, "seeds the data, every model's initialisation and every sample")
    device: str = _param("cpu", "cpu or cuda")
    threads: int = _param(2, "torch.set_num_threads on the CPU")
    runs_dir: str = _param("runs", "where run directories are created")

    def __post_init__(self) -> None:
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        _require(self.device in DEVICES, "device", " or ".join(DEVICES), self.device)
        _require_positive_int("threads", self.threads)
        _require(isinstance(self.runs_dir, str) and self.runs_dir.strip() != "", "runs_dir", "a non-empty path",
                 self.runs_dir)


SECTIONS: dict[str, type] = {"task": TaskConfig, "data": DataConfig, "model": ModelConfig, "sft": SFTConfig,
                             "reward": RewardConfig,
                             "ppo": PPOStageConfig, "dpo": DPOConfig, "run": LMRunConfig}


@dataclass(frozen=True)
class RLHFConfig:
    """A whole `proximal rlhf` run, one section per stage."""

    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    run: LMRunConfig = field(default_factory=LMRunConfig)

    def __post_init__(self) -> None:
        _require((self.task.name == FILE_TASK) == self.data.has_files, "task",
                 f"left out when --data.* files are given (the task is then your data), and not {FILE_TASK} "
                 "without them", self.task.name)
        _require(self.reward.labeller == "synthetic" or self.ppo.relabel_every == 0, "ppo.relabel_every",
                 "0 with --reward.labeller human (a person labels the reward stage's pairs; the rounds "
                 "during PPO are the synthetic labeller's)", self.ppo.relabel_every)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RLHFConfig:
        if not isinstance(data, dict) or not set(data) <= set(SECTIONS):
            raise ConfigError(f"an RLHF config has only the sections {sorted(SECTIONS)}")
        return cls(**{name: section_from_dict(name, section_cls, data[name])
                      for name, section_cls in SECTIONS.items()
                      if name in data})  # a section added since the run was made: its defaults

    @classmethod
    def for_task(cls, name: str, overrides: dict[str, dict[str, Any]] | None = None) -> RLHFConfig:
        """The defaults with the built-in task `name`'s preset applied (FILE_TASK has none), then
        `overrides` ({section: {field: value}}, the flags given) on top, in one step."""
        merged = {section: dict(values) for section, values in getattr(TASKS.get(name), "preset", {}).items()}
        for section, values in (overrides or {}).items():
            merged.setdefault(section, {}).update(values)
        merged.setdefault("task", {})["name"] = name
        return cls().with_overrides(merged)

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> RLHFConfig:
        """A copy with `{section: {field: value}}` applied (`replace_sections`)."""
        return replace_sections(self, overrides)


STUDIES = ("overoptimisation", "best-of-n", "methods", "label-noise")


@dataclass(frozen=True)
class StudyConfig:
    """What the studies vary; everything else is the pipeline's defaults."""

    seed: int = _param(100, "the pipeline seed of every variant (the pipeline's defaults were tuned on seeds 0-1)")
    threads: int = _param(1, "torch threads per run")
    label_budgets: tuple[int, ...] = _param((500, 2000, 20_000), "labels of the reward models compared (the "
                                                                  "largest, the pipeline's default, serves the "
                                                                  "methods and label-noise studies)")
    betas: tuple[float, ...] = _param((0.0, 0.01, 0.03, 0.1, 0.3, 1.0), "fixed KL coefficients of the "
                                                                          "over-optimisation sweep")
    iterations: int = _param(150, "PPO/RLOO iterations of every RL variant")
    best_of_n: tuple[int, ...] = _param((1, 2, 4, 8, 16, 32, 64), "the n of best-of-n")
    best_of_n_prompts: int = _param(200, "held-out prompts best-of-n is measured on")
    best_of_n_samples: int = _param(256, "SFT samples per prompt that find its responses")
    dpo_betas: tuple[float, ...] = _param((0.1, 0.3, 1.0, 3.0), "DPO's beta values")
    label_noise: tuple[float, ...] = _param((0.0, 0.1, 0.25), "labeller coin-flip rates")

    @property
    def most_labels(self) -> int:
        return max(self.label_budgets)

    def __post_init__(self) -> None:
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        for name in ("threads", "iterations", "best_of_n_prompts", "best_of_n_samples"):
            _require_positive_int(name, getattr(self, name))
        _require(len(self.label_budgets) > 0 and all(isinstance(n, int) and n >= 1 for n in self.label_budgets),
                 "label_budgets", "integers >= 1", self.label_budgets)
        for name in ("betas", "dpo_betas", "label_noise"):
            values = getattr(self, name)
            _require(len(values) > 0 and all(math.isfinite(v) and v >= 0 for v in values), name,
                     "finite values >= 0", values)
        _require(all(beta > 0 for beta in self.dpo_betas), "dpo_betas", "values > 0", self.dpo_betas)
        _require(len(self.best_of_n) > 0 and all(isinstance(n, int) and n >= 1 for n in self.best_of_n), "best_of_n",
                 "integers >= 1", self.best_of_n)
        _require(all(0 <= noise <= 1 for noise in self.label_noise), "label_noise", "values in [0, 1]",
                 self.label_noise)
