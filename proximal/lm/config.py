"""The LM pipeline's hyperparameters: one frozen dataclass per stage, nested in `RLHFConfig`.

`RLHFConfig` is the single source of truth of a `proximal rlhf` run: saved as config.json in the
run directory, and turned into command-line flags named after their section (`--sft.steps`,
`--ppo.kl-coef`; the run section's flags have no prefix: `--seed`, `--device`). Each field
declares its help line and the checks its value must pass (proximal/sections.py); they run when
the config is made, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from proximal.config import LABELLERS, LabellerSettings
from proximal.errors import ConfigError
from proximal.losses import AGGREGATIONS
from proximal.lm.tasks import TASKS
from proximal.sections import (FINITE, NON_EMPTY_PATH, NON_NEGATIVE_NUMBERS, PATH, POSITIVE_INT, POSITIVE_INTS, Check,
                               Section, above, at_least, int_at_least, one_of, replace_sections, require,
                               section_from_dict, setting, within)

FILE_TASK = "files"  # the task's name when the data comes from the user's files
MIN_TEMPERATURE = 0.01  # below it, logits / temperature overflow float32 (greedy decoding is the limit case)


@dataclass(frozen=True)
class TaskConfig(Section):
    """What the model learns and how the data is drawn."""

    name: str = setting("addition", f"the task: {', '.join(TASKS)}, or {FILE_TASK} (set by the --data.* files)")
    carry_noise: float = setting(0.6, "share of the carry prompts' demonstrations that drop the carry, in [0, 1]",
                                 within(0, 1))
    demonstrations: int = setting(20_000, "noisy demonstrations SFT imitates", POSITIVE_INT)
    eval_prompts: int = setting(500, "held-out prompts every stage is evaluated on (gold reward)", POSITIVE_INT)

    def check(self) -> None:
        require(self.name in (*TASKS, FILE_TASK), "task", " or ".join(TASKS), self.name)


@dataclass(frozen=True)
class DataConfig(Section):
    """A user's own data: JSON-lines files in the formats of TRL's dataset documentation, standard
    or conversational (docs/your_data.md). Any file given makes the run's task these files."""

    prompts: str = setting("", 'prompts PPO samples from: {"prompt": "..."} or {"prompt": [{"role": "user", '
                               '"content": "..."}]} per line', PATH)
    sft: str = setting("", 'demonstrations SFT imitates: {"prompt": ..., "completion": ...} or {"messages": [...]}',
                       PATH)
    preferences: str = setting("", 'labelled pairs for the reward model and DPO: {"prompt": ..., "chosen": ..., '
                                   '"rejected": ...} (or conversational chosen/rejected with the prompt inside)', PATH)
    eval_prompts: str = setting("", "held-out prompts to evaluate on, in the prompts format (empty: a seeded "
                                    "--data.eval-fraction of --data.prompts)", PATH)
    eval_preferences: str = setting("", "held-out labelled pairs (empty: a seeded --reward.validation-fraction "
                                        "of --data.preferences)", PATH)
    eval_fraction: float = setting(0.1, "share of --data.prompts held out for evaluation when no "
                                        "--data.eval-prompts is given, in (0, 1)",
                                   FINITE, Check("in (0, 1)", lambda value: 0.0 < value < 1.0))

    @property
    def has_files(self) -> bool:
        return any((self.prompts, self.sft, self.preferences, self.eval_prompts, self.eval_preferences))


@dataclass(frozen=True)
class ModelConfig(Section):
    """The policy's network: a local Hugging Face directory, or a tiny GPT-2 trained from scratch."""

    path: str = setting("", "a local directory with a Hugging Face causal LM and its tokenizer, or a .gguf file "
                            "(dequantised on load): SFT starts from it, or, when the run has no SFT stage "
                            "(--stages reward,ppo), every later stage does (empty: a tiny GPT-2 from a local config)")
    lora_rank: int = setting(0, "LoRA adapters of this rank on every linear layer of the reward model's and the "
                                "policy's body (the reference is the policy with its adapters disabled); 0: "
                                "every weight trains", int_at_least(0))
    lora_alpha: float = setting(32.0, "LoRA's scale alpha (the adapters' output is multiplied by alpha / rank)",
                                above(0))
    lora_layers: int = setting(0, "LoRA on the top this many transformer blocks only (0: all): the backward pass "
                                  "stops below them", int_at_least(0))
    width: int = setting(64, "tiny GPT-2: embedding width", POSITIVE_INT)
    layers: int = setting(2, "tiny GPT-2: transformer blocks", POSITIVE_INT)
    heads: int = setting(4, "tiny GPT-2: attention heads (must divide width)", POSITIVE_INT)
    context: int = setting(16, "tiny GPT-2: longest sequence, prompt + response, in tokens", POSITIVE_INT)

    def check(self) -> None:
        require(self.width % self.heads == 0, "heads", f"a divisor of width {self.width}", self.heads)


@dataclass(frozen=True)
class SFTConfig(Section):
    """Supervised fine-tuning on the demonstrations."""

    steps: int = setting(1600, "AdamW steps", POSITIVE_INT)
    batch_size: int = setting(128, "demonstrations per step", POSITIVE_INT)
    learning_rate: float = setting(3e-3, "peak AdamW step size (linear warm-up, then linear decay to 0)", above(0))
    warmup_steps: int = setting(100, "steps of linear warm-up (at most a tenth of --sft.steps, plus one)",
                                POSITIVE_INT)
    adam_beta1: float = setting(0.9, "AdamW beta1", within(0, 1, high_open=True))
    adam_beta2: float = setting(0.98, "AdamW beta2", within(0, 1, high_open=True))
    weight_decay: float = setting(0.0, "AdamW weight decay", at_least(0))
    max_grad_norm: float = setting(1.0, "clip the global gradient norm to this", above(0))
    checkpoint_every: int = setting(200, "steps between checkpoints a killed stage resumes from", POSITIVE_INT)


LM_LABELLERS = tuple(kind for kind in LABELLERS if kind != "replay")  # a run's own labels replay by --run-dir
FUNCTION_ROLES = ("reward", "labeller")
POOLINGS = ("last", "mean")


@dataclass(frozen=True)
class RewardConfig(LabellerSettings):
    """The labelled pairs, who labels them (`LabellerSettings`), and the reward model fitted to them."""

    labeller: str = setting("synthetic", "synthetic (the gold reward decides, with --reward.labeller-noise) or human "
                                         "(a person on a local web page whose URL is printed; needs "
                                         "--ppo.relabel-every 0, and a --reward.labels a person can answer)",
                            one_of(LM_LABELLERS))
    labeller_temperature: float = setting(0.25, "the Boltzmann labeller's temperature, > 0", above(0))
    labels: int = setting(20_000, "pairs of SFT samples the labeller compares (one prompt per pair; with --data.* "
                                  "files, at most one pair per training prompt)", POSITIVE_INT)
    function: str = setting("", "a reward function, module:callable or path/to/file.py:callable, taking (prompts, "
                                "completions) and returning one float each (see --reward.function-role)",
                            Check("module:callable or path/to/file.py:callable",
                                  lambda value: isinstance(value, str) and (value == "" or ":" in value)))
    function_role: str = setting("reward", "reward (PPO/RLOO optimise the function itself; no reward model is "
                                           "fitted) or labeller (the synthetic labeller prefers the completion the "
                                           "function scores higher, and a reward model is fitted to its answers)",
                                 one_of(FUNCTION_ROLES))
    function_timeout: float = setting(0.0, "seconds one call of --reward.function may take before the run stops "
                                           "with the checkpoint kept (0: no limit; a call past 30 s is announced "
                                           "either way)",
                                      at_least(0, "0: no limit"))
    sample_temperature: float = setting(1.5, "temperature the SFT samples of a pair are drawn at: above 1 "
                                             "makes varied wrong answers, which refute a shortcut",
                                        at_least(MIN_TEMPERATURE))
    samples_per_prompt: int = setting(4, "SFT samples drawn per prompt; the pair is the first and the first "
                                         "that differs from it (when any does)", int_at_least(2))
    validation_fraction: float = setting(0.2, "share of the pairs held out to measure accuracy",
                                         within(0, 1, high_open=True))
    standardise_samples: int = setting(1024, "start-model samples (at the PPO temperature) whose scores the reward "
                                             "model is shifted and scaled to mean 0, std 1 on", POSITIVE_INT)
    pooling: str = setting("last", "where the scalar head reads the response: last (its last token, the EOS) or "
                                   "mean (the mean over its tokens: suits a score that adds up words, like VADER)",
                           one_of(POOLINGS))
    blocks: int = setting(0, "the reward model's body: the start model's bottom this many transformer blocks and its "
                             "final norm (0: every block); fewer cost less to fit and to score with", int_at_least(0))
    epochs: int = setting(8, "passes over the training pairs", POSITIVE_INT)
    batch_size: int = setting(64, "pairs per step", POSITIVE_INT)
    learning_rate: float = setting(3e-4, "AdamW step size", above(0))
    validations: int = setting(20, "accuracy checks on the held-out pairs during the fit (the last, at its end, is "
                                   "the stage's); each costs a forward pass over them", POSITIVE_INT)
    keep_best: bool = setting(False, "keep the reward model as it was at its validation of highest agreement with "
                                     "the labeller on the held-out pairs (the later on a tie), not as the fit ends")


RL_METHODS = ("ppo", "rloo", "grpo")
GROUPED_METHODS = ("rloo", "grpo")  # k samples per prompt, baselined within their group
KL_PLACES = ("reward", "loss")


@dataclass(frozen=True)
class PPOStageConfig(Section):
    """The RL stage: PPO on the reward model's score with a per-token KL penalty to the SFT model
    (or RLOO, the critic-free alternative, with the same penalty, samples and update)."""

    method: str = setting("ppo", "ppo (value head, GAE over tokens), rloo (no critic: each of k samples of a "
                                 "prompt is baselined by the mean reward of the other k - 1; Ahmadian et al. 2024) "
                                 "or grpo (no critic: the k samples' rewards minus their mean, over their std; "
                                 "Shao et al. 2024)", one_of(RL_METHODS))
    rloo_samples: int = setting(4, "rloo and grpo: samples per prompt, k >= 2 (the prompts per iteration are "
                                   "prompts_per_iteration / k)", int_at_least(2))
    group_std: bool = setting(True, "grpo: divide each group's advantages by its reward std (off: Dr. GRPO, "
                                    "Liu et al. 2025)")
    iterations: int = setting(250, "rollout + update cycles", POSITIVE_INT)
    prompts_per_iteration: int = setting(256, "responses sampled per iteration (B); one per prompt for ppo",
                                         POSITIVE_INT)
    max_new_tokens: int = setting(5, "length limit of a response, EOS included", POSITIVE_INT)
    temperature: float = setting(1.0, "sampling temperature; the same one divides the logits of the policy and "
                                      "the reference whenever log-probs are computed", at_least(MIN_TEMPERATURE))
    epochs: int = setting(2, "passes over each rollout", POSITIVE_INT)
    minibatch_size: int = setting(128, "responses per gradient step", POSITIVE_INT)
    micro_batch_size: int = setting(0, "responses per forward and backward pass inside a minibatch; the passes' "
                                       "gradients add up to the minibatch's (0: as many as keep a pass's activations "
                                       "and logits near 256 MiB, lm/memory.py)", int_at_least(0))
    learning_rate: float = setting(2e-4, "AdamW step size", above(0))
    clip_coef: float = setting(0.2, "clip range epsilon of Eq. 7", above(0))
    clip_coef_high: float = setting(0.0, "the clip range's upper side, 1 + this (DAPO's clip-higher, e.g. 0.28; "
                                         "0: --ppo.clip-coef)", at_least(0))
    loss_aggregation: str = setting("token", "how the per-token loss is averaged: token (every token of the "
                                             "minibatch weighs the same), sequence (every response does: GRPO) or "
                                             "constant (the sum over responses x --ppo.max-new-tokens: Dr. GRPO)",
                                    one_of(AGGREGATIONS))
    vf_coef: float = setting(0.5, "weight of the value head's loss", at_least(0))
    gae_lambda: float = setting(0.95, "GAE lambda over the response tokens (gamma is 1)", within(0, 1))
    kl_coef: float = setting(0.3, "beta: weight of the per-token KL penalty to the SFT model (initial value "
                                  "when --ppo.adaptive-kl), >= 0", at_least(0))
    kl_in: str = setting("reward", "where the KL penalty goes: reward (beta * k1 per token in the reward, "
                                   "InstructGPT) or loss (beta * k3 per token added to the loss, GRPO as TRL has it)",
                         one_of(KL_PLACES))
    adaptive_kl: bool = setting(True, "adapt beta towards --ppo.kl-target (Ziegler et al. 2019)")
    kl_target: float = setting(0.5, "adaptive KL: the KL per response (nats) beta steers towards", above(0))
    kl_horizon: int = setting(2000, "adaptive KL: responses over which beta moves by up to 20%", POSITIVE_INT)
    missing_eos_score: float = setting(-3.0, "the score of a response cut at the length limit without EOS "
                                             "(reward-model scores are standardised on SFT samples)", FINITE)
    score_cut_responses: bool = setting(False, "score a response cut at the length limit as it stands (as TRL "
                                               "does) instead of giving it --ppo.missing-eos-score")
    max_grad_norm: float = setting(1.0, "clip the global gradient norm to this", above(0))
    relabel_every: int = setting(10, "every this many iterations, the labeller compares policy samples with SFT "
                                     "samples; the reward model's agreement with those fresh answers is logged, "
                                     "then it is refitted on every label so far (0: never)", int_at_least(0))
    relabel_pairs: int = setting(256, "pairs labelled per relabelling round (capped at prompts_per_iteration)",
                                 POSITIVE_INT)
    refit_steps: int = setting(50, "reward-model AdamW steps after each relabelling round", POSITIVE_INT)
    kl_budget: float = setting(0.0, "stop before --ppo.iterations once the training samples' KL to the start model "
                                    "(k1, nats per response, the mean over the last --ppo.kl-budget-window "
                                    "iterations) reaches this (0: always run every iteration)", at_least(0))
    kl_budget_window: int = setting(3, "iterations whose sample KLs --ppo.kl-budget averages", POSITIVE_INT)
    eval_every: int = setting(10, "iterations between evaluations of the policy on held-out prompts", POSITIVE_INT)
    snapshot_every: int = setting(10, "every this many iterations (and at the first), record every per-token "
                                      "quantity of a few completions to ppo/snapshots.jsonl for `proximal inspect` "
                                      "(0: never)", int_at_least(0))
    snapshot_prompts: int = setting(4, "fixed RL prompts a snapshot answers (k times each for rloo); never trained on",
                                    POSITIVE_INT)

    @property
    def group_size(self) -> int:
        """Samples per prompt: k for rloo and grpo, 1 for ppo."""
        return self.rloo_samples if self.method in GROUPED_METHODS else 1

    @property
    def old_logprobs_in_update(self) -> bool:
        """Whether the rollout can skip its policy pass and the update's first epoch take the old
        log-probs from its own passes (detached: a ratio of exactly 1): true when no critic's
        values are needed (RLOO, GRPO) and one minibatch takes the whole batch, so the first
        epoch runs before the first step. A KL in the reward then reads the log-probs the sampler
        drew each token with (lm/rollout.py)."""
        return self.method != "ppo" and self.minibatch_size == self.prompts_per_iteration

    @property
    def clip_high(self) -> float:
        return self.clip_coef_high or self.clip_coef

    @property
    def cut_response_score(self) -> float | None:
        """What a response cut at the length limit scores: missing_eos_score, or None (scored as it stands)."""
        return None if self.score_cut_responses else self.missing_eos_score

    def check(self) -> None:
        require(self.minibatch_size <= self.prompts_per_iteration, "minibatch_size",
                f"<= prompts_per_iteration ({self.prompts_per_iteration})", self.minibatch_size)
        if self.method in GROUPED_METHODS:
            require(self.prompts_per_iteration % self.rloo_samples == 0, "prompts_per_iteration",
                    f"a multiple of rloo_samples ({self.rloo_samples})", self.prompts_per_iteration)


@dataclass(frozen=True)
class DPOConfig(Section):
    """An optional stage in place of reward model + PPO: DPO on the reward stage's pairs."""

    beta: float = setting(1.0, "the implicit reward's scale, beta * log(pi / pi_ref): larger keeps the policy "
                               "nearer the SFT model (0.1, common for large LMs, drifts to a KL of 6 nats here)",
                          above(0))
    epochs: int = setting(2, "passes over the training pairs", POSITIVE_INT)
    batch_size: int = setting(64, "pairs per step", POSITIVE_INT)
    learning_rate: float = setting(1e-4, "AdamW step size", above(0))


DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class LMRunConfig(Section):
    """Seeding, device, threads and where the run goes."""

    seed: int = setting(0, "seeds the data, every model's initialisation and every sample", int_at_least(0))
    device: str = setting("cpu", "cpu or cuda", one_of(DEVICES))
    threads: int = setting(2, "torch.set_num_threads on the CPU", POSITIVE_INT)
    runs_dir: str = setting("runs", "where run directories are created", NON_EMPTY_PATH)


SECTIONS: dict[str, type] = {"task": TaskConfig, "data": DataConfig, "model": ModelConfig, "sft": SFTConfig,
                             "reward": RewardConfig,
                             "ppo": PPOStageConfig, "dpo": DPOConfig, "run": LMRunConfig}


@dataclass(frozen=True)
class RLHFConfig(Section):
    """A whole `proximal rlhf` run, one section per stage."""

    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    run: LMRunConfig = field(default_factory=LMRunConfig)

    def check(self) -> None:
        require((self.task.name == FILE_TASK) == self.data.has_files, "task",
                f"left out when --data.* files are given (the task is then your data), and not {FILE_TASK} "
                "without them", self.task.name)
        require(self.reward.labeller == "synthetic" or self.ppo.relabel_every == 0, "ppo.relabel_every",
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
class StudyConfig(Section):
    """What the studies vary; everything else is the pipeline's defaults."""

    seed: int = setting(100, "the pipeline seed of every variant (the pipeline's defaults were tuned on seeds 0-1)",
                        int_at_least(0))
    threads: int = setting(1, "torch threads per run", POSITIVE_INT)
    label_budgets: tuple[int, ...] = setting((500, 2000, 20_000), "labels of the reward models compared (the "
                                                                  "largest, the pipeline's default, serves the "
                                                                  "methods and label-noise studies)", POSITIVE_INTS)
    betas: tuple[float, ...] = setting((0.0, 0.01, 0.03, 0.1, 0.3, 1.0), "fixed KL coefficients of the "
                                                                         "over-optimisation sweep",
                                       NON_NEGATIVE_NUMBERS)
    iterations: int = setting(150, "PPO/RLOO iterations of every RL variant", POSITIVE_INT)
    best_of_n: tuple[int, ...] = setting((1, 2, 4, 8, 16, 32, 64), "the n of best-of-n", POSITIVE_INTS)
    best_of_n_prompts: int = setting(200, "held-out prompts best-of-n is measured on", POSITIVE_INT)
    best_of_n_samples: int = setting(256, "SFT samples per prompt that find its responses", POSITIVE_INT)
    dpo_betas: tuple[float, ...] = setting((0.1, 0.3, 1.0, 3.0), "DPO's beta values", NON_NEGATIVE_NUMBERS,
                                           Check("values > 0", lambda values: all(v > 0 for v in values)))
    label_noise: tuple[float, ...] = setting((0.0, 0.1, 0.25), "labeller coin-flip rates", NON_NEGATIVE_NUMBERS,
                                             Check("values in [0, 1]", lambda values: all(v <= 1 for v in values)))

    @property
    def most_labels(self) -> int:
        return max(self.label_budgets)
