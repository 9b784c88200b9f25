"""What an LM stage receives (`StageContext`) and what it leaves behind.

Each stage (sft.py, reward.py, ppo.py, dpo.py) is a function `run_<stage>(ctx) -> summary` that
owns its loop. It reads the config, the task and its data, and the folders of the stages
before it through the context, writes only into its own folder, and is finished when its
summary.json exists; while it runs, checkpoint.pt (written atomically) holds where it is.

  RUN_DIR/STAGE/model/         the stage's model, a plain Hugging Face directory
  RUN_DIR/STAGE/metrics.csv    one row per step or iteration; STAGE.png drawn from it
  RUN_DIR/STAGE/summary.json   written last: the stage is finished

With --model.lora-rank R, the stages that train from the start model (reward, PPO/RLOO, DPO) train
LoRA adapters on it (`StageContext.trainable`, `load_policy`) and save it with them merged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from proximal.dist import DistContext
from proximal.errors import naming
from proximal.lm.config import RLHFConfig
from proximal.lm.data import FileTask
from proximal.lm.evaluation import evaluate_policy
from proximal.lm.memory import peak_gb
from proximal.lm.loading import (AdaptersOff, ReloadedReference, build_char_tokenizer, load_pretrained, load_tokenizer,
                                 save_pretrained, with_lora)
from proximal.lm.model import Completions, sample_completions
from proximal.lm.reward_function import RewardFunction
from proximal.lm.tasks import TASKS, DataSizes, Task, TaskData
from proximal.progress import LogLines, progress
from proximal.run import write_json_atomic

SUMMARY_NAME = "summary.json"
MODEL_DIR = "model"
START_DIR = "start"  # a .gguf --model.path, dequantised once into a plain HF directory (RUN_DIR/start/model)
PREFERENCE_PROMPT_SEED, RL_SEED, EVAL_SEED = 1, 2, 3  # offsets from the run's seed, one per random stream


def is_finished(stage_dir: Path) -> bool:
    return (stage_dir / SUMMARY_NAME).is_file()


def read_summary(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / SUMMARY_NAME).read_text())


def finish(stage_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the stage's summary, with the peak resident memory the process reached in the stage
    (`peak_memory_gb`): from now on the stage counts as finished."""
    summary["peak_memory_gb"] = peak_gb()
    write_json_atomic(stage_dir / SUMMARY_NAME, summary)
    return summary


def prompt_budget(config: RLHFConfig) -> int:
    """Prompts the RL stage draws from (enough that a prompt rarely repeats within an iteration)."""
    return max(4 * config.ppo.prompts_per_iteration, 2000)


def make_task(config: RLHFConfig) -> Task:
    """The built-in task the config names, or the user's files (`--data.*`)."""
    return FileTask(config.data) if config.data.has_files else TASKS[config.task.name].from_config(config.task)


@dataclass
class StageContext:
    config: RLHFConfig
    task: Task
    data: TaskData
    run_dir: Path | None
    show_progress: bool = False
    reward_function: RewardFunction | None = None
    tokenizer: Any = None  # the start tokenizer the data was encoded with (`start_tokenizer`), loaded once
    dist: DistContext = DistContext()  # this process of K (torchrun); rank 0 alone writes, labels, evaluates
    loaded_start: tuple | None = None  # (model, tokenizer) of a GGUF --model.path, from `check_start_model`

    @property
    def device(self) -> str:
        return self.dist.device if self.dist.distributed else self.config.run.device

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def progress(self, stage: str, total: int, initial: int = 0, unit: str = "step") -> tqdm | LogLines:
        return progress(total, stage, self.show_progress and self.dist.is_main, unit, initial)

    def gold(self, prompts: list[str], texts: list[str], ended) -> np.ndarray | None:
        """What a stage is measured by: the task's gold score, else the reward function; None
        when there is neither."""
        ended = ended.tolist() if isinstance(ended, torch.Tensor) else list(ended)
        gold = self.task.gold(prompts, texts, ended)
        if gold is None and self.reward_function is not None:
            return self.reward_function.gold(prompts, texts, ended)
        return gold

    @property
    def has_gold(self) -> bool:
        return self.task.has_gold or self.reward_function is not None

    def judge(self, prompts: list[str], texts: list[str], ended) -> np.ndarray | None:
        """What the synthetic labeller compares by: the reward function when one is given (it is
        what "better" means to the user), else the task's gold."""
        if self.reward_function is not None:
            return self.reward_function.gold(prompts, texts, ended)
        return self.gold(prompts, texts, ended)

    def evaluate(self, model: torch.nn.Module, tokenizer, reference: torch.nn.Module | None = None
                 ) -> dict[str, float]:
        """`evaluate_policy` on the held-out prompts; every rank calls it (each answers its share)."""
        prompts = self.data.evaluation
        return evaluate_policy(model, tokenizer, prompts, self.gold if self.has_gold else None,
                               self.task.slices(prompts), self.config.ppo.max_new_tokens, self.config.ppo.temperature,
                               self.config.run.seed + EVAL_SEED, self.device, reference, self.dist)

    def start_model_dir(self) -> Path | None:
        """The model the stages after SFT start from: the SFT stage's, or the user's (--model.path)
        when this run has no finished SFT stage."""
        if self.run_dir is not None and is_finished(self.stage_dir("sft")):
            return self.stage_dir("sft") / MODEL_DIR
        if self.config.model.path.endswith(".gguf") and self.run_dir is not None:
            return self.stage_dir(START_DIR) / MODEL_DIR
        return Path(self.config.model.path) if self.config.model.path else None

    def check_start_model(self) -> None:
        """Load --model.path before anything is written, so that truncated, empty or mismatched
        weights are one line then, not after config.json and a stage folder are (a run directory
        holding those refused the corrected flag). A GGUF file's dequantised model is kept for
        `prepare_start_model` to save (on rank 0): it is dequantised once."""
        prepared = self.run_dir is not None and (self.stage_dir(START_DIR) / MODEL_DIR / "config.json").is_file()
        if not self.config.model.path or prepared:
            return
        loaded = load_pretrained(self.config.model.path, self.device)
        if self.config.model.path.endswith(".gguf") and self.dist.is_main:
            self.loaded_start = loaded

    def prepare_start_model(self) -> None:
        """Dequantise a GGUF --model.path once into RUN_DIR/start/model (loading a GGUF file takes
        ~35 s on a 2-core CPU, the plain directory under a second)."""
        target = self.stage_dir(START_DIR) / MODEL_DIR
        if not self.config.model.path.endswith(".gguf") or (target / "config.json").is_file():
            return
        model, tokenizer = self.loaded_start or load_pretrained(self.config.model.path, self.device)
        self.loaded_start = None
        partial = target.with_name(MODEL_DIR + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_pretrained(model, tokenizer, partial)
        partial.rename(target)  # whole or absent: a kill mid-write leaves only the .partial folder

    def load_start_model(self):
        """(model, tokenizer) of `start_model_dir`, on the run's device."""
        return load_pretrained(self.start_model_dir(), self.device)

    def trainable(self, lm: torch.nn.Module) -> torch.nn.Module:
        """`lm` with LoRA adapters when --model.lora-rank > 0 (only they train), else `lm` itself."""
        rank = self.config.model.lora_rank
        return with_lora(lm, rank, self.config.model.lora_alpha, self.config.model.lora_layers) if rank else lm

    def load_policy(self):
        """(policy LM, reference, tokenizer), both from the start model: with LoRA, the policy
        carries adapters and the reference is the same weights with them disabled; otherwise
        the reference is a frozen copy, loaded from the start model's directory only while it is
        used (`ReloadedReference`; a GGUF file without a run directory to hold its plain copy is
        loaded once and kept)."""
        policy, tokenizer = self.load_start_model()
        if self.config.model.lora_rank:
            policy = self.trainable(policy)
            return policy, AdaptersOff(policy), tokenizer
        path = self.start_model_dir()
        if path.is_dir():
            return policy, ReloadedReference(path, self.device), tokenizer
        reference, _ = self.load_start_model()
        return policy, reference.requires_grad_(False), tokenizer

    def sft_samples(self, start_model: torch.nn.Module, tokenizer) -> Completions:
        """--reward.standardise-samples samples of the start model at the PPO temperature: the
        scores' reference point."""
        generator = torch.Generator(device=self.device).manual_seed(self.config.run.seed + EVAL_SEED)
        prompts = self.data.rl[:self.config.reward.standardise_samples]
        return sample_completions(start_model, tokenizer, prompts, self.config.ppo.max_new_tokens,
                                  self.config.ppo.temperature, generator, self.device)


def start_tokenizer(config: RLHFConfig, task: Task):
    """The tokenizer every stage shares: the user's model's, or a character tokenizer over the task."""
    if not config.model.path:
        return build_char_tokenizer(task.alphabet)
    with naming("--model.path"):
        return load_tokenizer(config.model.path)


def open_context(config: RLHFConfig, run_dir: Path | None, show_progress: bool = False, tokenizer=None,
                 dist: DistContext = DistContext()) -> StageContext:
    """The task, its data and the reward function of `config`: everything a stage reads besides
    the folders of the stages before it. Reads files only; writes nothing."""
    task = make_task(config)
    tokenizer = tokenizer if tokenizer is not None else start_tokenizer(config, task)
    sizes = DataSizes(config.task.demonstrations, config.reward.labels, prompt_budget(config),
                      config.task.eval_prompts, config.reward.validation_fraction)
    data = task.data(config.run.seed, sizes, tokenizer)
    function = (RewardFunction(config.reward.function, config.ppo.cut_response_score, config.reward.function_timeout)
                if config.reward.function else None)
    return StageContext(config, task, data, None if run_dir is None else Path(run_dir), show_progress, function,
                        tokenizer, dist)
